"""The one training loop of fine-tuning and pre-training, and its checkpoints.

`fit` runs the epochs of a `Task`: per epoch it seeds the data order, trains with the
task's losses under the task's learning-rate schedule, optionally evaluates on val and
keeps checkpoint_best.pth, optionally writes checkpoint_{epoch}.pth, and always writes
checkpoint_last.pth for `--resume`, before validation. A loss that is not finite stops
the run at the next log step, naming the first bad step. `finetune_or_evaluate` drives the fine-tuning
scripts around it.
"""
import argparse
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from datasets import SPLITS, create_loader, summarize
from engine.distributed import barrier, gradient_sync, wrap_ddp
from engine.logs import format_metrics, log, progress, write_json
from engine.optim import build_optimizer, learning_rate, set_lr
from engine.run import NonFiniteError, Run, seed_everything
from models.collectives import all_reduce_sum, gather_objects, get_rank, get_world_size
from engine.saving import model_checkpoint, save_checkpoint
from engine.signals import ignore_signals_in_worker
from engine.task import LossFn, Task
from models.checkpoint import ShapeMismatchError, load_checkpoint
from models.checkpoint_reading import CheckpointError, local_file, read_checkpoint
from utils import ConfigError, Setting, Settings

TRAIN_SETTINGS: Settings = {
    "accum_steps": Setting(int, 1, "batches per optimizer step (gradient accumulation)", min=1),
    "print_freq": Setting(int, 50, "steps between log lines", min=1),
    "num_workers": Setting(int, 4, "data loader worker processes per rank", min=0),
}
FINETUNE_BATCH_SETTINGS: Settings = {
    "batch_size_train": Setting(int, meaning="training clips per process and step", min=1),
    "batch_size_test": Setting(int, meaning="evaluation clips per process and step", min=1),
}
LAST_CHECKPOINT = "checkpoint_last.pth"
BEST_CHECKPOINT = "checkpoint_best.pth"
RESUME_KEYS = ("optimizer", "scaler", "epoch", "best_metric", "best_epoch")

# data order --------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def start_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make the data order and every random draw of `epoch` depend only on (seed, epoch,
    rank), so that a resumed run repeats an uninterrupted one."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    if isinstance(loader.dataset, IterableDataset):  # tar shards: the epoch's shard order
        loader.dataset.set_epoch(epoch)
    rank_seed = epoch_seed(seed, epoch, get_rank())
    loader.generator.manual_seed(rank_seed)  # RandomSampler order and worker seeds
    seed_everything(rank_seed)


def build_loaders(run: Run, datasets: Mapping[str, Dataset],
                  batch_sizes: Mapping[str, int]) -> Dict[str, DataLoader]:
    """A loader per split (`train` shuffled, drop-last); distributed over the ranks when
    there are several (evaluation shards repeat a few items to even out the ranks)."""
    config = run.config
    return {split: create_loader(dataset, batch_sizes[split], config["num_workers"],
                                 split == "train", run.world_size > 1, config["seed"],
                                 worker_init_fn=ignore_signals_in_worker)
            for split, dataset in datasets.items()}


def check_trainable(loader: DataLoader, name: str) -> None:
    """A training set too small for one full batch is a config error."""
    if len(loader) == 0:
        raise ConfigError(f"{name}: {len(loader.dataset)} items make no full batch of "
                          f"{loader.batch_size} per process on {get_world_size()} process(es)")


# one epoch ---------------------------------------------------------------------------
def train_one_epoch(run: Run, model: nn.Module, loader: DataLoader,
                    optimizer: torch.optim.Optimizer, epoch: int, losses_of: LossFn,
                    lr_at_step: Optional[Callable[[int], float]] = None) -> Dict[str, float]:
    """One pass over `loader`: `losses_of(batch, epoch, step)` gives named losses, whose
    sum is back-propagated; the weights step every `accum_steps` batches. Returns the
    losses averaged over steps and ranks, the last learning rate, and the steps run and
    clips consumed by each rank (`steps_per_rank`, `samples_per_rank`; a batch's first
    entry is its clips)."""
    model.train()
    accum_steps, print_freq = run.config["accum_steps"], run.config["print_freq"]
    num_steps = len(loader)
    sums: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64,
                                                                      device=run.device))
    watch = NonFiniteWatch(run.device)
    optimizer.zero_grad(set_to_none=True)
    logged_step, logged_at = -1, time.perf_counter()
    steps_run = samples_seen = 0
    for step, batch in enumerate(progress(loader, f"epoch {epoch}", total=num_steps)):
        steps_run, samples_seen = step + 1, samples_seen + len(batch[0])
        if lr_at_step is not None:
            set_lr(optimizer, lr_at_step(step))
        updates = (step + 1) % accum_steps == 0 or step + 1 == num_steps
        with gradient_sync(model, updates):
            with run.precision.autocast():
                losses = losses_of(batch, epoch, step)
            run.precision.scaler.scale(sum(losses.values()) / accum_steps).backward()
        if updates:
            run.precision.scaler.step(optimizer)
            run.precision.scaler.update()
            optimizer.zero_grad(set_to_none=True)
        watch.record(losses, step)
        for name, loss in losses.items():
            sums[name] += loss.detach().to(torch.float64)  # summed on the device, no sync
        if step % print_freq == 0 or step + 1 == num_steps:
            watch.check(epoch)  # syncs, like the .item() below
            values = {name: loss.item() for name, loss in losses.items()}  # .item() syncs
            lr = optimizer.param_groups[0]["lr"]
            log(f"epoch {epoch} [{step + 1}/{num_steps}]  lr {lr:.3g}  " + format_metrics(values))
            # after the sync above: the device's time since the previous logged step
            now = time.perf_counter()
            seconds, samples = now - logged_at, (step - logged_step) * loader.batch_size
            logged_step, logged_at = step, now
            run.records.write({"kind": "step", "epoch": epoch, "step": step,
                               "global_step": epoch * num_steps + step, "lr": lr, **values,
                               "seconds": round(seconds, 3),
                               "samples_per_s": round(samples * run.world_size / seconds, 2)})
    return {**mean_over_ranks(sums, num_steps, run.device), "lr": optimizer.param_groups[0]["lr"],
            "steps_per_rank": gather_objects(steps_run),
            "samples_per_rank": gather_objects(samples_seen)}


class NonFiniteWatch:
    """The first step at which each loss was NaN or infinite, kept on the device so that
    recording it costs no host-device sync; `check` (at the log steps, which sync
    anyway) raises NonFiniteError naming the first bad step and loss."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: Sequence[str] = ()
        self.first_bad: Optional[torch.Tensor] = None  # [L] step, or -1 while finite

    def record(self, losses: Mapping[str, torch.Tensor], step: int) -> None:
        if self.first_bad is None:
            self.names = tuple(losses)
            self.first_bad = torch.full((len(losses),), -1, dtype=torch.long, device=self.device)
        bad = ~torch.isfinite(torch.stack([loss.detach().float() for loss in losses.values()]))
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check(self, epoch: int) -> None:
        if self.first_bad is None:
            return
        first_bad = self.first_bad.tolist()
        bad = [(step, name) for step, name in zip(first_bad, self.names) if step >= 0]
        if bad:
            step, name = min(bad)
            raise NonFiniteError(f"training stopped: {name} is not finite at epoch {epoch} "
                                 f"step {step}; the weights of the last finished epoch are in "
                                 f"{LAST_CHECKPOINT}")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError naming `what` when `tensor` holds NaN or infinity (one sync)."""
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"evaluation stopped: {what} are not finite")


def mean_over_ranks(sums: Mapping[str, torch.Tensor], count: int,
                    device: torch.device) -> Dict[str, float]:
    totals = torch.stack([*sums.values(), torch.tensor(float(count), dtype=torch.float64,
                                                       device=device)])
    all_reduce_sum(totals)
    return {name: (total / totals[-1]).item() for name, total in zip(sums, totals[:-1])}


# checkpoints -------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where training stands: the next epoch and the best validation result so far."""
    epoch: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1

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
              state: TrainState) -> None:
    """output_dir/checkpoint_last.pth: everything `--resume` needs after epoch
    `state.epoch - 1` (model with its queues, optimizer, loss scaler, best result)."""
    if run.is_main:
        checkpoint = model_checkpoint(model, run.config, state.epoch - 1, task=task.name,
                                      optimizer=optimizer,
                                      scaler=run.precision.scaler.state_dict(),
                                      best_metric=state.best_metric, best_epoch=state.best_epoch)
        save_checkpoint(str(run.output_dir / LAST_CHECKPOINT), checkpoint)
    barrier()


def resume(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore model, optimizer and loss scaler from output_dir/checkpoint_last.pth."""
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
    log(f"resumed from {path}: {len(checkpoint['model'])} tensors, epoch {checkpoint['epoch']} "
        f"done, best {state.best_metric:.4g} at epoch {state.best_epoch}")
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


# the loop ----------------------------------------------------------------------------
def fit(run: Run, model: nn.Module, task: Task, loaders: Mapping[str, DataLoader],
        resume_training: bool, datasets: Sequence) -> TrainState:
    """Train for `max_epoch` epochs (see the module docstring)."""
    config = run.config
    optimizer = build_optimizer(model, config, decay_norms_and_biases=task.decay_norms_and_biases)
    state = resume(run, model, optimizer) if resume_training else TrainState()
    train_model = wrap_ddp(model, run.device)
    train_loader = loaders["train"]
    steps_per_epoch = len(train_loader)
    schedule = task.schedule(config)
    losses_of = task.make_losses(train_model, run, train_loader)
    for epoch in range(state.epoch, config["max_epoch"]):
        epoch_started = time.perf_counter()
        start_epoch(train_loader, config["seed"], epoch)
        train_stats = train_one_epoch(
            run, train_model, train_loader, optimizer, epoch, losses_of,
            lr_at_step=lambda step: learning_rate(schedule, epoch, epoch * steps_per_epoch + step))
        record = {f"train_{k}": v for k, v in train_stats.items()}
        record["train_seconds"] = round(time.perf_counter() - epoch_started, 3)
        # the trained epoch is on disk before validation, which may fail
        state.epoch = epoch + 1
        save_last(run, model, task, optimizer, state)
        if task.epoch_checkpoint is not None:
            save_weights(run, model, task, task.epoch_checkpoint.format(epoch=epoch), epoch)
        if task.evaluate is not None:
            val_started = time.perf_counter()
            val_metrics = task.evaluate(model, loaders["val"], run, "val")
            record["val_seconds"] = round(time.perf_counter() - val_started, 3)
            if state.improved_by(val_metrics[task.best_metric], epoch):
                save_weights(run, model, task, BEST_CHECKPOINT, epoch)
                save_last(run, model, task, optimizer, state)  # with the new best result
            record.update({f"val_{k}": v for k, v in val_metrics.items()},
                          best_epoch=state.best_epoch)
        record["epoch_seconds"] = round(time.perf_counter() - epoch_started, 3)
        if run.device.type == "cuda":  # the allocator's peak since the run started
            record["max_memory_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
        run.records.write({"kind": "epoch", "epoch": epoch, **record})
        log(summarize(*datasets))
    return state


# fine-tuning -------------------------------------------------------------------------
def run_test(run: Run, model: nn.Module, task: Task, loader: DataLoader,
             checkpoint: str, result_name: str) -> Dict[str, Any]:
    """Metrics of `checkpoint` on the test split: the result (checkpoint, split, metrics)
    written to output_dir/result_name."""
    started = time.perf_counter()
    metrics = task.evaluate(model, loader, run, "test")
    result = {"checkpoint": checkpoint, "split": "test", "metrics": metrics}
    write_json(run.output_dir, result_name, result)
    run.records.write({"kind": "test", "checkpoint": checkpoint,
                       **{f"test_{k}": v for k, v in metrics.items()},
                       "seconds": round(time.perf_counter() - started, 3)})
    return result


def finetune_or_evaluate(run: Run, args: argparse.Namespace, task: Task) -> Dict[str, float]:
    """Build the task's datasets and model; `--evaluate`: test the given weights
    (eval_results.json), reading only the test split's files and no `text_init` (the
    evaluated weights hold the text towers). Otherwise fine-tune, then test
    checkpoint_best.pth (test_metrics.json). Ends with the run's summary."""
    config = run.config
    splits = ("test",) if args.evaluate else SPLITS
    datasets = task.build_datasets(config, splits)
    model = task.build_model({**config, "text_init": None} if args.evaluate else config)
    batch_sizes = {"train": config["batch_size_train"], "val": config["batch_size_test"],
                   "test": config["batch_size_test"]}
    loaders = build_loaders(run, {split: dataset for split, dataset in zip(SPLITS, datasets)
                                  if dataset is not None}, batch_sizes)
    weights = initial_weights(args, config)
    if args.evaluate:
        if weights is None:
            raise ConfigError(f"{args.config}: --evaluate needs --checkpoint or pretrained")
        load_weights(model, weights, trust=config["trust_checkpoint"], config_source=args.config)
        result = run_test(run, model.to(run.device), task, loaders["test"], weights,
                          "eval_results.json")
        run.records.finish(test=result)
        return result["metrics"]
    if weights is not None and not args.resume:
        load_weights(model, weights, trust=config["trust_checkpoint"])
    check_trainable(loaders["train"], "train set")
    if len(loaders["val"].dataset) == 0:
        raise ConfigError(f"{args.config}: the val split is empty; validation after every epoch "
                          "needs at least one item")
    fit(run, model.to(run.device), task, loaders, args.resume, datasets)
    best = str(run.output_dir / BEST_CHECKPOINT)
    load_weights(model, best)
    result = run_test(run, model, task, loaders["test"], best, "test_metrics.json")
    run.records.finish(test=result)
    return result["metrics"]
