"""tools/text_guided_study.py --train's bookkeeping: which finished runs it reuses, and the
means, standard errors and paired differences over seeds (on run folders written by hand,
so nothing trains)."""
import argparse
import json

import pytest
from ruamel.yaml import YAML

from tools import text_guided_study as study


def write_run(runs, task, name, seed, args, metrics):
    """A finished run folder as train_retrieval.py / train_videoqa.py leave it: the config
    with the study's values and the test metrics."""
    out = runs / task / f"{name}_seed{seed}"
    out.mkdir(parents=True)
    data = args.data if task == "retrieval" else args.qa_data
    config = {"video_root": str(data / "videos"), "ann_root": str(data / "annotations"),
              **study.SETTINGS[name], "seed": seed}
    if task == "retrieval":
        config.update(pretrained=str(args.base), max_epoch=args.epochs, init_lr=args.lr,
                      min_lr=args.lr / 2)
    else:
        config["max_epoch"] = args.qa_epochs
    with open(out / "config.yaml", "w") as f:
        YAML(typ="safe").dump(config, f)
    (out / "test_metrics.json").write_text(json.dumps({"metrics": metrics}))


def study_args(tmp_path, **changes):
    values = dict(base=tmp_path / "base.pth", data=tmp_path / "no_data",
                  qa_data=tmp_path / "no_qa_data", runs=tmp_path / "runs", epochs=1,
                  qa_epochs=4, lr=2e-4, seeds=[0, 1, 2],
                  settings=["off", "similarity_k5", "text_k5"], qa_settings=["off", "text_k5"])
    return argparse.Namespace(**{**values, **changes})


def recalls(r1):
    return {key: (r1 if key.endswith("r1") else 100.0) for key in study.RECALLS}


# hand-made t2v R@1 and accuracy per setting and seed
R1 = {"off": [50.0, 54.0, 58.0], "similarity_k5": [40.0, 46.0, 43.0], "text_k5": [42.0, 44.0, 49.0]}
ACCURACY = {"off": [30.0, 32.0, 31.0], "text_k5": [29.0, 30.0, 34.0]}


@pytest.fixture
def finished(tmp_path):
    args = study_args(tmp_path)
    for seed in args.seeds:
        for name, values in R1.items():
            write_run(args.runs, "retrieval", name, seed, args, recalls(values[seed]))
        for name, values in ACCURACY.items():
            write_run(args.runs, "videoqa", name, seed, args, {"accuracy": values[seed]})
    return args


def test_finished_runs_are_reused_and_summarised_over_seeds(finished):
    # the data folders do not exist: a run that trained would fail
    trained = study.train_runs(finished)
    off = trained["retrieval"]["off"]["t2v_r1"]
    assert off == {"mean": 54.0, "se": 2.309, "n": 3}  # stdev 4 / sqrt 3
    assert trained["videoqa"].keys() == {"off", "text_k5"}
    assert trained["videoqa"]["text_k5"]["accuracy"]["mean"] == pytest.approx(31.0)
    # seed by seed: text - similarity = 2, -2, 6: mean 2, stdev 4
    assert trained["differences"]["text_k5 - similarity_k5"] == {
        "retrieval_t2v_r1": {"mean": 2.0, "se": 2.309, "n": 3},
        "retrieval_v2t_r1": {"mean": 2.0, "se": 2.309, "n": 3}}  # no VideoQA control run
    # text - off = -8, -10, -9 (R@1) and -1, -2, 3 (accuracy)
    minus_off = trained["differences"]["text_k5 - off"]
    assert minus_off["retrieval_t2v_r1"] == {"mean": -9.0, "se": 0.577, "n": 3}
    assert minus_off["videoqa_accuracy"] == {"mean": 0.0, "se": 1.528, "n": 3}


def test_no_videoqa_runs_with_qa_epochs_0(finished):
    finished.qa_epochs = 0
    assert set(study.train_runs(finished)) == {"retrieval", "differences", "runs"}


def test_a_finished_run_with_other_settings_is_an_error(finished):
    finished.epochs = 2
    with pytest.raises(SystemExit, match=r"off_seed0: a run with max_epoch=1, not 2"):
        study.train_runs(finished)
