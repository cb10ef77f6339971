"""The encoder blocks: attention with proportional bias, and the TESTA block that attends
over time, may merge frames, attends over space, may merge patches, then applies its MLP.

The block follows `TESTABlock` in TESTA's testa/patch/timesformer.py
(github.com/RenShuhuai-Andy/TESTA, BSD-3-Clause) on the divided space-time block of
TimeSformer's timesformer/models/vit.py (facebookresearch/TimeSformer, CC BY-NC 4.0).
"""
from dataclasses import replace
from typing import List, Optional, Tuple

import torch
from einops import rearrange, repeat
from timm.layers import Mlp
from torch import nn

from models.aggregation import AGGREGATION_RULES, Reduction, attention_received
from models.attention import attend, live_key_bias, split_heads
from models.resize import resize_along_time
from models.token_state import TokenState, with_class_slot


class Attention(nn.Module):
    """Multi-head self-attention that also returns its keys averaged over heads, with
    proportional attention (a log-size bias, as `TESTAAttention` in testa/patch/timesformer.py,
    after ToMe's tome/patch/timm.py)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None,
                return_attn: bool = False, live: Optional[torch.Tensor] = None,
                return_metric: bool = True
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """x `[batch, N, D]`, size `[batch, N, 1]` (proportional attention; size 0 masks
        a key), live `[batch, N]` (keys to attend to, when no size is given) ->
        (output `[batch, N, D]`, keys averaged over heads `[batch, N, Dh]` if
        `return_metric` (the merge metric: a block that merges nothing skips it),
        attention averaged over heads `[batch, N, N]` if `return_attn`)."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)  # [batch, H, N, Dh] each
        bias = None if size is None else size.log()[:, None, None, :, 0]  # [batch, 1, 1, N]
        if live is not None and bias is None:
            bias = live_key_bias(live, x.dtype)
        out, attn = attend(q, k, v, self.scale, bias, return_attn)  # [batch, H, N, Dh]
        out = self.proj(rearrange(out, "b h n c -> b n (h c)"))
        attn = attn.mean(dim=1) if return_attn else None  # [batch, N, N]
        return out, k.mean(dim=1) if return_metric else None, attn


class Block(nn.Module):
    """One encoder block: attention, TESTA aggregation, MLP."""

    # parameters only some configs create -> what they are for (load reports)
    optional_parameters = {"temporal_scaling": "learned per-frame scaling of pre-training; "
                                               "this config has learnable_temporal_scaling off"}

    def __init__(self, dim: int, num_heads: int, num_frames: int, mlp_ratio: float = 4.0,
                 attention_type: str = "divided_space_time",
                 learnable_temporal_scaling: bool = False, aggregation: str = "geometry",
                 class_token: bool = True, prop_attn: bool = False,
                 threshold: Optional[Tuple[float, float]] = None):
        super().__init__()
        self.attention_type = attention_type
        self.rule = AGGREGATION_RULES[aggregation]
        self.threshold = threshold  # (frame, patch) similarity thresholds of the rule, or None
        self.class_token = class_token  # protected in patch merging (see aggregation_plan)
        self.prop_attn = prop_attn
        if learnable_temporal_scaling and attention_type != "space_only":
            self.temporal_scaling = nn.Parameter(torch.zeros(1, num_frames, 1))
        else:
            self.temporal_scaling = None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        if attention_type == "divided_space_time":
            self.temporal_norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.temporal_attn = Attention(dim, num_heads)
            self.temporal_fc = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, state: TokenState, r_frame: int, r_patch: int,
                size_trace: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, TokenState]:
        """With `size_trace`, a divided block appends the sizes its temporal attention,
        spatial attention and MLP see (for `models.cost.traced_gmacs`)."""
        if self.attention_type == "divided_space_time":
            return self._divided(x, state, r_frame, r_patch, size_trace)
        return self._global(x, state, r_patch)

    # divided space-time attention ---------------------------------------------------
    def _divided(self, x: torch.Tensor, state: TokenState, r_frame: int, r_patch: int,
                 size_trace: Optional[List[torch.Tensor]]) -> Tuple[torch.Tensor, TokenState]:
        batch, num_frames = x.shape[0], state.num_frames
        needs_attn = self.rule.needs_attention
        trace = size_trace.append if size_trace is not None else lambda size: None
        trace(state.size)

        # temporal attention over the frames of each patch position
        frames_in = rearrange(x[:, 1:], "b (l t) d -> (b l) t d", t=num_frames)
        res_t, metric_t, attn_t = self.temporal_attn(
            self.temporal_norm1(frames_in), return_attn=needs_attn and r_frame > 0,
            live=state.temporal_keys(), return_metric=r_frame > 0)
        if self.temporal_scaling is not None:
            res_t = res_t * (torch.tanh(resize_along_time(self.temporal_scaling, num_frames)) + 1)
        res_t = rearrange(res_t, "(b l) t d -> b (l t) d", b=batch)
        xt = x[:, 1:] + self.temporal_fc(res_t)  # [B, L*T, D]
        if r_frame > 0:
            xt, state = self._aggregate_frames(xt, metric_t, attn_t, state, r_frame)
        num_frames = state.num_frames

        # spatial attention within each frame, the class token prepended to every frame
        cls_in = x[:, :1]  # [B, 1, D]
        xs = torch.cat([repeat(cls_in, "b 1 d -> (b t) 1 d", t=num_frames),
                        rearrange(xt, "b (l t) d -> (b t) l d", t=num_frames)], dim=1)  # [(B*T), 1+L, D]
        trace(state.size)
        size = rearrange(state.size, "b t l 1 -> (b t) l 1") if self.prop_attn else None
        res_s, metric_s, attn_s = self.attn(
            self.norm1(xs), size, return_attn=needs_attn and r_patch > 0, live=state.spatial_keys(),
            return_metric=r_patch > 0)
        # the class token takes the mean of its per-frame results (testa/patch/timesformer.py)
        cls = cls_in + state.mean_over_frames(rearrange(res_s[:, 0], "(b t) d -> b t d", b=batch))
        # The class slot of each frame is protected by every reducer and dropped below,
        # so its value never reaches another token.
        tokens = xs + res_s  # [(B*T), 1+L, D]
        if r_patch > 0:
            tokens, state = self._aggregate_patches(tokens, metric_s, attn_s, state, r_patch)

        x = torch.cat([cls, rearrange(tokens[:, 1:], "(b t) l d -> b (l t) d", b=batch)], dim=1)
        trace(state.size)
        return x + self.mlp(self.norm2(x)), state

    def _aggregate_frames(self, xt: torch.Tensor, metric: torch.Tensor,
                          attn: Optional[torch.Tensor], state: TokenState, r: int
                          ) -> Tuple[torch.Tensor, TokenState]:
        """Merge frames: tokens `[B, L, T, D]`, one decision per video."""
        batch, num_patches = xt.shape[0], state.num_patches
        metric = rearrange(metric, "(b l) t c -> b l t c", b=batch)
        importance = None if attn is None else rearrange(
            attention_received(attn), "(b l) t -> b l t", b=batch)
        size = rearrange(state.size[:, :, 1:], "b t l 1 -> b l t 1")
        reduce = self._match(metric, importance, size, r, frames=True)
        if reduce is None:
            return xt, state
        frames = rearrange(xt, "b (l t) d -> b l t d", l=num_patches)
        frames, size = reduce.merge(frames, size)
        num_frames = frames.shape[2]
        new_state = replace(state, num_frames=num_frames,
                            size=with_class_slot(rearrange(size, "b l t 1 -> b t l 1"), 1))
        if state.source is not None:
            source = reduce.merge_source(rearrange(state.source[:, :, 1:], "b t l s -> b l t s"))
            new_state.source = with_class_slot(rearrange(source, "b l t s -> b t l s"), 0)
            frame_source = state.frame_source[:, None].expand(-1, num_patches, -1, -1)
            new_state.frame_source = reduce.merge_source(frame_source)[:, 0]  # [B, T', T0]
        return rearrange(frames, "b l t d -> b (l t) d"), new_state

    def _aggregate_patches(self, tokens: torch.Tensor, metric: torch.Tensor,
                           attn: Optional[torch.Tensor], state: TokenState, r: int
                           ) -> Tuple[torch.Tensor, TokenState]:
        """Merge patches within each frame: tokens `[(B*T), 1+L, D]`, class slot protected."""
        num_frames = state.num_frames
        importance = None if attn is None else attention_received(attn)  # [(B*T), 1+L]
        size = rearrange(state.size, "b t l 1 -> (b t) l 1")
        reduce = self._match(metric, importance, size, r, frames=False)
        if reduce is None:
            return tokens, state
        tokens, size = reduce.merge(tokens, size)
        new_state = replace(state, num_patches=tokens.shape[1] - 1,
                            size=rearrange(size, "(b t) l 1 -> b t l 1", t=num_frames))
        if state.source is not None:
            source = reduce.merge_source(rearrange(state.source, "b t l s -> (b t) l s"))
            new_state.source = rearrange(source, "(b t) l s -> b t l s", t=num_frames)
        return tokens, new_state

    # joint space-time / space-only attention, merging all tokens at once as
    # `global_agg` in testa/patch/timesformer.py (ToMe's matching, testa/merge_original.py)
    def _global(self, x: torch.Tensor, state: TokenState, r: int
                ) -> Tuple[torch.Tensor, TokenState]:
        needs_attn = self.rule.needs_attention and r > 0
        res, metric, attn = self.attn(self.norm1(x), state.size if self.prop_attn else None,
                                      return_attn=needs_attn, return_metric=r > 0)
        x = x + res
        if r > 0:
            importance = None if attn is None else attention_received(attn)
            reduce = self._match(metric, importance, state.size, r, frames=False)
            if reduce is not None:
                x, size = reduce.merge(x, state.size)
                source = None if state.source is None else reduce.merge_source(state.source)
                state = replace(state, size=size, source=source)
        return x + self.mlp(self.norm2(x)), state

    # helpers -------------------------------------------------------------------------
    def _match(self, metric: torch.Tensor, importance: Optional[torch.Tensor],
               size: torch.Tensor, r: int, frames: bool) -> Optional[Reduction]:
        """Choose which tokens to merge or drop, by the configured aggregation rule (with
        the frame or patch threshold, if any); the class slot of patch aggregation is never
        merged, and each cap on r reserves a slot for it (see `aggregation_plan`)."""
        threshold = None if self.threshold is None else self.threshold[0 if frames else 1]
        return self.rule.choose(metric, importance, size, r, threshold=threshold,
                                reserved=int(self.class_token),
                                protect_first=self.class_token and not frames,
                                across_frames=frames)
