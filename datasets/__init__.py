"""Data pipeline: decord video decoding, the paper's datasets, and their loaders.

Each dataset has a builder `(config, splits) -> (train, val, test)` (None for a split not
asked for: an evaluation reads only the test split's files); the tasks map their dataset
names to them (`Task.datasets`) and `build_splits` runs one with its checks. Every dataset
has a `collate_fn` (videos batched as `[B, 3, T, H, W]`) and `summary()` of its bad data.
"""
from typing import Callable, Mapping, Optional, Sequence, Tuple

from .annotations import DataError
from .base import SPLITS, ClipDataset
from .loader import create_loader
from .pretrain import PretrainDataset, build_pretrain_dataset
from .shards import ShardedPretrainDataset, build_sharded_dataset
from .retrieval import (READERS as RETRIEVAL_READERS, RetrievalEvalDataset, RetrievalTrainDataset,
                        build_retrieval_datasets)
from .text import pre_caption, pre_question
from .video import VideoDecodeError, load_video, read_frames, sample_frame_indices
from .videoqa import VideoQAEvalDataset, VideoQATrainDataset, build_videoqa_datasets


def build_pretrain_splits(config: dict, splits: Sequence[str] = SPLITS):
    """Pre-training has a train split only: (train, None, None), from `train_shards` (tar
    shards) or `train_file` (JSON lists)."""
    if "train" not in splits:
        return None, None, None
    from_shards = config.get("train_shards") not in (None, "", [])
    return (build_sharded_dataset if from_shards else build_pretrain_dataset)(config), None, None


Splits = Tuple[Optional[ClipDataset], Optional[ClipDataset], Optional[ClipDataset]]
SplitsBuilder = Callable[[Mapping, Sequence[str]], Splits]  # (config, splits) -> (train, val, test)


def build_splits(builders: Mapping[str, SplitsBuilder], config: Mapping,
                 splits: Sequence[str] = SPLITS) -> Splits:
    """(train, val, test) datasets of `config["dataset"]`, built by its entry in `builders`
    (dataset name -> builder), None for a split outside `splits` (whose files are then not
    read); pre-training gives (train, None, None).

    An annotation file that is not valid JSON (or CSV, text, a plain-data pickle), has the wrong
    shape, or leaves a split with no usable record or no decodable video raises DataError
    naming the file; bad records inside a good file are skipped and counted instead.
    """
    name = config["dataset"]
    if name not in builders:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(builders)}")
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise ValueError(f"unknown splits {unknown}; expected some of {', '.join(SPLITS)}")
    built = builders[name](config, splits)
    for dataset in built:
        if dataset is not None:
            dataset.check_usable()
    return built


def summarize(*datasets) -> str:
    """The bad-data summaries of the given datasets (None entries ignored), one line per
    dataset that has any; a single line when none has."""
    present = [dataset for dataset in datasets if dataset is not None]
    affected = [dataset.summary() for dataset in present
                if dataset.issues.num_skipped or dataset.issues.num_decode_failures]
    if affected:
        return "\n".join(affected)
    return "no bad data: " + ", ".join(dataset.issues.name for dataset in present)


__all__ = [
    "SPLITS", "ClipDataset", "Splits", "SplitsBuilder", "DataError", "PretrainDataset", "RETRIEVAL_READERS", "RetrievalEvalDataset", "RetrievalTrainDataset",
    "ShardedPretrainDataset", "VideoDecodeError", "VideoQAEvalDataset", "VideoQATrainDataset",
    "build_pretrain_splits", "build_retrieval_datasets", "build_splits", "build_videoqa_datasets",
    "create_loader", "load_video", "pre_caption", "pre_question", "read_frames",
    "sample_frame_indices", "summarize",
]
