"""Resuming part-way through an epoch (`checkpoint_every_steps`): a fine-tuning run killed
with SIGKILL after its second mid-epoch checkpoint and resumed ends with the weights of an
uninterrupted run, bit for bit; the pieces it rests on (a sampler that starts part-way,
item draws that depend on the item only, tar-shard ranges that restart where they
stood, log.jsonl without repeated steps)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import datasets
import train_retrieval
from datasets.loader import EpochSampler
from datasets.shards import shuffled_positions, worker_batches
from engine.logs import RunRecords
from helpers import REPO_ROOT, run_script, write_config, write_gray_video

TRAIN_VIDEOS = 24  # 12 steps an epoch at 2 clips a step


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """ActivityNet Captions layout: TRAIN_VIDEOS train and 2 val videos, gray clips of
    different lengths (so that frame sampling differs between items)."""
    root = tmp_path_factory.mktemp("data")
    ann, videos = root / "ann", root / "videos"
    ann.mkdir()
    videos.mkdir()
    for length in (9, 12, 16):
        write_gray_video(str(videos / f"gray{length}.mp4"), length)
    splits = {"train": [f"t{i}" for i in range(TRAIN_VIDEOS)], "val": ["e0", "e1"]}
    for split, names in splits.items():
        records = [{"video": f"v_{name}.mp4", "caption": [f"clip {name} of {split}."]} for name in names]
        for position, name in enumerate(names):
            os.symlink(videos / f"gray{(9, 12, 16)[position % 3]}.mp4", videos / f"v_{name}.mp4")
        (ann / f"{split}.json").write_text(json.dumps(records))
    return ann, videos


def config_for(tmp_path: Path, data, **overrides) -> str:
    ann, videos = data
    settings = dict(video_root=str(videos), ann_root=str(ann), num_frm_test=4, max_words=16,
                    batch_size_train=2, batch_size_test=2, embed_dim=16, queue_size=8, k_test=2,
                    max_epoch=2, accum_steps=2, frm_sampling_strategy="rand", augment=True,
                    progress_bar="off")
    settings.update(overrides)
    return write_config(tmp_path / "retrieval.yaml", "retrieval_activitynet_f32.yaml", **settings)


def records(output_dir: Path, kind: str) -> list:
    lines = (output_dir / "log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def test_a_run_killed_after_two_mid_epoch_checkpoints_resumes_to_the_same_weights(tmp_path, data):
    config = config_for(tmp_path, data)
    straight = tmp_path / "straight"
    run_script(train_retrieval.main, "--config", config, "--output_dir", straight,
               "--opts", "num_workers=0")

    # the same run with two loader workers and checkpoint_last.pth every 2 optimizer steps
    # (of 2 batches each), killed once the second checkpoint of epoch 0 is written
    killed = tmp_path / "killed"
    options = ["num_workers=2", "checkpoint_every_steps=2"]
    command = [sys.executable, str(REPO_ROOT / "train_retrieval.py"), "--config", config,
               "--output_dir", str(killed), "--opts", *options]
    script = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while time.time() < deadline and script.poll() is None:
        if (killed / "log.jsonl").is_file() and len(records(killed, "checkpoint")) >= 2:
            break
        time.sleep(0.02)
    os.killpg(script.pid, signal.SIGKILL)  # the script and its loader workers
    _, errors = script.communicate(timeout=60)
    assert script.returncode == -signal.SIGKILL, errors
    written = records(killed, "checkpoint")  # after optimizer steps 2 and 4: batches 4 and 8
    assert [(record["epoch"], record["step"]) for record in written[:2]] == [(0, 4), (0, 8)]
    assert not records(killed, "epoch")  # stopped inside epoch 0

    resumed = run_script(train_retrieval.main, "--config", config, "--output_dir", killed,
                         "--resume", "--opts", *options)
    assert "epoch 0 at step 8" in resumed
    final, expected = (torch.load(folder / "checkpoint_last.pth", weights_only=True)
                       for folder in (killed, straight))
    assert final["epoch"] == expected["epoch"] == 1 and final["position"] is None
    assert final["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key
    # every step logged once, global_step going on across the resume; the epoch means
    # cover the steps of both sessions
    steps = records(killed, "step")
    assert [record["global_step"] for record in steps] == list(range(2 * 12))
    for got, want in zip(records(killed, "epoch"), records(straight, "epoch")):
        assert (got["train_loss_vtc"], got["train_loss_vtm"]) == (want["train_loss_vtc"], want["train_loss_vtm"])
        assert got["train_steps_per_rank"] == want["train_steps_per_rank"] == [12]
        assert got["train_samples_per_rank"] == want["train_samples_per_rank"] == [24]
