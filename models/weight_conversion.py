"""The conversion of BLIP and TESTA state dicts to a model with video encoders, as one pure
function in the manner of timm's `checkpoint_filter_fn(state_dict, model)`
(huggingface/pytorch-image-models, timm/models/vision_transformer.py, Apache-2.0).

Rules (docs/computation.md, section 7): `position_ids` ignored, queues dropped, spatial
attention copied to temporal attention where the file has none (BLIP image checkpoints),
`pos_embed`, `time_embed` and `temporal_scaling` resized to the model.
"""
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Tuple

import torch
from torch import nn

from models.resize import grid_side, resize_along_time, resize_patch_grid
from models.video_encoder import VideoEncoder

SPATIAL_TO_TEMPORAL = {"attn": "temporal_attn", "norm1": "temporal_norm1"}
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(attn|norm1)\.(.+)$")


@dataclass
class Conversion:
    """What `checkpoint_filter_fn` did: ignored `position_ids` keys, dropped queue keys,
    temporal keys made from spatial ones, and `"key old->new"` resizes."""
    ignored: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    temporal_copied: List[str] = field(default_factory=list)
    interpolated: List[str] = field(default_factory=list)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module
                         ) -> Tuple[Dict[str, torch.Tensor], Conversion]:
    """A file's state dict converted for `model` (neither is changed), and what was done.
    Raises ValueError naming the key of an embedding that cannot be resized."""
    report = Conversion()
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
    return converted, report


def _video_encoders(model: nn.Module) -> List[Tuple[str, VideoEncoder]]:
    """(`"visual_encoder."`-style key prefix, module) of every video encoder in the model."""
    return [(name + ".", module) for name, module in model.named_modules()
            if isinstance(module, VideoEncoder) and name]


def _copy_spatial_to_temporal(state_dict: Dict[str, torch.Tensor], prefix: str,
                              encoder: VideoEncoder, report: Conversion) -> None:
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
            resize: Callable[..., torch.Tensor], report: Conversion) -> None:
    """Replace `state_dict[key]` by `resize(old, model shape, key)` when shapes differ."""
    if key not in state_dict or key not in model_state:
        return
    old, target = state_dict[key], model_state[key]
    if old.shape == target.shape:
        return
    state_dict[key] = resize(old, target.shape, key)
    report.interpolated.append(f"{key} {old.shape[1]}->{target.shape[1]}")


def _resize_pos_embed(pos_embed: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """`[1, 1+L0, D]` -> `[1, 1+L, D]`: the square patch grid resized bicubically (as
    BLIP does), the class slot kept."""
    old_side, new_side = grid_side(pos_embed.shape[1] - 1), grid_side(shape[1] - 1)
    if old_side is None or new_side is None or pos_embed.shape[2] != shape[2]:
        raise ValueError(f"{key} has shape {tuple(pos_embed.shape)}, which cannot be resized "
                         f"to the model's {tuple(shape)}")
    return resize_patch_grid(pos_embed, (new_side, new_side), mode="bicubic")


def _resize_along_time(embed: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """`[1, T0, C]` -> `[1, T, C]` by nearest interpolation along time."""
    if embed.dim() != 3 or embed.shape[0] != 1 or embed.shape[2] != shape[2]:
        raise ValueError(f"{key} has shape {tuple(embed.shape)}, which cannot be resized "
                         f"to the model's {tuple(shape)}")
    return resize_along_time(embed, shape[1])
