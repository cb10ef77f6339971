"""Video-language pre-training on WebVid-2M + CC3M: video clips and images as static clips."""
import os
import random
from typing import Iterator, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from utils import CAPTION_SETTINGS, FRAME_SETTINGS, NONE, ConfigError, Setting, Settings, with_defaults

from .annotations import iter_json_records, string_fields
from .base import (FINETUNE_DATA_SETTINGS, ClipDataset, clip_cache_problem, stack_clips,
                   with_clip_cache)
from .issues import DataIssues
from .records import StringColumn
from .text import pre_caption
from .transforms import PretrainImageTransform, PretrainVideoTransform
from .video import SAMPLING_STRATEGIES, VideoDecodeError

PRETRAIN_DATA_SETTINGS = Settings(title="Pre-training data", module=__name__, settings={
    "train_file": Setting((str, list, NONE), None, "JSON list(s) of {path, caption}; image "
                          "paths become static clips (this or train_shards)"),
    "train_shards": Setting((str, list, NONE), None, "webdataset tar shards (paths, brace "
                            "patterns, http(s) URLs, pipe: commands; this or train_file)"),
    "shards_manifest": Setting(str, "", "manifest of train_shards ('' = manifest.json next to "
                               "the first shard)"),
    "shuffle_buffer": Setting(int, 1000, "raw samples each loader worker shuffles through "
                              "(train_shards)", min=1),
    "video_root": Setting(str, "", "prefix of relative paths in train_file ('' = as written)"),
    "num_frm_train": Setting(int, meaning="frames sampled per clip", min=1),
    "frm_sampling_strategy": Setting(str, "headtail", "frame sampling of the clips",
                                     choices=SAMPLING_STRATEGIES),
    "video_resize": Setting(int, 256, "side videos are decoded at before cropping", min=1),
    "augment": Setting(bool, True, "RandAugment of the clips (off: the random square crop only)"),
    "cache_clips": FINETUNE_DATA_SETTINGS["cache_clips"],
})
PRETRAIN_DATA_SETTINGS.check(clip_cache_problem)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".flv", ".webm", ".mkv")


def is_video_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_SUFFIXES


def read_image(path: str) -> torch.Tensor:
    """uint8 `[3, H, W]` RGB."""
    try:
        with Image.open(path) as image:
            return F.pil_to_tensor(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise VideoDecodeError(f"{path}: {error}") from error


def read_pretrain_lists(train_files: Sequence[str], video_root: str,
                        issues: DataIssues) -> Iterator[tuple[str, str, str]]:
    """(source, media path under `video_root`, caption) of each well-formed record of the
    JSON lists `train_files` (`{"path", "caption"}`); malformed ones are skipped and counted."""
    for train_file in train_files:
        for source, record in iter_json_records(issues.reading(train_file), issues):
            fields = string_fields(record, "path", "caption")
            if fields is None:
                issues.skip("malformed annotation", source)
                continue
            yield source, os.path.join(video_root, fields[0]), fields[1]


class PretrainDataset(ClipDataset):
    """Records `{"path", "caption"}` of JSON lists; items `(video [T, 3, H, W], caption)`.

    Videos are decoded at `video_resize`, square-cropped to `image_size` and, with `augment`,
    augmented with one RandAugment for the whole clip; an image becomes a static clip of
    `num_frames` copies.
    """

    def __init__(self, issues: DataIssues, train_files: list[str], video_root: str, max_words: int,
                 num_frames: int, strategy: str, image_size: int, video_resize: int, *,
                 augment: bool = True):
        if video_resize < image_size:
            raise ValueError(f"video_resize ({video_resize}) must be at least image_size ({image_size})")
        captions: list[str] = []
        video: list[str] = []
        for source, path, caption in read_pretrain_lists(train_files, video_root, issues):
            if not os.path.exists(path):
                issues.skip("missing file", path)
                continue
            caption = pre_caption(caption, max_words)
            if not caption:
                issues.skip("empty caption", source)
                continue
            video.append(path)
            captions.append(caption)
        self.captions = StringColumn(captions)  # flat, see datasets/records.py
        self.image_transform = PretrainImageTransform(image_size, num_frames)
        super().__init__(issues, video, num_frames, strategy, video_resize,
                         PretrainVideoTransform(image_size, augment=augment))

    def __len__(self) -> int:
        return len(self.video)

    def video_index_of(self, index: int) -> int:
        return index

    def load_clip(self, video_index: int, rng: random.Random) -> torch.Tensor:
        path = self.video[video_index]
        if is_video_path(path):
            return super().load_clip(video_index, rng)
        return self.image_transform(read_image(path), rng)

    def make_item(self, index: int, clip: torch.Tensor) -> tuple[torch.Tensor, str]:
        return clip, self.captions[index]

    @staticmethod
    def collate_fn(batch):
        """-> (video [B, 3, T, H, W], captions list[str])."""
        clips, captions = zip(*batch)
        return stack_clips(list(clips)), list(captions)


@PRETRAIN_DATA_SETTINGS.check
def data_source_problem(config: dict) -> Optional[Tuple[str, str]]:
    """Why the config does not name exactly one of train_file and train_shards, as
    (key, problem), or None."""
    given = [key for key in ("train_file", "train_shards") if config.get(key) not in (None, "", [])]
    if len(given) == 1:
        return None
    if given:
        return "train_shards", "train_file and train_shards are both set; set one of them"
    return "train_file", "set train_file (JSON lists) or train_shards (tar shards)"


def pretrain_data_config(config: dict) -> dict:
    """`config` with the data defaults filled in, checked; ConfigError when it names
    neither or both of train_file and train_shards."""
    config = with_defaults(config, {**PRETRAIN_DATA_SETTINGS, **CAPTION_SETTINGS,
                                    **FRAME_SETTINGS})
    problem = data_source_problem(config)
    if problem:
        raise ConfigError(f"config: {problem[1]}")
    return config


def build_pretrain_dataset(config: dict) -> PretrainDataset:
    """The dataset of `train_file` (JSON lists of records)."""
    config = pretrain_data_config(config)
    train_files = config["train_file"]
    if isinstance(train_files, str):
        train_files = [train_files]
    dataset = PretrainDataset(
        DataIssues(f"{config['dataset']}/train"), list(train_files), config["video_root"],
        config["max_words"], config["num_frm_train"], config["frm_sampling_strategy"],
        config["image_size"], config["video_resize"], augment=config["augment"])
    return with_clip_cache(config, (dataset,))[0]
