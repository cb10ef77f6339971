"""A script run: its resolved config, output folder, device and precision; starting it
(config, process group, seed, saved config) and ending it (one-line errors)."""
import argparse
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

from datasets import DataError
from engine.config import resolve_config, save_config
from engine.distributed import (finish_distributed, get_rank, get_world_size, init_distributed,
                                select_device)
from engine.logs import RunRecords, log, set_progress_bar
from engine.precision import Precision, build_precision
from models.checkpoint import CheckpointError, remove_stale_temporaries
from utils import NONE, ConfigError, Setting, Settings

RUN_SETTINGS: Settings = {
    "pretrained": Setting((str, NONE), None, "checkpoint to start from (BLIP or TESTA): "
                          "path, http(s) URL or hf:// id; --checkpoint overrides it"),
    "trust_checkpoint": Setting(bool, False, "unpickle checkpoint files in full, beyond the "
                                "safe list (runs code from the file; --trust_checkpoint sets it)"),
    "seed": Setting(int, 42, "seed of weights, data order and augmentation", min=0),
}


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


def start_run(args: argparse.Namespace, schema: Settings,
              overrides: Optional[Mapping[str, Any]] = None) -> Run:
    """Resolve the config, join the process group, seed, create the output folder and
    save the config used there (and remove temporaries an interrupted save left in it)."""
    if args.trust_checkpoint:
        overrides = {**(overrides or {}), "trust_checkpoint": True}
    config = resolve_config(args.config, args.opts, schema, overrides)
    device = select_device(args.device)
    init_distributed(device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def script_errors():
    """Bad input (a config, checkpoint or data file) ends the script with a one-line
    message naming the file; the process group is released in any case."""
    try:
        yield
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        finish_distributed()
