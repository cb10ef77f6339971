"""tools/demo.py --quick for every task, the synthetic set's settings stamp, and
tools/make_pretrain_list.py."""
import json
from collections import Counter

import pytest

from datasets import DataError
from datasets.synthetic import SETTINGS_FILE, GenerationSettings, check_stamp
from tools import demo, make_pretrain_list, make_synthetic

RECALL_KEYS = ["t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "v2t_r5", "v2t_r10"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One folder for the quick demos: they share data/synthetic_quick."""
    return tmp_path_factory.mktemp("demo")


@pytest.mark.slow
def test_quick_retrieval_demo_writes_results_and_picture(root):
    results = demo.main(["--quick", "--root", str(root)])
    written = json.loads((root / "output" / "demo_quick" / "results.json").read_text())
    assert written == results
    assert set(written) == {*RECALL_KEYS, "chance", "gmacs_agg", "gmacs_noagg", "minutes"}
    assert written["chance"] == pytest.approx(100 / 8)  # 8 held-out videos
    for key in RECALL_KEYS:
        assert 0 <= written[key] <= 100
    assert written["t2v_r10"] == 100  # k = 10 > 8 videos
    assert 0 < written["gmacs_agg"] < written["gmacs_noagg"]
    picture = root / "output" / "demo_quick" / "aggregation.png"
    assert picture.stat().st_size > 10_000


@pytest.mark.slow
def test_quick_videoqa_demo_reports_accuracy_and_majority_baseline(root):
    results = demo.main(["--task", "videoqa", "--quick", "--root", str(root)])
    output = root / "output" / "demo_videoqa_quick"
    assert json.loads((output / "results.json").read_text()) == results
    annotations = root / "data" / "synthetic_quick" / "annotations"
    train = Counter(r["answer"] for r in json.loads((annotations / "train_a.json").read_text()))
    test = [r["answer"] for r in json.loads((annotations / "test_a.json").read_text())]
    majority = max(train, key=train.get)
    assert train[results["majority_answer"]] == train[majority]
    assert results["majority_baseline"] == pytest.approx(
        100 * test.count(results["majority_answer"]) / len(test), abs=0.01)
    assert results["num_test_questions"] == len(test) == 20  # 4 test videos, 5 questions each
    answers = json.loads((output / "test_answers.json").read_text())
    correct = sum(a["answer"] == a["ground_truth"] for a in answers)
    assert results["accuracy"] == pytest.approx(100 * correct / len(answers), abs=0.01)


@pytest.mark.slow
def test_quick_pretrain_demo_reports_losses_and_zero_shot_retrieval(root):
    results = demo.main(["--task", "pretrain", "--quick", "--root", str(root)])
    output = root / "output" / "demo_pretrain_quick"
    assert json.loads((output / "results.json").read_text()) == results
    epochs = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    epochs = [record for record in epochs if record["kind"] == "epoch"]
    assert results["epochs"] == len(epochs) == 1
    assert results["first_epoch"] == results["last_epoch"] == {
        name: round(epochs[0][f"train_{name}"], 4) for name in ("loss_vtc", "loss_vtm", "loss_cap")}
    zero_shot = json.loads((output / "zero_shot" / "eval_results.json").read_text())
    assert zero_shot["checkpoint"].endswith("checkpoint_00.pth")
    assert results["zero_shot"]["t2v_r1"] == round(zero_shot["metrics"]["t2v_r1"], 2)
    assert results["zero_shot"]["chance"] == pytest.approx(100 / 8)


QUICK = GenerationSettings(videos=16, frames_per_event=(4, 8), size=64, val_fraction=0.5)


def write_stamp(folder, **changes):
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps({**QUICK.stamp(), **changes}))


def test_a_set_with_the_same_settings_is_reused(tmp_path):
    write_stamp(tmp_path / "set")
    assert check_stamp(tmp_path / "set", QUICK) is True
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["settings.json"]


def test_an_absent_or_empty_folder_is_written(tmp_path):
    assert check_stamp(tmp_path / "absent", QUICK) is False
    (tmp_path / "empty").mkdir()
    assert check_stamp(tmp_path / "empty", QUICK) is False


def test_a_set_made_with_other_settings_is_not_reused(tmp_path):
    write_stamp(tmp_path / "set", videos=500, size=112)
    with pytest.raises(DataError, match=r"made with other settings \(videos 500 instead of 16, "
                                        r"size 112 instead of 64\)"):
        check_stamp(tmp_path / "set", QUICK)


def test_a_set_without_settings_is_not_reused(tmp_path):
    (tmp_path / "set" / "annotations").mkdir(parents=True)
    with pytest.raises(DataError, match="no settings.json, so its settings are unknown"):
        check_stamp(tmp_path / "set", QUICK)


def test_the_stamp_is_what_the_command_line_writes(tmp_path):
    """GenerationSettings.arguments() given to tools/make_synthetic.py stamps the same settings."""
    settings = GenerationSettings(videos=2, frames_per_event=(2, 3), size=32, val_fraction=0.5)
    make_synthetic.main(["--out", str(tmp_path), *settings.arguments(), "--workers", "1"])
    assert check_stamp(tmp_path, settings) is True


def test_make_synthetic_stamps_its_settings(tmp_path):
    make_synthetic.main(["--out", str(tmp_path), "--videos", "2", "--size", "32",
                         "--frames-per-event", "2", "3", "--workers", "1", "--val-fraction", "0.5"])
    assert json.loads((tmp_path / "settings.json").read_text()) == {
        "videos": 2, "seed": 0, "frames_per_event": [2, 3], "size": 32, "fps": 8,
        "val_fraction": 0.5}


def test_make_pretrain_list_joins_each_videos_paragraph(tmp_path):
    (tmp_path / "annotations").mkdir()
    captions = [{"video": "v_a.mp4", "caption": ["one.", "two."]},
                {"video": "v_b.mp4", "caption": ["three."]}]
    (tmp_path / "annotations" / "train.json").write_text(json.dumps(captions))
    out = make_pretrain_list.main(["--data", str(tmp_path)])
    assert out == tmp_path / "annotations" / "pretrain.json"
    assert json.loads(out.read_text()) == [{"path": "v_a.mp4", "caption": "one. two."},
                                           {"path": "v_b.mp4", "caption": "three."}]
    with pytest.raises(SystemExit, match="pretrain.json: exists; pass --overwrite"):
        make_pretrain_list.main(["--data", str(tmp_path), "--limit", "1"])
    with pytest.raises(SystemExit, match="val.json: not found"):
        make_pretrain_list.main(["--data", str(tmp_path), "--split", "val", "--overwrite"])
    assert len(json.loads(out.read_text())) == 2  # neither refused call changed the list
    with pytest.raises(SystemExit, match="--limit must be 1 or more, got 0"):
        make_pretrain_list.main(["--data", str(tmp_path), "--limit", "0", "--overwrite"])


@pytest.mark.parametrize("text, problem", [("{damaged", "not readable JSON"),
                                           ("[1, 2]", "expected a JSON object, got list")])
def test_a_damaged_settings_file_is_one_line(tmp_path, text, problem):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / SETTINGS_FILE).write_text(text)
    with pytest.raises(SystemExit) as refused:
        demo.main(["--quick", "--data", str(tmp_path / "set"), "--out", str(tmp_path / "out")])
    message = str(refused.value.code)
    assert message.startswith(f"error: {tmp_path / 'set' / 'settings.json'}: {problem}")
    assert "\n" not in message


def test_a_used_output_folder_is_refused_before_the_dataset_is_made(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    with pytest.raises(SystemExit) as refused:
        demo.main(["--quick", "--data", str(tmp_path / "set"), "--out", str(out)])
    assert str(refused.value.code) == (f"error: --out: {out}: holds a previous run (results.json); "
                                       f"pass --out with another folder, or remove it")
    assert not (tmp_path / "set").exists()
    assert (out / "results.json").read_text() == '{"earlier": true}'
