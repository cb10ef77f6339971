"""Shared helpers of the training scripts: configs and their schemas, the command line,
distributed setup, seeding, optimisation, the training loop, checkpoints and logging."""
import argparse
import difflib
import inspect
import json
import logging
import math
import os
import random
import sys
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from datasets import DataError, create_loader, summarize
from models.checkpoint import (CheckpointError, load_checkpoint, local_file, read_checkpoint,
                               remove_stale_temporaries, save_checkpoint)
from models.dist_utils import get_rank, get_world_size, is_distributed


# configs -----------------------------------------------------------------------------
class ConfigError(ValueError):
    """A config file or `--opts` entry that cannot be used; the message names where."""


def load_config(path) -> Dict[str, Any]:
    """Read a YAML config into a plain dict; a missing or malformed file raises
    ConfigError (a ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        config = YAML(typ="safe").load(path.read_text())
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return config


class _Required:
    """The default of keys a config must set."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()
NUMBER = (int, float)
NONE = type(None)


@dataclass(frozen=True)
class Key:
    """One config key: the types it accepts, its default (REQUIRED: the config must set
    it) and, for keys the scripts branch on, the values allowed."""
    types: Any
    default: Any = REQUIRED
    choices: Optional[Tuple[str, ...]] = None


Schema = Dict[str, Key]

VIDEO_ENCODER_KEYS: Schema = {
    "vit": Key(str, "timesformer"),
    "image_size": Key(int),
    "patch_size": Key(int, 16),
    "vision_width": Key(int, 768),
    "num_heads": Key(int, 12),
    "depth": Key(int, 12),
    "num_frames": Key(int),
    "attention_type": Key(str, "divided_space_time"),
    "learnable_temporal_scaling": Key(bool, False),
    "token_merging": Key(bool, False),
    "testa_r": Key((int, list), 0),
    "testa_threshold": Key((int, float, list, NONE), None),
    "merging_type": Key((str, list), "frame&patch"),
    "aggregation": Key(str, "geometry"),
    "prop_attn": Key(bool, False),
    "vit_grad_ckpt": Key(bool, False),
    "vit_ckpt_layer": Key(int, 0),
}
TEXT_KEYS: Schema = {
    "text_encoder": Key(str, "bert-base-uncased"),
    "med_config": Key(str, "configs/med_config.json"),
    "text_config": Key((dict, NONE), None),
    "text_init": Key((str, NONE), None),
}
RUN_KEYS: Schema = {
    "pretrained": Key((str, NONE), None),
    "trust_checkpoint": Key(bool, False),
    "seed": Key(int, 42),
    "amp": Key(str, "bf16", ("bf16", "fp16", "none")),
    "accum_steps": Key(int, 1),
    "print_freq": Key(int, 50),
    "num_workers": Key(int, 4),
    "init_lr": Key(NUMBER),
    "min_lr": Key(NUMBER, 0.0),
    "weight_decay": Key(NUMBER, 0.05),
    "max_epoch": Key(int),
}
FINETUNE_DATA_KEYS: Schema = {
    "video_root": Key(str),
    "ann_root": Key(str),
    "num_frm_train": Key(int),
    "num_frm_test": Key(int),
    "frm_sampling_strategy": Key(str, "uniform"),
    "augment": Key(bool, False),
    "cache_clips": Key(bool, False),
    "batch_size_train": Key(int),
    "batch_size_test": Key(int),
}
MOMENTUM_KEYS: Schema = {
    "embed_dim": Key(int, 256),
    "queue_size": Key(int, 57600),
    "momentum": Key(NUMBER, 0.995),
    "alpha": Key(NUMBER, 0.4),
    "max_words": Key(int),
}
RETRIEVAL_SCHEMA: Schema = {
    **RUN_KEYS, **VIDEO_ENCODER_KEYS, **TEXT_KEYS, **FINETUNE_DATA_KEYS, **MOMENTUM_KEYS,
    "dataset": Key(str, choices=("retrieval_queryd", "retrieval_didemo", "retrieval_activitynet",
                                 "retrieval_condensedmovies")),
    "negative_all_rank": Key(bool, False),
    "k_test": Key(int, 128),
    "k_test_batch_size": Key(int, 64),
}
VIDEOQA_SCHEMA: Schema = {
    **RUN_KEYS, **VIDEO_ENCODER_KEYS, **TEXT_KEYS, **FINETUNE_DATA_KEYS,
    "dataset": Key(str, choices=("activitynet_qa",)),
    "max_question_len": Key(int, 35),
    "max_answer_len": Key(int, 10),
    "inference": Key(str, "rank", ("rank", "generate")),
    "k_test": Key(int, 128),
    "num_beams": Key(int, 3),
}
PRETRAIN_SCHEMA: Schema = {
    **RUN_KEYS, **VIDEO_ENCODER_KEYS, **TEXT_KEYS, **MOMENTUM_KEYS,
    "dataset": Key(str, "pretrain_video", ("pretrain_video",)),
    "train_file": Key((str, list)),
    "video_root": Key(str, ""),
    "num_frm_train": Key(int),
    "frm_sampling_strategy": Key(str, "headtail"),
    "video_resize": Key(int, 256),
    "batch_size": Key(int),
    "warmup_lr": Key(NUMBER, 1e-6),
    "warmup_steps": Key(int, 0),
    "lr_schedule": Key(str, "step", ("step", "cosine")),
    "lr_decay_rate": Key(NUMBER, 0.9),
}


def unknown_key_problem(name: str, schema: Schema) -> str:
    close = difflib.get_close_matches(name, list(schema), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {name!r}{hint}"


def value_problem(name: str, value: Any, key: Key) -> Optional[str]:
    """Why `value` does not fit `key`, or None."""
    types = key.types if isinstance(key.types, tuple) else (key.types,)
    is_bool_for_number = isinstance(value, bool) and bool not in types
    if is_bool_for_number or not isinstance(value, types):
        expected = " or ".join("null" if t is NONE else t.__name__ for t in types)
        return f"{name} must be {expected}, got {value!r}"
    if key.choices is not None and value not in key.choices:
        return f"{name} must be one of {', '.join(key.choices)}, got {value!r}"
    return None


def parse_opts(opts: Sequence[str]) -> Dict[str, Any]:
    """`["max_epoch=2", "testa_r=[1,12]"]` -> `{"max_epoch": 2, "testa_r": [1, 12]}`;
    values are read as YAML scalars, lists or mappings."""
    parsed = {}
    for opt in opts:
        name, sep, text = opt.partition("=")
        if not sep or not name:
            raise ConfigError(f"--opts: expected key=value, got {opt!r}")
        try:
            parsed[name] = YAML(typ="safe").load(text)
        except YAMLError as err:
            reason = str(err).splitlines()[0]
            raise ConfigError(f"--opts: {name}: not a YAML value ({reason})") from None
    return parsed


def resolve_config(path: str, opts: Sequence[str], schema: Schema,
                   overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The config of `path` with `--opts` and command-line `overrides` over it and the
    schema's defaults filled in. Unknown keys, missing required keys and values of the
    wrong type raise ConfigError naming the file (or `--opts`) and the key."""
    file_config = load_config(path)
    opt_config = parse_opts(opts)
    for source, entries in ((path, file_config), ("--opts", opt_config)):
        problems = [unknown_key_problem(name, schema) for name in entries if name not in schema]
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
    config = {**file_config, **opt_config, **(overrides or {})}
    missing = [name for name, key in schema.items()
               if key.default is REQUIRED and name not in config]
    if missing:
        keys = "key" if len(missing) == 1 else "keys"
        raise ConfigError(f"{path}: missing required {keys} " + ", ".join(map(repr, missing)))
    for name, value in config.items():
        problem = value_problem(name, value, schema[name])
        if problem:
            raise ConfigError(f"{'--opts' if name in opt_config else path}: {problem}")
    defaults = {name: key.default for name, key in schema.items() if name not in config}
    resolved = {**config, **defaults}
    if resolved.get("cache_clips") and resolved["num_workers"] > 0:
        raise ConfigError(f"{path}: cache_clips keeps the decoded clips in the main process; "
                          "it needs num_workers: 0")
    return resolved


def save_config(config: Mapping[str, Any], path: Path) -> None:
    yaml = YAML(typ="safe")
    yaml.default_flow_style = None
    with open(path, "w") as f:
        yaml.dump(dict(config), f)


# command line ------------------------------------------------------------------------
def build_arg_parser(description: str, evaluate: bool = True) -> argparse.ArgumentParser:
    """The options every script takes; `evaluate=False` leaves out `--evaluate`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--output_dir", required=True,
                        help="where checkpoints, logs and results go")
    if evaluate:
        parser.add_argument("--evaluate", action="store_true",
                            help="only evaluate --checkpoint (or the config's pretrained) on test")
    parser.add_argument("--resume", action="store_true",
                        help="continue from output_dir/checkpoint_last.pth")
    parser.add_argument("--checkpoint", help="weights to start from or to evaluate, instead of "
                                             "the config's pretrained")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow checkpoints that hold arbitrary Python objects; unpickling "
                             "them can run code from the file (config key trust_checkpoint)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, values as YAML (max_epoch=2 testa_r=[1,12])")
    return parser


def parse_args(parser: argparse.ArgumentParser,
               argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if getattr(args, "evaluate", False) and args.resume:
        parser.error("--evaluate and --resume exclude each other")
    return args


# distributed setup -------------------------------------------------------------------
@dataclass
class Run:
    """What a script run works with: its config, output folder, device and precision."""
    config: Dict[str, Any]
    output_dir: Path
    device: torch.device
    precision: "Precision"

    @property
    def rank(self) -> int:
        return get_rank()

    @property
    def world_size(self) -> int:
        return get_world_size()

    @property
    def is_main(self) -> bool:
        return get_rank() == 0

    @property
    def log_file(self) -> Path:
        return self.output_dir / "log.jsonl"


def select_device(name: Optional[str]) -> torch.device:
    """`--device`, else cuda when available; under torchrun the process's local GPU."""
    device_type = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo
    on CPU); a plain `python script.py` runs as a single process."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def start_run(args: argparse.Namespace, schema: Schema,
              overrides: Optional[Mapping[str, Any]] = None) -> Run:
    """Resolve the config, join the process group, seed, create the output folder and
    save the config used there."""
    if args.trust_checkpoint:
        overrides = {**(overrides or {}), "trust_checkpoint": True}
    config = resolve_config(args.config, args.opts, schema, overrides)
    device = select_device(args.device)
    init_distributed(device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run = Run(config, output_dir, device, build_precision(config["amp"], device))
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


def finish_run() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def script_errors():
    """Bad input (a config, checkpoint or data file) ends the script with a one-line
    message naming the file; the process group is released in any case."""
    try:
        yield
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        finish_run()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (the identity in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj: Any) -> List[Any]:
    """`obj` of every rank, in rank order."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# torch >= 2.14 renames broadcast_buffers to forward_sync_buffers
_NO_BUFFER_SYNC_PER_STEP = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False})


def wrap_ddp(model: nn.Module, run: Run) -> nn.Module:
    """DistributedDataParallel around `model` when there are several ranks. Buffers are
    not broadcast every step: the queues are updated with gathered features, identically
    on every rank."""
    if not is_distributed():
        return model
    device_ids = [run.device.index] if run.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               **_NO_BUFFER_SYNC_PER_STEP)


# logging -----------------------------------------------------------------------------
def log(message: str) -> None:
    """Print on rank 0 only, without breaking progress bars."""
    if get_rank() == 0:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def progress(iterable: Iterable, description: str, total: Optional[int] = None) -> Iterable:
    """A tqdm bar on rank 0; the plain iterable elsewhere."""
    return tqdm(iterable, desc=description, total=total, disable=get_rank() != 0,
                dynamic_ncols=True, leave=False)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    return "  ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in metrics.items())


def append_jsonl(run: Run, record: Mapping[str, Any]) -> None:
    """One JSON line in output_dir/log.jsonl (rank 0)."""
    if run.is_main:
        with open(run.log_file, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json(run: Run, name: str, content: Any) -> None:
    """output_dir/name as indented JSON (rank 0)."""
    if run.is_main:
        with open(run.output_dir / name, "w") as f:
            json.dump(content, f, indent=1)


# seeds -------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def start_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make the data order and every random draw of `epoch` depend only on (seed, epoch,
    rank), so that a resumed run repeats an uninterrupted one."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    rank_seed = epoch_seed(seed, epoch, get_rank())
    loader.generator.manual_seed(rank_seed)  # RandomSampler order and worker seeds
    seed_everything(rank_seed)


# optimisation ------------------------------------------------------------------------
def is_norm_or_bias(name: str) -> bool:
    """Parameters the reference's pre-training exempts from weight decay."""
    return "bias" in name or "LayerNorm.weight" in name


def build_optimizer(model: nn.Module, config: Mapping[str, Any],
                    decay_norms_and_biases: bool = True) -> torch.optim.AdamW:
    """AdamW at `init_lr` over the trainable parameters with `weight_decay`; with
    `decay_norms_and_biases=False` biases and LayerNorm weights get no decay."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if decay_norms_and_biases:
        groups = [{"params": [p for _, p in named]}]
    else:
        groups = [{"params": [p for n, p in named if not is_norm_or_bias(n)]},
                  {"params": [p for n, p in named if is_norm_or_bias(n)], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for _, p in named)  # one kernel for all tensors
    return torch.optim.AdamW(groups, lr=config["init_lr"], weight_decay=config["weight_decay"],
                             fused=fused)


def cosine_lr(epoch: int, max_epoch: int, init_lr: float, min_lr: float) -> float:
    return min_lr + (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch))


def step_lr(epoch: int, init_lr: float, min_lr: float, decay_rate: float) -> float:
    return max(min_lr, init_lr * decay_rate ** epoch)


def warmup_lr(step: int, warmup_steps: int, start_lr: float, init_lr: float) -> float:
    return min(init_lr, start_lr + (init_lr - start_lr) * step / warmup_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def ramped_alpha(alpha: float, epoch: int, step: int, steps_per_epoch: int,
                 ramp_epochs: int = 1) -> float:
    """Distillation weight growing linearly from 0 to `alpha` over `ramp_epochs`."""
    return alpha * min(1.0, (epoch * steps_per_epoch + step) / (ramp_epochs * steps_per_epoch))


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


@dataclass
class Precision:
    """Autocast dtype (None: full precision) and the loss scaler (active for fp16 only)."""
    device_type: str
    dtype: Optional[torch.dtype]
    scaler: torch.amp.GradScaler

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def __str__(self) -> str:
        names = {torch.bfloat16: "bf16", torch.float16: "fp16 (loss scaling)", None: "fp32"}
        return names[self.dtype]


def build_precision(amp: str, device: torch.device) -> Precision:
    """Mixed precision from the config's `amp` on GPU; CPU runs stay in float32."""
    dtype = AMP_DTYPES[amp] if device.type == "cuda" else None
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log("amp bf16: this GPU has no bfloat16; using fp16 with loss scaling")
        dtype = torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return Precision(device.type, dtype, scaler)


# training loop -----------------------------------------------------------------------
LossFn = Callable[[Any, int, int], Dict[str, torch.Tensor]]  # (batch, epoch, step) -> losses


def gradient_sync(model: nn.Module, sync: bool):
    """DDP's `no_sync()` on accumulation steps that do not update the weights."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def check_trainable(loader: DataLoader, name: str) -> None:
    if len(loader) == 0:
        raise ConfigError(f"{name}: {len(loader.dataset)} items make no full batch of "
                          f"{loader.batch_size} per process on {get_world_size()} process(es)")


def train_one_epoch(run: Run, model: nn.Module, loader: DataLoader,
                    optimizer: torch.optim.Optimizer, epoch: int, losses_of: LossFn,
                    lr_at_step: Optional[Callable[[int], float]] = None) -> Dict[str, float]:
    """One pass over `loader`: `losses_of(batch, epoch, step)` gives named losses, whose sum is
    back-propagated; the weights step every `accum_steps` batches. Returns the losses
    averaged over steps and ranks, and the last learning rate."""
    model.train()
    accum_steps, print_freq = run.config["accum_steps"], run.config["print_freq"]
    num_steps = len(loader)
    sums: Dict[str, float] = defaultdict(float)
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(progress(loader, f"epoch {epoch}", total=num_steps)):
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
        values = {name: loss.item() for name, loss in losses.items()}
        for name, value in values.items():
            sums[name] += value
        if step % print_freq == 0 or step + 1 == num_steps:
            lr = optimizer.param_groups[0]["lr"]
            log(f"epoch {epoch} [{step + 1}/{num_steps}]  lr {lr:.3g}  " + format_metrics(values))
            append_jsonl(run, {"kind": "step", "epoch": epoch, "step": step, "lr": lr, **values})
    return {**mean_over_ranks(sums, num_steps, run.device), "lr": optimizer.param_groups[0]["lr"]}


def mean_over_ranks(sums: Mapping[str, float], count: int,
                    device: torch.device) -> Dict[str, float]:
    totals = torch.tensor([*sums.values(), count], dtype=torch.float64, device=device)
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


LAST_CHECKPOINT = "checkpoint_last.pth"
BEST_CHECKPOINT = "checkpoint_best.pth"
RESUME_KEYS = ("optimizer", "scaler", "epoch", "best_metric", "best_epoch")


def save_weights(run: Run, model: nn.Module, name: str, epoch: int) -> None:
    """output_dir/name with the model and config only (rank 0)."""
    if run.is_main:
        save_checkpoint(str(run.output_dir / name), model, run.config, epoch)
    barrier()


def save_last(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer,
              state: TrainState) -> None:
    """output_dir/checkpoint_last.pth: everything `--resume` needs after epoch
    `state.epoch - 1` (model with its queues, optimizer, loss scaler, best result)."""
    if run.is_main:
        save_checkpoint(str(run.output_dir / LAST_CHECKPOINT), model, run.config, state.epoch - 1,
                        optimizer, scaler=run.precision.scaler.state_dict(),
                        best_metric=state.best_metric, best_epoch=state.best_epoch)
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


def load_weights(model: nn.Module, location: str, *, trust: bool = False) -> None:
    """Load a BLIP/TESTA checkpoint (path, URL or hf:// id) and print its load report (in
    full when keys are missing or unexpected for no known reason, else its summary line).
    A URL is downloaded by the first process of each node while the others wait."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        local_file(location)
    barrier()
    report = load_checkpoint(model, location, trust=trust)
    log(str(report) if report.needs_attention() else report.summary())


# fine-tuning -------------------------------------------------------------------------
@dataclass
class FinetuneTask:
    """What differs between the fine-tuning scripts.

    make_losses(train_model, run, train_loader) -> the LossFn of a training step;
    evaluate(model, loader, run, split) -> metrics (also printed and written by it);
    best_metric: the validation metric that picks checkpoint_best.pth.
    """
    make_losses: Callable[[nn.Module, Run, DataLoader], LossFn]
    evaluate: Callable[[nn.Module, DataLoader, Run, str], Dict[str, float]]
    best_metric: str


def build_finetune_loaders(run: Run, datasets: Sequence) -> Dict[str, DataLoader]:
    """Loaders of the (train, val, test) datasets; distributed over the ranks when there
    are several (evaluation shards repeat a few items to even out the ranks)."""
    config, distributed = run.config, run.world_size > 1
    batch_sizes = {"train": config["batch_size_train"], "val": config["batch_size_test"],
                   "test": config["batch_size_test"]}
    return {split: create_loader(dataset, batch_sizes[split], config["num_workers"],
                                 split == "train", distributed, config["seed"])
            for split, dataset in zip(("train", "val", "test"), datasets)}


def fit(run: Run, model: nn.Module, task: FinetuneTask, loaders: Mapping[str, DataLoader],
        resume_training: bool, datasets: Sequence) -> TrainState:
    """Train for `max_epoch` epochs with the cosine schedule, validating after each and
    keeping checkpoint_last.pth and checkpoint_best.pth."""
    config = run.config
    optimizer = build_optimizer(model, config)
    state = resume(run, model, optimizer) if resume_training else TrainState()
    train_model = wrap_ddp(model, run)
    train_loader = loaders["train"]
    losses_of = task.make_losses(train_model, run, train_loader)
    for epoch in range(state.epoch, config["max_epoch"]):
        start_epoch(train_loader, config["seed"], epoch)
        set_lr(optimizer, cosine_lr(epoch, config["max_epoch"], config["init_lr"],
                                    config["min_lr"]))
        train_stats = train_one_epoch(run, train_model, train_loader, optimizer, epoch, losses_of)
        val_metrics = task.evaluate(model, loaders["val"], run, "val")
        if state.improved_by(val_metrics[task.best_metric], epoch):
            save_weights(run, model, BEST_CHECKPOINT, epoch)
        state.epoch = epoch + 1
        save_last(run, model, optimizer, state)
        append_jsonl(run, {"kind": "epoch", "epoch": epoch,
                           **{f"train_{k}": v for k, v in train_stats.items()},
                           **{f"val_{k}": v for k, v in val_metrics.items()},
                           "best_epoch": state.best_epoch})
        log(summarize(*datasets))
    return state


def run_test(run: Run, model: nn.Module, task: FinetuneTask, loader: DataLoader,
         checkpoint: str, result_name: str) -> Dict[str, float]:
    """Metrics of `checkpoint` on the test split, written to output_dir/result_name."""
    metrics = task.evaluate(model, loader, run, "test")
    write_json(run, result_name, {"checkpoint": checkpoint, "split": "test", "metrics": metrics})
    append_jsonl(run, {"kind": "test", "checkpoint": checkpoint,
                       **{f"test_{k}": v for k, v in metrics.items()}})
    return metrics


def finetune_or_evaluate(run: Run, args: argparse.Namespace, model: nn.Module,
                         task: FinetuneTask, datasets: Sequence) -> Dict[str, float]:
    """`--evaluate`: test the given weights (eval_results.json). Otherwise fine-tune,
    then test checkpoint_best.pth (test_metrics.json)."""
    loaders = build_finetune_loaders(run, datasets)
    weights = initial_weights(args, run.config)
    if args.evaluate:
        if weights is None:
            raise ConfigError(f"{args.config}: --evaluate needs --checkpoint or pretrained")
        load_weights(model, weights, trust=run.config["trust_checkpoint"])
        return run_test(run, model.to(run.device), task, loaders["test"], weights,
                        "eval_results.json")
    if weights is not None and not args.resume:
        load_weights(model, weights, trust=run.config["trust_checkpoint"])
    check_trainable(loaders["train"], "train set")
    fit(run, model.to(run.device), task, loaders, args.resume, datasets)
    best = str(run.output_dir / BEST_CHECKPOINT)
    load_weights(model, best)
    return run_test(run, model, task, loaders["test"], best, "test_metrics.json")
