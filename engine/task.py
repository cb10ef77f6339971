"""`Task`: everything that tells one task (retrieval, VideoQA, pre-training, ...) from
another, for the scripts, the training loop, `testa.load` and the config reference. The
tasks themselves are in tasks/, registered in `tasks.TASKS`."""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import build_datasets
from engine.optim import LRSchedule
from utils import Settings

LossFn = Callable[[Any, int, int], Dict[str, torch.Tensor]]  # (batch, epoch, step) -> losses


@dataclass(frozen=True)
class Task:
    """A task.

    name: its key in `tasks.TASKS`, recorded in the checkpoints it writes.
    script: the entry script that runs it.
    schema: the settings its config may set (a composition of settings groups).
    build_model(config) -> the model it trains.
    make_losses(train_model, run, train_loader) -> the LossFn of a training step.
    schedule(config) -> the learning-rate schedule.
    build_datasets(config, splits) -> (train, val, test) datasets (None for a split it lacks
        or that is not in `splits`).
    decay_norms_and_biases: False exempts biases and LayerNorm weights from weight decay.
    evaluate(model, loader, run, split) -> metrics (also printed and written by it), or
        None for no evaluation.
    best_metric: the validation metric that picks checkpoint_best.pth (with `evaluate`).
    epoch_checkpoint: a name like `checkpoint_{epoch:02d}.pth` to keep every epoch's weights.
    outputs: glob patterns of the files its evaluation writes into the output folder,
        beyond those every run writes (a folder holding any holds a previous run).
    """
    name: str
    script: str
    schema: Settings
    build_model: Callable[[Mapping[str, Any]], nn.Module]
    make_losses: Callable[[nn.Module, Any, DataLoader], LossFn]
    schedule: Callable[[Mapping[str, Any]], LRSchedule]
    build_datasets: Callable[[Mapping[str, Any], Sequence[str]], Tuple] = build_datasets
    decay_norms_and_biases: bool = True
    evaluate: Optional[Callable[[nn.Module, DataLoader, Any, str], Dict[str, float]]] = None
    best_metric: Optional[str] = None
    epoch_checkpoint: Optional[str] = None
    outputs: Tuple[str, ...] = ()
