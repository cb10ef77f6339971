"""Paragraph-to-video retrieval: QuerYD, DiDeMo, ActivityNet Captions, Condensed Movies."""
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from utils import CAPTION_SETTINGS, FRAME_SETTINGS, with_defaults

from .annotations import (DataError, first_existing, iter_csv, iter_json_records, iter_jsonl,
                          load_plain_pickle, require_file, string_fields, utf8_text)
from .base import (FINETUNE_DATA_SETTINGS, SPLITS, ClipDataset, ClipTransform, build_splits,
                   stack_clips, with_clip_cache)
from .issues import DataIssues
from .records import IndexLists, IntColumn, StringColumn
from .text import pre_caption
from .transforms import FinetuneTransform
from .video import TEST_STRATEGY


@dataclass(frozen=True)
class TextVideoPair:
    videos: tuple[str, ...]  # candidate paths of the video, the first that exists is used
    text: str                # raw text, cleaned when the dataset is built
    source: str              # where the record is, for reports


def _is_sentence_list(sentences) -> bool:
    """A list of sentences, each a string or a list of tokens (QuerYD)."""
    return isinstance(sentences, list) and all(
        isinstance(sentence, str)
        or (isinstance(sentence, list) and all(isinstance(token, str) for token in sentence))
        for sentence in sentences)


def join_sentences(sentences: list) -> str:
    return " ".join(s if isinstance(s, str) else " ".join(s) for s in sentences)


def read_queryd(ann_root: str, video_root: str, split: str, issues: DataIssues) -> list[TextVideoPair]:
    """`exists_{split}_list.txt` names the videos; the pickle maps each name to its sentences
    (read as plain data only, see `load_plain_pickle`)."""
    list_file = issues.reading(require_file(os.path.join(ann_root, f"exists_{split}_list.txt")))
    caption_file = issues.reading(require_file(os.path.join(ann_root, "raw_captions_combined_filtered.pkl")))
    captions = load_plain_pickle(caption_file)
    if not isinstance(captions, dict):
        raise DataError(f"{caption_file}: expected a dict of video name -> sentences, got a "
                        f"{type(captions).__name__}")
    with utf8_text(list_file) as f:
        names = [line.strip() for line in f if line.strip()]
    pairs = []
    for name in names:
        source = f"{caption_file}[{name!r}]"
        sentences = captions.get(name)
        if sentences is None:
            issues.skip("missing caption", source)
            continue
        if not _is_sentence_list(sentences):
            issues.skip("malformed annotation", source)
            continue
        text = join_sentences(sentences)
        path = os.path.join(video_root, name)
        pairs.append(TextVideoPair((path, path + ".mp4"), text, source))
    return pairs


def read_didemo(ann_root: str, video_root: str, split: str, issues: DataIssues) -> list[TextVideoPair]:
    """`{split}.jsonl`: one `{"clip_name", "caption"}` a line; videos `<clip_name>.mp4`."""
    pairs = []
    for source, record in iter_jsonl(issues.reading(os.path.join(ann_root, f"{split}.jsonl")),
                                      issues):
        fields = string_fields(record, "clip_name", "caption")
        if fields is None:
            issues.skip("malformed annotation", source)
            continue
        clip_name, caption = fields
        pairs.append(TextVideoPair((os.path.join(video_root, clip_name + ".mp4"),), caption, source))
    return pairs


def read_activitynet(ann_root: str, video_root: str, split: str, issues: DataIssues) -> list[TextVideoPair]:
    """`{split}.json`: a JSON list of `{"video": "v_xxx.mp4", "caption": [sentences]}`."""
    path = issues.reading(os.path.join(ann_root, f"{split}.json"))
    pairs = []
    for source, record in iter_json_records(path, issues):
        video = record.get("video") if isinstance(record, dict) else None
        sentences = record.get("caption") if isinstance(record, dict) else None
        if isinstance(video, str) and isinstance(sentences, str):
            issues.skip("string caption (a list of sentences expected)", source)
            continue
        if not isinstance(video, str) or not _is_sentence_list(sentences):
            issues.skip("malformed annotation", source)
            continue
        text = join_sentences(sentences)
        pairs.append(TextVideoPair((os.path.join(video_root, video),), text, source))
    return pairs


def _condensed_movies_csv(ann_root: str, filename: str) -> str:
    in_metadata = os.path.join(ann_root, "metadata", filename)
    return in_metadata if os.path.isfile(in_metadata) else os.path.join(ann_root, filename)


def read_condensed_movies(ann_root: str, video_root: str, split: str,
                          issues: DataIssues) -> list[TextVideoPair]:
    """train/val: rows of `train_val_challf0.csv` whose `split` matches; test: `test_challf0.csv`.
    Videos `<videoid>.mkv` (or `.mp4` after compression)."""
    filename = "test_challf0.csv" if split == "test" else "train_val_challf0.csv"
    pairs = []
    for source, row in iter_csv(issues.reading(_condensed_movies_csv(ann_root, filename))):
        fields = string_fields(row, "videoid", "caption")
        if fields is None or not fields[0]:
            issues.skip("malformed annotation", source)
            continue
        if split != "test" and row.get("split") != split:
            continue
        videoid, caption = fields
        stem = os.path.join(video_root, videoid)
        pairs.append(TextVideoPair((stem + ".mkv", stem + ".mp4"), caption, source))
    return pairs


class Reader(NamedTuple):
    """A retrieval dataset: its annotation reader, the annotation split its test split reads,
    and whether a challenge server scores its test split (the evaluation then writes the
    submission files)."""
    read: Callable[[str, str, str, DataIssues], list[TextVideoPair]]
    test_annotations: str = "test"
    challenge_submission: bool = False


READERS = {
    "retrieval_queryd": Reader(read_queryd),
    "retrieval_didemo": Reader(read_didemo),
    "retrieval_activitynet": Reader(read_activitynet, test_annotations="val"),
    "retrieval_condensedmovies": Reader(read_condensed_movies, challenge_submission=True),
}


class RetrievalDataset(ClipDataset):
    """Texts and videos of one split: `text`, `video` (paths), `txt2video`, `video2txt`.

    Records whose video is missing or whose cleaned caption is empty are skipped; the index maps
    describe only what remains. Records naming the same video share its index. All are kept
    flat (datasets/records.py).
    """

    def __init__(self, issues: DataIssues, pairs: list[TextVideoPair], max_words: int, num_frames: int,
                 strategy: str, image_size: int, transform: ClipTransform):
        text: list[str] = []
        txt2video: list[int] = []
        video2txt: list[list[int]] = []
        video: list[str] = []
        video_index: dict[str, int] = {}
        for pair in pairs:
            path = first_existing(pair.videos)
            if path is None:
                issues.skip("missing video", pair.videos[0])
                continue
            caption = pre_caption(pair.text, max_words)
            if not caption:
                issues.skip("empty caption", pair.source)
                continue
            if path not in video_index:
                video_index[path] = len(video)
                video.append(path)
                video2txt.append([])
            video2txt[video_index[path]].append(len(text))
            txt2video.append(video_index[path])
            text.append(caption)
        self.text = StringColumn(text)
        self.txt2video = IntColumn(txt2video)
        self.video2txt = IndexLists(video2txt)
        super().__init__(issues, video, num_frames, strategy, image_size, transform)


class RetrievalTrainDataset(RetrievalDataset):
    """One item per text: `(video [T, 3, H, W], caption, video_index)`."""

    def __len__(self) -> int:
        return len(self.text)

    def video_index_of(self, index: int) -> int:
        return self.txt2video[index]

    def make_item(self, index: int, clip: torch.Tensor) -> tuple[torch.Tensor, str, int]:
        return clip, self.text[index], self.txt2video[index]

    @staticmethod
    def collate_fn(batch):
        """-> (video [B, 3, T, H, W], captions list[str], video_index LongTensor [B])."""
        clips, captions, video_indices = zip(*batch)
        return stack_clips(list(clips)), list(captions), torch.tensor(video_indices, dtype=torch.long)


class RetrievalEvalDataset(RetrievalDataset):
    """One item per video: `(video [T, 3, H, W], video_index)`. `challenge_submission`: a
    challenge server scores this split (see `Reader`)."""

    substitute_next_record = False
    challenge_submission = False

    def __len__(self) -> int:
        return len(self.video)

    def video_index_of(self, index: int) -> int:
        return index

    def make_item(self, index: int, clip: torch.Tensor) -> tuple[torch.Tensor, int]:
        return clip, index

    @staticmethod
    def collate_fn(batch):
        """-> (video [B, 3, T, H, W], video_index LongTensor [B])."""
        clips, video_indices = zip(*batch)
        return stack_clips(list(clips)), torch.tensor(video_indices, dtype=torch.long)


def build_retrieval_datasets(config: dict, splits: Sequence[str] = SPLITS):
    """(train, val, test) of `config["dataset"]` (None outside `splits`); ActivityNet
    Captions tests on `val`."""
    config = with_defaults(config, {**FINETUNE_DATA_SETTINGS, **CAPTION_SETTINGS,
                                    **FRAME_SETTINGS})
    name = config["dataset"]
    reader = READERS[name]

    def build(split: str, train: bool) -> RetrievalDataset:
        issues = DataIssues(f"{name}/{split}")
        annotation_split = reader.test_annotations if split == "test" else split
        pairs = reader.read(config["ann_root"], config["video_root"], annotation_split, issues)
        if train:
            return RetrievalTrainDataset(
                issues, pairs, config["max_words"], config["num_frm_train"],
                config["frm_sampling_strategy"], config["image_size"],
                FinetuneTransform(config["augment"]))
        dataset = RetrievalEvalDataset(issues, pairs, config["max_words"], config["num_frm_test"],
                                       TEST_STRATEGY, config["image_size"], FinetuneTransform(False))
        dataset.challenge_submission = reader.challenge_submission and split == "test"
        return dataset

    return with_clip_cache(config, build_splits(build, splits))
