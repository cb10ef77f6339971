"""Checkpoint files as users hit them through the scripts: crafted files run no code,
files that fit badly stop the run with one line, saves are atomic, follow the umask and
leave no temporary files, checkpoints come by URL or hub id through a cache."""
import builtins
import errno
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import train_retrieval
from engine.saving import model_checkpoint, remove_stale_temporaries, save_checkpoint
from models import build_pretrain_model, build_retrieval_model, build_videoqa_model, load_checkpoint
from helpers import REPO_ROOT, BodyServer, Server, read_metrics, run_script, tiny_config
from models import CheckpointError, hub

BAD_LINE_EXIT = SystemExit  # the scripts end bad input with SystemExit("error: ...")


def tiny_model_config(**overrides) -> dict:
    """The model part of the scripts' tiny retrieval config."""
    return {**tiny_config(testa_r=[1, 2], embed_dim=16, queue_size=8, max_words=32), **overrides}


def evaluate(config: str, output_dir: Path, *argv) -> str:
    return run_script(train_retrieval.main, "--config", config, "--output_dir", output_dir,
                      "--evaluate", *argv)


def script_error(config: str, output_dir: Path, *argv) -> str:
    """The one-line message a script ends with."""
    with pytest.raises(BAD_LINE_EXIT) as ended:
        evaluate(config, output_dir, *argv)
    message = str(ended.value.code)
    assert "\n" not in message
    return message


def files_in(directory: Path) -> list:
    return sorted(path.name for path in directory.iterdir())


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny retrieval model's checkpoint as the scripts save it."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    save_checkpoint(str(path), model_checkpoint(build_retrieval_model(tiny_model_config()), {},
                                                epoch=0))
    return path


def write_state(path: Path, state: dict, **extra) -> Path:
    torch.save({"model": state, **extra}, path)
    return path


class WritesMarker:
    """Unpickling this creates `marker`: stands for any code a crafted file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


# no code from files ------------------------------------------------------------------
def test_crafted_checkpoint_runs_no_code(retrieval_config, weights, tmp_path):
    marker = tmp_path / "marker"
    crafted = write_state(tmp_path / "crafted.pth", torch.load(weights)["model"],
                          payload=WritesMarker(marker))
    output_dir = tmp_path / "out"
    message = script_error(retrieval_config, output_dir, "--checkpoint", crafted)
    assert message == (
        f"error: {crafted}: holds Python objects outside the safe list (io.open), and "
        "unpickling them can run code from the file; pass --trust_checkpoint (config key "
        "trust_checkpoint: true) only if you trust where the file comes from")
    assert not marker.exists()
    assert not output_dir.exists()  # refused before the folder is taken


def test_trust_is_an_explicit_opt_in(weights, tmp_path):
    marker = tmp_path / "marker"
    crafted = write_state(tmp_path / "crafted.pth", torch.load(weights)["model"],
                          payload=WritesMarker(marker))
    model = build_retrieval_model(tiny_model_config())
    with pytest.raises(CheckpointError):
        load_checkpoint(model, str(crafted))
    assert not marker.exists()
    report = load_checkpoint(model, str(crafted), trust=True)
    assert marker.exists()  # trusted: the file was unpickled in full, as asked
    assert report.notes == ["unpickled in full, trusted (io.open)"]


# nothing silently wrong --------------------------------------------------------------
def test_ddp_prefix_is_removed_and_reported(retrieval_config, weights, tmp_path):
    state = torch.load(weights)["model"]
    prefixed = write_state(tmp_path / "ddp.pth", {f"module.{k}": v for k, v in state.items()})
    printed = evaluate(retrieval_config, tmp_path / "ddp", "--checkpoint", prefixed)
    evaluate(retrieval_config, tmp_path / "plain", "--checkpoint", weights)
    assert f"loaded ddp.pth: {len(state) - 4} tensors, 0 missing, 0 unexpected, " \
           "'module.' prefix removed, 4 queues dropped" in printed
    assert (read_metrics(tmp_path / "ddp" / "eval_results.json")
            == read_metrics(tmp_path / "plain" / "eval_results.json"))


def test_checkpoint_for_another_model_stops_the_run(retrieval_config, weights, tmp_path):
    state = torch.load(weights)["model"]
    renamed = write_state(tmp_path / "renamed.pth", {f"backbone.{k}": v for k, v in state.items()})
    output_dir = tmp_path / "out"
    message = script_error(retrieval_config, output_dir, "--checkpoint", renamed)
    encoder_tensors = sum(key.startswith("visual_encoder.") for key in state)
    assert message == (
        f"error: {renamed}: fills too little of the model: 0 of {encoder_tensors} video-encoder "
        "tensors matched (the file's keys look like 'backbone.temp', the model's like "
        "'visual_encoder.cls_token')")
    assert not output_dir.exists()  # refused before the folder is taken


def test_non_finite_weights_stop_the_run(retrieval_config, weights, tmp_path):
    state = torch.load(weights)["model"]
    state["text_proj.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), 1.0])
    broken = write_state(tmp_path / "nan.pth", state)
    output_dir = tmp_path / "out"
    message = script_error(retrieval_config, output_dir, "--checkpoint", broken)
    assert message == (f"error: {broken}: text_proj.weight holds 2 non-finite values (NaN or "
                       f"inf) of {state['text_proj.weight'].numel()}; the model would be broken")
    assert not output_dir.exists()  # refused before the folder is taken


def test_truncated_last_checkpoint_on_resume_is_one_line(retrieval_config, tmp_path):
    run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", tmp_path,
               "--opts", "max_epoch=1")
    last = tmp_path / "checkpoint_last.pth"
    last.write_bytes(last.read_bytes()[:last.stat().st_size // 2])
    truncated, log = last.read_bytes(), (tmp_path / "log.jsonl").read_text()
    with pytest.raises(BAD_LINE_EXIT) as ended:
        run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", tmp_path,
                   "--resume", "--opts", "max_epoch=2")
    assert str(ended.value.code).startswith(
        f"error: {last}: not a PyTorch checkpoint, or truncated (RuntimeError: ")
    assert "\n" not in str(ended.value.code)
    assert last.read_bytes() == truncated and (tmp_path / "log.jsonl").read_text() == log


# load report -------------------------------------------------------------------------
def test_zero_shot_report_explains_the_unused_decoder(retrieval_config, tmp_path):
    torch.manual_seed(2)
    pretrained = tmp_path / "pretrain.pth"
    pretrain_model = build_pretrain_model(tiny_model_config())
    save_checkpoint(str(pretrained), model_checkpoint(pretrain_model, {}, epoch=0))
    decoder = sum(key.startswith("text_decoder.") for key in pretrain_model.state_dict())
    printed = evaluate(retrieval_config, tmp_path / "zero_shot", "--checkpoint", pretrained)
    report_lines = [line for line in printed.splitlines()
                    if line.startswith("loaded ") and "pretrain.pth" in line]
    assert report_lines == [
        f"loaded pretrain.pth: {len(pretrain_model.state_dict()) - decoder - 3} tensors, 0 missing, "
        f"{decoder} unexpected ({decoder} expected: text_decoder unused by retrieval), "
        "3 queues dropped"]


def test_temporal_scaling_of_pretraining_is_expected_unused(tmp_path):
    pretrained = tmp_path / "pretrain.pth"
    save_checkpoint(str(pretrained), model_checkpoint(build_pretrain_model(
        tiny_model_config(learnable_temporal_scaling=True)), {}, epoch=0))
    report = load_checkpoint(build_retrieval_model(tiny_model_config()), str(pretrained))
    blocks = 2 * 2  # 2 blocks in the main and the momentum video encoder
    assert report.unused_parts["temporal_scaling"] == blocks
    assert not report.needs_attention()
    assert "temporal_scaling (4 tensors): learned per-frame scaling of pre-training" in str(report)


def test_videoqa_report_names_the_roles_the_models_declare(tmp_path):
    """A VideoQA model lacks the retrieval heads and momentum towers of a pre-training
    checkpoint; the report tells what each is for from the classes' `part_roles`."""
    pretrained = tmp_path / "pretrain.pth"
    save_checkpoint(str(pretrained), model_checkpoint(build_pretrain_model(tiny_model_config()),
                                                      {}, epoch=0))
    report = load_checkpoint(build_videoqa_model(tiny_model_config(max_question_len=8)),
                             str(pretrained))
    assert set(report.unused_parts) == {"vision_proj", "text_proj", "itm_head", "temp",
                                        "visual_encoder_m", "vision_proj_m", "text_encoder_m",
                                        "text_proj_m"}
    assert not report.needs_attention()
    text = str(report)
    assert "    itm_head (2 tensors): video-text matching head" in text
    assert "    temp (1 tensor): contrastive temperature" in text
    assert "    vision_proj_m (2 tensors): momentum copy of vision_proj" in text


class ProbeModel(torch.nn.Module):
    """A model of another task, declaring what its extra part is for."""
    part_roles = {"body": "shared layer", "probe_head": "linear probe of the features"}

    def __init__(self):
        super().__init__()
        self.body, self.probe_head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)


def test_a_part_is_explained_by_the_class_that_declares_it(tmp_path):
    source = ProbeModel()
    probe = write_state(tmp_path / "probe.pth", source.state_dict())
    report = load_checkpoint(torch.nn.ModuleDict({"body": torch.nn.Linear(2, 2)}), str(probe))
    assert report.unused_parts == {"probe_head": 2} and not report.needs_attention()
    assert "    probe_head (2 tensors): linear probe of the features" in str(report)


def test_unexplained_keys_get_the_full_report(weights, tmp_path):
    state = torch.load(weights)["model"]
    state["visual_encoder.extra_scale"] = torch.ones(1)
    del state["itm_head.bias"]
    odd = write_state(tmp_path / "odd.pth", state)
    report = load_checkpoint(build_retrieval_model(tiny_model_config()), str(odd))
    assert report.needs_attention()
    text = str(report)
    assert "missing, not in the file (left at their initial values):\n    itm_head.bias" in text
    assert ("unexpected, in the file but not in the model (not used):\n"
            "    visual_encoder.extra_scale") in text


# saving ------------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_checkpoints_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_checkpoint(str(tmp_path / "checkpoint_best.pth"),
                        model_checkpoint(torch.nn.Linear(2, 2), {}, epoch=0))
    finally:
        os.umask(previous)
    assert (tmp_path / "checkpoint_best.pth").stat().st_mode & 0o777 == mode


def test_full_disk_is_one_line_and_leaves_no_temporary(retrieval_config, tmp_path, monkeypatch):
    output_dir = tmp_path / "out"
    real_write = os.write

    def disk_full(fd, data):  # the output folder's file system is full
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(output_dir)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(BAD_LINE_EXIT) as ended:
        run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", output_dir,
                   "--opts", "max_epoch=1")
    # the first checkpoint written: checkpoint_last.pth, right after the epoch's training
    assert str(ended.value.code) == (f"error: no space left on device while writing "
                                     f"{output_dir / 'checkpoint_last.pth'}")
    assert files_in(output_dir) == ["config.yaml", "log.jsonl"]


SLOW_SAVE = """
import os, sys, time, torch
sys.path.insert(0, sys.argv[1])
from engine.saving import model_checkpoint, save_checkpoint
real_write = os.write
def slow_write(fd, data):  # a slow disk: the save takes seconds
    time.sleep(0.05)
    return real_write(fd, data[:1 << 16])
os.write = slow_write
save_checkpoint(sys.argv[2], model_checkpoint(torch.nn.Linear(1024, 1024), {}, epoch=1))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_save_leaves_no_temporary(tmp_path, signum):
    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint(str(path), model_checkpoint(torch.nn.Linear(2, 2), {}, epoch=0))
    before = path.read_bytes()
    saving = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(REPO_ROOT), str(path)],
                              stderr=subprocess.PIPE)
    for _ in range(1200):  # until the temporary file exists
        if len(files_in(tmp_path)) > 1:
            break
        assert saving.poll() is None, saving.stderr.read()
        threading.Event().wait(0.05)
    saving.send_signal(signum)
    # SIGTERM ends with 128 + 15 as if by the signal; SIGINT by the signal itself
    assert saving.wait(timeout=60) == {signal.SIGTERM: 143, signal.SIGINT: -signal.SIGINT}[signum]
    assert files_in(tmp_path) == ["checkpoint_last.pth"]
    assert path.read_bytes() == before


def test_next_start_removes_temporaries_of_a_killed_run(retrieval_config, weights, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    leftovers = [".checkpoint_last.pth.1a2b3c4d.tmp", ".checkpoint_best.pth.u_9xk2le.tmp"]
    for name in leftovers + ["notes.tmp"]:
        (output_dir / name).write_bytes(b"partial")
    printed = evaluate(retrieval_config, output_dir, "--checkpoint", weights)
    for name in sorted(leftovers):
        assert f"removed {output_dir / name}, left by an interrupted save" in printed
    assert files_in(output_dir) == ["config.yaml", "eval_results.json", "log.jsonl", "notes.tmp",
                                    "summary.json"]
    assert remove_stale_temporaries(str(output_dir)) == []


# checkpoints by URL and hub id -------------------------------------------------------
@pytest.fixture
def server(weights, tmp_path, monkeypatch):
    served = BodyServer()
    for path in ("/tiny.pth", "/ShuhuaiRen/TESTA_tiny/resolve/main/tiny.pth"):
        served.bodies[path] = weights.read_bytes()
    monkeypatch.setenv("TESTA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    yield served
    served.close()


def cached_files(tmp_path: Path) -> list:
    cache = tmp_path / "cache"
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()) \
        if cache.exists() else []


def test_url_checkpoint_is_downloaded_once_and_reused(retrieval_config, weights, server, tmp_path):
    url = f"{server.url}/tiny.pth"
    printed = evaluate(retrieval_config, tmp_path / "first", "--checkpoint", url)
    assert "loaded tiny.pth:" in printed and server.requests == ["/tiny.pth"]
    server.close()  # offline from here on
    evaluate(retrieval_config, tmp_path / "second", "--checkpoint", url)
    assert server.requests == ["/tiny.pth"]
    entry = hub.entry_dir(url).name
    assert cached_files(tmp_path) == [f"{entry}/entry.json", f"{entry}/tiny.pth"]
    assert (tmp_path / "cache" / entry / "tiny.pth").read_bytes() == weights.read_bytes()
    evaluate(retrieval_config, tmp_path / "local", "--checkpoint", weights)
    assert (read_metrics(tmp_path / "second" / "eval_results.json")
            == read_metrics(tmp_path / "local" / "eval_results.json"))


def test_hub_id_resolves_to_the_hub_file(retrieval_config, weights, tmp_path, monkeypatch):
    """hf:// goes through huggingface_hub, here against a server that answers as a hub does."""
    served_file = tmp_path / "served" / "ShuhuaiRen" / "TESTA_tiny" / "resolve" / "main" / "tiny.pth"
    served_file.parent.mkdir(parents=True)
    served_file.write_bytes(weights.read_bytes())
    hub_server = Server(tmp_path / "served")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    try:
        printed = evaluate(retrieval_config, tmp_path / "out", "--checkpoint",
                           "hf://ShuhuaiRen/TESTA_tiny/tiny.pth")
    finally:
        hub_server.close()
    assert "loaded tiny.pth:" in printed
    assert "/ShuhuaiRen/TESTA_tiny/resolve/main/tiny.pth" in hub_server.requests


def test_missing_url_is_one_line_and_caches_nothing(retrieval_config, server, tmp_path):
    url = f"{server.url}/absent.pth"
    message = script_error(retrieval_config, tmp_path / "out", "--checkpoint", url)
    assert message == f"error: {url}: download failed (HTTP 404 File not found)"
    assert cached_files(tmp_path) == []


def test_interrupted_download_caches_nothing(retrieval_config, server, weights, tmp_path):
    server.modes["/tiny.pth"] = "short"
    url = f"{server.url}/tiny.pth"
    message = script_error(retrieval_config, tmp_path / "out", "--checkpoint", url)
    size = weights.stat().st_size
    assert message.startswith(f"error: {url}: download ")
    assert str(size) in message or "IncompleteRead" in message
    assert cached_files(tmp_path) == []
