"""Data pipeline: decord video decoding, the paper's datasets, and their loaders.

`build_datasets(config)` returns `(train, val, test)` for `config["dataset"]` (None for a split not
asked for: an evaluation reads only the test split's files); every dataset has a
`collate_fn` (videos batched as `[B, 3, T, H, W]`) and `summary()` of its bad data.
"""
from typing import Sequence

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


# dataset name -> the builder of its (train, val, test) splits
BUILDERS = {**{name: build_retrieval_datasets for name in RETRIEVAL_READERS},
            "activitynet_qa": build_videoqa_datasets, "pretrain_video": build_pretrain_splits}
DATASETS = tuple(BUILDERS)


def build_datasets(config: dict, splits: Sequence[str] = SPLITS):
    """(train, val, test) datasets of `config["dataset"]`, None for a split outside `splits`
    (whose files are then not read); pre-training gives (train, None, None).

    An annotation file that is not valid JSON (or CSV, text, a plain-data pickle), has the wrong
    shape, or leaves a split with no usable record or no decodable video raises DataError
    naming the file; bad records inside a good file are skipped and counted instead.
    """
    name = config["dataset"]
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise ValueError(f"unknown splits {unknown}; expected some of {', '.join(SPLITS)}")
    built = BUILDERS[name](config, splits)
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
    "DATASETS", "SPLITS", "ClipDataset", "DataError", "PretrainDataset", "RetrievalEvalDataset", "RetrievalTrainDataset",
    "ShardedPretrainDataset", "VideoDecodeError", "VideoQAEvalDataset", "VideoQATrainDataset", "build_datasets",
    "create_loader", "load_video", "pre_caption", "pre_question", "read_frames",
    "sample_frame_indices", "summarize",
]
