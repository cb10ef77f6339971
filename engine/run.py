"""A script run: its resolved config, output folder, device and precision; starting it
(config, process group, seed, saved config) and ending it (one-line errors)."""
import argparse
import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from datasets import DataError
from datasets.decoders import decoder_env_problem
from engine.config import resolve_config, save_config
from engine.distributed import (DISTRIBUTED_SETTINGS, finish_distributed, init_distributed,
                                is_collective_timeout, select_device)
from engine.host_memory import keep_freed_memory
from engine.logs import RunRecords, log, set_progress_bar, summary_writer_class
from engine.output_dir import OutputDir, release_held
from engine.precision import Precision, build_precision
from engine.saving import remove_stale_temporaries
from engine.task import Task
from engine.signals import Interrupted, script_signals
from models.checkpoint_reading import CheckpointError, read_checkpoint
from models.collectives import gather_objects, get_rank, get_world_size
from utils import NONE, ConfigError, Setting, Settings

RUN_SETTINGS = Settings(title="Run", module=__name__, settings={
    "pretrained": Setting((str, NONE), None, "checkpoint to start from (BLIP or TESTA): "
                          "path, http(s) URL or hf:// id; --checkpoint overrides it"),
    "trust_checkpoint": Setting(bool, False, "unpickle checkpoint files in full, beyond the "
                                "safe list (runs code from the file; --trust_checkpoint sets it)"),
    "seed": Setting(int, 42, "seed of weights, data order and augmentation", min=0),
    **DISTRIBUTED_SETTINGS,
})
# what every run writes into its output folder (and its task's `outputs`); a folder holding
# any of these holds a run
RUN_OUTPUTS = ("checkpoint_*.pth", "log.jsonl", "summary.json", "eval_results.json",
               "test_metrics.json", "tensorboard")


@dataclass
class Run:
    """What a script run works with: its config, output folder, device and precision,
    and its records (log.jsonl, TensorBoard, summary; plain log.jsonl unless given)."""
    config: Dict[str, Any]
    output_dir: Path
    device: torch.device
    precision: Precision
    records: Optional[RunRecords] = None
    output: Optional[OutputDir] = None  # the folder to take; None: a Run made by hand

    def __post_init__(self):
        if self.records is None:
            self.records = RunRecords(self.output_dir)

    def take_output_dir(self) -> None:
        """Once every check of the run has passed: take the output folder (rank 0: lock
        it, delete an earlier run's results with --overwrite), start the records
        (TensorBoard), save the config used and remove temporaries an interrupted save
        left. Every rank stops with rank 0's error if taking fails."""
        if self.output is None or self.output.taken:
            return
        problem = None
        if self.is_main:
            try:
                self.output.take()
            except ConfigError as err:
                problem = str(err)
        problems = [found for found in gather_objects(problem) if found is not None]
        if problems:
            raise ConfigError(problems[0])
        self.output.taken = True
        self.records = RunRecords(self.output_dir, tensorboard=self.config["tensorboard"])
        if self.is_main:
            save_config(self.config, self.output_dir / "config.yaml")
            for name in remove_stale_temporaries(str(self.output_dir)):
                log(f"removed {self.output_dir / name}, left by an interrupted save")

    @property
    def rank(self) -> int:
        return get_rank()

    @property
    def world_size(self) -> int:
        return get_world_size()

    @property
    def is_main(self) -> bool:
        return get_rank() == 0


def start_run(args: argparse.Namespace, task: Task,
              overrides: Optional[Mapping[str, Any]] = None) -> Run:
    """Resolve the config against the task's schema, check the output folder (a previous
    run's files: RUN_OUTPUTS and the task's; another run in it), join the process group,
    check what depends on the number of processes, and seed. Without `--config` (an
    evaluation), the config is the one saved in `--checkpoint`, with `--opts` over it (data
    paths, evaluation keys). Nothing is written to the output folder here: the caller takes
    it (`Run.take_output_dir`) once the data and weights have passed their checks too
    (one-line errors, see script_errors)."""
    if args.trust_checkpoint:
        overrides = {**(overrides or {}), "trust_checkpoint": True}
    if args.config is None:  # --evaluate --checkpoint: the checkpoint's own config
        config = resolve_config(args.checkpoint, args.opts, task.schema, overrides,
                                saved=saved_config(args.checkpoint, task,
                                                   trust=args.trust_checkpoint))
    else:
        config = resolve_config(args.config, args.opts, task.schema, overrides)
    device = select_device(args.device)
    output = OutputDir(Path(args.output_dir), RUN_OUTPUTS + task.outputs, resume=args.resume,
                       overwrite=args.overwrite)
    output.check()
    if decoder_env_problem():
        raise ConfigError(decoder_env_problem())
    if config["tensorboard"]:
        summary_writer_class()  # installed? (every rank, before any work)
    init_distributed(device, config["dist_timeout_minutes"])
    if not getattr(args, "evaluate", False):
        check_queue_fits_batch(config, args)
    set_progress_bar(config["progress_bar"])
    run = Run(config, output.path, device, build_precision(config["amp"], device), output=output)
    # the models' one-line reports (e.g. text_init) on rank 0; warnings on every rank
    logging.basicConfig(format="%(message)s")
    logging.getLogger("models").setLevel(logging.INFO if run.is_main else logging.WARNING)
    seed_everything(config["seed"])  # the same initial weights on every rank
    keep_freed_memory(device)  # on a CPU: no page faults for every step's activations
    log(f"{run.world_size} process(es) on {device.type}, precision {run.precision}, "
        f"output {output.path}")
    return run


def saved_config(location: str, task: Task, *, trust: bool) -> Dict[str, Any]:
    """The config a checkpoint (path, URL, hf:// id or exported folder) was trained with,
    to evaluate it on `task`; ConfigError when it holds none or one of another task."""
    checkpoint, _ = read_checkpoint(location, trust=trust)
    config = checkpoint.get("config")
    if not isinstance(config, dict):
        raise ConfigError(f"{location}: holds no config; pass --config (e.g. configs/*.yaml)")
    saved_task = checkpoint.get("task")
    if saved_task not in (None, task.name):
        raise ConfigError(f"{location}: holds the config of a {saved_task} run, which "
                          f"{task.script} cannot use; pass --config (e.g. configs/*.yaml)")
    return config


def get_rank_from_env() -> int:
    """The rank torchrun gives this process (0 in a single process), before the process
    group exists."""
    return int(os.environ.get("RANK", 0))


def check_queue_fits_batch(config: Mapping[str, Any], args: argparse.Namespace) -> None:
    """The feature queues take the whole world's batch at a time: queue_size must be a
    multiple of the batch per process x the processes of this run."""
    if "queue_size" not in config:
        return
    batch_key = "batch_size_train" if "batch_size_train" in config else "batch_size"
    global_batch = config[batch_key] * get_world_size()
    if config["queue_size"] % global_batch:
        source = ("--opts" if any(opt.startswith(("queue_size=", f"{batch_key}="))
                                  for opt in args.opts) else args.config)
        raise ConfigError(f"{source}: queue_size {config['queue_size']} is not a multiple of the "
                          f"global batch {global_batch} ({batch_key} {config[batch_key]} x "
                          f"{get_world_size()} process(es))")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class NonFiniteError(ValueError):
    """A loss, feature or score that is NaN or infinite; the message names it and where."""


@contextmanager
def script_errors():
    """Bad input (a config, checkpoint or data file), SIGTERM or SIGINT, and a stalled or
    lost peer end the script with a one-line message (exit status 1); the process group is
    released and the signal handlers restored in any case (engine/signals.py). A save that
    a signal interrupts removes its temporary file itself (engine/saving.py)."""
    try:
        with script_signals():
            yield
    except (ConfigError, CheckpointError, DataError, FileNotFoundError, NonFiniteError) as err:
        raise SystemExit(f"error: {err}") from None
    except (Interrupted, KeyboardInterrupt) as err:
        name = str(err) or "SIGINT"
        raise SystemExit(f"error: stopped by {name}; finished epochs are in the output folder's "
                         f"checkpoint_last.pth (--resume continues)") from None
    except RuntimeError as err:
        if not is_collective_timeout(err):
            raise
        raise SystemExit(f"error: rank {get_rank_from_env()}: another process did not take part "
                         f"in a collective within dist_timeout_minutes, or left "
                         f"({str(err).splitlines()[0][:160]})") from None
    finally:
        release_held()
        finish_distributed()
