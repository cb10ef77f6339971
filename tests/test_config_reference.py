"""docs/config_keys.md is generated from the settings declarations and must be current;
every key of every script's schema is in it once."""
import re
from pathlib import Path

from tasks import TASKS
from tools import config_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "config_keys.md"


def test_committed_key_reference_is_current():
    assert DOC.read_text() == config_reference.render(), \
        "run python tools/config_reference.py and commit docs/config_keys.md"
    assert config_reference.main(["--check"]) == 0


def test_every_schema_key_is_documented_once():
    documented = re.findall(r"^\| `(\w+)` \|", DOC.read_text(), flags=re.MULTILINE)
    schema_keys = {name for task in TASKS.values() for name in task.schema}
    # keys read by different code per script (data roots, frames) are declared per group
    assert set(documented) == schema_keys
    for name in ("init_lr", "testa_r", "aggregation", "max_words", "amp"):
        assert documented.count(name) == 1
