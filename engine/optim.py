"""AdamW over the trainable parameters and the one learning-rate function of a run:
linear warmup over the first steps, then a per-epoch cosine or step decay."""
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from torch import nn

from utils import NUMBER, Setting, Settings

OPTIM_SETTINGS = Settings(title="Optimizer and schedule", module=__name__, settings={
    "init_lr": Setting(NUMBER, meaning="peak learning rate", min=0),
    "min_lr": Setting(NUMBER, 0.0, "floor of the learning-rate decay", min=0),
    "weight_decay": Setting(NUMBER, 0.05, "AdamW weight decay", min=0),
    "max_epoch": Setting(int, meaning="epochs to train", min=1),
})
# pre-training only; fine-tuning decays by cosine per epoch without warmup
WARMUP_SETTINGS = Settings(title="Warmup and decay (pre-training)", module=__name__, settings={
    "warmup_lr": Setting(NUMBER, 1e-6, "learning rate of the first warmup step", min=0),
    "warmup_steps": Setting(int, 0, "steps of linear warmup from warmup_lr to init_lr", min=0),
    "lr_schedule": Setting(str, "step", "per-epoch decay after warmup: step (x lr_decay_rate "
                           "each epoch, the released config) or cosine (the paper)",
                           choices=("step", "cosine")),
    "lr_decay_rate": Setting(NUMBER, 0.9, "factor per epoch of the step schedule", min=0),
})


def is_norm_or_bias(name: str) -> bool:
    """Parameters the reference's pre-training exempts from weight decay."""
    return "bias" in name or "LayerNorm.weight" in name


def build_optimizer(model: nn.Module, config: Mapping[str, Any], *,
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


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate over a run.

    Args:
        init_lr, min_lr: peak and floor.
        max_epoch: the epochs of the cosine period.
        decay: per-epoch decay after warmup, `cosine` or `step` (x `decay_rate` per epoch).
        warmup_steps: linear warmup from `warmup_lr` to `init_lr` over these global steps.
    """
    init_lr: float
    min_lr: float
    max_epoch: int
    decay: Literal["cosine", "step"] = "cosine"
    decay_rate: float = 1.0
    warmup_steps: int = 0
    warmup_lr: float = 0.0


def finetune_schedule(config: Mapping[str, Any]) -> LRSchedule:
    """Cosine decay per epoch from `init_lr` to `min_lr`, no warmup."""
    return LRSchedule(config["init_lr"], config["min_lr"], config["max_epoch"])


def warmup_schedule(config: Mapping[str, Any]) -> LRSchedule:
    """`WARMUP_SETTINGS`: warmup, then `lr_schedule` per epoch."""
    return LRSchedule(config["init_lr"], config["min_lr"], config["max_epoch"],
                      config["lr_schedule"], config["lr_decay_rate"], config["warmup_steps"],
                      config["warmup_lr"])


def learning_rate(schedule: LRSchedule, epoch: int, global_step: int) -> float:
    """The learning rate of step `global_step` (counted from the run's start) in `epoch`."""
    if global_step < schedule.warmup_steps:
        return warmup_lr(global_step, schedule.warmup_steps, schedule.warmup_lr, schedule.init_lr)
    if schedule.decay == "cosine":
        return cosine_lr(epoch, schedule.max_epoch, schedule.init_lr, schedule.min_lr)
    return step_lr(epoch, schedule.init_lr, schedule.min_lr, schedule.decay_rate)


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
