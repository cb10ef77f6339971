"""The one training loop of fine-tuning and pre-training (its checkpoints: engine/checkpoints.py).

`fit` runs the epochs of a `Task`: per epoch it seeds the data order, trains with the
task's losses under the task's learning-rate schedule, optionally evaluates on val and
keeps checkpoint_best.pth, optionally writes checkpoint_{epoch}.pth, and always writes
checkpoint_last.pth for `--resume`, before validation. With `checkpoint_every_steps` N,
checkpoint_last.pth is also written every N optimizer steps inside the epochs, with where
the epoch stands (`EpochProgress`: the next batch, every rank's loss sums and RNG states),
so that `--resume` continues at that step as if the run had not stopped. A loss that is
not finite stops the run at the next log step, naming the first bad step.
`finetune_or_evaluate` drives the fine-tuning scripts around it.
"""
import argparse
import math
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from datasets import SPLITS, create_loader, summarize
from datasets.base import ClipDataset
from engine.checkpoints import (BEST_CHECKPOINT, LAST_CHECKPOINT, TrainState, initial_weights,
                                load_weights, resume, save_last, save_weights)
from engine.distributed import gradient_sync, wrap_ddp
from engine.logs import format_metrics, log, progress, write_json
from engine.optim import build_optimizer, learning_rate, set_lr
from engine.progress import EpochProgress, set_rng_states
from engine.run import NonFiniteError, Run, seed_everything
from models.collectives import all_reduce_sum, gather_objects, get_rank, get_world_size
from engine.signals import ignore_signals_in_worker
from engine.task import LossFn, Task
from utils import ConfigError, Setting, Settings

TRAIN_SETTINGS = Settings(title="Training loop", module=__name__, settings={
    "accum_steps": Setting(int, 1, "batches per optimizer step (gradient accumulation)", min=1),
    "print_freq": Setting(int, 50, "steps between log lines", min=1),
    "num_workers": Setting(int, 4, "data loader worker processes per rank", min=0),
    "checkpoint_every_steps": Setting(int, 0, "optimizer steps between the checkpoint_last.pth "
                                      "writes inside an epoch, from which --resume continues at "
                                      "that step (0: at the end of each epoch only)", min=0),
})
FINETUNE_BATCH_SETTINGS = Settings(title="Fine-tuning batches", module=__name__, settings={
    "batch_size_train": Setting(int, meaning="training clips per process and step", min=1),
    "batch_size_test": Setting(int, meaning="evaluation clips per process and step", min=1),
})

# data order --------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def start_epoch(loader: DataLoader, seed: int, epoch: int, start_step: int = 0) -> None:
    """Make the data order and every random draw of `epoch` depend only on (seed, epoch,
    rank), so that a resumed run repeats an uninterrupted one; the loader begins at batch
    `start_step` of the epoch (a run resumed part-way through it)."""
    start = start_step * loader.batch_size
    if isinstance(loader.dataset, IterableDataset):  # tar shards: the epoch's shard order
        loader.dataset.set_epoch(epoch, start)
    else:
        loader.sampler.set_epoch(epoch, start)
    if isinstance(loader.dataset, ClipDataset):  # each item's draws: of its index and the epoch
        loader.dataset.seed_items(epoch_seed(seed, epoch, 0))
    rank_seed = epoch_seed(seed, epoch, get_rank())
    loader.generator.manual_seed(rank_seed)  # the workers' seeds
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
                    lr_at_step: Optional[Callable[[int], float]] = None, *,
                    num_steps: Optional[int] = None, start: Optional[EpochProgress] = None,
                    save_progress: Optional[Callable[[EpochProgress], None]] = None
                    ) -> Dict[str, float]:
    """One pass over `loader`: `losses_of(batch, epoch, step)` gives named losses, whose
    sum is back-propagated; the weights step every `accum_steps` batches. Returns the
    losses averaged over steps and ranks, the last learning rate, and the steps run and
    clips consumed by each rank (`steps_per_rank`, `samples_per_rank`; a batch's first
    entry is its clips).

    A resumed epoch passes its `num_steps` (the loader holds the remaining batches only)
    and where it stood (`start`). With `checkpoint_every_steps` N, `save_progress` gets
    the epoch's progress after every N-th optimizer step of the run (not after the last
    step of the epoch, which the caller saves)."""
    model.train()
    accum_steps, print_freq = run.config["accum_steps"], run.config["print_freq"]
    every = run.config.get("checkpoint_every_steps", 0)
    num_steps = len(loader) if num_steps is None else num_steps
    updates_per_epoch = math.ceil(num_steps / accum_steps)
    start = EpochProgress() if start is None else start
    sums: Dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64,
                                                                      device=run.device))
    for name, total in start.loss_sums.items():
        sums[name] += total
    watch = NonFiniteWatch(run.device)
    optimizer.zero_grad(set_to_none=True)
    logged_step, logged_at = start.step - 1, time.perf_counter()
    steps_run, samples_seen = start.steps_run, start.samples_seen
    batches = progress(loader, f"epoch {epoch}", total=num_steps - start.step)
    for step, batch in enumerate(batches, start=start.step):
        steps_run, samples_seen = steps_run + 1, samples_seen + len(batch[0])
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
        optimizer_steps = epoch * updates_per_epoch + math.ceil((step + 1) / accum_steps)
        if (updates and every and optimizer_steps % every == 0 and step + 1 < num_steps
                and save_progress is not None):
            watch.check(epoch)  # no checkpoint of weights a non-finite loss has touched
            save_progress(EpochProgress(step + 1, {name: total.item() for name, total in sums.items()},
                                        steps_run, samples_seen))
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
                                 f"step {step}; the weights saved last (at the end of an epoch, or "
                                 f"by checkpoint_every_steps) are in {LAST_CHECKPOINT}")


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


# the loop ----------------------------------------------------------------------------
def fit(run: Run, model: nn.Module, task: Task, loaders: Mapping[str, DataLoader],
        resume_training: bool, datasets: Sequence) -> TrainState:
    """Train for `max_epoch` epochs (see the module docstring)."""
    config = run.config
    optimizer = build_optimizer(model, config, decay_norms_and_biases=task.decay_norms_and_biases)
    train_loader = loaders["train"]
    steps_per_epoch = len(train_loader)  # before a resumed epoch starts part-way
    state = resume(run, model, optimizer, train_loader) if resume_training else TrainState()
    run.take_output_dir()  # every check passed (data, weights, the resumed checkpoint)

    def global_step(step: int) -> int:  # of `step` in the epoch that state.epoch names
        return state.epoch * steps_per_epoch + step

    if resume_training:  # the stopped run's records after the resumed step are written again
        step = 0 if state.progress is None else state.progress.step
        run.records.continue_from(state.epoch, step, global_step(step))
    train_model = wrap_ddp(model, run.device)
    schedule = task.schedule(config)
    losses_of = task.make_losses(train_model, run, train_loader)

    def save_progress(progress: EpochProgress) -> None:
        save_last(run, model, task, optimizer, state, train_loader, progress)
        run.records.write({"kind": "checkpoint", "epoch": state.epoch, "step": progress.step,
                           "global_step": global_step(progress.step)})

    for epoch in range(state.epoch, config["max_epoch"]):
        epoch_started = time.perf_counter()
        progress, state.progress = state.progress, None
        start_epoch(train_loader, config["seed"], epoch, 0 if progress is None else progress.step)
        if progress is not None:  # where the stopped run stood, after the epoch's seeding
            set_rng_states(progress.rng, run.device)
        train_stats = train_one_epoch(
            run, train_model, train_loader, optimizer, epoch, losses_of,
            lr_at_step=lambda step: learning_rate(schedule, epoch, epoch * steps_per_epoch + step),
            num_steps=steps_per_epoch, start=progress, save_progress=save_progress)
        record = {f"train_{k}": v for k, v in train_stats.items()}
        record["train_seconds"] = round(time.perf_counter() - epoch_started, 3)
        # the trained epoch is on disk before validation, which may fail
        state.epoch = epoch + 1
        save_last(run, model, task, optimizer, state, train_loader)
        if task.epoch_checkpoint is not None:
            save_weights(run, model, task, task.epoch_checkpoint.format(epoch=epoch), epoch)
        if task.evaluate is not None:
            val_started = time.perf_counter()
            val_metrics = task.evaluate(model, loaders["val"], run, "val")
            record["val_seconds"] = round(time.perf_counter() - val_started, 3)
            if state.improved_by(val_metrics[task.best_metric], epoch):
                save_weights(run, model, task, BEST_CHECKPOINT, epoch)
                save_last(run, model, task, optimizer, state, train_loader)  # the new best
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
        run.take_output_dir()
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
