"""`Task`: everything that tells one task (retrieval, VideoQA, pre-training, ...) from
another, for the scripts, the training loop, `testa.load` and the config reference. The
tasks themselves are in tasks/, registered in `tasks.TASKS`."""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import SPLITS, Splits, SplitsBuilder, build_splits
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
    datasets: its dataset names (the `dataset` setting's choices) -> the builders of their
        (train, val, test) splits; a dataset name belongs to one task, so a checkpoint whose
        config names only its dataset finds its task (`tasks.task_of_dataset`).
    served_as: what `testa.load` gives for its checkpoints, a key of `testa.SERVED_AS` (the
        model it builds and the wrapper around it): "video_text" (embeddings, similarities,
        re-ranking) or "videoqa" (answers).
    make_losses(train_model, run, train_loader) -> the LossFn of a training step.
    schedule(config) -> the learning-rate schedule.
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
    datasets: Mapping[str, SplitsBuilder]
    served_as: str
    decay_norms_and_biases: bool = True
    evaluate: Optional[Callable[[nn.Module, DataLoader, Any, str], Dict[str, float]]] = None
    best_metric: Optional[str] = None
    epoch_checkpoint: Optional[str] = None
    outputs: Tuple[str, ...] = ()

    def build_datasets(self, config: Mapping[str, Any], splits: Sequence[str] = SPLITS) -> Splits:
        """(train, val, test) datasets of `config["dataset"]`, None for a split it lacks or
        that is not in `splits` (`datasets.build_splits`)."""
        return build_splits(self.datasets, config, splits)
