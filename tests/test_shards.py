"""Tar shards: tools/make_shards.py, the epoch plan, ShardedPretrainDataset, a two-rank run."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from datasets import DataError
from datasets.issues import DataIssues
from datasets.shards import ShardedPretrainDataset, plan_epoch, read_manifest, samples_per_slot, shard_name
from helpers import REPO_ROOT, free_port, write_config, write_gray_video
from tasks import build_datasets
from utils import ConfigError

from tools import make_shards

NUM_CLIPS = 23


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """A pre-training list of NUM_CLIPS gray videos, caption `clip i` each, and one missing file."""
    root = tmp_path_factory.mktemp("clips")
    records = []
    for i in range(NUM_CLIPS):
        path = root / f"v{i:02d}.mp4"
        if i < 3:
            write_gray_video(str(path), 6 + i)
        records.append({"path": str(root / f"v{i % 3:02d}.mp4"), "caption": f"clip {i}"})
    records.append({"path": str(root / "missing.mp4"), "caption": "gone"})
    (root / "list.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def shards(clips, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    make_shards.main(["--train_file", str(clips / "list.json"), "--out", str(out),
                      "--samples-per-shard", "5"])
    return out


def config_of(shards: Path, **overrides) -> dict:
    return {"dataset": "pretrain_video", "train_shards": str(shards / "train-{000000..000004}.tar"),
            "num_frm_train": 2, "image_size": 32, "video_resize": 32, "max_words": 16,
            "batch_size": 2, "num_workers": 0, "seed": 0, **overrides}


def test_shards_keep_the_stored_bytes_and_the_manifest_counts_and_hashes_them(clips, shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert manifest["samples"] == NUM_CLIPS  # the missing file is skipped
    captions = []
    for shard in manifest["shards"]:
        path = shards / shard["name"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert len(members) == 2 * shard["samples"]
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                captions += meta["captions"]
                media = members[name[:-len("json")] + "mp4"]
                assert media == Path(meta["path"]).read_bytes()
    assert captions == [f"clip {i}" for i in range(NUM_CLIPS)]


def test_the_plan_gives_every_slot_the_same_whole_batches_of_one_contiguous_range():
    counts, order, slots, batch = [5, 5, 5, 5, 3], [2, 4, 3, 0, 1], 4, 2
    sequence = [(shard, position) for shard in order for position in range(counts[shard])]
    per_slot = samples_per_slot(sum(counts), slots, batch)
    assert per_slot == 4 and sum(counts) - slots * per_slot < slots * batch
    for slot, plan in enumerate(plan_epoch(counts, order, slots, batch)):
        read = [(shard, position) for shard, skip, take in plan
                for position in range(skip, skip + take)]
        assert read == sequence[slot * per_slot:(slot + 1) * per_slot]


def test_shard_names_of_paths_urls_and_pipe_commands():
    assert shard_name("/data/train-000001.tar") == "train-000001.tar"
    assert shard_name("https://host/bucket/train-000002.tar?sig=x") == "train-000002.tar"
    assert shard_name("pipe:aws s3 cp s3://b/train-000003.tar -") == "train-000003.tar"


def test_two_ranks_with_two_workers_read_every_sample_at_most_once(shards):
    counts = [5, 5, 5, 5, 3]
    urls = [str(shards / f"train-{i:06d}.tar") for i in range(5)]
    captions = []
    for rank in range(2):
        dataset = ShardedPretrainDataset(
            DataIssues("x/train"), urls, counts, max_words=16, num_frames=2,
            strategy="uniform", image_size=32, video_resize=32, augment=False, batch_size=2,
            num_workers=2, shuffle_buffer=3, seed=0, rank=rank, world_size=2)
        assert len(dataset) == 2 * samples_per_slot(NUM_CLIPS, 4, 2) == 8
        for worker in range(2):
            items = list(dataset.slot_items(rank * 2 + worker))
            assert len(items) == 4
            captions += [caption for _, caption in items]
    assert len(captions) == len(set(captions)) == 16  # 23 - 16 < 4 slots x batch 2 left out
    assert set(captions) <= {f"clip {i}" for i in range(NUM_CLIPS)}


def write_shard(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_counted_and_replaced_so_the_epoch_keeps_its_length(clips, tmp_path):
    good = (clips / "v00.mp4").read_bytes()
    caption = lambda i: json.dumps({"captions": [f"clip {i}"]}).encode()  # noqa: E731
    write_shard(tmp_path / "a.tar", [
        {"0.mp4": good, "0.json": caption(0)},
        {"1.mp4": b"not a video", "1.json": caption(1)},        # does not decode
        {"2.mp4": good, "2.json": b'{"captions": []}'},           # no caption
        {"3.mp4": good, "3.json": caption(3)},
        {"5.mp4": good, "5.json": b'{"captions": ["one"], "captions": ["other"]}'}])  # twice
    write_shard(tmp_path / "b.tar", [{"4.mp4": good, "4.json": caption(4)}])  # manifest says 3
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [
        {"name": "a.tar", "samples": 5}, {"name": "b.tar", "samples": 3}]}))
    dataset, _, _ = build_datasets(config_of(tmp_path, train_shards=[str(tmp_path / "a.tar"),
                                                                       str(tmp_path / "b.tar")],
                                             batch_size=8, shuffle_buffer=1))
    items = list(dataset.slot_items(0))
    assert len(items) == len(dataset) == 8
    # one undecodable, one captionless, one with a key given twice, two missing
    assert dataset.num_decode_failures == 5
    assert {caption for _, caption in items} == {"clip 0", "clip 3", "clip 4"}
    assert "5 videos failed to decode (previous sample used)" in dataset.summary()


def test_the_config_names_exactly_one_source_and_shards_the_manifest_knows(shards, clips):
    with pytest.raises(ConfigError, match="both set"):
        build_datasets(config_of(shards, train_file=str(clips / "list.json")))
    with pytest.raises(ConfigError, match="set train_file .* or train_shards"):
        build_datasets(config_of(shards, train_shards=None))
    with pytest.raises(DataError, match="manifest.json: has no shard 'train-000005.tar'"):
        build_datasets(config_of(shards, train_shards=str(shards / "train-{000000..000005}.tar")))
    with pytest.raises(DataError, match="given twice"):
        build_datasets(config_of(shards, train_shards=[str(shards / "train-000000.tar")] * 2))
    with pytest.raises(DataError, match="name the shards' manifest with shards_manifest"):
        build_datasets(config_of(shards, train_shards="https://host/train-000000.tar"))
    with pytest.raises(DataError, match="make no batch of 8 for each of 4 loader workers"):
        build_datasets(config_of(shards, batch_size=8, num_workers=4))


@pytest.mark.slow  # two processes with two loader workers each, one epoch of pre-training
def test_two_ranks_pretrain_from_shards_and_consume_the_dataset_in_equal_steps(shards, tmp_path):
    config = write_config(
        tmp_path / "pretrain.yaml", "pretrain_from_blip.yaml", train_file=None,
        train_shards=str(shards / "train-{000000..000004}.tar"), shuffle_buffer=4,
        video_resize=32, batch_size=2, embed_dim=16, queue_size=8, max_words=16,
        warmup_steps=2, max_epoch=2, num_workers=2, num_frm_train=2, num_frames=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(REPO_ROOT / "pretrain.py"), "--config", config,
               "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    epochs = [record for record in records if record["kind"] == "epoch"]
    assert len(epochs) == 2
    per_slot = samples_per_slot(NUM_CLIPS, 2 * 2, 2)  # 4: 23 - 16 = 7 < 4 slots x batch 2
    for epoch in epochs:
        assert epoch["train_steps_per_rank"] == [2 * per_slot // 2] * 2  # 2 workers, batch 2
        assert epoch["train_samples_per_rank"] == [2 * per_slot] * 2
        assert NUM_CLIPS - sum(epoch["train_samples_per_rank"]) < 2 * 2 * 2
    assert (tmp_path / "out" / "checkpoint_01.pth").is_file()


def test_a_manifest_entry_that_gives_a_key_twice_is_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text(
        '{"shards": [{"name": "a.tar", "samples": 3, "samples": 5}]}')
    with pytest.raises(DataError, match=r"manifest.json: the top-level object has 'samples' given "
                                        r"twice in shards\[0\]$"):
        read_manifest(str(tmp_path / "manifest.json"))
