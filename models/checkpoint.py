"""Load BLIP and TESTA checkpoints into the models, and save checkpoints atomically.

Loading (docs/computation.md, section 7): queues dropped, spatial attention copied
to temporal attention where the file has none (BLIP image checkpoints), `pos_embed`
and `time_embed` resized to the model, non-strict load, momentum towers missing from
the file copied from their main towers, `position_ids` ignored. Every step is recorded
in a `LoadReport`.
"""
import os
import pickle
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.video_encoder import VideoEncoder

# missing keys that image (BLIP) checkpoints cannot provide: new layers keep their init
EXPECTED_MISSING = re.compile(r"\.(temporal_fc\.(weight|bias)|temporal_scaling|time_embed)$")
SPATIAL_TO_TEMPORAL = {"attn": "temporal_attn", "norm1": "temporal_norm1"}
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(attn|norm1)\.(.+)$")


class CheckpointError(ValueError):
    """A file that cannot be loaded into the model; the message names the file."""


@dataclass
class LoadReport:
    """What `load_checkpoint` did.

    loaded: tensors copied from the file into the model; missing / unexpected: model
    keys the file did not fill / file keys the model has no place for; temporal_copied:
    temporal keys made from spatial ones; interpolated: `"key old->new"` resizes;
    dropped: queue entries left out; momentum_copied: momentum keys filled from their
    main towers; ignored: `position_ids` buffers; notes: anything else worth knowing.
    """
    path: str
    loaded: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    temporal_copied: List[str] = field(default_factory=list)
    interpolated: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    momentum_copied: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def expected_missing(self) -> List[str]:
        return [key for key in self.missing if EXPECTED_MISSING.search(key)]

    @property
    def other_missing(self) -> List[str]:
        return [key for key in self.missing if not EXPECTED_MISSING.search(key)]

    def summary(self) -> str:
        """One line, e.g. `loaded ckpt.pth: 512 tensors, 0 missing, 0 unexpected,
        24 temporal copied, time_embed 8->32 interpolated, 4 queues dropped`."""
        missing = f"{len(self.missing)} missing"
        if self.expected_missing:
            missing += f" ({len(self.expected_missing)} expected)"
        parts = [f"{self.loaded} tensors", missing, f"{len(self.unexpected)} unexpected"]
        if self.temporal_copied:
            parts.append(f"{len(self.temporal_copied)} temporal copied")
        resizes = dict.fromkeys(entry.split(".")[-1] for entry in self.interpolated)
        parts += [f"{resize} interpolated" for resize in resizes]
        if self.dropped:
            parts.append(f"{len(self.dropped)} queues dropped")
        if self.momentum_copied:
            parts.append(f"{len(self.momentum_copied)} momentum copied")
        return f"loaded {os.path.basename(self.path)}: " + ", ".join(parts)

    def __str__(self) -> str:
        lines = [self.summary(), f"  file: {self.path}"]
        sections = [
            ("missing, not in the file (left at their initial values)", self.other_missing),
            ("missing, expected: video-only parts an image checkpoint lacks", self.expected_missing),
            ("unexpected, in the file but not in the model (not used)", self.unexpected),
            ("temporal attention copied from spatial attention", self.temporal_copied),
            ("interpolated", self.interpolated),
            ("queues dropped", self.dropped),
            ("momentum towers copied from their main towers", self.momentum_copied),
            ("ignored (position_ids buffers of older transformers)", self.ignored),
        ]
        for title, keys in sections:
            if keys:
                lines.append(f"  {title}:")
                lines += [f"    {entry}" for entry in _group_keys(keys)]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _group_keys(keys: List[str], max_lines_per_module: int = 8) -> List[str]:
    """Readable lines for many keys: numbered layers collapsed (`a.blocks.*.b (x12)`),
    and a top-level module with more than `max_lines_per_module` lines as one line."""
    by_module: Dict[str, Counter] = {}
    for key in keys:
        module = key.split(".")[0]
        by_module.setdefault(module, Counter())[re.sub(r"\.\d+\.", ".*.", key)] += 1
    lines = []
    for module, names in by_module.items():
        if len(names) > max_lines_per_module:
            lines.append(f"{module}.* ({sum(names.values())} tensors)")
        else:
            lines += [name if count == 1 else f"{name} (x{count})" for name, count in names.items()]
    return lines


# reading -----------------------------------------------------------------------------
def read_checkpoint(path: str, allow_pickle: bool = True) -> Tuple[Dict[str, Any], List[str]]:
    """The checkpoint dict at `path` and notes on how it was read.

    Tried with `torch.load(weights_only=True)` first; a file holding other Python
    objects is unpickled in full only when `allow_pickle` (only for files you trust).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    notes = []
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err) or not allow_pickle:
            raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint "
                                  f"({_first_line(err)})") from None
        checkpoint = _load_full_pickle(path)
        notes.append("the file holds non-tensor Python objects; it was unpickled in full "
                     "(weights_only=False)")
    except Exception as err:  # torch.load raises many kinds for damaged files
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or truncated "
                              f"({type(err).__name__}: {_first_line(err)})") from None
    _check_layout(path, checkpoint)
    return checkpoint, notes


def _load_full_pickle(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or truncated "
                              f"({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    return str(err).strip().split("\n")[0][:200]


def _check_layout(path: str, checkpoint: Any) -> None:
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict, found "
                              f"{_describe(checkpoint)}")
    for key, value in checkpoint["model"].items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: model entry {key!r} is {type(value).__name__}, "
                                  f"not a tensor")


def _describe(checkpoint: Any) -> str:
    if isinstance(checkpoint, Mapping):
        return f"a dict with keys {sorted(map(str, checkpoint))[:8]}"
    return type(checkpoint).__name__


# converting --------------------------------------------------------------------------
def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                       report: LoadReport) -> Dict[str, torch.Tensor]:
    """Apply the loading rules to a file's state dict for `model`, recording each step."""
    model_state = model.state_dict()
    converted = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            report.ignored.append(key)
        elif "queue" in key:
            report.dropped.append(key)
        else:
            converted[key] = value
    for prefix, encoder in _video_encoders(model):
        _copy_spatial_to_temporal(converted, prefix, encoder, report)
        _resize(converted, prefix + "pos_embed", model_state, _resize_pos_embed, report)
        _resize(converted, prefix + "time_embed", model_state, _resize_along_time, report)
        for index in range(len(encoder.blocks)):
            _resize(converted, f"{prefix}blocks.{index}.temporal_scaling", model_state,
                    _resize_along_time, report)
    return converted


def _video_encoders(model: nn.Module) -> List[Tuple[str, VideoEncoder]]:
    """(`"visual_encoder."`-style key prefix, module) of every video encoder in the model."""
    return [(name + ".", module) for name, module in model.named_modules()
            if isinstance(module, VideoEncoder) and name]


def _copy_spatial_to_temporal(state_dict: Dict[str, torch.Tensor], prefix: str,
                              encoder: VideoEncoder, report: LoadReport) -> None:
    """`blocks.i.attn.*` -> `blocks.i.temporal_attn.*`, `blocks.i.norm1.*` ->
    `blocks.i.temporal_norm1.*`, where the file lacks the temporal key and the model has it."""
    encoder_keys = set(encoder.state_dict())
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = BLOCK_KEY.match(key[len(prefix):])
        if match is None:
            continue
        block, spatial, name = match.groups()
        temporal = f"blocks.{block}.{SPATIAL_TO_TEMPORAL[spatial]}.{name}"
        if temporal in encoder_keys and prefix + temporal not in state_dict:
            state_dict[prefix + temporal] = state_dict[key]
            report.temporal_copied.append(prefix + temporal)


def _resize(state_dict: Dict[str, torch.Tensor], key: str, model_state: Mapping[str, torch.Tensor],
            resize: Callable[..., torch.Tensor], report: LoadReport) -> None:
    """Replace `state_dict[key]` by `resize(old, model shape, key, path)` when shapes differ."""
    if key not in state_dict or key not in model_state:
        return
    old, target = state_dict[key], model_state[key]
    if old.shape == target.shape:
        return
    state_dict[key] = resize(old, target.shape, key, report.path)
    report.interpolated.append(f"{key} {old.shape[1]}->{target.shape[1]}")


def _resize_pos_embed(pos_embed: torch.Tensor, shape: torch.Size, key: str,
                      path: str) -> torch.Tensor:
    """`[1, 1+L0, D]` -> `[1, 1+L, D]`: the square patch grid resized bicubically (as
    BLIP does), the class slot kept."""
    old_side, new_side = _grid_side(pos_embed.shape[1] - 1), _grid_side(shape[1] - 1)
    if old_side is None or new_side is None or pos_embed.shape[2] != shape[2]:
        raise CheckpointError(f"{path}: {key} has shape {tuple(pos_embed.shape)}, which cannot "
                              f"be resized to the model's {tuple(shape)}")
    grid = rearrange(pos_embed[:, 1:].float(), "1 (h w) d -> 1 d h w", h=old_side)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    patches = rearrange(grid, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patches], dim=1)


def _grid_side(num_patches: int) -> Optional[int]:
    side = round(num_patches ** 0.5)
    return side if side * side == num_patches else None


def _resize_along_time(embed: torch.Tensor, shape: torch.Size, key: str,
                       path: str) -> torch.Tensor:
    """`[1, T0, C]` -> `[1, T, C]` by nearest interpolation along time."""
    if embed.dim() != 3 or embed.shape[0] != 1 or embed.shape[2] != shape[2]:
        raise CheckpointError(f"{path}: {key} has shape {tuple(embed.shape)}, which cannot "
                              f"be resized to the model's {tuple(shape)}")
    resized = F.interpolate(rearrange(embed.float(), "1 t c -> 1 c t"), size=shape[1],
                            mode="nearest")
    return rearrange(resized, "1 c t -> 1 t c").to(embed.dtype)


def _check_shapes(path: str, state_dict: Mapping[str, torch.Tensor],
                  model_state: Mapping[str, torch.Tensor]) -> None:
    for key, value in state_dict.items():
        if key in model_state and value.shape != model_state[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)} in the file but "
                                  f"{tuple(model_state[key].shape)} in the model")


# loading -----------------------------------------------------------------------------
def load_checkpoint(model: nn.Module, path: str, allow_pickle: bool = True) -> LoadReport:
    """Load a BLIP or TESTA checkpoint file into `model` (non-strict) and report what
    happened. Bad files raise `CheckpointError`."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    checkpoint, notes = read_checkpoint(path, allow_pickle)
    report = LoadReport(path=path, notes=notes)
    state_dict = convert_state_dict(checkpoint["model"], model, report)
    model_state = model.state_dict()
    _check_shapes(path, state_dict, model_state)

    result = model.load_state_dict(state_dict, strict=False)
    report.loaded = sum(key in model_state for key in state_dict)
    report.unexpected = list(result.unexpected_keys)
    missing = [key for key in result.missing_keys if "queue" not in key]
    report.momentum_copied = _copy_missing_momentum(model, missing)
    report.missing = [key for key in missing if key not in set(report.momentum_copied)]
    return report


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


# saving ------------------------------------------------------------------------------
def save_checkpoint(path: str, model: nn.Module, config: Mapping, epoch: int,
                    optimizer: Optional[torch.optim.Optimizer] = None, **extra: Any) -> None:
    """Write `{"model", "config", "epoch", "optimizer", **extra}` to `path` atomically (a
    temporary file in the same directory, then `os.replace`)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    checkpoint = {"model": model.state_dict(), "config": _plain(config), "epoch": epoch,
                  "optimizer": None if optimizer is None else optimizer.state_dict(), **extra}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                        suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def _plain(value: Any) -> Any:
    """Config as plain Python containers and scalars (YAML loaders return their own
    subclasses), so the saved file loads with `weights_only=True`."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for scalar_type in (bool, int, float, str):
        if isinstance(value, scalar_type):
            return scalar_type(value)
    return value
