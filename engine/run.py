"""A script run: its resolved config, output folder, device and precision; starting it
(config, process group, seed, saved config) and ending it (one-line errors)."""
import argparse
import logging
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from datasets import DataError
from engine.config import resolve_config, save_config
from engine.distributed import (DISTRIBUTED_SETTINGS, finish_distributed, init_distributed,
                                is_collective_timeout, select_device)
from engine.logs import RunRecords, log, set_progress_bar
from engine.precision import Precision, build_precision
from engine.saving import remove_stale_temporaries
from engine.task import Task
from engine.signals import Interrupted, script_signals
from models.checkpoint_reading import CheckpointError, read_checkpoint
from models.collectives import get_rank, get_world_size
from utils import NONE, ConfigError, Setting, Settings

RUN_SETTINGS: Settings = {
    "pretrained": Setting((str, NONE), None, "checkpoint to start from (BLIP or TESTA): "
                          "path, http(s) URL or hf:// id; --checkpoint overrides it"),
    "trust_checkpoint": Setting(bool, False, "unpickle checkpoint files in full, beyond the "
                                "safe list (runs code from the file; --trust_checkpoint sets it)"),
    "seed": Setting(int, 42, "seed of weights, data order and augmentation", min=0),
    **DISTRIBUTED_SETTINGS,
}
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

    def __post_init__(self):
        if self.records is None:
            self.records = RunRecords(self.output_dir)

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
    run's files: RUN_OUTPUTS and the task's), join the process group, check what depends
    on the number of processes, seed, and save the config used in the output folder (and
    remove temporaries an interrupted save left in it). Without `--config` (an evaluation),
    the config is the one saved in `--checkpoint`, with `--opts` over it (data paths,
    evaluation keys). Every check comes before any work (one-line errors, see
    script_errors)."""
    if args.trust_checkpoint:
        overrides = {**(overrides or {}), "trust_checkpoint": True}
    if args.config is None:  # --evaluate --checkpoint: the checkpoint's own config
        config = resolve_config(args.checkpoint, args.opts, task.schema, overrides,
                                saved=saved_config(args.checkpoint, task,
                                                   trust=args.trust_checkpoint))
    else:
        config = resolve_config(args.config, args.opts, task.schema, overrides)
    device = select_device(args.device)
    output_dir = Path(args.output_dir)
    prepare_output_dir(output_dir, RUN_OUTPUTS + task.outputs, resume=args.resume,
                       overwrite=args.overwrite)
    init_distributed(device, config["dist_timeout_minutes"])
    if not getattr(args, "evaluate", False):
        check_queue_fits_batch(config, args)
    set_progress_bar(config["progress_bar"])
    run = Run(config, output_dir, device, build_precision(config["amp"], device),
              RunRecords(output_dir, tensorboard=config["tensorboard"]))
    # the models' one-line reports (e.g. text_init) on rank 0; warnings on every rank
    logging.basicConfig(format="%(message)s")
    logging.getLogger("models").setLevel(logging.INFO if run.is_main else logging.WARNING)
    if run.is_main:
        save_config(config, output_dir / "config.yaml")
        for name in remove_stale_temporaries(str(output_dir)):
            log(f"removed {output_dir / name}, left by an interrupted save")
    seed_everything(config["seed"])  # the same initial weights on every rank
    log(f"{run.world_size} process(es) on {device.type}, precision {run.precision}, "
        f"output {output_dir}")
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


def prepare_output_dir(output_dir: Path, outputs: Sequence[str], *, resume: bool,
                       overwrite: bool) -> None:
    """Create `output_dir` and make sure it is writable. A folder that holds a previous
    run (files matching `outputs`) is refused unless `resume` continues it or `overwrite`
    starts afresh, which removes those files (rank 0)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--output_dir: {output_dir}: a file is in the way, not a folder") from None
    except OSError as err:
        raise ConfigError(f"--output_dir: {output_dir}: cannot create the folder "
                          f"({err.strerror})") from None
    try:
        probe, probe_path = tempfile.mkstemp(dir=output_dir, prefix=".write_test_")
        os.close(probe)
        os.remove(probe_path)
    except OSError as err:
        raise ConfigError(f"--output_dir: {output_dir}: cannot write there ({err.strerror})") from None
    previous = sorted(path.name for pattern in outputs for path in output_dir.glob(pattern))
    if not previous or resume:
        return
    if not overwrite:
        raise ConfigError(f"--output_dir: {output_dir}: holds a previous run "
                          f"({', '.join(previous[:3])}{', ...' if len(previous) > 3 else ''}); "
                          f"pass --resume to continue it or --overwrite to replace it")
    if get_rank_from_env() == 0:
        for name in previous:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


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
        finish_distributed()
