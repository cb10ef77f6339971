"""The studies' bookkeeping (engine/study.py): which finished runs are reused, continued or
refused, and the means, standard errors and paired differences over seeds, on run folders
written by hand (nothing trains)."""
import json
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from engine.study import mean_and_se, paired_difference, summarise_seeds, train_or_reuse


def write_run(out, config, metrics=None, checkpoint=False):
    """A run folder as the training scripts leave it: the config, the test metrics when it
    finished, checkpoint_last.pth once an epoch ended."""
    out.mkdir(parents=True)
    with open(out / "config.yaml", "w") as f:
        YAML(typ="safe").dump(config, f)
    if metrics is not None:
        (out / "test_metrics.json").write_text(json.dumps({"metrics": metrics}))
    if checkpoint:
        (out / "checkpoint_last.pth").write_bytes(b"")


class Recorder:
    """A training script's main that records its arguments and finishes the run."""

    def __init__(self, metrics):
        self.metrics, self.calls = metrics, []

    def __call__(self, argv):
        self.calls.append(argv)
        out = Path(argv[argv.index("--output_dir") + 1])
        out.mkdir(exist_ok=True)
        (out / "test_metrics.json").write_text(json.dumps({"metrics": self.metrics}))


def test_a_finished_run_with_the_same_values_is_reused(tmp_path):
    write_run(tmp_path / "run", {"seed": 1, "max_epoch": 2, "lr": 0.1}, {"t2v_r1": 50.0})
    train = Recorder({"t2v_r1": 0.0})
    assert train_or_reuse(train, tmp_path / "c.yaml", {"seed": 1, "max_epoch": 2},
                          tmp_path / "run") == {"t2v_r1": 50.0}
    assert train.calls == []


def test_a_finished_run_with_other_values_is_an_error_naming_the_key(tmp_path):
    write_run(tmp_path / "run", {"seed": 1, "max_epoch": 1}, {"t2v_r1": 50.0})
    with pytest.raises(SystemExit, match=r"run: a run with max_epoch=1, not 2; remove the folder"):
        train_or_reuse(Recorder({}), tmp_path / "c.yaml", {"seed": 1, "max_epoch": 2},
                       tmp_path / "run")


def test_a_stopped_run_continues_and_a_missing_one_starts(tmp_path):
    write_run(tmp_path / "stopped", {"seed": 1}, checkpoint=True)
    train = Recorder({"accuracy": 31.0})
    assert train_or_reuse(train, tmp_path / "c.yaml", {"seed": 1, "text_guided_k": None},
                          tmp_path / "stopped") == {"accuracy": 31.0}
    assert train_or_reuse(train, tmp_path / "c.yaml", {"seed": 2}, tmp_path / "new") == {
        "accuracy": 31.0}
    assert train.calls == [
        ["--config", str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "stopped"),
         "--resume", "--opts", "seed=1", "text_guided_k=null"],
        ["--config", str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "new"),
         "--overwrite", "--opts", "seed=2"]]


# hand-made t2v R@1 per setting and seed
RUNS = {"off": {0: {"t2v_r1": 50.0}, 1: {"t2v_r1": 54.0}, 2: {"t2v_r1": 58.0}},
        "text_k5": {0: {"t2v_r1": 42.0}, 1: {"t2v_r1": 44.0}, 2: {"t2v_r1": 49.0}}}


def test_means_and_standard_errors_over_seeds():
    assert summarise_seeds(RUNS["off"]) == {"t2v_r1": {"mean": 54.0, "se": 2.309, "n": 3}}  # 4 / sqrt 3
    assert mean_and_se([3.0])["se"] != mean_and_se([3.0])["se"]  # NaN for one value


def test_paired_differences_go_seed_by_seed():
    # text - off = -8, -10, -9: mean -9, stdev 1
    assert paired_difference(RUNS["text_k5"], RUNS["off"], "t2v_r1") == {
        "mean": -9.0, "se": 0.577, "n": 3}
