"""The training scripts end to end on a tiny synthetic long-video dataset (tiny encoder
and text towers, 32 px, 4 frames): evaluation of a saved checkpoint reproduces the
training run's test metrics, a resumed run matches an uninterrupted one, two gloo
processes match one, VideoQA and pre-training run through. Plus the schedule and
accumulation helpers."""
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from PIL import Image
from ruamel.yaml import YAML
from torch.utils.data import DataLoader, TensorDataset

import pretrain
import train_retrieval
import train_videoqa
from utils import (Run, build_precision, cosine_lr, ramped_alpha, step_lr, train_one_epoch,
                   warmup_lr)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    pretrained=None, image_size=32, vision_width=64, num_heads=2, depth=2, num_frames=4,
    num_frm_train=4, testa_r=[1, 2], num_workers=0, print_freq=1, init_lr=1e-3,
    text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128))


# fixtures and helpers ----------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """12 videos (6 train, 6 held out) in the ActivityNet Captions and -QA formats."""
    root = tmp_path_factory.mktemp("synthetic")
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_synthetic.py"), "--out",
                    str(root), "--videos", "12", "--seed", "0", "--size", "32",
                    "--frames-per-event", "4", "6", "--val-fraction", "0.5", "--workers", "1"],
                   check=True, capture_output=True)
    return root


def write_config(path: Path, shipped: str, **overrides) -> str:
    """A shipped config with the tiny model and `overrides`, written to `path`."""
    config = YAML(typ="safe").load((REPO_ROOT / "configs" / shipped).read_text())
    config.update(TINY, **overrides)
    YAML(typ="safe").dump(config, path)
    return str(path)


@pytest.fixture(scope="module")
def retrieval_config(synthetic, tmp_path_factory) -> str:
    return write_config(
        tmp_path_factory.mktemp("config") / "retrieval.yaml", "retrieval_activitynet_f32.yaml",
        video_root=str(synthetic / "videos"), ann_root=str(synthetic / "annotations"),
        num_frm_test=4, max_words=32, batch_size_train=2, batch_size_test=4, embed_dim=16,
        queue_size=8, k_test=4, k_test_batch_size=3)


def run_script(main, *argv) -> str:
    """Run a script's main in this process; its printed output."""
    printed = io.StringIO()
    with redirect_stdout(printed):
        main([str(arg) for arg in argv])
    return printed.getvalue()


def read_metrics(path: Path) -> dict:
    return json.loads(path.read_text())["metrics"]


def read_log(output_dir: Path, kind: str) -> list:
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == kind]


def printed_line(output: str, prefix: str) -> str:
    return [line for line in output.splitlines() if line.startswith(prefix)][-1]


@pytest.fixture(scope="module")
def straight_run(retrieval_config, tmp_path_factory):
    """Two epochs of retrieval fine-tuning in one go: (output_dir, printed output)."""
    output_dir = tmp_path_factory.mktemp("straight")
    printed = run_script(train_retrieval.main, "--config", retrieval_config,
                         "--output_dir", output_dir, "--opts", "max_epoch=2")
    return output_dir, printed


# retrieval ---------------------------------------------------------------------------
def test_training_writes_checkpoints_logs_and_config(straight_run):
    output_dir, printed = straight_run
    for name in ("checkpoint_last.pth", "checkpoint_best.pth", "config.yaml", "test_metrics.json"):
        assert (output_dir / name).is_file(), name
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


def test_resume_matches_uninterrupted_run(straight_run, retrieval_config, tmp_path):
    straight_dir, _ = straight_run
    run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", tmp_path,
               "--opts", "max_epoch=1")
    resumed = run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir",
                         tmp_path, "--resume", "--opts", "max_epoch=2")
    assert "resumed from" in resumed and "epoch 0 done" in resumed
    assert read_log(tmp_path, "epoch")[-1] == read_log(straight_dir, "epoch")[-1]
    expected = read_metrics(straight_dir / "test_metrics.json")
    assert read_metrics(tmp_path / "test_metrics.json") == expected
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
    assert (pretrained / "checkpoint_00.pth").is_file()
    assert (pretrained / "checkpoint_last.pth").is_file()

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
    assert pretrain.learning_rate(config, 0, 5) == pytest.approx(3e-6)
    assert pretrain.learning_rate(config, 1, 12) == pytest.approx(2.5e-6)
    assert pretrain.learning_rate({**config, "lr_schedule": "cosine"}, 0, 10) == pytest.approx(5e-6)
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
    assert set(stats) == {"mse", "lr"}
    return torch.cat([model.weight.detach().flatten(), model.bias.detach()])


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    accumulated = linear_regression_epoch(tmp_path, batch_size=2, accum_steps=2)
    large_batch = linear_regression_epoch(tmp_path, batch_size=4, accum_steps=1)
    small_batch = linear_regression_epoch(tmp_path, batch_size=2, accum_steps=1)
    torch.testing.assert_close(accumulated, large_batch)
    assert not torch.allclose(accumulated, small_batch)
