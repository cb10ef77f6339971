"""TimeSformer video encoder with TESTA temporal and spatial token aggregation.

Tokens between blocks are `[B, 1 + L*T, D]`: one class token, then the patch tokens in
patch-major, time-minor order (token `1 + l*T + t` is patch `l` of frame `t`). A
divided space-time block attends over time, may merge frames, attends over space, may
merge patches, then applies its MLP (docs/computation.md, section 2). Aggregation is part
of every block and is switched by the per-block plan built from the config.
"""
from dataclasses import dataclass, replace
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from timm.layers import Mlp, PatchEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.aggregation import (AGGREGATION_RULES, AGGREGATIONS, Reduction,
                                attention_received, max_reduction, merge_source,
                                merge_weighted, parse_merging_types, parse_r, parse_threshold)
from models.resize import resize_along_time, resize_patch_grid
from utils import FRAME_SETTINGS, NONE, Setting, Settings, with_defaults

ATTENTION_TYPES = ("divided_space_time", "joint_space_time", "space_only")

VIDEO_ENCODER_SETTINGS = Settings({
    "vit": Setting(str, "timesformer", "video backbone; TimeSformer is the one there is",
                   choices=("timesformer",)),
    **FRAME_SETTINGS,
    "patch_size": Setting(int, 16, "patch side in pixels", min=1),
    "vision_width": Setting(int, 768, "token width of the video encoder", min=1),
    "num_heads": Setting(int, 12, "attention heads per block", min=1),
    "depth": Setting(int, 12, "encoder blocks", min=1),
    "num_frames": Setting(int, meaning="frames of the time embedding (other counts are resized)",
                          min=1),
    "attention_type": Setting(str, "divided_space_time", "attention layout of every block",
                              choices=ATTENTION_TYPES),
    "learnable_temporal_scaling": Setting(bool, False, "learned per-frame scale of the temporal "
                                          "attention output"),
    "token_merging": Setting(bool, False, "aggregate tokens (TESTA); false: testa_r is ignored"),
    "testa_r": Setting((int, list), 0, "tokens removed per aggregation operation: an int, a "
                       "list in operation order, or an [r, inflection] pair", min=0),
    "merging_type": Setting((str, list), "frame&patch", "what each block aggregates: patch, "
                            "frame, frame&patch, frame-patch, patch-frame, or a list per block"),
    "aggregation": Setting(str, "geometry", "how tokens are chosen (models/aggregation.py)",
                           choices=AGGREGATIONS),
    "prop_attn": Setting(bool, False, "proportional attention: bias by log token size"),
    "testa_threshold": Setting((int, float, list, NONE), None, "adaptive aggregation: merge, per "
                               "video, every matched pair whose key cosine similarity is above "
                               "it (a [frame, patch] pair sets them apart), at most testa_r; "
                               "null: the fixed schedule (docs/adaptive.md)", min=-1, max=1),
    "vit_grad_ckpt": Setting(bool, False, "gradient checkpointing of the encoder blocks"),
    "vit_ckpt_layer": Setting(int, 0, "checkpoint only the last N blocks (0: all)", min=0),
})


@dataclass
class TokenState:
    """Layout and bookkeeping of the tokens handed from block to block.

    size: how many original tokens each token stands for, on the grid
        `[B, T, 1+L, 1]` (divided), `[B, 1+N, 1]` (joint) or `[(B*T), 1+L, 1]` (space only).
    source: optional 0/1 map on the same grid whose last dim indexes the original patch
        tokens `t0 * L0 + l0`; class-token rows are zero.
    frame_source: optional `[B, T, T0]` 0/1 map from current to original frames.
    trace: optional list that every block extends with the sizes its attention and MLP
        saw, for cost accounting (tools/benchmark.py, `traced_gmacs`).
    """
    num_frames: int
    num_patches: int
    size: torch.Tensor
    source: Optional[torch.Tensor] = None
    frame_source: Optional[torch.Tensor] = None
    trace: Optional[List[torch.Tensor]] = None


class Attention(nn.Module):
    """Multi-head self-attention that also returns its keys averaged over heads."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: Optional[torch.Tensor] = None,
                return_attn: bool = False, live: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """x `[batch, N, D]`, size `[batch, N, 1]` (proportional attention; size 0 masks
        a key), live `[batch, N]` (keys to attend to, when no size is given) ->
        (output `[batch, N, D]`, keys averaged over heads `[batch, N, Dh]`,
        attention averaged over heads `[batch, N, N]` if `return_attn`)."""
        qkv = rearrange(self.qkv(x), "b n (three h c) -> three b h n c", three=3, h=self.num_heads)
        q, k, v = qkv.unbind(0)  # [batch, H, N, Dh] each
        bias = None if size is None else size.log()[:, None, None, :, 0]  # [batch, 1, 1, N]
        if live is not None and bias is None:
            bias = live_key_bias(live, x.dtype)
        if return_attn:
            logits = (q @ k.transpose(-2, -1)) * self.scale
            if bias is not None:
                logits = logits + bias
            attn = logits.softmax(dim=-1)
            out = attn @ v
            attn = attn.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
            attn = None
        out = self.proj(rearrange(out, "b h n c -> b n (h c)"))
        return out, k.mean(dim=1), attn


def live_key_bias(live: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias `[batch, 1, 1, N]`: 0 for live keys, -inf for empty slots.
    A row with no live key (only empty slots ask) attends to all, so it stays finite."""
    live = live | ~live.any(dim=-1, keepdim=True)
    bias = torch.zeros(live.shape, dtype=dtype, device=live.device).masked_fill(~live, -torch.inf)
    return bias[:, None, None, :]


class Block(nn.Module):
    """One encoder block: attention, TESTA aggregation, MLP."""

    def __init__(self, dim: int, num_heads: int, num_frames: int, mlp_ratio: float = 4.0,
                 attention_type: str = "divided_space_time",
                 learnable_temporal_scaling: bool = False, aggregation: str = "geometry",
                 class_token: bool = True, prop_attn: bool = False,
                 threshold: Optional[Tuple[float, float]] = None):
        super().__init__()
        self.attention_type = attention_type
        self.rule = AGGREGATION_RULES[aggregation]
        self.threshold = threshold  # (frame, patch) similarity thresholds: adaptive mode
        self.class_token = class_token
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

    def forward(self, x: torch.Tensor, state: TokenState, r_frame: int, r_patch: int
                ) -> Tuple[torch.Tensor, TokenState]:
        if self.attention_type == "divided_space_time":
            return self._divided(x, state, r_frame, r_patch)
        return self._global(x, state, r_patch)

    # divided space-time attention ---------------------------------------------------
    def _divided(self, x: torch.Tensor, state: TokenState, r_frame: int, r_patch: int
                 ) -> Tuple[torch.Tensor, TokenState]:
        batch, num_frames = x.shape[0], state.num_frames
        needs_attn = self.rule.needs_attention

        adaptive = self.threshold is not None
        self._record(state)

        # temporal attention over the frames of each patch position
        frames_in = rearrange(x[:, 1:], "b (l t) d -> (b l) t d", t=num_frames)
        live_t = rearrange(state.size[:, :, 1:, 0] > 0, "b t l -> (b l) t") if adaptive else None
        res_t, metric_t, attn_t = self.temporal_attn(
            self.temporal_norm1(frames_in), return_attn=needs_attn and r_frame > 0, live=live_t)
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
        self._record(state)
        size = rearrange(state.size, "b t l 1 -> (b t) l 1") if self.prop_attn else None
        live_s = rearrange(state.size[..., 0] > 0, "b t l -> (b t) l") if adaptive else None
        res_s, metric_s, attn_s = self.attn(
            self.norm1(xs), size, return_attn=needs_attn and r_patch > 0, live=live_s)
        cls_res = rearrange(res_s[:, 0], "(b t) d -> b t d", b=batch)
        if adaptive:  # the mean over the frames that hold a token
            frame_live = (state.size[:, :, 1:, 0] > 0).any(dim=-1, keepdim=True).to(cls_res.dtype)
            cls_res = (cls_res * frame_live).sum(dim=1, keepdim=True) / frame_live.sum(dim=1, keepdim=True)
        else:
            cls_res = cls_res.mean(dim=1, keepdim=True)
        cls = cls_in + cls_res  # [B, 1, D]
        # The class slot of each frame is protected by every reducer and dropped below,
        # so its value never reaches another token.
        tokens = xs + res_s  # [(B*T), 1+L, D]
        if r_patch > 0:
            tokens, state = self._aggregate_patches(tokens, metric_s, attn_s, state, r_patch)

        x = torch.cat([cls, rearrange(tokens[:, 1:], "(b t) l d -> b (l t) d", b=batch)], dim=1)
        self._record(state)
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
        frames, size = merge_weighted(reduce, frames, size)
        num_frames = frames.shape[2]
        new_state = replace(state, num_frames=num_frames,
                            size=_with_class_slot(rearrange(size, "b l t 1 -> b t l 1"), 1))
        if state.source is not None:
            source = merge_source(reduce, rearrange(state.source[:, :, 1:], "b t l s -> b l t s"))
            new_state.source = _with_class_slot(rearrange(source, "b l t s -> b t l s"), 0)
            frame_source = state.frame_source[:, None].expand(-1, num_patches, -1, -1)
            new_state.frame_source = merge_source(reduce, frame_source)[:, 0]  # [B, T', T0]
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
        tokens, size = merge_weighted(reduce, tokens, size)
        new_state = replace(state, num_patches=tokens.shape[1] - 1,
                            size=rearrange(size, "(b t) l 1 -> b t l 1", t=num_frames))
        if state.source is not None:
            source = merge_source(reduce, rearrange(state.source, "b t l s -> (b t) l s"))
            new_state.source = rearrange(source, "(b t) l s -> b t l s", t=num_frames)
        return tokens, new_state

    # joint space-time / space-only attention with global (ToMe) merging --------------
    def _global(self, x: torch.Tensor, state: TokenState, r: int
                ) -> Tuple[torch.Tensor, TokenState]:
        needs_attn = self.rule.needs_attention and r > 0
        res, metric, attn = self.attn(self.norm1(x), state.size if self.prop_attn else None,
                                      return_attn=needs_attn)
        x = x + res
        if r > 0:
            importance = None if attn is None else attention_received(attn)
            reduce = self._match(metric, importance, state.size, r, frames=False)
            if reduce is not None:
                x, size = merge_weighted(reduce, x, state.size)
                source = None if state.source is None else merge_source(reduce, state.source)
                state = replace(state, size=size, source=source)
        return x + self.mlp(self.norm2(x)), state

    # helpers -------------------------------------------------------------------------
    def _match(self, metric: torch.Tensor, importance: Optional[torch.Tensor],
               size: torch.Tensor, r: int, frames: bool) -> Optional[Reduction]:
        """Choose which tokens to merge or drop, by the configured aggregation rule (with
        the frame or patch threshold in adaptive mode); the class slot of patch aggregation
        is never merged."""
        threshold = None if self.threshold is None else self.threshold[0 if frames else 1]
        return self.rule.choose(metric, importance, size, r, threshold=threshold,
                                class_token=self.class_token,
                                protect_first=self.class_token and not frames,
                                across_frames=frames)

    @staticmethod
    def _record(state: TokenState) -> None:
        if state.trace is not None:
            state.trace.append(state.size)


def token_mask(state: TokenState) -> torch.Tensor:
    """Which output tokens `[B, 1 + L*T]` (class token first, patch-major) hold content
    (size > 0), from a divided-attention `TokenState`."""
    live = rearrange(state.size[:, :, 1:, 0] > 0, "b t l -> b (l t)")
    return torch.cat([live.new_ones(live.shape[0], 1), live], dim=1)


def pool_tokens(tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of the tokens `[B, N, D]` that hold content (all when `mask [B, N]` is None)."""
    if mask is None:
        return tokens.mean(dim=1)
    weight = mask[..., None].to(tokens.dtype)
    return (tokens * weight).sum(dim=1) / weight.sum(dim=1)


def pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pad `[B, N, D]` tokens (zeros) and their mask `[B, N]` (False) to `length` slots."""
    extra = length - tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def cat_token_batches(tokens: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]]
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Batches of encoder output `[B_i, N_i, D]` with their content masks `[B_i, N_i]` (all
    None for fixed r) -> `[sum B_i, max N_i, D]` and its mask: adaptive batches keep
    different counts, so shorter ones are padded with masked slots."""
    if masks[0] is None:
        return torch.cat(list(tokens)), None
    length = max(batch.shape[1] for batch in tokens)
    padded = [pad_tokens(batch, mask, length) for batch, mask in zip(tokens, masks)]
    return torch.cat([batch for batch, _ in padded]), torch.cat([mask for _, mask in padded])


def _with_class_slot(grid: torch.Tensor, value: float) -> torch.Tensor:
    """Prepend a class-token slot filled with `value`: `[B, T, L, C]` -> `[B, T, 1+L, C]`."""
    slot = torch.full_like(grid[:, :, :1], value)
    return torch.cat([slot, grid], dim=2)


class VideoEncoder(nn.Module):
    """ViT TimeSformer whose blocks aggregate frames and patches (TESTA)."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, num_frames: int = 8,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, attention_type: str = "divided_space_time",
                 learnable_temporal_scaling: bool = False, token_merging: bool = False,
                 testa_r=0, merging_type="frame&patch", aggregation: str = "geometry",
                 prop_attn: bool = False, grad_ckpt: bool = False, ckpt_layer: int = 0,
                 testa_threshold=None):
        super().__init__()
        _check_settings(image_size, patch_size, num_frames, embed_dim, num_heads,
                        attention_type, aggregation)
        threshold = parse_threshold(testa_threshold) if token_merging else None
        if threshold is not None and (attention_type != "divided_space_time"
                                      or not AGGREGATION_RULES[aggregation].adaptive):
            adaptive_rules = [name for name, rule in AGGREGATION_RULES.items() if rule.adaptive]
            raise ValueError("testa_threshold (adaptive aggregation) needs attention_type "
                             f"'divided_space_time' and aggregation {' or '.join(map(repr, adaptive_rules))}, "
                             f"got {attention_type!r} and {aggregation!r}")
        self.adaptive = threshold is not None
        self.attention_type = attention_type
        self.embed_dim = embed_dim
        self.num_frames = num_frames
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.depth = depth
        class_token, self.plan = _aggregation_plan(
            token_merging, testa_r, merging_type, attention_type, depth, num_frames,
            self.num_patches)
        self.checkpointed = [grad_ckpt and (ckpt_layer == 0 or i >= depth - ckpt_layer)
                             for i in range(depth)]

        self.patch_embed = PatchEmbed(image_size, patch_size, 3, embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        if attention_type != "space_only":
            self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, num_frames, mlp_ratio, attention_type,
                  learnable_temporal_scaling, aggregation, class_token, prop_attn, threshold)
            for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.attention_type == "divided_space_time":
            for block in self.blocks[1:]:  # TimeSformer keeps block 0's random temporal_fc
                nn.init.zeros_(block.temporal_fc.weight)
                nn.init.zeros_(block.temporal_fc.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "time_embed"}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video `[B, 3, T, H, W]` -> all output tokens `[B, 1 + L'*T', D]`."""
        return self.forward_with_state(video)[0]

    def forward_with_mask(self, video: torch.Tensor
                          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """video `[B, 3, T, H, W]` -> (all output tokens `[B, 1 + L'*T', D]`, which of
        them hold content `[B, 1 + L'*T']` bool, or None when every token does: the
        adaptive mode pads videos that kept fewer tokens with empty slots)."""
        tokens, state = self.forward_with_state(video)
        return tokens, token_mask(state) if self.adaptive else None

    def forward_with_state(self, video: torch.Tensor, track_source: bool = False,
                           num_blocks: Optional[int] = None, trace: bool = False
                           ) -> Tuple[torch.Tensor, TokenState]:
        """Tokens and their `TokenState` (sizes, and sources if `track_source`) after
        `num_blocks` blocks (default all) and the final norm; with `trace`, the state's
        `trace` lists the sizes every attention and MLP saw (tools/benchmark.py, `traced_gmacs`)."""
        batch, _, num_frames, height, width = video.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"video frames of {height}x{width} px do not fit the "
                             f"{self.patch_size}-px patch grid")
        grid = (height // self.patch_size, width // self.patch_size)
        x = self.patch_embed(rearrange(video, "b c t h w -> (b t) c h w"))  # [(B*T), L, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self._pos_embed(grid)  # [(B*T), 1+L, D]
        num_patches = grid[0] * grid[1]

        if self.attention_type == "space_only":
            if track_source:
                raise ValueError("source tracking needs temporal tokens; space_only has none")
            state = TokenState(num_frames, num_patches, x.new_ones(x.shape[0], 1 + num_patches, 1))
        else:
            cls = x[::num_frames, :1]  # [B, 1, D]
            patches = rearrange(x[:, 1:], "(b t) l d -> b l t d", b=batch)
            time_embed = resize_along_time(self.time_embed, num_frames)  # [1, T, D]
            patches = patches + time_embed[:, None]  # [B, L, T, D]
            x = torch.cat([cls, rearrange(patches, "b l t d -> b (l t) d")], dim=1)
            state = self._initial_state(x, batch, num_frames, num_patches, track_source)
        if trace:
            state.trace = []

        for block, (r_frame, r_patch), ckpt in list(zip(self.blocks, self.plan, self.checkpointed))[:num_blocks]:
            if ckpt and torch.is_grad_enabled():
                x, state = checkpoint(block, x, state, r_frame, r_patch, use_reentrant=False)
            else:
                x, state = block(x, state, r_frame, r_patch)
        x = self.norm(x)
        if self.attention_type == "space_only":
            x = rearrange(x, "(b t) l d -> b (t l) d", b=batch)
        return x, state

    def _initial_state(self, x: torch.Tensor, batch: int, num_frames: int, num_patches: int,
                       track_source: bool) -> TokenState:
        if self.attention_type == "joint_space_time":
            state = TokenState(num_frames, num_patches, x.new_ones(batch, x.shape[1], 1))
            if track_source:
                # token 1 + l*T + t stands for original patch t*L + l
                eye = torch.eye(num_frames * num_patches, dtype=x.dtype, device=x.device)
                source = rearrange(eye, "(t l) s -> (l t) s", t=num_frames)
                source = torch.cat([source.new_zeros(1, source.shape[1]), source])  # [1+N, S]
                state.source = source.expand(batch, -1, -1)
            return state
        state = TokenState(num_frames, num_patches,
                           x.new_ones(batch, num_frames, 1 + num_patches, 1))
        if track_source:
            eye = torch.eye(num_frames * num_patches, dtype=x.dtype, device=x.device)
            source = rearrange(eye, "(t l) s -> t l s", t=num_frames)
            state.source = _with_class_slot(source[None], 0).expand(batch, -1, -1, -1)
            state.frame_source = torch.eye(num_frames, dtype=x.dtype, device=x.device).expand(
                batch, -1, -1)
        return state

    def _pos_embed(self, grid: Tuple[int, int]) -> torch.Tensor:
        """`pos_embed` for a patch grid, nearest-resized on the 2-D grid when it differs."""
        if grid[0] * grid[1] == self.num_patches:
            return self.pos_embed
        return resize_patch_grid(self.pos_embed, grid, mode="nearest")


def _check_settings(image_size: int, patch_size: int, num_frames: int, embed_dim: int,
                    num_heads: int, attention_type: str, aggregation: str) -> None:
    if attention_type not in ATTENTION_TYPES:
        raise ValueError(f"attention_type {attention_type!r} is not one of {', '.join(ATTENTION_TYPES)}")
    if aggregation not in AGGREGATION_RULES:
        raise ValueError(f"aggregation {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
    if patch_size <= 0 or image_size < patch_size or image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a positive multiple of patch_size {patch_size}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if embed_dim % num_heads:
        raise ValueError(f"vision_width {embed_dim} is not divisible by num_heads {num_heads}")


def _aggregation_plan(token_merging: bool, testa_r, merging_type, attention_type: str,
                      depth: int, num_frames: int, num_patches: int
                      ) -> Tuple[bool, List[Tuple[int, int]]]:
    """Whether the class token is protected, and `(r_frame, r_patch)` for every block.

    Divided attention consumes `testa_r` one entry per aggregation operation, in block
    order and frame before patch; joint and space-only attention merge once per block.
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


@VIDEO_ENCODER_SETTINGS.check
def video_encoder_problem(config: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """Why the encoder settings of `config` do not fit together, as (key, problem), or
    None: the checks of the constructor, without building anything. Every problem
    begins with the name of the key it is about."""
    config = with_defaults(config, VIDEO_ENCODER_SETTINGS)
    try:
        _check_settings(config["image_size"], config["patch_size"], config["num_frames"],
                        config["vision_width"], config["num_heads"], config["attention_type"],
                        config["aggregation"])
        _aggregation_plan(config["token_merging"], config["testa_r"], config["merging_type"],
                          config["attention_type"], config["depth"], config["num_frames"],
                          (config["image_size"] // config["patch_size"]) ** 2)
    except ValueError as err:
        problem = str(err)
        return problem.split(" ", 1)[0], problem
    return None


def build_video_encoder(config: Mapping[str, Any]) -> VideoEncoder:
    """The video encoder from the YAML config keys of the paper's configs
    (`VIDEO_ENCODER_SETTINGS`; keys the config leaves out take their defaults)."""
    config = with_defaults(config, VIDEO_ENCODER_SETTINGS)
    return VideoEncoder(
        image_size=config["image_size"],
        patch_size=config["patch_size"],
        num_frames=config["num_frames"],
        embed_dim=config["vision_width"],
        depth=config["depth"],
        num_heads=config["num_heads"],
        attention_type=config["attention_type"],
        learnable_temporal_scaling=config["learnable_temporal_scaling"],
        token_merging=config["token_merging"],
        testa_r=config["testa_r"],
        merging_type=config["merging_type"],
        aggregation=config["aggregation"],
        prop_attn=config["prop_attn"],
        testa_threshold=config["testa_threshold"],
        grad_ckpt=config["vit_grad_ckpt"],
        ckpt_layer=config["vit_ckpt_layer"],
    )
