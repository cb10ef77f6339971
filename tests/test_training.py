"""The training scripts end to end on a tiny synthetic long-video dataset (tiny encoder
and text towers, 32 px, 4 frames): evaluation of a saved checkpoint reproduces the
training run's test metrics, a resumed run matches an uninterrupted one, two gloo
processes match one, VideoQA and pre-training run through; what a run logs (timestamps,
durations, summary, progress bars, TensorBoard). Plus the schedule and accumulation
helpers."""
import io
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from PIL import Image
from ruamel.yaml import YAML
from torch.utils.data import DataLoader, TensorDataset

import pretrain
import train_retrieval
import train_videoqa
from engine.logs import progress, set_progress_bar
from engine.optim import (cosine_lr, learning_rate, ramped_alpha, step_lr, warmup_lr,
                          warmup_schedule)
from engine.precision import build_precision
from engine.run import Run
from engine.train import train_one_epoch
from helpers import read_metrics, run_script, write_config

REPO_ROOT = Path(__file__).resolve().parents[1]


# fixtures (`synthetic`, `retrieval_config`: conftest.py) and helpers -------------------
def read_log(output_dir: Path, kind: str) -> list:
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == kind]


TIMING_FIELDS = ("time", "train_seconds", "val_seconds", "epoch_seconds")


def without_timing(record: dict) -> dict:
    return {name: value for name, value in record.items() if name not in TIMING_FIELDS}


def printed_line(output: str, prefix: str) -> str:
    return [line for line in output.splitlines() if line.startswith(prefix)][-1]


@pytest.fixture(scope="module")
def straight_run(retrieval_config, tmp_path_factory):
    """Two epochs of retrieval fine-tuning in one go, with TensorBoard scalars:
    (output_dir, printed output)."""
    output_dir = tmp_path_factory.mktemp("straight")
    printed = run_script(train_retrieval.main, "--config", retrieval_config,
                         "--output_dir", output_dir, "--opts", "max_epoch=2", "tensorboard=true")
    return output_dir, printed


# retrieval ---------------------------------------------------------------------------
def test_training_writes_checkpoints_logs_and_config(straight_run):
    output_dir, printed = straight_run
    for name in ("checkpoint_last.pth", "checkpoint_best.pth", "config.yaml", "test_metrics.json"):
        assert (output_dir / name).is_file(), name
    for name in ("checkpoint_last.pth", "checkpoint_best.pth"):  # each records its task
        assert torch.load(output_dir / name, weights_only=True)["task"] == "retrieval"
    epochs = read_log(output_dir, "epoch")
    assert [record["epoch"] for record in epochs] == [0, 1]
    assert epochs[1]["train_lr"] == pytest.approx(cosine_lr(1, 2, 1e-3, 0.0))
    assert read_log(output_dir, "step")[0]["step"] == 0
    assert YAML(typ="safe").load(output_dir / "config.yaml")["max_epoch"] == 2
    assert "no bad data: retrieval_activitynet/train" in printed
    assert "loaded checkpoint_best.pth:" in printed


def test_evaluate_checkpoint_reproduces_training_metrics(straight_run, retrieval_config, tmp_path):
    output_dir, printed = straight_run
    evaluated = run_script(train_retrieval.main, "--config", retrieval_config,
                           "--output_dir", tmp_path, "--evaluate",
                           "--checkpoint", output_dir / "checkpoint_best.pth")
    expected = read_metrics(output_dir / "test_metrics.json")
    assert read_metrics(tmp_path / "eval_results.json") == expected
    assert printed_line(evaluated, "test:") == printed_line(printed, "test:")
    assert "loaded checkpoint_best.pth:" in evaluated
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test"] == json.loads((tmp_path / "eval_results.json").read_text())
    assert summary["epochs_run"] == 0 and "best_epoch" not in summary
    assert summary["files"]["checkpoints"] == []
    assert "eval_results.json" in summary["files"]["results"]
    assert "run finished in" in evaluated and "no training" in evaluated


def test_resume_matches_uninterrupted_run(straight_run, retrieval_config, tmp_path):
    straight_dir, _ = straight_run
    run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", tmp_path,
               "--opts", "max_epoch=1")
    resumed = run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir",
                         tmp_path, "--resume", "--opts", "max_epoch=2")
    assert "resumed from" in resumed and "epoch 0 done" in resumed
    assert (without_timing(read_log(tmp_path, "epoch")[-1])
            == without_timing(read_log(straight_dir, "epoch")[-1]))
    expected = read_metrics(straight_dir / "test_metrics.json")
    assert read_metrics(tmp_path / "test_metrics.json") == expected
    resumed_summary = json.loads((tmp_path / "summary.json").read_text())
    straight_summary = json.loads((straight_dir / "summary.json").read_text())
    assert (resumed_summary["epochs_run"], resumed_summary["epochs_done"]) == (1, 2)
    # the best epoch may be one of the first session: read back from log.jsonl
    assert (without_timing(resumed_summary["best_epoch"])
            == without_timing(straight_summary["best_epoch"]))
    resumed_state = torch.load(tmp_path / "checkpoint_last.pth", weights_only=True)
    straight_state = torch.load(straight_dir / "checkpoint_last.pth", weights_only=True)
    assert resumed_state["epoch"] == straight_state["epoch"] == 1
    for key, value in straight_state["model"].items():
        assert torch.equal(resumed_state["model"][key], value), key


def test_two_processes_match_single_process_evaluation(retrieval_config, tmp_path):
    trained, evaluated = tmp_path / "trained", tmp_path / "evaluated"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO_ROOT / "train_retrieval.py"), "--config", retrieval_config,
         "--output_dir", str(trained), "--opts", "max_epoch=1"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout
    run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", evaluated,
               "--evaluate", "--checkpoint", trained / "checkpoint_best.pth",
               "--k_test_batch_size", "1")
    expected = read_metrics(trained / "test_metrics.json")
    assert read_metrics(evaluated / "eval_results.json") == expected


# what a run logs --------------------------------------------------------------------
def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), text
    return moment


def test_log_records_have_utc_times_and_durations(straight_run):
    output_dir, _ = straight_run
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    times = [parse_time(record["time"]) for record in records]
    assert times == sorted(times)
    assert [record["kind"] for record in records][-2:] == ["test", "summary"]

    steps, epochs = read_log(output_dir, "step"), read_log(output_dir, "epoch")
    steps_per_epoch = max(step["step"] for step in steps) + 1
    for epoch in epochs:
        in_epoch = [step for step in steps if step["epoch"] == epoch["epoch"]]
        assert [step["global_step"] for step in in_epoch] == [
            epoch["epoch"] * steps_per_epoch + step["step"] for step in in_epoch]
        for step in in_epoch:  # print_freq 1: one logged step, 2 clips, per record
            assert step["seconds"] > 0
            # both rounded: seconds to the millisecond, samples_per_s to 2 decimals, so the
            # unrounded rate 2 / s lies in 2 / (seconds +- 0.0005), give or take 0.005
            low = 2 / (step["seconds"] + 0.0005) - 0.005
            high = 2 / max(step["seconds"] - 0.0005, 1e-9) + 0.005
            assert low <= step["samples_per_s"] <= high
        assert 0 < sum(step["seconds"] for step in in_epoch) <= epoch["train_seconds"]
        assert epoch["val_seconds"] > 0
        assert epoch["epoch_seconds"] >= epoch["train_seconds"] + epoch["val_seconds"]
    # the wall clock between two epoch records is the second epoch's duration
    between = (parse_time(epochs[1]["time"]) - parse_time(epochs[0]["time"])).total_seconds()
    assert between == pytest.approx(epochs[1]["epoch_seconds"], abs=1.0)
    assert read_log(output_dir, "test")[0]["seconds"] > 0


def test_summary_names_best_epoch_test_metrics_time_and_files(straight_run):
    output_dir, printed = straight_run
    summary = json.loads((output_dir / "summary.json").read_text())
    epochs = read_log(output_dir, "epoch")
    val_t2v = [epoch["val_t2v_r_mean"] for epoch in epochs]
    best = val_t2v.index(max(val_t2v))  # the first epoch reaching the maximum
    assert summary["best_epoch"] == {name: value for name, value in epochs[best].items()
                                     if name not in ("kind", "time")}
    assert summary["last_epoch"]["epoch"] == 1
    assert summary["test"] == json.loads((output_dir / "test_metrics.json").read_text())
    assert (summary["epochs_run"], summary["epochs_done"]) == (2, 2)
    elapsed = (parse_time(summary["finished"]) - parse_time(summary["started"])).total_seconds()
    assert summary["seconds"] == pytest.approx(elapsed, abs=0.01)
    assert summary["seconds"] >= sum(epoch["epoch_seconds"] for epoch in epochs)
    files = summary["files"]
    assert Path(files["output_dir"]) == output_dir.resolve()
    assert files["checkpoints"] == ["checkpoint_best.pth", "checkpoint_last.pth"]
    assert "test_metrics.json" in files["results"]
    for name in (files["config"], files["log"], files["summary"], files["tensorboard"]):
        assert (output_dir / name).exists(), name
    record = read_log(output_dir, "summary")[-1]
    assert {name: value for name, value in record.items()
            if name not in ("kind", "time")} == summary
    assert f"best epoch {best}: val_" in printed
    assert (f"files in {output_dir.resolve()}: checkpoint_best.pth, checkpoint_last.pth, "
            "test_metrics.json, config.yaml, log.jsonl, summary.json, tensorboard/") in printed


def test_tensorboard_scalars_match_the_log(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    output_dir, _ = straight_run
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/lr", "step/loss_vtc", "step/loss_vtm", "step/seconds", "epoch/train_loss_vtc",
            "epoch/val_r_mean", "epoch/train_seconds", "test/test_r_mean"} <= tags
    steps = read_log(output_dir, "step")
    assert [(event.step, event.value) for event in events.Scalars("step/loss_vtc")] == [
        (step["global_step"], pytest.approx(step["loss_vtc"], rel=1e-6)) for step in steps]
    assert [(event.step, event.value) for event in events.Scalars("epoch/val_r_mean")] == [
        (epoch["epoch"], pytest.approx(epoch["val_r_mean"], rel=1e-6))
        for epoch in read_log(output_dir, "epoch")]


BAR = "%|"  # tqdm's bar starts after the percentage


def test_progress_bars_only_on_terminals_or_on_request(straight_run, retrieval_config, tmp_path):
    _, printed = straight_run  # stdout and stderr are not terminals: no bars
    assert BAR not in printed and "\r" not in printed
    assert "epoch 1 [3/3]" in printed  # the print_freq lines stay
    forced = run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir",
                        tmp_path, "--evaluate", "--checkpoint",
                        straight_run[0] / "checkpoint_best.pth", "--opts", "progress_bar=on")
    assert BAR in forced and "re-ranking" in forced


def test_auto_progress_bars_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    set_progress_bar("auto")
    assert list(progress(range(3), "counting")) == [0, 1, 2]
    assert "counting" in terminal.getvalue() and BAR in terminal.getvalue()


def test_tensorboard_without_the_package_is_one_line(retrieval_config, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(SystemExit) as stopped:
        run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", tmp_path,
                   "--opts", "tensorboard=true")
    assert str(stopped.value) == ("error: tensorboard: true needs the tensorboard package, "
                                  "which is not installed (pip install tensorboard)")
    assert not (tmp_path / "log.jsonl").exists()


# VideoQA -----------------------------------------------------------------------------
def test_videoqa_trains_answers_and_evaluates(synthetic, tmp_path):
    config = write_config(
        tmp_path / "vqa.yaml", "vqa_activitynet_f32.yaml", video_root=str(synthetic / "videos"),
        ann_root=str(synthetic / "annotations"), num_frm_test=4, max_question_len=12,
        batch_size_train=4, batch_size_test=8, k_test=4, max_epoch=1)
    trained, evaluated = tmp_path / "trained", tmp_path / "evaluated"
    run_script(train_videoqa.main, "--config", config, "--output_dir", trained)
    run_script(train_videoqa.main, "--config", config, "--output_dir", evaluated, "--evaluate",
               "--checkpoint", trained / "checkpoint_best.pth")

    annotations = synthetic / "annotations"
    questions = json.loads((annotations / "test_q.json").read_text())
    answer_records = json.loads((annotations / "test_a.json").read_text())
    answer_list = {record["answer"] for record in answer_records}
    answers = json.loads((trained / "test_answers.json").read_text())
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(a["answer"] in answer_list for a in answers)
    metrics = read_metrics(trained / "test_metrics.json")
    correct = sum(a["answer"] == a["ground_truth"] for a in answers)
    assert metrics == {"accuracy": pytest.approx(100 * correct / len(questions)),
                       "num_questions": len(questions)}
    assert read_metrics(evaluated / "eval_results.json") == metrics
    assert (trained / "val_answers.json").is_file()


# pre-training ------------------------------------------------------------------------
def test_pretrain_then_zero_shot_retrieval(synthetic, retrieval_config, tmp_path):
    Image.new("RGB", (48, 48), (200, 30, 30)).save(tmp_path / "red.png")
    records = [{"path": str(synthetic / "videos" / f"v_synth{i:05d}.mp4"), "caption": f"clip {i}"}
               for i in range(5)] + [{"path": str(tmp_path / "red.png"), "caption": "a red square"}]
    (tmp_path / "pretrain.json").write_text(json.dumps(records))
    config = write_config(
        tmp_path / "pretrain.yaml", "pretrain_from_blip.yaml",
        train_file=[str(tmp_path / "pretrain.json")],
        video_resize=40, batch_size=2, embed_dim=16, queue_size=8, max_words=16, warmup_steps=2,
        max_epoch=1)
    pretrained = tmp_path / "pretrained"
    run_script(pretrain.main, "--config", config, "--output_dir", pretrained)

    steps = read_log(pretrained, "step")
    assert [step["lr"] for step in steps] == pytest.approx([1e-6, 5.005e-4, 1e-3])  # warmup
    assert all(set(step) >= {"loss_vtc", "loss_vtm", "loss_cap"} for step in steps)
    assert torch.load(pretrained / "checkpoint_00.pth", weights_only=True)["task"] == "pretraining"
    assert (pretrained / "checkpoint_last.pth").is_file()
    summary = json.loads((pretrained / "summary.json").read_text())  # no validation, no test
    last_epoch = read_log(pretrained, "epoch")[-1]
    assert summary["last_epoch"] == {name: value for name, value in last_epoch.items()
                                     if name not in ("kind", "time")}
    assert set(summary["last_epoch"]) >= {"train_loss_vtc", "train_loss_vtm", "train_loss_cap"}
    assert "best_epoch" not in summary and "test" not in summary
    assert summary["files"]["checkpoints"] == ["checkpoint_00.pth", "checkpoint_last.pth"]

    printed = run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir",
                         tmp_path / "zero_shot", "--evaluate", "--checkpoint",
                         pretrained / "checkpoint_00.pth")
    assert "loaded checkpoint_00.pth:" in printed
    assert set(read_metrics(tmp_path / "zero_shot" / "eval_results.json")) >= {"t2v_r1", "r_mean"}


# schedules and accumulation ----------------------------------------------------------
def test_learning_rate_schedules_and_alpha_ramp():
    assert cosine_lr(0, 10, 1e-5, 0.0) == pytest.approx(1e-5)
    assert cosine_lr(5, 10, 1e-5, 0.0) == pytest.approx(5e-6)
    assert step_lr(2, 5e-6, 5e-7, 0.95) == pytest.approx(5e-6 * 0.95 ** 2)
    assert step_lr(100, 5e-6, 5e-7, 0.95) == pytest.approx(5e-7)
    assert warmup_lr(0, 5000, 1e-6, 5e-6) == pytest.approx(1e-6)
    assert warmup_lr(2500, 5000, 1e-6, 5e-6) == pytest.approx(3e-6)
    config = {"warmup_steps": 10, "warmup_lr": 1e-6, "init_lr": 5e-6, "min_lr": 5e-7,
              "lr_schedule": "step", "lr_decay_rate": 0.5, "max_epoch": 5}
    assert learning_rate(warmup_schedule(config), 0, 5) == pytest.approx(3e-6)
    assert learning_rate(warmup_schedule(config), 1, 12) == pytest.approx(2.5e-6)
    assert learning_rate(warmup_schedule({**config, "lr_schedule": "cosine"}), 0, 10) == pytest.approx(5e-6)
    assert ramped_alpha(0.4, 0, 5, 10) == pytest.approx(0.2)
    assert ramped_alpha(0.4, 1, 0, 10) == pytest.approx(0.4)
    assert ramped_alpha(0.4, 1, 0, 10, ramp_epochs=2) == pytest.approx(0.2)


def linear_regression_epoch(tmp_path, batch_size: int, accum_steps: int) -> torch.Tensor:
    """Weights of a linear model after one SGD epoch over 8 fixed samples."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(8, 3), torch.randn(8, 1)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = Run({"accum_steps": accum_steps, "print_freq": 100}, tmp_path, torch.device("cpu"),
              build_precision("none", torch.device("cpu")))

    def losses_of(batch, epoch, step):
        x, y = batch
        return {"mse": torch.nn.functional.mse_loss(model(x), y)}

    loader = DataLoader(TensorDataset(inputs, targets), batch_size=batch_size)
    stats = train_one_epoch(run, model, loader, optimizer, 0, losses_of)
    assert set(stats) == {"mse", "lr", "steps_per_rank", "samples_per_rank"}
    assert stats["steps_per_rank"] == [len(loader)] and stats["samples_per_rank"] == [len(inputs)]
    return torch.cat([model.weight.detach().flatten(), model.bias.detach()])


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    accumulated = linear_regression_epoch(tmp_path, batch_size=2, accum_steps=2)
    large_batch = linear_regression_epoch(tmp_path, batch_size=4, accum_steps=1)
    small_batch = linear_regression_epoch(tmp_path, batch_size=2, accum_steps=1)
    torch.testing.assert_close(accumulated, large_batch)
    assert not torch.allclose(accumulated, small_batch)
