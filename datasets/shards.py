"""Pre-training from webdataset tar shards (`train_shards`), read sequentially by webdataset.

A shard holds samples `KEY.<ext>` (the stored video or image bytes, as they were) and
`KEY.json` (`{"captions": [...], "path": original path}`); `tools/make_shards.py` writes
them with a manifest (`manifest.json`: every shard's name, sample count and sha256), from
which the epoch's length is known without reading any shard.

Every epoch the shards are put in one order (seeded by seed and epoch, the same on every
rank), their samples read as one sequence, and that sequence cut into equal contiguous
ranges, one per loader worker of every rank (a "slot"): `per_slot = B * floor(N / (S * B))`
samples for S = ranks x workers per rank, batch B and N samples in all. So every rank runs
the same number of steps, every sample is read at most once per epoch, and the last
`N - S * per_slot < S * B` samples of the epoch's order are left out (other ones each epoch,
as the order changes). A range may begin inside a shard: its worker reads that shard from
the start and skips the samples before its range without decoding them.

Inside its range a worker shuffles through a buffer of `shuffle_buffer` raw samples
(webdataset's shuffle, whose order is worked out on the positions of the range, so that the
samples can be read in order and used in that order). An epoch resumed after `b` batches of
a rank (`set_epoch(epoch, start)`) gives each worker the rest of its range in the same
order, with the same random draws: it reads from the first position not yet used (a shard
wholly used is not opened; of the shard it starts in, the samples before are read again,
not decoded), so no sample is seen twice or left out. A bad
sample (no media or JSON, a JSON without captions, media that do not decode, an empty
caption, or the samples missing when a shard ends early or cannot be read) is counted and
reported like a bad file (`DataIssues`) and replaced by the worker's previous good sample
(by its next one when no sample is good yet), so the number of items stays put.
"""
import io
import os
import random
from itertools import islice
from typing import Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .annotations import DataError, RepeatedKeys, load_json, parse_json
from .base import item_rng
from .issues import DataIssues
from .pretrain import VIDEO_SUFFIXES, PretrainDataset, pretrain_data_config, read_image
from .text import pre_caption
from .transforms import PretrainImageTransform, PretrainVideoTransform
from .video import VideoDecodeError, read_frames

MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FALLBACK = "previous sample used"


class NamedBytes(io.BytesIO):
    """A sample's media bytes, named after the shard and key in the decoders' messages."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


class BadSample(ValueError):
    """A sample whose JSON or media is missing or unusable."""


# which shards ------------------------------------------------------------------------
def expand_shards(specs: str | Sequence[str]) -> list[str]:
    """Local paths, `http(s)://` URLs or `pipe:` commands, brace patterns expanded
    (`train-{000000..000099}.tar`), in the order given."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    return [url for spec in specs for url in wds.shardlists.expand_urls(spec)]


def shard_name(url: str) -> str:
    """The file name a manifest knows a shard by: of the path, the URL's path, or the last
    word of a `pipe:` command naming a .tar file."""
    if url.startswith("pipe:"):
        words = url[len("pipe:"):].split()
        url = next((word for word in reversed(words) if ".tar" in word), words[-1] if words else "")
    return os.path.basename(urlparse(url).path if "://" in url else url)


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def default_manifest(urls: Sequence[str]) -> str | None:
    """manifest.json next to the first shard when it is a local file, else None."""
    return os.path.join(os.path.dirname(urls[0]), MANIFEST) if urls and is_local(urls[0]) else None


def read_manifest(path: str) -> dict[str, int]:
    """Shard name -> sample count of a manifest; a wrong shape raises DataError naming it."""
    manifest = load_json(path)
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list):
        raise DataError(f"{path}: expected a shard manifest, an object with a 'shards' list")
    counts: dict[str, int] = {}
    for position, shard in enumerate(shards):
        name = shard.get("name") if isinstance(shard, dict) else None
        samples = shard.get("samples") if isinstance(shard, dict) else None
        if (not isinstance(name, str) or isinstance(samples, bool) or not isinstance(samples, int)
                or samples < 0):
            raise DataError(f"{path}: shards[{position}] needs a 'name' and a 'samples' count >= 0")
        if name in counts:
            raise DataError(f"{path}: shard {name!r} is listed twice")
        counts[name] = samples
    return counts


def shard_counts(urls: Sequence[str], manifest: str) -> list[int]:
    """The sample count of every shard, from the manifest; a shard given twice or absent
    from the manifest raises DataError."""
    known = read_manifest(manifest)
    names = [shard_name(url) for url in urls]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DataError(f"train_shards: shard {twice[0]!r} is given twice")
    absent = [name for name in names if name not in known]
    if absent:
        raise DataError(f"{manifest}: has no shard {absent[0]!r} (of train_shards); "
                        f"{len(absent)} of {len(names)} shards are not in it")
    return [known[name] for name in names]


# which samples where -----------------------------------------------------------------
def samples_per_slot(total: int, num_slots: int, batch_size: int) -> int:
    """Samples every slot reads per epoch: a whole number of batches, the same for all."""
    return total // (num_slots * batch_size) * batch_size


def plan_epoch(counts: Sequence[int], order: Sequence[int], num_slots: int,
               batch_size: int) -> list[list[tuple[int, int, int]]]:
    """For every slot, the `(shard, skip, take)` pieces of its range of the samples of the
    shards in `order`: read shard `shard`, skip `skip` samples, keep the next `take`."""
    per_slot = samples_per_slot(sum(counts), num_slots, batch_size)
    plans: list[list[tuple[int, int, int]]] = [[] for _ in range(num_slots)]
    slot, room = 0, per_slot
    for shard in order:
        used = 0
        while used < counts[shard] and slot < num_slots:
            take = min(room, counts[shard] - used)
            if take:
                plans[slot].append((shard, used, take))
            used, room = used + take, room - take
            if room == 0:
                slot, room = slot + 1, per_slot
    return plans


def slot_seed(seed: int, epoch: int, slot: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, slot]).generate_state(1)[0])


def worker_batches(batches: int, worker: int, num_workers: int) -> int:
    """Of the first `batches` batches of a rank, those its loader worker `worker` made: a
    DataLoader takes batches from its workers in turn."""
    return max(0, (batches - worker + num_workers - 1) // num_workers)


def shuffled_positions(length: int, buffer: int, seed: int) -> list[int]:
    """The order in which webdataset's shuffle buffer (`buffer` samples, filled before the
    first pick, its rng seeded with `seed`) yields the samples of a range of `length`: its
    picks depend on the rng and the buffer's fill only, so shuffling the positions gives
    the order the samples themselves would take."""
    shuffle = wds.shuffle(buffer, initial=buffer, rng=random.Random(seed))
    return list(shuffle(iter(range(length))))


class ShardedPretrainDataset(IterableDataset):
    """Items `(video [T, 3, H, W], caption)` from tar shards, like PretrainDataset's;
    `len()` is the items of this rank per epoch (its workers' ranges together)."""

    collate_fn = staticmethod(PretrainDataset.collate_fn)

    def __init__(self, issues: DataIssues, urls: Sequence[str], counts: Sequence[int], *,
                 max_words: int, num_frames: int, strategy: str, image_size: int,
                 video_resize: int, augment: bool, batch_size: int, num_workers: int,
                 shuffle_buffer: int, seed: int, rank: int = 0, world_size: int = 1):
        if video_resize < image_size:
            raise ValueError(f"video_resize ({video_resize}) must be at least image_size ({image_size})")
        self.issues = issues
        self.urls, self.counts = list(urls), list(counts)
        self.first_index = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.max_words, self.num_frames, self.strategy = max_words, num_frames, strategy
        self.video_resize = video_resize
        self.video_transform = PretrainVideoTransform(image_size, augment=augment)
        self.image_transform = PretrainImageTransform(image_size, num_frames)
        self.batch_size, self.workers_per_rank = batch_size, max(num_workers, 1)
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        issues.track_videos(self.num_samples)

    @property
    def num_samples(self) -> int:
        return int(self.first_index[-1])

    @property
    def num_slots(self) -> int:
        return self.world_size * self.workers_per_rank

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Read epoch `epoch` from then on, after the first `start` items of this rank (a
        whole number of batches, where a run that stopped part-way through it resumes)."""
        if start % self.batch_size or not 0 <= start <= len(self):
            raise ValueError(f"start {start} is not a whole number of batches of {self.batch_size} "
                             f"within the {len(self)} items of the epoch")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return samples_per_slot(self.num_samples, self.num_slots, self.batch_size) * self.workers_per_rank

    def epoch_plan(self) -> list[list[tuple[int, int, int]]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
        return plan_epoch(self.counts, order.tolist(), self.num_slots, self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        worker = get_worker_info()
        worker_id = 0 if worker is None else worker.id
        if (1 if worker is None else worker.num_workers) != self.workers_per_rank:
            raise ValueError(f"the dataset was planned for {self.workers_per_rank} workers per rank")
        # the DataLoader takes batch 0 from worker 0, then each worker in turn: in an epoch
        # resumed after b batches, worker 0 reads on where worker b % workers left off
        done_batches = self.start // self.batch_size
        role = (worker_id + done_batches) % self.workers_per_rank
        return self.slot_items(self.rank * self.workers_per_rank + role,
                               self.batch_size * worker_batches(done_batches, role,
                                                                self.workers_per_rank))

    # one slot ----------------------------------------------------------------------
    def raw_samples(self, plan: Sequence[tuple[int, int, int]], first: int = 0
                    ) -> Iterator[tuple[int, int, dict]]:
        """(position in the slot's range, global index, sample) of the range from position
        `first` on (shards wholly before it are not read); a `__missing__` sample for each
        one a shard lacks."""
        offset = 0
        for shard, skip, take in plan:
            begin, offset = max(first - offset, 0), offset + take  # positions of this piece
            if begin >= take:
                continue
            problems: list[str] = []

            def note(error: Exception) -> bool:  # webdataset's handler: go on after a bad read
                problems.append(f"{type(error).__name__}: {str(error)[:160]}")
                return True

            stream = wds.tarfile_to_samples(handler=note)([{"url": self.urls[shard]}])
            first_index = int(self.first_index[shard]) + skip
            read = begin
            for read, sample in enumerate(islice(stream, skip + begin, skip + take), start=begin + 1):
                yield offset - take + read - 1, first_index + read - 1, sample
            for missing in range(read, take):
                reason = problems[0] if problems else "the shard ended"
                yield offset - take + missing, first_index + missing, {"__missing__": reason}

    def decode(self, sample: dict, rng: random.Random) -> tuple[torch.Tensor, str]:
        """(clip, caption) of one raw sample; raises BadSample or VideoDecodeError."""
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        if "__missing__" in sample:
            raise BadSample(f"{where}: sample missing ({sample['__missing__']})")
        try:
            meta = parse_json(sample["json"])
        except (KeyError, ValueError, TypeError):
            raise BadSample(f"{where}: no readable JSON") from None
        if isinstance(meta, RepeatedKeys):
            raise BadSample(f"{where}: the JSON has {meta.problem()}")
        captions = meta.get("captions") if isinstance(meta, dict) else None
        if (not isinstance(captions, list) or not captions
                or not all(isinstance(caption, str) for caption in captions)):
            raise BadSample(f"{where}: the JSON has no 'captions' list of strings")
        caption = pre_caption(rng.choice(captions), self.max_words)
        if not caption:
            raise BadSample(f"{where}: empty caption")
        media = [key for key in sample if not key.startswith("__") and key != "json"]
        if not media:
            raise BadSample(f"{where}: no video or image")
        name, suffix = f"{where}.{media[0]}", "." + media[0].rsplit(".", 1)[-1].lower()
        data = NamedBytes(sample[media[0]], name)
        if suffix in VIDEO_SUFFIXES:
            clip = read_frames(data, self.num_frames, self.strategy, self.video_resize, rng)
            return self.video_transform(clip, rng), caption
        if suffix in IMAGE_SUFFIXES:
            return self.image_transform(read_image(data), rng), caption
        raise BadSample(f"{name}: neither a video nor an image suffix")

    def slot_items(self, slot: int, start: int = 0) -> Iterator[tuple[torch.Tensor, str]]:
        """The items of one slot's range this epoch after its first `start`, shuffled, bad
        samples replaced. The shuffled order is worked out on positions first (see
        `shuffled_positions`); the samples are read in the range's order from the first
        position not yet yielded and held until their turn, so an epoch resumed part-way
        yields the items of an uninterrupted one, and re-reads (without decoding) at most
        the shuffle buffer and the shard it begins in."""
        plan = self.epoch_plan()[slot]
        order = shuffled_positions(sum(take for _, _, take in plan), self.shuffle_buffer,
                                   slot_seed(self.seed, self.epoch, slot))
        todo = order[start:]
        first = min(todo, default=len(order))
        done = {position for position in order[:start] if position >= first}
        raw = (entry for entry in self.raw_samples(plan, first) if entry[0] not in done)
        held: dict[int, tuple[int, dict]] = {}  # position -> (index, sample), read, not yet used
        item_seed = slot_seed(self.seed, self.epoch, slot)
        last_good, pending = None, 0
        for position in todo:
            while position not in held:
                read_position, index, sample = next(raw)
                held[read_position] = index, sample
            index, sample = held.pop(position)
            try:
                item = self.decode(sample, item_rng(item_seed, position))
            except (BadSample, VideoDecodeError) as error:
                self.issues.record_decode_failure(index, error, FALLBACK)
                if last_good is None:
                    pending += 1
                else:
                    yield last_good
                continue
            for _ in range(1 + pending):
                yield item
            last_good, pending = item, 0
        if pending:
            raise DataError(f"{self.where}: none of the {pending} samples of worker range "
                            f"{slot} can be used")

    # like ClipDataset's -------------------------------------------------------------
    @property
    def where(self) -> str:
        return ", ".join(self.issues.files) or self.issues.name

    def check_usable(self) -> None:
        """Raise DataError naming the manifest when an epoch would have no step (the
        shards are read only during the epochs)."""
        if len(self) == 0:
            raise DataError(f"{self.where}: {self.num_samples} samples make no batch of "
                            f"{self.batch_size} for each of {self.num_slots} loader workers "
                            f"({self.world_size} rank(s) x {self.workers_per_rank})")

    @property
    def num_decode_failures(self) -> int:
        return self.issues.num_decode_failures

    def summary(self) -> str:
        return self.issues.summary(FALLBACK)


def build_sharded_dataset(config: dict) -> ShardedPretrainDataset:
    """The dataset of `train_shards`; its rank and world size from torch.distributed."""
    config = pretrain_data_config(config)
    urls = expand_shards(config["train_shards"])
    if not urls:
        raise DataError("train_shards: names no shard")
    manifest = config["shards_manifest"] or default_manifest(urls)
    if manifest is None:
        raise DataError(f"train_shards: {urls[0]} is not a local file; name the shards' "
                        f"manifest with shards_manifest")
    issues = DataIssues(f"{config['dataset']}/train")
    counts = shard_counts(urls, issues.reading(manifest))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return ShardedPretrainDataset(
        issues, urls, counts, max_words=config["max_words"], num_frames=config["num_frm_train"],
        strategy=config["frm_sampling_strategy"], image_size=config["image_size"],
        video_resize=config["video_resize"], augment=config["augment"],
        batch_size=config["batch_size"], num_workers=config["num_workers"],
        shuffle_buffer=config["shuffle_buffer"], seed=config["seed"],
        rank=torch.distributed.get_rank() if distributed else 0,
        world_size=torch.distributed.get_world_size() if distributed else 1)
