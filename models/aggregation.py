"""Token aggregation for TESTA: bipartite matching, importance-based merging, pruning.

Every reducer works on tokens laid out `[..., N, C]` (the token axis is -2; any leading
dims are batch-like) and returns a `Reduction`: one choice of tokens, applied alike to the
features with their sizes (`merge`) and to the source maps (`merge_source`).

The matching follows `bipartite_soft_matching`, `merge_wavg` and `merge_source` of TESTA's
testa/merge.py (github.com/RenShuhuai-Andy/TESTA, BSD-3-Clause), which adapt ToMe's
tome/merge.py (github.com/facebookresearch/ToMe, CC BY-NC 4.0); the code is written anew.

The rules a config can name (`aggregation`) are the entries of `AGGREGATION_RULES`; a
new rule is one function choosing tokens and one entry there.

Two token axes are reduced in a TESTA block:
- patches, per frame: tokens `[B, T, 1+L, C]` with the class token at position 0;
- frames, per patch position: tokens `[B, L, T, C]`. The frame choice is shared by all
  patch positions of a video (patch voting for geometry-based merging, importance
  averaged over patches for the importance-based modes).
"""
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Protocol, Tuple

import torch

class Reduction(Protocol):
    """A choice of tokens, applied alike to any tensor `[..., N, C]` of the same layout;
    N' is the tokens left: N - r for the fixed reducers, at least that for `AdaptiveMerge`,
    which keeps an emptied slot while another row of the batch still needs it."""

    def merge(self, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average of `x [..., N, C]` with sizes `[..., N, 1]` -> (x', size')
        `[..., N', C]`, `[..., N', 1]`: `x' = sum(x*s) / sum(s)`, `s' = sum(s)` over the
        tokens merged into one (as merge_wavg in tome/merge.py); a token that takes no merge
        passes through unchanged (where `x*s/s` could differ from `x` in the last bit)."""

    def merge_source(self, source: torch.Tensor) -> torch.Tensor:
        """0/1 maps `[..., N, S]` of the original tokens each token stands for -> `[..., N', S]`
        (merged rows combined by max, as merge_source in tome/merge.py)."""


def _expand_index(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`idx [..., k, 1]` broadcast to the leading dims and channels of `like [..., n, C]`."""
    return idx.expand(*like.shape[:-2], idx.shape[-2], like.shape[-1])


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The rows `idx [..., k, 1]` of `x [..., N, C]`, per leading index -> `[..., k, C]`:
    `x.gather(-2, idx expanded over C)`, as one `index_select` of whole rows (the gather
    reads an index per element: 10 to 20x slower at the encoder's 768 channels)."""
    lead, (num_rows, channels) = x.shape[:-2], x.shape[-2:]
    idx = idx[..., 0].expand(*lead, idx.shape[-2])  # [..., k]
    starts = torch.arange(math.prod(lead), device=x.device).view(*lead, 1) * num_rows
    rows = x.reshape(-1, channels).index_select(0, (idx + starts).flatten())
    return rows.view(*lead, idx.shape[-1], channels)


class BipartiteMerge:
    """Merge `r` tokens of set A (even positions) into their matches in set B (odd).

    Output order: the unmerged A tokens (ascending when sorted), then all B tokens.
    """

    def __init__(self, unm_idx: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor):
        self.unm_idx = unm_idx  # [..., |A| - r, 1]
        self.src_idx = src_idx  # [..., r, 1]
        self.dst_idx = dst_idx  # [..., r, 1] positions in B

    def merge_source(self, source: torch.Tensor) -> torch.Tensor:
        unmerged, moved = _rows(source, 2 * self.unm_idx), _rows(source, 2 * self.src_idx)
        set_b = source[..., 1::2, :].scatter_reduce(-2, _expand_index(self.dst_idx, moved), moved,
                                                    reduce="amax")
        return torch.cat([unmerged, set_b], dim=-2)

    def merge(self, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # set A is the even rows: its i-th token is row 2i
        unmerged, unmerged_size = (_rows(t, 2 * self.unm_idx) for t in (x, size))
        return _weighted_into(x[..., 1::2, :], size[..., 1::2, :],
                              *(_rows(t, 2 * self.src_idx) for t in (x, size)),
                              self.dst_idx, unmerged, unmerged_size)


class SubsetMerge:
    """Merge the tokens at `src_idx` into their matches among the kept tokens `keep_idx`.

    With no sources (`src_idx is None`) this is pruning: the kept tokens, in order.
    """

    def __init__(self, keep_idx: torch.Tensor, src_idx: Optional[torch.Tensor] = None,
                 dst_idx: Optional[torch.Tensor] = None):
        self.keep_idx = keep_idx  # [..., N - r, 1], ascending
        self.src_idx = src_idx  # [..., r, 1]
        self.dst_idx = dst_idx  # [..., r, 1] positions among the kept tokens

    def merge_source(self, source: torch.Tensor) -> torch.Tensor:
        kept = _rows(source, self.keep_idx)
        if self.src_idx is None:
            return kept
        moved = _rows(source, self.src_idx)
        return kept.scatter_reduce(-2, _expand_index(self.dst_idx, moved), moved, reduce="amax")

    def merge(self, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pruning (no sources) keeps the tokens as they are."""
        kept, kept_size = (_rows(t, self.keep_idx) for t in (x, size))
        if self.src_idx is None:
            return kept, kept_size
        moved, moved_size = (_rows(t, self.src_idx) for t in (x, size))
        return _weighted_into(kept, kept_size, moved, moved_size, self.dst_idx)


def _weighted_into(dst: torch.Tensor, dst_size: torch.Tensor, moved: torch.Tensor,
                   moved_size: torch.Tensor, dst_idx: torch.Tensor,
                   before: Optional[torch.Tensor] = None,
                   before_size: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Add size-weighted `moved [..., r, C]` into `dst [..., M, C]` at `dst_idx`, average by
    size, and prepend the untouched tokens `before` if given."""
    merged_size = dst_size.scatter_add(-2, _expand_index(dst_idx, moved_size), moved_size)
    merged = (dst * dst_size).scatter_add_(-2, _expand_index(dst_idx, moved), moved * moved_size)
    merged = merged.div_(merged_size)
    if before is None:
        return merged, merged_size
    return torch.cat([before, merged], dim=-2), torch.cat([before_size, merged_size], dim=-2)


@contextmanager
def _full_precision(metric: torch.Tensor) -> Iterator[torch.Tensor]:
    """The metric in at least float32, with autocast off inside: cosine similarities in
    bfloat16 (3 significant digits) would reorder near-tied matches."""
    device = metric.device.type
    with (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
          else nullcontext()):  # the meta device (FLOP counting) has no autocast
        yield metric.to(torch.promote_types(metric.dtype, torch.float32))


def max_reduction(num_tokens: int, reserved: int) -> int:
    """The largest r one bipartite step can remove: half the tokens not `reserved`."""
    return (num_tokens - reserved) // 2


def bipartite_matching(metric: torch.Tensor, r: int, *, reserved: int, protect_first: bool,
                       vote_frames: bool) -> Optional[BipartiteMerge]:
    """Geometry-based bipartite soft matching, with TESTA's frame voting (testa/merge.py
    `bipartite_soft_matching`, after tome/merge.py).

    metric: `[..., N, Dh]`. `reserved` tokens are kept out of the cap on r (see
    `max_reduction`); `protect_first` forbids merging token 0 (the class token) and, like
    `vote_frames`, keeps the unmerged tokens in order; `vote_frames` makes every patch
    position (dim -3) follow the majority decision. Returns None when nothing is merged.
    """
    r = min(r, max_reduction(metric.shape[-2], reserved))
    if r <= 0:
        return None
    with torch.no_grad(), _full_precision(metric) as metric:
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)  # [..., |A|, |B|]
        if protect_first:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # [..., |A|]
        if vote_frames:
            # [B, L, |A|]: the patches of a frame vote for its partner and its score
            num_patches = metric.shape[-3]
            node_idx = node_idx.mode(dim=-2, keepdim=True).values.repeat(1, num_patches, 1)
            node_max = node_max.mode(dim=-2, keepdim=True).values.repeat(1, num_patches, 1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]  # [..., |A|, 1]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if protect_first or vote_frames:
            unm_idx = unm_idx.sort(dim=-2).values
    return BipartiteMerge(unm_idx, src_idx, dst_idx)


def attention_received(attn: torch.Tensor) -> torch.Tensor:
    """Importance `S_i = sum_{j != i} attn[j, i]` from head-averaged attention `[..., N, N]`."""
    off_diagonal = 1 - torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    return (attn * off_diagonal).sum(dim=-2)  # [..., N]


def _least_important(importance: torch.Tensor, r: int, protect_first: bool,
                     share_over_patches: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices `[..., r, 1]` of the r least important tokens and of the rest (ascending)."""
    if share_over_patches:
        # [B, L, T] -> the same frames for every patch position of a video
        importance = importance.mean(dim=-2, keepdim=True).expand_as(importance)
    if protect_first:
        importance = importance.clone()
        importance[..., 0] = math.inf
    order = importance.argsort(dim=-1)[..., None]  # ascending importance, [..., N, 1]
    return order[..., :r, :], order[..., r:, :].sort(dim=-2).values


def importance_matching(metric: torch.Tensor, importance: torch.Tensor, r: int, *,
                        reserved: int, protect_first: bool,
                        share_over_patches: bool) -> Optional[SubsetMerge]:
    """Merge the r least important tokens (attention received) into their most similar kept token."""
    return merge_least_important(metric, importance, min(r, max_reduction(metric.shape[-2], reserved)),
                                 protect_first=protect_first, share_over_patches=share_over_patches)


def merge_least_important(metric: torch.Tensor, importance: torch.Tensor, r: int, *,
                          protect_first: bool, share_over_patches: bool) -> Optional[SubsetMerge]:
    """`importance_matching` without the cap on r: any r below the token count (the
    text-guided selection of models/text_guided.py keeps as few as one token)."""
    if r <= 0:
        return None
    with torch.no_grad(), _full_precision(metric) as metric:
        src_idx, keep_idx = _least_important(importance, r, protect_first, share_over_patches)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        src_metric = metric.gather(-2, _expand_index(src_idx, metric))  # [..., r, Dh]
        keep_metric = metric.gather(-2, _expand_index(keep_idx, metric))  # [..., N-r, Dh]
        scores = src_metric @ keep_metric.transpose(-1, -2)  # [..., r, N-r]
        if protect_first:
            scores[..., 0] = -math.inf  # the class token (kept first) takes no merges
        dst_idx = scores.argmax(dim=-1)[..., None]
        if share_over_patches:
            dst_idx = dst_idx.mode(dim=-3, keepdim=True).values.expand_as(dst_idx)
    return SubsetMerge(keep_idx, src_idx, dst_idx)


def pruning(importance: torch.Tensor, r: int, *, reserved: int, protect_first: bool,
            share_over_patches: bool) -> Optional[SubsetMerge]:
    """Drop the r least important tokens."""
    r = min(r, max_reduction(importance.shape[-1], reserved))
    if r <= 0:
        return None
    with torch.no_grad():
        _, keep_idx = _least_important(importance, r, protect_first, share_over_patches)
    return SubsetMerge(keep_idx)


# the rules a config names ---------------------------------------------------------------
@dataclass(frozen=True)
class AggregationRule:
    """One way of choosing tokens.

    needs_attention: the rule reads the head-averaged attention weights (as importance),
        so attention is computed explicitly rather than by the fused kernel.
    adaptive: the rule takes a similarity threshold (`testa_threshold`), with which each
        row merges as many tokens as score above it, at most r.
    choose(metric, importance, size, r, *, threshold, reserved, protect_first,
        across_frames) -> the Reduction removing up to r tokens, or None. `metric` are the
        keys `[..., N, Dh]`, `importance` the attention each token receives `[..., N]`
        (None unless `needs_attention`), `size` the token sizes `[..., N, 1]` (0: an empty
        slot, adaptive mode only), `threshold` None unless `adaptive`; `across_frames`:
        tokens are `[B, L, T, Dh]` frames, and one decision is taken per video; `reserved`
        and `protect_first` as for `bipartite_matching`.
    """
    needs_attention: bool
    adaptive: bool
    choose: Callable[..., Optional[Reduction]]


def _by_geometry(metric, importance, size, r, *, threshold, reserved, protect_first,
                 across_frames):
    if threshold is not None:
        return adaptive_matching(metric, size, r, threshold, reserved=reserved,
                                 protect_first=protect_first, frames=across_frames)
    return bipartite_matching(metric, r, reserved=reserved, protect_first=protect_first,
                              vote_frames=across_frames)


def _by_importance(metric, importance, size, r, *, threshold, reserved, protect_first,
                   across_frames):
    return importance_matching(metric, importance, r, reserved=reserved,
                               protect_first=protect_first, share_over_patches=across_frames)


def _by_pruning(metric, importance, size, r, *, threshold, reserved, protect_first,
                across_frames):
    return pruning(importance, r, reserved=reserved, protect_first=protect_first,
                   share_over_patches=across_frames)


AGGREGATION_RULES: Dict[str, AggregationRule] = {
    # TESTA, ToMe; with a threshold, adaptive
    "geometry": AggregationRule(needs_attention=False, adaptive=True, choose=_by_geometry),
    "importance": AggregationRule(needs_attention=True, adaptive=False, choose=_by_importance),
    "prune": AggregationRule(needs_attention=True, adaptive=False, choose=_by_pruning),
}
AGGREGATIONS = tuple(AGGREGATION_RULES)


# content-adaptive aggregation ---------------------------------------------------------
class AdaptiveMerge:
    """Merge each set-A token whose match score clears the threshold into its set-B partner,
    per row, then drop the tokens that every row of the batch left empty.

    A merged token keeps its slot with size 0 (it stands for nothing; attention masks it
    out) until the whole batch allows the slot to go. Tokens keep their order.
    """

    def __init__(self, merged: torch.Tensor, dst_idx: torch.Tensor, keep_idx: torch.Tensor):
        self.merged = merged  # [..., |A|, 1] bool: merged into its partner in B
        self.dst_idx = dst_idx  # [..., |A|, 1] partner positions in B
        self.keep_idx = keep_idx  # [..., M, 1] slots kept, ascending

    def _interleave_and_keep(self, set_a: torch.Tensor, set_b: torch.Tensor) -> torch.Tensor:
        tokens = set_a.new_empty(*set_a.shape[:-2], set_a.shape[-2] + set_b.shape[-2], set_a.shape[-1])
        tokens[..., ::2, :] = set_a
        tokens[..., 1::2, :] = set_b
        return _rows(tokens, self.keep_idx)

    def merge_source(self, source: torch.Tensor) -> torch.Tensor:
        """A merged token's originals move to its partner."""
        set_a, set_b = source[..., ::2, :], source[..., 1::2, :]
        moved = set_a * self.merged
        set_b = set_b.scatter_reduce(-2, _expand_index(self.dst_idx, moved), moved, reduce="amax")
        return self._interleave_and_keep(set_a * ~self.merged, set_b)

    def merge(self, x: torch.Tensor, size: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A token that ends with size 0 keeps its value (no 0/0)."""
        set_a, set_b = x[..., ::2, :], x[..., 1::2, :]
        size_a, size_b = size[..., ::2, :], size[..., 1::2, :]
        moved_size = size_a * self.merged  # [..., |A|, 1], 0 where not merged
        received = torch.zeros_like(size_b).scatter_add(
            -2, _expand_index(self.dst_idx, moved_size), moved_size)
        merged_size = size_b + received
        total = (set_b * size_b).scatter_add(-2, _expand_index(self.dst_idx, set_a), set_a * moved_size)
        took = received > 0
        denominator = torch.where(took, merged_size, torch.ones_like(merged_size))
        set_b = torch.where(took, total / denominator, set_b)
        return (self._interleave_and_keep(set_a, set_b),
                self._interleave_and_keep(size_a * ~self.merged, merged_size))


def adaptive_matching(metric: torch.Tensor, size: torch.Tensor, r: int, threshold: float, *,
                      reserved: int, protect_first: bool, frames: bool) -> AdaptiveMerge:
    """Bipartite matching that merges every pair scoring above `threshold`, at most r per row.

    metric: `[..., N, Dh]`; size: `[..., N, 1]`, 0 for empty slots, which neither merge
    nor take merges. Patches (`frames=False`): one row per frame, tokens `[(B*T), 1+L]`.
    Frames (`frames=True`): metric and size `[B, L, T, .]`; a frame's score against another
    is the mean cosine similarity of their keys over the patch positions where both hold a
    token, and the decision is shared by all patch positions. The cap per row is also
    half the unprotected live tokens (`max_reduction`). Slots empty in every row are dropped.
    """
    with torch.no_grad(), _full_precision(metric) as metric:
        live = size[..., 0] > 0  # [..., N]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)  # [..., |A|, |B|]
        both_live = live[..., ::2, None] & live[..., None, 1::2]
        if frames:
            # [B, L, |A|, |B|] -> [B, 1, |A|, |B|]: mean over the positions where both are live
            pairs = both_live.sum(dim=-3, keepdim=True)
            scores = torch.where(both_live, scores, 0).sum(dim=-3, keepdim=True) / pairs.clamp(min=1)
            both_live = pairs > 0
            live = live.any(dim=-2, keepdim=True)  # [B, 1, T]: frames with a token
        scores = scores.masked_fill(~both_live, -math.inf)
        if protect_first:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)  # [..., |A|]
        rank = node_max.argsort(dim=-1, descending=True).argsort(dim=-1)
        cap = ((live.sum(dim=-1, keepdim=True) - reserved) // 2).clamp(min=0, max=r)
        wanted = (node_max > threshold).sum(dim=-1, keepdim=True).minimum(cap)
        merged = (rank < wanted)[..., None]  # [..., |A|, 1]
        dst_idx = node_idx[..., None]
        # live slots after merging: B slots stay live, A slots unless merged
        live_after = live.clone()
        live_after[..., ::2] &= ~merged[..., 0]
        kept = int(live_after.flatten(0, -2).sum(dim=-1).max())
        keep_idx = (~live_after).to(torch.uint8).sort(dim=-1, stable=True).indices[..., :kept, None]
        if frames:
            num_patches = metric.shape[-3]
            merged, dst_idx, keep_idx = (t.expand(-1, num_patches, -1, -1)
                                         for t in (merged, dst_idx, keep_idx))
    return AdaptiveMerge(merged, dst_idx, keep_idx)
