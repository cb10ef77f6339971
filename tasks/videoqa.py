"""Long-form VideoQA (ActivityNet-QA): its settings, the training loss, and the
evaluation protocol.

Answers are ranked from the split's answer list (`inference: rank`: the `k_test`
answers likeliest by their first token, re-scored by full likelihood) or generated with
beam search (`inference: generate`). Accuracy = exact match with the ground-truth answer.
"""
from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import build_videoqa_datasets
from datasets.base import FINETUNE_DATA_SETTINGS
from engine.logs import LOG_SETTINGS, log, progress, write_json
from engine.optim import OPTIM_SETTINGS, finetune_schedule
from engine.precision import PRECISION_SETTINGS
from engine.run import RUN_SETTINGS, Run
from engine.task import LossFn, Task
from engine.train import FINETUNE_BATCH_SETTINGS, TRAIN_SETTINGS, check_finite
from models.collectives import gather_objects
from models.text import TEXT_SETTINGS
from models.videoqa import build_videoqa_model
from models.video_encoder import VIDEO_ENCODER_SETTINGS
from utils import QUESTION_SETTINGS, Setting, Settings, compose

BEST_METRIC = "accuracy"
DATASETS = {"activitynet_qa": build_videoqa_datasets}

VIDEOQA_SETTINGS = Settings(title="VideoQA task", module=__name__, settings={
    "dataset": Setting(str, meaning="the VideoQA dataset", choices=tuple(DATASETS)),
    "inference": Setting(str, "rank", "answers ranked from the answer list, or generated",
                         choices=("rank", "generate")),
    "k_test": Setting(int, 128, "answers re-scored by full likelihood (inference: rank)", min=1),
    "num_beams": Setting(int, 3, "beam width (inference: generate)", min=1),
    "max_answer_len": Setting(int, 10, "tokens of a generated answer (inference: generate)",
                              min=1),
})
VIDEOQA_SCHEMA: Settings = compose(
    RUN_SETTINGS, LOG_SETTINGS, PRECISION_SETTINGS, TRAIN_SETTINGS, FINETUNE_BATCH_SETTINGS,
    OPTIM_SETTINGS, VIDEO_ENCODER_SETTINGS, TEXT_SETTINGS, QUESTION_SETTINGS,
    FINETUNE_DATA_SETTINGS, VIDEOQA_SETTINGS)


# evaluation --------------------------------------------------------------------------
def accuracy(answers: Mapping[Any, str], ground_truth: Mapping[Any, str]) -> float:
    """Percentage of the ground-truth questions answered exactly right (unanswered
    questions count as wrong)."""
    correct = sum(answers.get(qid) == answer for qid, answer in ground_truth.items())
    return 100.0 * correct / len(ground_truth)


@torch.no_grad()
def answer_batch(model: nn.Module, video: torch.Tensor, questions: List[str],
                 answer_list: Sequence[str], run: Run) -> List[Dict[str, Any]]:
    """A record per question: its answer, the best of `answer_list` (with the full-answer
    score and first-token probability it was ranked by) or generated (config `inference`)."""
    config = run.config
    with run.precision.autocast():
        if config["inference"] == "generate":
            generated = model.generate_answers(video, questions, num_beams=config["num_beams"],
                                               max_length=config["max_answer_len"])
            return [{"answer": answer} for answer in generated]
        ranked = model.rank_answers(video, questions, answer_list, config["k_test"])
    check_finite(ranked.scores, "answer scores")
    chosen = ranked.candidates == ranked.best[:, None]  # [B, k], one True a row
    return [{"answer": answer_list[index], "score": score, "first_token_prob": prob}
            for index, score, prob in zip(ranked.best.tolist(), ranked.scores[chosen].tolist(),
                                          ranked.first_token_probs[chosen].tolist())]


@torch.no_grad()
def answer_questions(model: nn.Module, loader: DataLoader, run: Run) -> Dict[Any, Dict[str, Any]]:
    """question_id -> answer record (see `answer_batch`) for every question of the loader's
    dataset, gathered from all ranks (the distributed sampler's padding repeats are dropped)."""
    model.eval()
    answer_list = loader.dataset.answer_list
    answers = {}
    for video, questions, question_ids in progress(loader, "questions"):
        records = answer_batch(model, video.to(run.device, non_blocking=True), questions,
                               answer_list, run)
        answers.update(zip(question_ids, records))
    merged = {}
    for rank_answers in gather_objects(answers):
        merged.update(rank_answers)
    return merged


def evaluate_split(model: nn.Module, loader: DataLoader, run: Run, split: str) -> Dict[str, float]:
    """Accuracy on `split`; every question's answer record and ground truth go to
    output_dir/{split}_answers.json."""
    ground_truth = loader.dataset.answers_by_qid
    records = answer_questions(model, loader, run)
    answers = {qid: record["answer"] for qid, record in records.items()}
    metrics = {"accuracy": accuracy(answers, ground_truth), "num_questions": len(ground_truth)}
    write_json(run.output_dir, f"{split}_answers.json", [
        {"question_id": qid, **records.get(qid, {"answer": None}), "ground_truth": answer}
        for qid, answer in ground_truth.items()])
    log(f"{split}: accuracy {metrics['accuracy']:.2f} on {len(ground_truth)} questions")
    return metrics


# training ----------------------------------------------------------------------------
def make_losses(train_model: nn.Module, run: Run, train_loader: DataLoader) -> LossFn:
    """Weighted answer NLL of a batch."""
    def losses_of(batch, epoch: int, step: int) -> Dict[str, torch.Tensor]:
        video, questions, answers, weights, answers_per_question = batch
        loss = train_model(video.to(run.device, non_blocking=True), questions, answers,
                           weights.to(run.device), answers_per_question)
        return {"loss": loss}
    return losses_of


TASK = Task("videoqa", "train_videoqa.py", VIDEOQA_SCHEMA, build_videoqa_model, make_losses,
            finetune_schedule, DATASETS, served_as="videoqa", evaluate=evaluate_split,
            best_metric=BEST_METRIC, outputs=("*_answers.json",))
