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

import train_retrieval
from datasets.issues import DataIssues
from datasets.loader import EpochSampler
from datasets.shards import shuffled_positions, worker_batches
from engine.logs import RunRecords
from helpers import REPO_ROOT, run_script, write_config, write_gray_video
from tasks import build_datasets

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


@pytest.fixture
def one_thread():
    """One intra-op thread in this process, as the killed subprocess runs with: float32
    sums split over a different number of threads round differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_run_killed_after_two_mid_epoch_checkpoints_resumes_to_the_same_weights(tmp_path, data,
                                                                                   one_thread):
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


# the pieces --------------------------------------------------------------------------
def test_the_epoch_sampler_starting_part_way_gives_the_rest_of_the_epoch():
    data = list(range(23))
    for world_size in (1, 3):
        for rank in range(world_size):
            sampler = EpochSampler(data, world_size, rank, seed=5)
            sampler.set_epoch(2)
            whole = list(sampler)
            reference = torch.utils.data.DistributedSampler(data, world_size, rank, shuffle=True,
                                                            seed=5, drop_last=True)
            reference.set_epoch(2)
            assert whole == list(reference)
            sampler.set_epoch(2, start=4)
            assert list(sampler) == whole[4:] and len(sampler) == len(whole) - 4
            sampler.set_epoch(3)  # the next epoch starts at its beginning
            assert len(list(sampler)) == len(whole)
    with pytest.raises(ValueError, match="outside the epoch"):
        EpochSampler(data, 1, 0, seed=0).set_epoch(0, start=24)


def test_items_draw_alike_whichever_worker_reads_them_and_differ_by_epoch(tmp_path, data):
    config = dict(dataset="retrieval_activitynet", video_root=str(data[1]), ann_root=str(data[0]),
                  num_frm_train=4, num_frm_test=4, image_size=32, max_words=16,
                  frm_sampling_strategy="rand", augment=True)
    train, _, _ = build_datasets(config)
    clips = {}
    for workers in (0, 2):
        train.seed_items(11)
        loader = torch.utils.data.DataLoader(train, batch_size=3, num_workers=workers,
                                             collate_fn=train.collate_fn)
        clips[workers] = torch.cat([video for video, _, _ in loader])
    assert torch.equal(clips[0], clips[2])
    train.seed_items(12)
    assert not torch.equal(train[0][0], clips[0][0])


def test_a_shard_epoch_resumed_part_way_yields_the_rest_of_the_uninterrupted_one(tmp_path):
    """22 gray clips in shards of 6, read by a DataLoader with 2 workers (10 batches of 2
    an epoch); starting after 3 or 6 batches gives the rest of the epoch's batches."""
    clips = []
    for i in range(22):
        write_gray_video(str(tmp_path / f"v{i:02d}.mp4"), 6 + i % 5)
        clips.append({"path": str(tmp_path / f"v{i:02d}.mp4"), "caption": f"clip {i}"})
    (tmp_path / "list.json").write_text(json.dumps(clips))
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_shards.py"), "--train_file",
                    str(tmp_path / "list.json"), "--out", str(tmp_path / "shards"),
                    "--samples-per-shard", "6"], check=True, capture_output=True)
    config = {"dataset": "pretrain_video", "num_frm_train": 2, "image_size": 32,
              "video_resize": 32, "max_words": 16, "batch_size": 2, "num_workers": 2, "seed": 3,
              "shuffle_buffer": 4, "frm_sampling_strategy": "rand",
              "train_shards": str(tmp_path / "shards" / "train-{000000..000003}.tar")}
    dataset, _, _ = build_datasets(config)

    def batches(start_batches: int) -> list:
        dataset.set_epoch(1, start=2 * start_batches)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                             collate_fn=dataset.collate_fn)
        return list(loader)

    whole = batches(0)
    assert len(whole) == 10
    for start in (3, 6):
        rest = batches(start)
        assert [captions for _, captions in rest] == [captions for _, captions in whole[start:]]
        assert all(torch.equal(got, want) for (got, _), (want, _) in zip(rest, whole[start:]))


def test_shuffled_positions_are_the_order_of_the_shuffle_buffer():
    import random
    import webdataset as wds
    samples = [f"sample {i}" for i in range(40)]
    shuffled = list(wds.shuffle(8, initial=8, rng=random.Random(3))(iter(samples)))
    assert [samples[i] for i in shuffled_positions(40, 8, 3)] == shuffled


def test_worker_batches_follow_the_loaders_turns():
    # batches 0..6 of a rank come from workers 0, 1, 2, 0, 1, 2, 0
    assert [worker_batches(7, worker, 3) for worker in range(3)] == [3, 2, 2]
    assert [worker_batches(1, worker, 3) for worker in range(3)] == [1, 0, 0]
    assert worker_batches(0, 0, 1) == 0 and worker_batches(5, 0, 1) == 5


def test_resuming_drops_the_logged_steps_the_run_repeats(tmp_path):
    log_records = RunRecords(tmp_path)
    for epoch in range(2):
        for step in range(3):
            log_records.write({"kind": "step", "epoch": epoch, "step": step})
        log_records.write({"kind": "epoch", "epoch": epoch})
    with open(tmp_path / "log.jsonl", "a") as log_file:
        log_file.write('{"kind": "step", "ep')  # cut short by a kill
    log_records.drop_steps_from(1, 1)
    kept = [(record["kind"], record["epoch"], record.get("step"))
            for record in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()[:-1])]
    assert kept == [("step", 0, 0), ("step", 0, 1), ("step", 0, 2), ("epoch", 0, None),
                    ("step", 1, 0), ("epoch", 1, None)]


def test_a_resumed_run_hides_the_stopped_runs_later_tensorboard_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    stopped = RunRecords(tmp_path, tensorboard=True)
    for global_step in range(6):  # 3 steps an epoch; killed after epoch 1 step 2
        stopped.write({"kind": "step", "epoch": global_step // 3, "step": global_step % 3,
                       "global_step": global_step, "loss": float(global_step)})
    stopped.writer.close()
    resumed = RunRecords(tmp_path, tensorboard=True)
    resumed.continue_from(1, 1, 4)  # resumed at epoch 1 step 1 (its last checkpoint)
    for global_step in (4, 5):
        resumed.write({"kind": "step", "epoch": 1, "step": global_step % 3,
                       "global_step": global_step, "loss": 10.0 + global_step})
    resumed.writer.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("step/loss")] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    logged = [record["global_step"] for record in map(json.loads,
                                                      (tmp_path / "log.jsonl").read_text().splitlines())]
    assert logged == [0, 1, 2, 3, 4, 5]


def test_a_resumed_run_passes_over_the_videos_that_failed_before_and_counts_them(tmp_path, data,
                                                                                 caplog):
    """The videos that failed to decode are in checkpoint_last.pth: the resumed run does
    not try them again (an uninterrupted run would not) and its summary still counts them."""
    ann, videos = data
    own_ann, own_videos = tmp_path / "ann", tmp_path / "videos"
    own_ann.mkdir()
    own_videos.mkdir()
    names = ["t0", "t1", "t2", "t3", "t4", "broken"]  # 3 steps of 2: every item is drawn
    for name in [*names[:-1], "e0", "e1"]:
        os.symlink(videos / f"v_{name}.mp4", own_videos / f"v_{name}.mp4")
    (own_videos / "v_broken.mp4").write_bytes(b"not a video")
    (own_ann / "train.json").write_text(json.dumps(
        [{"video": f"v_{name}.mp4", "caption": [f"clip {name}."]} for name in names]))
    (own_ann / "val.json").write_text((ann / "val.json").read_text())
    config = config_for(tmp_path, (own_ann, own_videos), max_epoch=1, accum_steps=1)
    output_dir = tmp_path / "out"

    def decode_warnings() -> list:
        return [r for r in caplog.records if "v_broken.mp4" in r.getMessage()]

    first = run_script(train_retrieval.main, "--config", config, "--output_dir", output_dir,
                       "--opts", "num_workers=0")
    assert len(decode_warnings()) == 1 and "1 video failed to decode" in first
    saved = torch.load(output_dir / "checkpoint_last.pth", weights_only=True)
    assert [indices.tolist() for indices in saved["failed_videos"]] == [[5]]  # one rank
    caplog.clear()
    resumed = run_script(train_retrieval.main, "--config", config, "--output_dir", output_dir,
                         "--resume", "--opts", "num_workers=0", "max_epoch=2")
    assert decode_warnings() == []  # passed over, not decoded and reported again
    assert "1 video failed to decode" in resumed


def test_failed_videos_of_another_training_set_are_not_flagged():
    issues = DataIssues("set/train")
    issues.track_videos(3)
    assert issues.flag_failed(torch.tensor([1], dtype=torch.int32))
    assert issues.failed_videos().tolist() == [1] and issues.num_decode_failures == 1
    assert not issues.flag_failed(torch.tensor([0, 3], dtype=torch.int32))  # 3 videos: 0..2
    assert issues.failed_videos().tolist() == [1]
