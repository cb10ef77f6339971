"""Base class of every dataset here: items that decode one clip, with deterministic fallbacks."""
import random
from typing import Any, Callable, Sequence

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset

from utils import Setting, Settings

from .annotations import DataError
from .issues import DataIssues
from .transforms import normalize
from .records import StringColumn
from .video import RANDOM_STRATEGIES, SAMPLING_STRATEGIES, VideoDecodeError, read_frames

ClipTransform = Callable[[torch.Tensor, random.Random], torch.Tensor]

# the fine-tuning datasets (retrieval and VideoQA)
FINETUNE_DATA_SETTINGS = Settings(title="Fine-tuning data", module=__name__, settings={
    "video_root": Setting(str, meaning="folder of the videos"),
    "ann_root": Setting(str, meaning="folder of the annotation files (DATASETS.md)"),
    "num_frm_train": Setting(int, meaning="frames sampled per training clip", min=1),
    "num_frm_test": Setting(int, meaning="frames sampled per evaluation clip", min=1),
    "frm_sampling_strategy": Setting(str, "uniform", "frame sampling of training clips "
                                     "(evaluation samples uniformly)",
                                     choices=SAMPLING_STRATEGIES),
    "augment": Setting(bool, False, "random crops and flips of training clips"),
    "cache_clips": Setting(bool, False, "decode each video once and keep its frames in memory "
                           "(small datasets; needs num_workers: 0)"),
})


@FINETUNE_DATA_SETTINGS.check
def clip_cache_problem(config):
    """The clip cache lives in the main process: it needs `num_workers: 0`."""
    if config["cache_clips"] and "num_workers" in config and config["num_workers"] > 0:
        return "cache_clips", ("cache_clips keeps the decoded clips in the main process; it "
                               "needs num_workers: 0")
    return None


def item_rng(seed: int, index: int) -> random.Random:
    """The generator of one item's random draws (frame sampling, augmentation): a function
    of `seed` (one per epoch) and the item's `index` only, not of the loader worker that
    reads it or of what that worker read before, so an epoch resumed part-way draws as an
    uninterrupted one does, with any number of workers."""
    return random.Random(int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)[0]))


def stack_clips(clips: list[torch.Tensor]) -> torch.Tensor:
    """B clips `[T, 3, H, W]` -> one batch `[B, 3, T, H, W]` (channels before time)."""
    return rearrange(torch.stack(clips), "b t c h w -> b c t h w")


def video_batch(clips: list[torch.Tensor]) -> torch.Tensor:
    """B decoded clips `[T, 3, H, W]` -> the encoder's input `[B, 3, T, H, W]`, float32: uint8
    clips (as `read_frames` returns them) are normalised, float ones taken as normalised."""
    return stack_clips([normalize(clip) if clip.dtype == torch.uint8 else clip.float()
                        for clip in clips])


SPLITS = ("train", "val", "test")


def build_splits(build: Callable[[str, bool], "ClipDataset"], splits: Sequence[str]) -> tuple:
    """(train, val, test) from `build(split, train)`, None for a split outside `splits`."""
    return tuple(build(split, split == "train") if split in splits else None for split in SPLITS)


def with_clip_cache(config: dict, datasets: tuple) -> tuple:
    """`datasets`, each keeping its decoded clips in memory when `config["cache_clips"]`
    (None entries stay None)."""
    if config["cache_clips"]:
        for dataset in datasets:
            if dataset is not None:
                dataset.keep_decoded_clips()
    return datasets


class ClipDataset(Dataset):
    """Items built around one clip of `self.video[video_index_of(index)]`.

    The video paths are kept flat (`StringColumn`), shared by forked loader workers without
    copy-on-read. A video that fails to decode is flagged once (`DataIssues`) and substituted: train datasets
    (`substitute_next_record = True`) use the next record whose video decodes, so captions stay
    paired; eval datasets return a blank clip (zeros after normalisation) so indices stay put.
    """

    substitute_next_record = True

    def __init__(self, issues: DataIssues, video: list[str], num_frames: int, strategy: str,
                 size: int, transform: ClipTransform):
        self.issues = issues
        self.video = StringColumn(video)
        self.num_frames = num_frames
        self.strategy = strategy
        self.size = size
        self.transform = transform
        self.decoded_clips: dict[int, torch.Tensor] | None = None
        self.item_seed = 0
        issues.track_videos(len(video))

    def seed_items(self, seed: int) -> None:
        """Seed the random draws of every item from now on (see `item_rng`); the training
        loop gives each epoch its own."""
        self.item_seed = seed

    def keep_decoded_clips(self) -> None:
        """Decode each video once and keep its uint8 frames in memory (`cache_clips`, for small
        datasets); transforms still run on every read. Needs a deterministic frame sampling."""
        if self.strategy in RANDOM_STRATEGIES:
            raise ValueError(f"{self.issues.name}: cache_clips needs a deterministic frame sampling, "
                             f"not the random {self.strategy!r}")
        self.decoded_clips = {}

    def video_index_of(self, index: int) -> int:
        raise NotImplementedError

    def make_item(self, index: int, clip: torch.Tensor) -> tuple:
        raise NotImplementedError

    def read_clip(self, video_index: int, rng: random.Random) -> torch.Tensor:
        """uint8 `[T, 3, H, W]`."""
        if self.decoded_clips is not None and video_index in self.decoded_clips:
            return self.decoded_clips[video_index]
        clip = read_frames(self.video[video_index], self.num_frames, self.strategy, self.size, rng)
        if self.decoded_clips is not None:
            self.decoded_clips[video_index] = clip
        return clip

    def load_clip(self, video_index: int, rng: random.Random) -> torch.Tensor:
        """float `[T, 3, H, W]`, transformed and normalised."""
        return self.transform(self.read_clip(video_index, rng), rng)

    def blank_clip(self) -> torch.Tensor:
        return torch.zeros(self.num_frames, 3, self.size, self.size)

    @property
    def fallback(self) -> str:
        return "next record used" if self.substitute_next_record else "blank clip used"

    def _try_load(self, index: int, rng: random.Random) -> torch.Tensor | None:
        video_index = self.video_index_of(index)
        if self.issues.has_failed(video_index):
            return None
        try:
            return self.load_clip(video_index, rng)
        except VideoDecodeError as error:
            self.issues.record_decode_failure(video_index, error, self.fallback)
            return None

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        rng = item_rng(self.item_seed, index)
        if not self.substitute_next_record:
            clip = self._try_load(index, rng)
            return self.make_item(index, self.blank_clip() if clip is None else clip)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            clip = self._try_load(candidate, rng)
            if clip is not None:
                return self.make_item(candidate, clip)
        raise DataError(f"{self.where}: no video of the {self.split} split can be decoded")

    @property
    def split(self) -> str:
        return self.issues.name.rsplit("/", 1)[-1]

    @property
    def where(self) -> str:
        """The annotation files of the dataset, for error messages."""
        return ", ".join(self.issues.files) or self.issues.name

    def check_usable(self) -> None:
        """Raise DataError naming the annotation files when the split has no item, or when
        none of its videos decodes (probed in order until one does; failures are counted)."""
        if len(self) == 0:
            reasons = self.issues.skip_reasons()
            problem = f"no usable record ({reasons})" if reasons else "no records"
            raise DataError(f"{self.where}: the {self.split} split has {problem}")
        probe_rng = random.Random(0)  # not torch's generator: the model's initialisation stays put
        for video_index in range(len(self.video)):
            try:
                self.load_clip(video_index, probe_rng)
                return
            except VideoDecodeError as error:
                self.issues.record_decode_failure(video_index, error, self.fallback)
        raise DataError(f"{self.where}: none of the {len(self.video)} videos of the {self.split} "
                        f"split can be decoded")

    @property
    def num_decode_failures(self) -> int:
        return self.issues.num_decode_failures

    def summary(self) -> str:
        return self.issues.summary(self.fallback)
