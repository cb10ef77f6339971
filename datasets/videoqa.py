"""ActivityNet-QA: open-ended questions about long videos."""
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from utils import FRAME_SETTINGS, QUESTION_SETTINGS, with_defaults

from .annotations import first_existing, iter_json_records, string_fields
from .base import (FINETUNE_DATA_SETTINGS, SPLITS, ClipDataset, ClipTransform, build_splits,
                   stack_clips, with_clip_cache)
from .issues import DataIssues
from .text import pre_question
from .transforms import FinetuneTransform
from .video import TEST_STRATEGY

TRAIN_ANSWER_WEIGHT = 0.2  # per answer occurrence, as TESTA's data/video_dataset.py (ActivityNet_qa)
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv")


@dataclass(frozen=True)
class Question:
    question_id: str | int
    question: str       # cleaned
    answers: tuple[str, ...]  # every answer given for the question
    video_index: int


def _is_question_id(value) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def read_answers(path: str, issues: DataIssues) -> dict:
    """`{split}_a.json`: question_id -> answers, from `{"answer", "question_id", "type"}` records."""
    answers = defaultdict(list)
    for source, record in iter_json_records(path, issues):
        qid = record.get("question_id") if isinstance(record, dict) else None
        if string_fields(record, "answer") is None or not _is_question_id(qid):
            issues.skip("malformed annotation", source)
            continue
        answers[qid].append(record["answer"])
    return answers


class VideoQADataset(ClipDataset):
    """Questions of one split with their videos `v_<video_name>.mp4` (else `.webm`, `.mkv`).

    `answer_list` is the sorted set of the split's answers; `answers_by_qid` maps each kept
    question_id to its (first) answer.
    """

    def __init__(self, issues: DataIssues, ann_root: str, video_root: str, split: str,
                 max_question_len: int, num_frames: int, strategy: str, image_size: int,
                 transform: ClipTransform):
        question_path = issues.reading(os.path.join(ann_root, f"{split}_q.json"))
        answers = read_answers(issues.reading(os.path.join(ann_root, f"{split}_a.json")), issues)
        self.answer_list = sorted({answer for given in answers.values() for answer in given})
        self.questions: list[Question] = []
        video: list[str] = []
        video_index: dict[str, int] = {}
        asked: set = set()  # the question_ids kept
        for source, record in iter_json_records(question_path, issues):
            fields = string_fields(record, "question", "video_name")
            qid = record.get("question_id") if isinstance(record, dict) else None
            if fields is None or not _is_question_id(qid):
                issues.skip("malformed annotation", source)
                continue
            if qid not in answers:
                issues.skip("missing answer", source)
                continue
            if qid in asked:  # its answers would count twice in the accuracy
                issues.skip("question_id given twice", source)
                continue
            stem = os.path.join(video_root, "v_" + fields[1])
            path = first_existing(tuple(stem + extension for extension in VIDEO_EXTENSIONS))
            if path is None:
                issues.skip("missing video", stem + VIDEO_EXTENSIONS[0])
                continue
            question = pre_question(fields[0], max_question_len)
            if not question:
                issues.skip("empty question", source)
                continue
            if path not in video_index:
                video_index[path] = len(video)
                video.append(path)
            asked.add(qid)
            self.questions.append(Question(qid, question, tuple(answers[qid]), video_index[path]))
        self.answers_by_qid = {q.question_id: q.answers[0] for q in self.questions}
        super().__init__(issues, video, num_frames, strategy, image_size, transform)

    def __len__(self) -> int:
        return len(self.questions)

    def video_index_of(self, index: int) -> int:
        return self.questions[index].video_index


class VideoQATrainDataset(VideoQADataset):
    """Items `(video [T, 3, H, W], question, answers, weights)`, weight 0.2 per occurrence."""

    def make_item(self, index: int, clip: torch.Tensor):
        counts = Counter(self.questions[index].answers)
        answers = list(counts)
        weights = [TRAIN_ANSWER_WEIGHT * counts[answer] for answer in answers]
        return clip, self.questions[index].question, answers, weights

    @staticmethod
    def collate_fn(batch):
        """-> (video [B, 3, T, H, W], questions, answers flat, weights FloatTensor, n per question)."""
        clips, questions, answers, weights = zip(*batch)
        answers_flat = [answer for given in answers for answer in given]
        weights_flat = torch.tensor([w for given in weights for w in given], dtype=torch.float)
        return stack_clips(list(clips)), list(questions), answers_flat, weights_flat, [len(a) for a in answers]


class VideoQAEvalDataset(VideoQADataset):
    """Items `(video [T, 3, H, W], question, question_id)`."""

    substitute_next_record = False

    def make_item(self, index: int, clip: torch.Tensor):
        question = self.questions[index]
        return clip, question.question, question.question_id

    @staticmethod
    def collate_fn(batch):
        """-> (video [B, 3, T, H, W], questions list[str], question_ids list)."""
        clips, questions, question_ids = zip(*batch)
        return stack_clips(list(clips)), list(questions), list(question_ids)


def build_videoqa_datasets(config: dict, splits: Sequence[str] = SPLITS):
    """(train, val, test) of ActivityNet-QA (None outside `splits`)."""
    config = with_defaults(config, {**FINETUNE_DATA_SETTINGS, **QUESTION_SETTINGS,
                                    **FRAME_SETTINGS})

    def build(split: str, train: bool) -> VideoQADataset:
        issues = DataIssues(f"{config['dataset']}/{split}")
        if train:
            return VideoQATrainDataset(
                issues, config["ann_root"], config["video_root"], split, config["max_question_len"],
                config["num_frm_train"], config["frm_sampling_strategy"],
                config["image_size"], FinetuneTransform(config["augment"]))
        return VideoQAEvalDataset(
            issues, config["ann_root"], config["video_root"], split, config["max_question_len"],
            config["num_frm_test"], TEST_STRATEGY, config["image_size"], FinetuneTransform(False))

    return with_clip_cache(config, build_splits(build, splits))
