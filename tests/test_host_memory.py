"""Host memory: with freed memory kept, a block allocated again costs no page faults."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.host_memory import allocator_chosen_by_environment, keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr(
    "CS_GNU_LIBC_VERSION") is None, reason="mallopt settings are glibc's")

# allocates and frees a 64 MiB tensor (filled, so every page is touched) 20 times, then 5
# more, and reports the page faults of the last 5 and the growth of the resident set
FAULTS = """
import json, resource, sys
import torch
from engine.host_memory import keep_freed_memory
def resident_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20
reason = keep_freed_memory("cpu") if sys.argv[1] == "keep" else "not asked"
start = resident_mb()
for _ in range(20):
    torch.empty(2**24).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(2**24).fill_(1)
print(json.dumps(dict(reason=reason, growth_mb=resident_mb() - start,
                      faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)))
"""


def faults(mode: str, **env) -> dict:
    environment = {key: value for key, value in os.environ.items()
                   if key != "GLIBC_TUNABLES" and not key.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, check=True,
                            capture_output=True, text=True, env={**environment, **env})
    return json.loads(result.stdout.splitlines()[-1])


@glibc_only
def test_kept_memory_is_reused_without_page_faults():
    # each of the five blocks comes from fresh pages: a fault per page (per huge page
    # where the kernel backs them so), at least one a block
    assert faults("default")["faults"] >= 5
    kept = faults("keep")
    assert kept["reason"] is None
    assert kept["faults"] < 5  # a freed block served again
    # what is kept is bounded: glibc's aligned blocks leave a few 64 MiB gaps, no more
    assert kept["growth_mb"] < 16 * 64


@glibc_only
def test_the_environment_s_own_malloc_settings_are_left_alone():
    kept = faults("keep", MALLOC_ARENA_MAX="4")
    assert kept["reason"] == "malloc left as MALLOC_ARENA_MAX sets it"
    assert kept["faults"] >= 5


def test_any_malloc_variable_or_tunables_opts_out(monkeypatch):
    for name in [key for key in os.environ if key == "GLIBC_TUNABLES" or key.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    assert allocator_chosen_by_environment() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "")  # set, even empty
    assert allocator_chosen_by_environment() == "GLIBC_TUNABLES"
    assert keep_freed_memory("cpu") in ("malloc left as GLIBC_TUNABLES sets it",
                                   f"malloc left as it is on {sys.platform}")
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")
    assert allocator_chosen_by_environment() == "MALLOC_TOP_PAD_"


def test_a_model_off_the_cpu_leaves_malloc_alone():
    assert keep_freed_memory("cuda:0") == "malloc left as it is: the model runs on cuda"
