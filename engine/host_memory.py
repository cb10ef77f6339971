"""Host memory: freed blocks kept in the process for reuse.

glibc's malloc gives a large block (from 128 KiB, up to 32 MiB as its threshold adapts,
and every block above that) fresh pages from the system and returns them when the block is
freed, so a forward that allocates activations of that size pays a page fault for every
4 KiB of them, every time. At 32 frames the faults took a tenth of a bfloat16 encoder
forward on a 2-core EPYC (docs/efficiency.md, section 4). With every block served from the
heap and freed memory kept there, as PyTorch's GPU allocator keeps its cache, the next
forward reuses the same pages. The process's resident memory then stays near its peak
instead of falling back between steps, plus a few gaps the heap cannot reuse (aligned
blocks of another size). The scripts and `testa.load` set this when the model runs on a
CPU; on a GPU the activations are not in host memory and the data loader's workers are
better off returning what they free.
"""
import ctypes
import ctypes.util
import os
import sys
from typing import Optional, Union

import torch

# mallopt(3) parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_ABOVE = 2**31 - 1  # free bytes at the heap top before any go back: mallopt's largest


def allocator_chosen_by_environment() -> Optional[str]:
    """The variable by which the environment already tunes glibc's malloc, if any (an
    allocator preloaded in its place, such as jemalloc, ignores mallopt anyway)."""
    return next((name for name in sorted(os.environ) if name == "GLIBC_TUNABLES"
                 or name.startswith("MALLOC_")), None)


def keep_freed_memory(device: Union[str, torch.device]) -> Optional[str]:
    """For a model running on `device`, have glibc's malloc serve every block from the heap
    (no block of its own mapping) and keep what is freed there for reuse. Returns None
    when done, else why the allocator was left as it is: the model is not on a CPU, not
    Linux with glibc, or the environment's own choice (a `MALLOC_*` variable or
    `GLIBC_TUNABLES`; setting one, even empty, opts out)."""
    if torch.device(device).type != "cpu":
        return f"malloc left as it is: the model runs on {torch.device(device).type}"
    if not sys.platform.startswith("linux"):
        return f"malloc left as it is on {sys.platform}"
    chosen = allocator_chosen_by_environment()
    if chosen is not None:
        return f"malloc left as {chosen} sets it"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # glibc only: mallopt's parameters differ elsewhere
    except (OSError, AttributeError):
        return "malloc left as it is: the C library is not glibc"
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE)):
        return "malloc left as it is: glibc refused the settings"
    return None
