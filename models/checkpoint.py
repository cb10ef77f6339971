"""Load BLIP and TESTA checkpoints into the models.

Files are read weights-only (models/checkpoint_reading.py) and converted to the model
(models/weight_conversion.py, docs/computation.md, section 7): a DDP `module.` prefix
removed, then non-strict load, momentum towers missing from the file copied from their
main towers. A file whose shapes do not fit, that fills too little of the model or holds
non-finite weights is refused before the model changes. Every step is recorded in a
`LoadReport` (models/load_report.py).
"""
from typing import Dict, List, Mapping

import torch
from torch import nn

from models.checkpoint_reading import (SCRIPT_TRUST_OPTION, CheckpointError, local_file,
                                       read_checkpoint)
from models.load_report import DDP_PREFIX, LoadReport, part_of
from models.weight_conversion import checkpoint_filter_fn

class ShapeMismatchError(CheckpointError):
    """A tensor of the file whose shape the model cannot take (another model size or
    layout: the config and the weights disagree)."""


PART_NAMES = {"visual_encoder": "video-encoder", "text_encoder": "text-encoder",
              "text_decoder": "text-decoder"}


def load_checkpoint(model: nn.Module, location: str, *, trust: bool = False,
                    trust_option: str = SCRIPT_TRUST_OPTION) -> LoadReport:
    """Load a BLIP or TESTA checkpoint (path, URL or hf:// id) into `model` (non-strict)
    and report what happened. Bad files, files that fill too little of the model and
    non-finite weights raise `CheckpointError` before the model is changed; `trust` and
    `trust_option` as in `read_checkpoint`."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    path = local_file(location)
    checkpoint, notes = read_checkpoint(path, trust=trust, trust_option=trust_option)
    if path != location:
        notes.insert(0, f"downloaded from {location}")
    report = LoadReport(path=path, notes=notes,
                        model_kind=getattr(model, "kind", type(model).__name__))
    state_dict = _strip_ddp_prefix(checkpoint["model"], report)
    try:
        state_dict, conversion = checkpoint_filter_fn(state_dict, model)
    except ValueError as err:
        raise ShapeMismatchError(f"{path}: {err}") from None
    report.ignored, report.dropped = conversion.ignored, conversion.dropped
    report.temporal_copied = conversion.temporal_copied
    report.interpolated = conversion.interpolated
    model_state = model.state_dict()
    _check_shapes(path, state_dict, model_state)
    _check_coverage(path, state_dict, model_state)
    _check_finite(path, state_dict, model_state)

    result = model.load_state_dict(state_dict, strict=False)
    report.loaded = sum(key in model_state for key in state_dict)
    report.unexpected = list(result.unexpected_keys)
    report.model_parts = sorted({part_of(key) for key in model_state})
    missing = [key for key in result.missing_keys if "queue" not in key]
    report.momentum_copied = _copy_missing_momentum(model, missing)
    report.missing = [key for key in missing if key not in set(report.momentum_copied)]
    return report


def _strip_ddp_prefix(state_dict: Mapping[str, torch.Tensor],
                      report: LoadReport) -> Dict[str, torch.Tensor]:
    """Keys saved from a DistributedDataParallel wrapper (`module.visual_encoder...`)
    without their `module.` prefix, noted in the report."""
    stripped = {key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key: value
                for key, value in state_dict.items()}
    report.ddp_prefix_removed = sum(key.startswith(DDP_PREFIX) for key in state_dict)
    if report.ddp_prefix_removed:
        report.notes.append(f"removed the {DDP_PREFIX!r} prefix of {report.ddp_prefix_removed} "
                            f"keys (saved from a DistributedDataParallel wrapper)")
    return stripped


def _check_coverage(path: str, state_dict: Mapping[str, torch.Tensor],
                    model_state: Mapping[str, torch.Tensor]) -> None:
    """Every part of the model (video encoder, text encoder, heads; momentum copies and
    queues aside) must get at least half of its tensors from the file (an image
    checkpoint fills all but the few new video layers); otherwise the file is for
    another model or has renamed keys."""
    needed: Dict[str, List[str]] = {}
    for key in model_state:
        part = part_of(key)
        if not (part.endswith("_m") or "queue" in key or key.endswith("position_ids")):
            needed.setdefault(part, []).append(key)
    main_parts = list(PART_NAMES)  # the towers first, in this order, then the heads
    for part, keys in sorted(needed.items(), key=lambda item: (
            main_parts.index(item[0]) if item[0] in main_parts else len(main_parts))):
        matched = sum(key in state_dict for key in keys)
        if 2 * matched < len(keys):
            raise CheckpointError(
                f"{path}: fills too little of the model: {matched} of {len(keys)} "
                f"{PART_NAMES.get(part, part)} tensors matched (the file's keys look like "
                f"{_example_key(state_dict)!r}, the model's like {keys[0]!r})")


def _example_key(state_dict: Mapping[str, torch.Tensor]) -> str:
    return next(iter(state_dict), "<none>")


def _check_finite(path: str, state_dict: Mapping[str, torch.Tensor],
                  model_state: Mapping[str, torch.Tensor]) -> None:
    for key, value in state_dict.items():
        if key in model_state and value.is_floating_point():
            bad = value.numel() - int(torch.isfinite(value).sum())
            if bad:
                raise CheckpointError(f"{path}: {key} holds {bad} non-finite values (NaN or "
                                      f"inf) of {value.numel()}; the model would be broken")


@torch.no_grad()
def _copy_missing_momentum(model: nn.Module, missing: List[str]) -> List[str]:
    """Fill momentum keys (`<tower>_m.*`) the file lacked from their main towers."""
    model_state = model.state_dict()
    copied = []
    for key in missing:
        tower, _, rest = key.partition(".")
        main_key = f"{tower[:-2]}.{rest}"
        if tower.endswith("_m") and main_key in model_state:
            model_state[key].copy_(model_state[main_key])
            copied.append(key)
    return copied



def _check_shapes(path: str, state_dict: Mapping[str, torch.Tensor],
                  model_state: Mapping[str, torch.Tensor]) -> None:
    for key, value in state_dict.items():
        if key in model_state and value.shape != model_state[key].shape:
            raise ShapeMismatchError(f"{path}: {key} has shape {tuple(value.shape)} in the file but "
                                  f"{tuple(model_state[key].shape)} in the model")
