"""The tokens between encoder blocks: their `TokenState` and the per-block merge plan.

Tokens are `[B, 1 + L*T, D]` for divided and joint attention: one class token, then the
patch tokens in patch-major, time-minor order (token `1 + l*T + t` is patch `l` of frame
`t`); `[(B*T), 1+L, D]` for space-only attention.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from einops import rearrange

from models.aggregation import max_reduction

MERGING_TYPES = ("patch", "frame", "frame&patch", "frame-patch", "patch-frame")


@dataclass
class TokenState:
    """Layout and bookkeeping of the tokens handed from block to block.

    size: how many original tokens each token stands for, on the grid
        `[B, T, 1+L, 1]` (divided), `[B, 1+N, 1]` (joint) or `[(B*T), 1+L, 1]` (space only);
        0 marks an empty slot (`has_empty_slots`).
    has_empty_slots: adaptive aggregation keeps a merged token's slot (size 0) while
        another video of the batch still needs it; attention then skips empty slots.
    source: optional 0/1 map on the same grid whose last dim indexes the original patch
        tokens `t0 * L0 + l0`; class-token rows are zero.
    frame_source: optional `[B, T, T0]` 0/1 map from current to original frames.
    """
    num_frames: int
    num_patches: int
    size: torch.Tensor
    has_empty_slots: bool = False
    source: Optional[torch.Tensor] = None
    frame_source: Optional[torch.Tensor] = None

    # divided attention: which slots hold content ------------------------------------
    def temporal_keys(self) -> Optional[torch.Tensor]:
        """`[(B*L), T]`: the frames of each patch position holding a token (None: all)."""
        if not self.has_empty_slots:
            return None
        return rearrange(self.size[:, :, 1:, 0] > 0, "b t l -> (b l) t")

    def spatial_keys(self) -> Optional[torch.Tensor]:
        """`[(B*T), 1+L]`: the slots of each frame holding a token (None: all)."""
        if not self.has_empty_slots:
            return None
        return rearrange(self.size[..., 0] > 0, "b t l -> (b t) l")

    def mean_over_frames(self, per_frame: torch.Tensor) -> torch.Tensor:
        """`[B, T, D]` -> `[B, 1, D]`: the mean over the frames that hold a token."""
        if not self.has_empty_slots:
            return per_frame.mean(dim=1, keepdim=True)
        live = (self.size[:, :, 1:, 0] > 0).any(dim=-1, keepdim=True).to(per_frame.dtype)
        return (per_frame * live).sum(dim=1, keepdim=True) / live.sum(dim=1, keepdim=True)

    def content_mask(self) -> Optional[torch.Tensor]:
        """Which output tokens `[B, 1 + L*T]` (class token first, patch-major) hold content,
        or None when every token does."""
        if not self.has_empty_slots:
            return None
        live = rearrange(self.size[:, :, 1:, 0] > 0, "b t l -> b (l t)")
        return torch.cat([live.new_ones(live.shape[0], 1), live], dim=1)


def initial_state(attention_type: str, x: torch.Tensor, batch: int, num_frames: int,
                  num_patches: int, track_source: bool, has_empty_slots: bool) -> TokenState:
    """The state of the embedded tokens `x` (every token of size 1; sources the identity)."""
    if attention_type == "space_only":
        if track_source:
            raise ValueError("source tracking needs temporal tokens; space_only has none")
        return TokenState(num_frames, num_patches, x.new_ones(x.shape[0], 1 + num_patches, 1))
    if track_source:
        eye = torch.eye(num_frames * num_patches, dtype=x.dtype, device=x.device)
    if attention_type == "joint_space_time":
        state = TokenState(num_frames, num_patches, x.new_ones(batch, x.shape[1], 1))
        if track_source:
            # token 1 + l*T + t stands for original patch t*L + l
            source = rearrange(eye, "(t l) s -> (l t) s", t=num_frames)
            source = torch.cat([source.new_zeros(1, source.shape[1]), source])  # [1+N, S]
            state.source = source.expand(batch, -1, -1)
        return state
    state = TokenState(num_frames, num_patches, x.new_ones(batch, num_frames, 1 + num_patches, 1),
                       has_empty_slots)
    if track_source:
        source = rearrange(eye, "(t l) s -> t l s", t=num_frames)
        state.source = with_class_slot(source[None], 0).expand(batch, -1, -1, -1)
        state.frame_source = torch.eye(num_frames, dtype=x.dtype, device=x.device).expand(
            batch, -1, -1)
    return state


def with_class_slot(grid: torch.Tensor, value: float) -> torch.Tensor:
    """Prepend a class-token slot filled with `value`: `[B, T, L, C]` -> `[B, T, 1+L, C]`."""
    slot = torch.full_like(grid[:, :, :1], value)
    return torch.cat([slot, grid], dim=2)


# the merge plan ----------------------------------------------------------------------------
def aggregation_plan(token_merging: bool, testa_r, merging_type, attention_type: str,
                     depth: int, num_frames: int, num_patches: int
                     ) -> Tuple[bool, List[Tuple[int, int]]]:
    """Whether the class token is protected, and `(r_frame, r_patch)` for every block.

    Divided attention consumes `testa_r` one entry per aggregation operation, in block
    order and frame before patch; joint and space-only attention merge once per block.
    The class token is protected as soon as any block merges patches, and then every
    cap on r, the frames' included, reserves one token for it: `apply_patch` in TESTA's
    testa/patch/timesformer.py sets one `class_token` flag that testa/merge.py applies
    to both axes.
    """
    if attention_type != "divided_space_time":
        class_token = "patch" in merging_type
        tokens = num_patches * num_frames if attention_type == "joint_space_time" else num_patches
        values = parse_r(testa_r, depth) if token_merging else [0] * depth
        _check_r(values, max_reduction(1 + tokens, int(class_token)), "token")
        return class_token, [(0, r) for r in values]

    types = parse_merging_types(merging_type, depth)
    class_token = any("patch" in t for t in types)
    ops = [(block, kind) for block, t in enumerate(types) for kind in ("frame", "patch") if kind in t]
    values = parse_r(testa_r, len(ops)) if token_merging else [0] * len(ops)
    plan = [[0, 0] for _ in range(depth)]
    for (block, kind), r in zip(ops, values):
        plan[block][kind == "patch"] = r
    _check_r([p[0] for p in plan], max_reduction(num_frames, int(class_token)), "frame")
    _check_r([p[1] for p in plan], max_reduction(1 + num_patches, int(class_token)), "patch")
    return class_token, [tuple(p) for p in plan]


def _check_r(values: Sequence[int], limit: int, what: str) -> None:
    too_large = [r for r in values if r > limit]
    if too_large:
        raise ValueError(f"testa_r asks to remove {max(too_large)} {what}s in one step, but at "
                         f"most {limit} can be removed from the input (half of them)")


def parse_merging_types(merging_type: Union[str, Sequence[str]], depth: int) -> List[str]:
    """Per-block merging type: one type for all blocks, or alternating ('frame-patch')."""
    if not isinstance(merging_type, str):
        types = list(merging_type)
    elif merging_type in ("patch", "frame", "frame&patch"):
        types = [merging_type] * depth
    elif merging_type in ("frame-patch", "patch-frame"):
        first, second = merging_type.split("-")
        types = [first if i % 2 == 0 else second for i in range(depth)]
    else:
        raise ValueError(f"merging_type {merging_type!r} is not one of {', '.join(MERGING_TYPES)}")
    bad = [t for t in types if t not in ("patch", "frame", "frame&patch")]
    if len(types) != depth or bad:
        raise ValueError(f"merging_type list must hold {depth} entries of 'patch', 'frame' or "
                         f"'frame&patch', got {list(merging_type)!r}")
    return types


def parse_threshold(threshold: Union[None, float, Sequence[float]]
                    ) -> Optional[Tuple[float, float]]:
    """`testa_threshold` -> (frame, patch) cosine-similarity thresholds, or None (off).

    One number sets both; a pair sets them apart. Each lies in [-1, 1] (a pair merges when
    its score is above it, so -1 merges up to r unless keys point exactly apart).
    """
    if threshold is None:
        return None
    values = [threshold] * 2 if isinstance(threshold, (int, float)) else list(threshold)
    if (len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                or not -1.0 <= v <= 1.0 for v in values)):
        raise ValueError("testa_threshold must be null, a number in [-1, 1] or a [frame, patch] "
                         f"pair of them, got {threshold!r}")
    return float(values[0]), float(values[1])


def parse_r(r: Union[int, Sequence[int], Tuple[int, float]], num_ops: int) -> List[int]:
    """r per aggregation operation, in order.

    - int: the same r for every operation;
    - (r, inflection) pair (inflection a float; a 2-list from YAML): the linear schedule
      of `parse_r` in tome/utils.py (facebookresearch/ToMe, CC BY-NC 4.0) over the operations;
    - list: one entry per operation, padded with 0.
    """
    if isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], float):
        base, inflect = r
        low = int(base * (1.0 - inflect))
        high = 2 * base - low
        step = (high - low) / (num_ops - 1) if num_ops > 1 else 0.0
        values = [int(low + step * i) for i in range(num_ops)]
    elif isinstance(r, int) and not isinstance(r, bool):
        values = [r] * num_ops
    elif isinstance(r, (list, tuple)):
        values = list(r)
        if len(values) > num_ops:
            raise ValueError(f"testa_r has {len(values)} entries but the encoder runs only "
                             f"{num_ops} aggregation operations")
        values += [0] * (num_ops - len(values))
    else:
        raise ValueError(f"testa_r must be an int, a list of ints or an (r, inflection) pair, got {r!r}")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values):
        raise ValueError(f"testa_r entries must be non-negative ints, got {values}")
    return values
