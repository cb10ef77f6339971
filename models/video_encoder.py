"""TimeSformer video encoder with TESTA temporal and spatial token aggregation.

Tokens between blocks are `[B, 1 + L*T, D]` with their `TokenState` (models/token_state.py);
each block (models/blocks.py) attends over time, may merge frames, attends over space, may
merge patches, then applies its MLP (docs/computation.md, section 2). Aggregation is part
of every block and is switched by the per-block plan built from the config
(`aggregation_plan`). The embedding and its resizing follow `forward_features` in TESTA's
testa/patch/timesformer.py (github.com/RenShuhuai-Andy/TESTA, BSD-3-Clause).
"""
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import PatchEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.aggregation import AGGREGATION_RULES, AGGREGATIONS
from models.blocks import Block
from models.resize import resize_along_time, resize_patch_grid
from models.token_state import TokenState, aggregation_plan, initial_state, parse_threshold
from utils import FRAME_SETTINGS, NONE, Setting, Settings, with_defaults

ATTENTION_TYPES = ("divided_space_time", "joint_space_time", "space_only")

VIDEO_ENCODER_SETTINGS = Settings(title="Video encoder", module=__name__, settings={
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
        self.class_token, self.plan = aggregation_plan(
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
                  learnable_temporal_scaling, aggregation, self.class_token, prop_attn, threshold)
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
            for block in self.blocks[1:]:  # block 0 keeps its random temporal_fc (vit.py)
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
        return tokens, state.content_mask()

    def forward_with_state(self, video: torch.Tensor, track_source: bool = False,
                           num_blocks: Optional[int] = None,
                           size_trace: Optional[List[torch.Tensor]] = None
                           ) -> Tuple[torch.Tensor, TokenState]:
        """Tokens and their `TokenState` (sizes, and sources if `track_source`) after
        `num_blocks` blocks (default all) and the final norm; `size_trace`, a list, receives
        the sizes every attention and MLP saw (see `Block.forward`)."""
        batch, _, num_frames, height, width = video.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"video frames of {height}x{width} px do not fit the "
                             f"{self.patch_size}-px patch grid")
        grid = (height // self.patch_size, width // self.patch_size)
        x = self.patch_embed(rearrange(video, "b c t h w -> (b t) c h w"))  # [(B*T), L, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self._pos_embed(grid)  # [(B*T), 1+L, D]
        num_patches = grid[0] * grid[1]

        if self.attention_type != "space_only":
            cls = x[::num_frames, :1]  # [B, 1, D]
            patches = rearrange(x[:, 1:], "(b t) l d -> b l t d", b=batch)
            time_embed = resize_along_time(self.time_embed, num_frames)  # [1, T, D]
            patches = patches + time_embed[:, None]  # [B, L, T, D]
            x = torch.cat([cls, rearrange(patches, "b l t d -> b (l t) d")], dim=1)
        state = initial_state(self.attention_type, x, batch, num_frames, num_patches,
                              track_source, has_empty_slots=self.adaptive)

        for block, (r_frame, r_patch), ckpt in list(zip(self.blocks, self.plan, self.checkpointed))[:num_blocks]:
            if ckpt and torch.is_grad_enabled():
                x, state = checkpoint(block, x, state, r_frame, r_patch, size_trace,
                                      use_reentrant=False)
            else:
                x, state = block(x, state, r_frame, r_patch, size_trace)
        x = self.norm(x)
        if self.attention_type == "space_only":
            x = rearrange(x, "(b t) l d -> b (t l) d", b=batch)
        return x, state

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
        aggregation_plan(config["token_merging"], config["testa_r"], config["merging_type"],
                          config["attention_type"], config["depth"], config["num_frames"],
                          (config["image_size"] // config["patch_size"]) ** 2)
        if config["token_merging"]:
            parse_threshold(config["testa_threshold"])  # a [frame, patch] pair, each in [-1, 1]
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
