"""Fine-tune and evaluate TESTA for long-form VideoQA (ActivityNet-QA).

    torchrun --nproc_per_node 8 train_videoqa.py --config configs/vqa_activitynet_f32.yaml \
        --output_dir output/vqa_activitynet_f32
    python train_videoqa.py --config configs/vqa_activitynet_f32.yaml --output_dir out/vqa \
        --evaluate --checkpoint output/vqa_activitynet_f32/checkpoint_best.pth

Answers are ranked from the split's answer list (`inference: rank`: the `k_test`
answers likeliest by their first token, re-scored by full likelihood) or generated with
beam search (`inference: generate`). Accuracy = exact match with the ground-truth answer.
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import build_datasets
from models import build_videoqa_model
from utils import (VIDEOQA_SCHEMA, FinetuneTask, LossFn, Run, build_arg_parser,
                   finetune_or_evaluate, gather_objects, log, parse_args, progress,
                   script_errors, start_run, write_json)

BEST_METRIC = "accuracy"


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
    write_json(run, f"{split}_answers.json", [
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


TASK = FinetuneTask(make_losses, evaluate_split, BEST_METRIC)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(build_arg_parser(__doc__.splitlines()[0]), argv)
    with script_errors():
        run = start_run(args, VIDEOQA_SCHEMA)
        datasets = build_datasets(run.config)
        finetune_or_evaluate(run, args, build_videoqa_model(run.config), TASK, datasets)


if __name__ == "__main__":
    main()
