"""Faults as a user hits them, through the scripts' `main(argv)`: settings that only fail
together, a used or unusable output folder, an empty validation split, SIGTERM during
training and a loss that turns NaN end in the exact one-line error, before any work
where they can be known before it, and leave nothing else in the output folder. A batch
holding one video twice trains; a stalled peer ends a distributed run instead of hanging."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_retrieval
from engine.precision import build_precision
from engine.train import NonFiniteWatch
from engine.run import NonFiniteError
from engine.signals import Interrupted, held_while_fetching, script_signals
from helpers import REPO_ROOT, free_port, write_config, write_gray_video
from models import build_retrieval_model, build_videoqa_model
from tasks.videoqa import answer_batch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """ActivityNet Captions layout: 4 train and 2 val videos of 12 gray frames."""
    root = tmp_path_factory.mktemp("data")
    ann, videos = root / "ann", root / "videos"
    ann.mkdir()
    videos.mkdir()
    write_gray_video(str(videos / "gray.mp4"), 12)
    records = {}
    for split, names in (("train", "abcd"), ("val", "ef")):
        records[split] = [{"video": f"v_{name}.mp4", "caption": [f"clip {name}."]} for name in names]
        for name in names:
            os.symlink(videos / "gray.mp4", videos / f"v_{name}.mp4")
        (ann / f"{split}.json").write_text(json.dumps(records[split]))
    return ann, videos


def config_for(tmp_path: Path, data, **overrides) -> str:
    ann, videos = data
    settings = dict(video_root=str(videos), ann_root=str(ann), num_frm_test=4, max_words=16,
                    batch_size_train=2, batch_size_test=2, embed_dim=16, queue_size=8, k_test=2,
                    max_epoch=1)
    settings.update(overrides)
    return write_config(tmp_path / "retrieval.yaml", "retrieval_activitynet_f32.yaml", **settings)


def fails_with(config: str, output_dir: Path, *extra, allowed=frozenset()) -> str:
    """The script's one-line error; nothing but `allowed` is left in output_dir (a run
    that fails its checks writes nothing, not even config.yaml)."""
    before = set(os.listdir(output_dir)) if output_dir.is_dir() else set()
    with pytest.raises(SystemExit) as exit_info:
        train_retrieval.main(["--config", config, "--output_dir", str(output_dir), *extra])
    message = str(exit_info.value.code)
    assert "\n" not in message and message.startswith("error: ")
    written = set(os.listdir(output_dir)) if output_dir.is_dir() else set()
    assert written - before <= set(allowed), written - before
    assert not [name for name in written - before if name.startswith(".")], written  # no temporaries
    return message


# settings that can only be checked together ---------------------------------------------
@pytest.mark.parametrize("opt, problem", [
    ("image_size=40", "image_size 40 is not a positive multiple of patch_size 16"),
    ("vision_width=65", "vision_width 65 is not divisible by num_heads 2"),
    ("testa_r=[3]", "testa_r asks to remove 3 frames in one step, but at most 1 can be removed "
                    "from the input (half of them)"),
    ("testa_r=[0,0,0,0,1]", "testa_r has 5 entries but the encoder runs only 4 aggregation "
                            "operations"),
    ("merging_type=[patch]", "merging_type list must hold 2 entries of 'patch', 'frame' or "
                             "'frame&patch', got ['patch']"),
])
def test_encoder_settings_that_do_not_fit_together_are_one_line_before_any_work(
        tmp_path, data, opt, problem):
    message = fails_with(config_for(tmp_path, data), tmp_path / "out", "--opts", opt)
    assert message == f"error: --opts: {problem}"
    assert not (tmp_path / "out").exists()  # checked before the output folder is made


@pytest.mark.parametrize("threshold", ["[0.5]", "[0.5,0.6,0.7]", "[0.5,2]"])
def test_a_threshold_that_is_not_a_pair_in_range_is_one_line_before_any_work(tmp_path, data,
                                                                            threshold):
    message = fails_with(config_for(tmp_path, data, token_merging=True), tmp_path / "out",
                         "--opts", f"testa_threshold={threshold}")
    assert message.startswith("error: --opts: testa_threshold must be null, a number in [-1, 1] "
                              "or a [frame, patch] pair of them, got ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not readable JSON (Expecting property name"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"hidden_size": "wide"}', "hidden_size must be int, got 'wide'"),
])
def test_a_med_config_that_cannot_be_read_is_one_line_before_any_work(tmp_path, data, text,
                                                                     problem):
    med = tmp_path / "med.json"
    med.write_text(text)
    config = config_for(tmp_path, data, med_config=str(med))
    message = fails_with(config, tmp_path / "out")
    assert message.startswith(f"error: {config}: med_config {med}: {problem}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, problem", [
    ("ffmpeg", "TESTA_VIDEO_DECODER='ffmpeg': expected auto, decord or pyav"),
    ("decod", "TESTA_VIDEO_DECODER='decod': expected auto, decord or pyav"),
])
def test_a_bad_decoder_variable_is_one_line_before_any_work(tmp_path, data, monkeypatch, value,
                                                           problem):
    monkeypatch.setenv("TESTA_VIDEO_DECODER", value)
    message = fails_with(config_for(tmp_path, data), tmp_path / "out")
    assert message == f"error: {problem}"
    assert not (tmp_path / "out").exists()


def test_encoder_problem_in_the_file_names_the_file(tmp_path, data):
    config = config_for(tmp_path, data, num_heads=3)
    message = fails_with(config, tmp_path / "out")
    assert message == f"error: {config}: vision_width 64 is not divisible by num_heads 3"


@pytest.mark.parametrize("opt, problem", [
    ("max_epoch=0", "max_epoch must be >= 1, got 0"),
    ("k_test=0", "k_test must be >= 1, got 0"),
    ("num_frames=0", "num_frames must be >= 1, got 0"),
])
def test_meaningless_counts_are_one_line(tmp_path, data, opt, problem):
    message = fails_with(config_for(tmp_path, data), tmp_path / "out", "--opts", opt)
    assert message == f"error: --opts: {problem}"


def test_queue_size_must_take_the_global_batch_at_the_actual_world_size(tmp_path, data):
    config = config_for(tmp_path, data, queue_size=9)
    message = fails_with(config, tmp_path / "out")
    assert message == (f"error: {config}: queue_size 9 is not a multiple of the global batch 2 "
                       f"(batch_size_train 2 x 1 process(es))")


def test_empty_validation_split_is_caught_before_the_first_epoch(tmp_path, data):
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "train.json").write_text((data[0] / "train.json").read_text())
    (ann / "val.json").write_text("[]")
    config = config_for(tmp_path, (ann, data[1]))
    message = fails_with(config, tmp_path / "out")
    assert message in (f"error: {ann / 'val.json'}: the val split has no records",
                       f"error: {config}: the val split is empty; validation after every epoch "
                       f"needs at least one item")


# the output folder --------------------------------------------------------------------
def test_a_file_in_the_way_of_the_output_folder_is_one_line(tmp_path, data):
    occupied = tmp_path / "out"
    occupied.write_text("not a folder")
    message = fails_with(config_for(tmp_path, data), occupied)
    assert message == f"error: --output_dir: {occupied}: a file is in the way, not a folder"
    assert occupied.read_text() == "not a folder"


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path, data):
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "out"
    message = fails_with(config_for(tmp_path, data), target)
    assert message == f"error: --output_dir: {target}: cannot create the folder (Not a directory)"


def test_a_used_output_folder_is_refused_unless_resume_or_overwrite(tmp_path, data):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    previous = {"checkpoint_last.pth": b"weights", "log.jsonl": b'{"kind": "step"}\n'}
    for name, content in previous.items():
        (output_dir / name).write_bytes(content)
    config = config_for(tmp_path, data)
    message = fails_with(config, output_dir)
    assert message == (f"error: --output_dir: {output_dir}: holds a previous run "
                       f"(checkpoint_last.pth, log.jsonl); pass --resume to continue it or "
                       f"--overwrite to replace it")
    for name, content in previous.items():
        assert (output_dir / name).read_bytes() == content  # nothing lost

    # --overwrite starts afresh: the old log is gone, not mixed with the new run
    train_retrieval.main(["--config", config, "--output_dir", str(output_dir), "--overwrite",
                          "--opts", "max_epoch=1"])
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "step" and "lr" in records[0]
    assert torch.load(output_dir / "checkpoint_last.pth", weights_only=True)["epoch"] == 0


def previous_run(output_dir: Path) -> dict:
    """A finished run's files (bytes) in `output_dir`."""
    output_dir.mkdir()
    files = {"config.yaml": b"# the earlier run's config\n", "checkpoint_last.pth": b"weights",
             "checkpoint_best.pth": b"best", "log.jsonl": b'{"kind": "step"}\n',
             "summary.json": b"{}", "notes.txt": b"mine"}
    for name, content in files.items():
        (output_dir / name).write_bytes(content)
    return files


def folder_content(output_dir: Path) -> dict:
    return {path.name: path.read_bytes() for path in output_dir.iterdir()}


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_a_refused_overwrite_or_resume_changes_nothing(tmp_path, data, flag):
    """A wrong video_root with --overwrite (or --resume) stops the run before the folder
    is taken: the earlier run stays as it was, config.yaml included."""
    output_dir = tmp_path / "out"
    files = previous_run(output_dir)
    ann, _ = data
    config = config_for(tmp_path, (ann, tmp_path / "no_such_videos"))
    message = fails_with(config, output_dir, flag)
    assert message.endswith("the train split has no usable record (4 missing video)")
    assert folder_content(output_dir) == files


def test_a_resume_from_a_damaged_checkpoint_keeps_the_config(tmp_path, data):
    output_dir = tmp_path / "out"
    files = previous_run(output_dir)
    message = fails_with(config_for(tmp_path, data), output_dir, "--resume")
    assert message.startswith(f"error: {output_dir / 'checkpoint_last.pth'}: not a PyTorch checkpoint")
    assert folder_content(output_dir) == files


def test_a_folder_in_use_by_another_run_is_refused(tmp_path, data):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        lock = output_dir / ".testa.lock"
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        message = fails_with(config_for(tmp_path, data), output_dir, "--overwrite",
                             allowed=set())
        assert message == (f"error: --output_dir: {output_dir}: in use by another run (pid "
                           f"{other.pid} on {socket.gethostname()}, {lock}); if no run is using "
                           f"the folder, delete that file")
        assert os.listdir(output_dir) == [".testa.lock"]
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_replaced_and_the_lock_removed_at_the_end(tmp_path, data):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    (output_dir / ".testa.lock").write_text(json.dumps({"pid": int(ended.stdout),
                                                        "host": socket.gethostname()}))
    train_retrieval.main(["--config", config_for(tmp_path, data), "--output_dir", str(output_dir)])
    assert (output_dir / "checkpoint_best.pth").is_file()
    assert not (output_dir / ".testa.lock").exists()


# during training ------------------------------------------------------------------------
def test_sigterm_during_training_ends_with_one_line_and_no_temporaries(tmp_path, data):
    output_dir = tmp_path / "out"
    config = config_for(tmp_path, data, max_epoch=5)

    def terminate_after_first_step():
        log_file = output_dir / "log.jsonl"
        while not (log_file.is_file() and log_file.read_text()):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_after_first_step, daemon=True)
    killer.start()
    message = fails_with(config, output_dir, allowed={"config.yaml", "log.jsonl",
                                                      "checkpoint_last.pth", "checkpoint_best.pth"})
    killer.join(timeout=10)
    assert message == ("error: stopped by SIGTERM; finished epochs are in the output folder's "
                       "checkpoint_last.pth (--resume continues)")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the script's handler is gone


def test_a_signal_while_an_item_is_fetched_is_raised_once_it_is_in():
    """A DataLoader hands a batch over in several steps (a worker passes its shared memory
    over a connection); a signal raised in between would cut the connection."""
    fetched = []

    def batches():
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, before the next line
        fetched.append("first batch, whole")
        yield 0
        fetched.append("never")
        yield 1

    with script_signals(), pytest.raises(Interrupted, match="SIGTERM"):
        for _ in held_while_fetching(batches()):
            fetched.append("a step")
    assert fetched == ["first batch, whole"]


def test_a_second_signal_while_an_item_is_fetched_raises_at_once():
    fetched = []

    def batches():
        os.kill(os.getpid(), signal.SIGINT)
        fetched.append("after the first signal")
        os.kill(os.getpid(), signal.SIGINT)
        fetched.append("after the second signal")
        yield 0

    with script_signals(), pytest.raises(Interrupted, match="SIGINT"):
        list(held_while_fetching(batches()))
    assert fetched == ["after the first signal"]


def test_without_a_catcher_items_pass_as_they_are():
    assert list(held_while_fetching(iter(range(3)))) == [0, 1, 2]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_with_loader_workers_ends_in_one_line(tmp_path, data, signum):
    """Ctrl-C and schedulers signal every process of the group, DataLoader workers too."""
    output_dir = tmp_path / "out"
    ann, videos = data
    long_ann = tmp_path / "ann"  # 100 steps an epoch: the signal comes while workers load
    long_ann.mkdir()
    (long_ann / "train.json").write_text(json.dumps(
        [{"video": f"v_{name}.mp4", "caption": [f"clip {name} {i}."]} for i in range(50) for name in "abcd"]))
    (long_ann / "val.json").write_text((ann / "val.json").read_text())
    config = config_for(tmp_path, (long_ann, videos), num_workers=2)
    script = subprocess.Popen([sys.executable, str(REPO_ROOT / "train_retrieval.py"), "--config", config,
                               "--output_dir", str(output_dir), "--opts", "progress_bar=off"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    log_file = output_dir / "log.jsonl"
    deadline = time.time() + 120
    while not (log_file.is_file() and log_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(script.pid, signum)
    output, _ = script.communicate(timeout=120)
    assert script.returncode == 1
    assert "Traceback" not in output and "Exception ignored" not in output, output
    assert output.strip().splitlines()[-1] == (
        f"error: stopped by {signal.Signals(signum).name}; finished epochs are in the output "
        f"folder's checkpoint_last.pth (--resume continues)")


def test_a_loss_that_is_not_finite_stops_the_run_naming_epoch_step_and_loss(tmp_path, data):
    # a learning rate this large sends the weights to infinity in the first update
    config = config_for(tmp_path, data, init_lr=1e30, weight_decay=0.0)
    message = fails_with(config, tmp_path / "out", allowed={"config.yaml", "log.jsonl"})
    assert message == ("error: training stopped: loss_vtc is not finite at epoch 0 step 1; "
                       "the weights saved last (at the end of an epoch, or by "
                       "checkpoint_every_steps) are in checkpoint_last.pth")


def test_non_finite_watch_names_the_first_bad_step_though_it_looks_later():
    watch = NonFiniteWatch(torch.device("cpu"))
    for step in range(6):
        bad = step in (3, 4)
        watch.record({"loss_a": torch.tensor(1.0),
                      "loss_b": torch.tensor(float("nan") if bad else 2.0)}, step)
        if step == 2:
            watch.check(epoch=5)  # nothing yet
    with pytest.raises(NonFiniteError, match="loss_b is not finite at epoch 5 step 3;"):
        watch.check(epoch=5)


# legal batches ------------------------------------------------------------------------
def test_a_batch_holding_one_video_twice_trains(tiny_config, tiny_video, captions):
    torch.manual_seed(0)
    model = build_retrieval_model(tiny_config())
    video = tiny_video(1).expand(2, -1, -1, -1, -1)  # the same clip twice, two texts
    loss_vtc, loss_vtm = model(video, captions[:2], 0.4, torch.tensor([3, 3]))
    (loss_vtc + loss_vtm).backward()
    assert torch.isfinite(loss_vtc) and torch.isfinite(loss_vtm)
    assert model.itm_head.weight.grad.abs().sum() > 0  # the positive pairs still train VTM


def test_answer_scores_that_are_not_finite_stop_the_videoqa_evaluation(tiny_config, tiny_video):
    torch.manual_seed(0)
    model = build_videoqa_model(tiny_config()).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.decoder.bias.fill_(float("nan"))
    run = SimpleNamespace(config={"inference": "rank", "k_test": 2},
                          precision=build_precision("none", torch.device("cpu")))
    with pytest.raises(NonFiniteError, match="^evaluation stopped: answer scores are not finite$"):
        answer_batch(model, tiny_video(2), ["what is it?", "where?"], ["a dog", "a cat", "yes"], run)


# distributed --------------------------------------------------------------------------
STALLED_PEER = """
import os, sys, time
from pathlib import Path
import torch
from engine.distributed import init_distributed
from models.collectives import all_reduce_sum
from engine.run import script_errors
folder = Path(sys.argv[1])
(folder / f"ready{os.environ['RANK']}").touch()  # imports done: both join the group at once
while not all((folder / f"ready{rank}").exists() for rank in range(2)):
    time.sleep(0.05)
with script_errors():
    init_distributed(torch.device("cpu"), timeout_minutes=0.05)  # 3 s
    if os.environ["RANK"] == "1":
        while not (folder / "release").exists():  # stalled until the test lets it go
            time.sleep(0.05)
        (folder / "awake").touch()
    all_reduce_sum(torch.ones(1))
"""


def launch_two_ranks(script: str, argument: str, **env: str) -> list:
    """`python -c script argument` as ranks 0 and 1 of a gloo group on 127.0.0.1 at a free
    port, their stderr piped."""
    shared = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO_ROOT), **env}
    return [subprocess.Popen([sys.executable, "-c", script, argument], cwd=REPO_ROOT,
                             env={**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                             stderr=subprocess.PIPE, text=True) for rank in range(2)]


@pytest.mark.slow  # two processes that import torch, and a 3 s collective timeout
def test_a_stalled_peer_ends_the_run_with_one_line_instead_of_hanging(tmp_path):
    ranks = launch_two_ranks(STALLED_PEER, str(tmp_path))
    _, waiting_err = ranks[0].communicate(timeout=300)
    assert not (tmp_path / "awake").exists()  # rank 0 gave up while rank 1 was stalled
    (tmp_path / "release").touch()
    _, stalled_err = ranks[1].communicate(timeout=300)
    assert ranks[0].returncode == 1 and "Traceback" not in waiting_err
    assert waiting_err.strip().splitlines()[-1].startswith(
        "error: rank 0: another process did not take part in a collective within "
        "dist_timeout_minutes, or left (")
    assert ranks[1].returncode == 1 and "Traceback" not in stalled_err
    assert stalled_err.strip().splitlines()[-1].startswith("error: rank 1: ")


UNREACHABLE_WEIGHTS = """
import sys
import torch
from torch import nn
from engine.distributed import init_distributed
from engine.run import script_errors
from engine.checkpoints import load_weights
with script_errors():
    init_distributed(torch.device("cpu"), timeout_minutes=10)
    load_weights(nn.Linear(2, 2), sys.argv[1])
"""


@pytest.mark.slow  # two processes that import torch
def test_a_download_failing_on_the_first_rank_stops_every_rank_with_its_error(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/model_base.pth"
    ranks = launch_two_ranks(UNREACHABLE_WEIGHTS, url, TESTA_CACHE=str(tmp_path / "cache"))
    # both end on their own, well before the 10-minute collective timeout
    errors = [rank.communicate(timeout=300)[1] for rank in ranks]
    for rank, err in zip(ranks, errors):
        assert rank.returncode == 1 and "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: {url}: download failed ("), last
