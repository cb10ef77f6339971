"""Resizing of learned embeddings to another frame count or patch grid, shared by the
video encoder (inputs of another size) and the checkpoint loader (files of another size).

Interpolation runs in float32, or float64 for float64 tensors, and the result keeps the
input's dtype; nearest resizing only selects entries, so it is exact in any dtype.
"""
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def resize_along_time(embed: torch.Tensor, num_frames: int) -> torch.Tensor:
    """`[1, T0, C]` -> `[1, num_frames, C]` by nearest interpolation along time."""
    if embed.shape[1] == num_frames:
        return embed
    resized = F.interpolate(rearrange(embed.to(_compute_dtype(embed)), "1 t c -> 1 c t"),
                            size=num_frames, mode="nearest")
    return rearrange(resized, "1 c t -> 1 t c").to(embed.dtype)


def grid_side(num_patches: int) -> Optional[int]:
    """The side of a square grid of `num_patches`, or None when it is not square."""
    side = round(num_patches ** 0.5)
    return side if side * side == num_patches else None


def resize_patch_grid(pos_embed: torch.Tensor, grid: Tuple[int, int], *,
                      mode: Literal["nearest", "bicubic"]) -> torch.Tensor:
    """`[1, 1+L0, D]` (class slot, then a square grid of L0 patches) -> `[1, 1+h*w, D]` for
    the grid `(h, w)`; the class slot is kept."""
    side = grid_side(pos_embed.shape[1] - 1)
    if side is None:
        raise ValueError(f"position embedding of {pos_embed.shape[1] - 1} patches is not a "
                         f"square grid")
    patches = rearrange(pos_embed[:, 1:].to(_compute_dtype(pos_embed)), "1 (h w) d -> 1 d h w",
                        h=side)
    options = {} if mode == "nearest" else {"align_corners": False}
    patches = F.interpolate(patches, size=grid, mode=mode, **options)
    patches = rearrange(patches, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patches], dim=1)
