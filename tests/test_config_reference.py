"""docs/config_keys.md is generated from the settings declarations and must be current;
every key of every script's schema is in it once, under its group's title and module."""
import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from tasks import TASKS
from tools import config_reference
from utils import Setting, compose

DOC = Path(__file__).resolve().parents[1] / "docs" / "config_keys.md"


def test_committed_key_reference_is_current():
    assert config_reference.main(["--check"]) == 0, \
        "run python tools/config_reference.py and commit docs/config_keys.md"


def test_every_schema_key_is_documented_once():
    documented = re.findall(r"^\| `(\w+)` \|", DOC.read_text(), flags=re.MULTILINE)
    schema_keys = {name for task in TASKS.values() for name in task.schema}
    # keys read by different code per script (data roots, frames) are declared per group
    assert set(documented) == schema_keys
    for name in ("init_lr", "testa_r", "aggregation", "max_words", "amp"):
        assert documented.count(name) == 1


def test_every_group_is_declared_where_it_says():
    """The module a group names defines it (the reference's `Declared in`), and the
    reference has one section per group, under its title."""
    sections = re.findall(r"^## (.+)\n\nDeclared in `(.+)`", DOC.read_text(), flags=re.MULTILINE)
    groups = {id(group): group for task in TASKS.values() for group in task.schema.groups}
    assert len(sections) == len(groups)
    for group in groups.values():
        module = importlib.import_module(group.module)
        assert any(value is group for value in vars(module).values()), group.title
        assert (group.title, group.module.replace(".", "/") + ".py") in sections


def test_a_task_with_an_untitled_group_is_refused(monkeypatch):
    untitled = compose({"dataset": Setting(str, "x", "the data", choices=("x",))})
    monkeypatch.setitem(TASKS, "fourth", dataclasses.replace(TASKS["videoqa"], name="fourth",
                                                             schema=untitled))
    with pytest.raises(ValueError, match=r"fourth schema has a settings group without a title"):
        config_reference.main(["--check"])
