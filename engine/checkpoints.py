"""Checkpoints of the training loop: the state `--resume` continues from
(checkpoint_last.pth, written at the end of each epoch and every `checkpoint_every_steps`
steps with where the epoch stands), checkpoint_best.pth and the per-epoch weights, and
loading the weights a run starts from."""
import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from engine.distributed import barrier
from engine.logs import log
from engine.progress import EpochProgress, rng_states
from engine.run import Run
from engine.saving import model_checkpoint, save_checkpoint
from engine.task import Task
from models.checkpoint import ShapeMismatchError, load_checkpoint
from models.checkpoint_reading import CheckpointError, local_file, read_checkpoint
from models.collectives import gather_objects
from utils import ConfigError

LAST_CHECKPOINT = "checkpoint_last.pth"
BEST_CHECKPOINT = "checkpoint_best.pth"
RESUME_KEYS = ("optimizer", "scaler", "epoch", "best_metric", "best_epoch")


@dataclass
class TrainState:
    """Where training stands: the next epoch (with how far it got, when the run stopped
    part-way through it) and the best validation result so far."""
    epoch: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    progress: Optional[EpochProgress] = None

    def improved_by(self, metric: float, epoch: int) -> bool:
        """Record `metric` of `epoch`; True when it is the best so far."""
        if metric <= self.best_metric:
            return False
        self.best_metric, self.best_epoch = metric, epoch
        return True


def save_weights(run: Run, model: nn.Module, task: Task, name: str, epoch: int) -> None:
    """output_dir/name with the model, config and task only (rank 0)."""
    if run.is_main:
        save_checkpoint(str(run.output_dir / name),
                        model_checkpoint(model, run.config, epoch, task=task.name))
    barrier()


def save_last(run: Run, model: nn.Module, task: Task, optimizer: torch.optim.Optimizer,
              state: TrainState, loader: DataLoader,
              progress: Optional[EpochProgress] = None) -> None:
    """output_dir/checkpoint_last.pth: everything `--resume` needs after epoch
    `state.epoch - 1` (model with its queues, optimizer, loss scaler, best result, and per
    rank the training videos that failed to decode, which the data then passes over), and
    with `progress` (every rank's, at the same step of epoch `state.epoch`) where that
    epoch stands: `position` holds the epoch, the next step, the processes, batch size
    and loader workers it was cut for, and per rank the loss sums, counts and RNG states."""
    failed_videos = gather_objects(loader.dataset.issues.failed_videos())
    position = None
    if progress is not None:
        ranks = gather_objects({"loss_sums": progress.loss_sums, "steps_run": progress.steps_run,
                                "samples_seen": progress.samples_seen,
                                "rng": rng_states(run.device)})
        position = {"epoch": state.epoch, "step": progress.step, "world_size": run.world_size,
                    "batch_size": loader.batch_size, "num_workers": loader.num_workers,
                    "ranks": ranks}
    if run.is_main:
        checkpoint = model_checkpoint(model, run.config, state.epoch - 1, task=task.name,
                                      optimizer=optimizer,
                                      scaler=run.precision.scaler.state_dict(),
                                      best_metric=state.best_metric, best_epoch=state.best_epoch,
                                      failed_videos=failed_videos, position=position)
        save_checkpoint(str(run.output_dir / LAST_CHECKPOINT), checkpoint)
    barrier()


def resume(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer,
           train_loader: DataLoader) -> TrainState:
    """Restore model, optimizer and loss scaler from output_dir/checkpoint_last.pth, and
    where the epoch it was written in stands (`TrainState.progress`, this rank's). A
    part-way checkpoint must fit the run: as many processes, the same batch size, and
    for tar shards (cut into ranges per loader worker) as many workers. The training
    videos that failed to decode are flagged again, so the resumed run passes over them as
    the stopped one did and counts them. (`fit` then drops the run's records from there
    on, which the resumed run writes again.)"""
    path = run.output_dir / LAST_CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from "
                              f"(run without --resume to start)")
    checkpoint, _ = read_checkpoint(str(path), trust=run.config["trust_checkpoint"])
    absent = [key for key in RESUME_KEYS if key not in checkpoint]
    if absent:
        raise CheckpointError(f"{path}: not the last checkpoint of a run (no {', '.join(absent)})")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit the model of the config "
                              f"({_first_detail(err)})") from None
    optimizer.load_state_dict(checkpoint["optimizer"])
    run.precision.scaler.load_state_dict(checkpoint["scaler"])
    state = TrainState(checkpoint["epoch"] + 1, checkpoint["best_metric"], checkpoint["best_epoch"])
    failed = checkpoint.get("failed_videos") or []  # per rank; older files: none
    if failed:  # this rank's, or all ranks' when their number changed
        own = failed[run.rank] if len(failed) == run.world_size else torch.cat(failed)
        if not train_loader.dataset.issues.flag_failed(own):
            log(f"{path}: its videos that failed to decode are not those of this training set "
                "(more videos than it has); they are tried again")
    position = checkpoint.get("position")  # None: written at the end of an epoch
    if position is None:
        log(f"resumed from {path}: {len(checkpoint['model'])} tensors, epoch {checkpoint['epoch']} "
            f"done, best {state.best_metric:.4g} at epoch {state.best_epoch}")
        return state
    cut_for = {"process(es)": (position["world_size"], run.world_size),
               "clips per batch": (position["batch_size"], train_loader.batch_size)}
    if isinstance(train_loader.dataset, IterableDataset):
        cut_for["loader workers"] = (position["num_workers"], train_loader.num_workers)
    for what, (then, now) in cut_for.items():
        if then != now:
            raise CheckpointError(f"{path}: was written part-way through epoch {position['epoch']} "
                                  f"with {then} {what}; resume it with as many, not {now}")
    own = position["ranks"][run.rank]
    state.progress = EpochProgress(position["step"], own["loss_sums"], own["steps_run"],
                                   own["samples_seen"], own["rng"])
    log(f"resumed from {path}: {len(checkpoint['model'])} tensors, epoch {position['epoch']} at "
        f"step {position['step']}, best {state.best_metric:.4g} at epoch {state.best_epoch}")
    return state


def _first_detail(err: Exception) -> str:
    """The first line of a load_state_dict error that says what differs."""
    lines = [line.strip() for line in str(err).strip().splitlines()]
    return (lines[1] if len(lines) > 1 else lines[0])[:200]


def initial_weights(args: argparse.Namespace, config: Mapping[str, Any]) -> Optional[str]:
    """`--checkpoint`, else the config's `pretrained` (None when neither is set)."""
    return args.checkpoint or config["pretrained"] or None


def load_weights(model: nn.Module, location: str, *, trust: bool = False,
                 config_source: Optional[str] = None) -> None:
    """Load a BLIP/TESTA checkpoint (path, URL or hf:// id) and print its load report (in
    full when keys are missing or unexpected for no known reason, else its summary line).
    A URL is downloaded by the first process of each node while the others wait; when it
    fails, every process stops with its error. Weights whose shapes the model of
    `config_source` (the config file given) does not have are an error naming both."""
    problem = None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            local_file(location)
        except CheckpointError as err:
            problem = str(err)
    problems = [found for found in gather_objects(problem) if found is not None]
    if problems:
        raise CheckpointError(problems[0])
    try:
        report = load_checkpoint(model, location, trust=trust)
    except ShapeMismatchError as err:
        if config_source is None:
            raise
        raise ConfigError(f"{config_source}: builds a model that does not fit the weights of "
                          f"{err}; leave out --config to use the checkpoint's own") from None
    log(str(report) if report.needs_attention() else report.summary())
