"""The video encoder's cost: multiply-accumulates (GMACs) and token counts of one forward.

`count` runs the encoder on the meta device under torch's FLOP counter (no computation);
`traced_gmacs` counts the same terms from the sizes a divided-attention encoder traced,
per video, counting only the tokens that hold content, so that adaptive aggregation's
content-dependent cost is measured. Every shape comes from the encoder itself.
"""
from typing import Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.video_encoder import VIDEO_ENCODER_SETTINGS, VideoEncoder, build_video_encoder
from utils import with_defaults


def encoder_config(config: dict, frames: Optional[int], aggregate: bool) -> dict:
    """`config` with the encoder defaults, aggregation on only if `aggregate` and the
    config's `token_merging`, and `frames` input frames (default: the config's)."""
    config = with_defaults(config, VIDEO_ENCODER_SETTINGS)
    config["token_merging"] = aggregate and config["token_merging"]
    if frames is not None:
        config["num_frames"] = frames
    return config


def video_shape(config: dict, batch: int = 1) -> tuple:
    size = config["image_size"]
    return (batch, 3, config["num_frames"], size, size)


def _rounded(gmacs: float, decimals: Optional[int]) -> float:
    return gmacs if decimals is None else round(gmacs, decimals)


def count(config: dict, decimals: Optional[int] = 1) -> Dict[str, float]:
    """GMACs (rounded to `decimals`; None: unrounded) and token counts of one forward,
    on the meta device."""
    with torch.device("meta"):
        encoder = build_video_encoder(config)
        video = torch.empty(video_shape(config))
        with FlopCounterMode(display=False) as counter:
            tokens = encoder(video)
    tokens_in = 1 + config["num_frames"] * (config["image_size"] // config["patch_size"]) ** 2
    return {"gmacs": _rounded(counter.get_total_flops() / 2e9, decimals),
            "tokens_in": tokens_in, "tokens_out": tokens.shape[1]}


def _matching_macs(tokens: torch.Tensor, head_dim: int) -> torch.Tensor:
    """MACs of bipartite matching scores over `tokens` live tokens (|A| x |B| x Dh)."""
    return (tokens + 1).div(2, rounding_mode="floor") * tokens.div(2, rounding_mode="floor") * head_dim


def traced_gmacs(encoder: VideoEncoder, size_trace: List[torch.Tensor]) -> List[float]:
    """GMACs of one forward of a divided-attention `encoder` for every video of a batch,
    counting only the tokens that hold content (size > 0), from the sizes it traced
    (`forward_with_state(..., size_trace=[])`: per block, the sizes its temporal attention,
    spatial attention and MLP saw); matching is counted where something can merge. The
    same terms as the FLOP counter: linear layers, attention products (QK^T and AV),
    matching scores and the patch embedding; norms and softmax are free."""
    dim, block = encoder.embed_dim, encoder.blocks[0]
    hidden = block.mlp.fc1.out_features
    head_dim = dim // block.attn.num_heads
    reserved = int(encoder.class_token)
    first = size_trace[0]  # [B, T0, 1+L0, 1]
    frames, patches = first.shape[1], first.shape[2] - 1
    embed_macs = frames * patches * encoder.patch_embed.proj.weight.numel()
    macs = torch.full((first.shape[0],), float(embed_macs), dtype=torch.float64)
    for temporal, spatial, mlp, (r_frame, r_patch) in zip(
            size_trace[0::3], size_trace[1::3], size_trace[2::3], encoder.plan):
        live = temporal[:, :, 1:, 0] > 0  # [B, T, L]
        per_position = live.sum(dim=1).double()  # [B, L]: frames each temporal attention sees
        # qkv, proj and temporal_fc: 5 dim x dim products per token
        macs += live.sum(dim=(1, 2)) * 5 * dim * dim + 2 * dim * per_position.square().sum(dim=1)
        live_frames = live.any(dim=2).sum(dim=1)  # [B]
        if r_frame > 0:
            can_merge = live_frames - reserved >= 2
            macs += _matching_macs(per_position, head_dim).sum(dim=1) * can_merge
        live = spatial[:, :, 1:, 0] > 0
        per_frame = (1 + live.sum(dim=2).double()) * live.any(dim=2)  # [B, T]: frames with content
        macs += per_frame.sum(dim=1) * 4 * dim * dim + 2 * dim * per_frame.square().sum(dim=1)
        if r_patch > 0:
            can_merge = per_frame - reserved >= 2
            macs += (_matching_macs(per_frame, head_dim) * can_merge).sum(dim=1)
        macs += (1 + (mlp[:, :, 1:, 0] > 0).sum(dim=(1, 2))) * 2 * dim * hidden
    return (macs / 1e9).tolist()


@torch.no_grad()
def content_cost(encoder: VideoEncoder, video: torch.Tensor) -> Dict[str, list]:
    """Per video of `video [B, 3, T, H, W]` (divided attention): `gmacs` (`traced_gmacs`)
    and `tokens_out`, the output tokens that hold content."""
    trace: List[torch.Tensor] = []
    tokens, state = encoder.forward_with_state(video, size_trace=trace)
    mask = state.content_mask()
    kept = [tokens.shape[1]] * tokens.shape[0] if mask is None else mask.sum(dim=1).tolist()
    return {"gmacs": traced_gmacs(encoder, trace), "tokens_out": kept}


def count_on_video(config: dict, video: torch.Tensor, seed: int, decimals: Optional[int] = 1
                   ) -> Dict[str, float]:
    """GMACs (rounded to `decimals`; None: unrounded) and token counts of one forward on
    `video [1, 3, T, H, W]` with random weights (`seed`), counting tokens with content."""
    config = with_defaults(config, VIDEO_ENCODER_SETTINGS)
    if config["attention_type"] != "divided_space_time":
        return count(config, decimals)  # no content-dependent modes there
    torch.manual_seed(seed)
    cost = content_cost(build_video_encoder(config).eval(), video)
    tokens_in = 1 + video.shape[2] * (video.shape[3] // config["patch_size"]) ** 2
    return {"gmacs": _rounded(cost["gmacs"][0], decimals), "tokens_in": tokens_in,
            "tokens_out": int(cost["tokens_out"][0])}


def fixed_r1_at(gmacs: float, fixed: Dict[str, dict]) -> Optional[float]:
    """The text-to-video R@1 of fixed r at `gmacs` mean GMACs, linear between the two fixed
    settings around it (`fixed`: name -> {"gmacs_mean", "t2v_r1"}); None outside them."""
    points = sorted((stats["gmacs_mean"], stats["t2v_r1"]) for stats in fixed.values())
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= gmacs <= x1:
            return y0 if x1 == x0 else round(y0 + (y1 - y0) * (gmacs - x0) / (x1 - x0), 2)
    return None


def compare_at_equal_gmacs(fixed: Dict[str, dict], adaptive: Dict[str, dict]) -> Dict[str, dict]:
    """Per adaptive setting (name -> {"gmacs_mean", "t2v_r1"}): its R@1 next to fixed r's
    at the same mean GMACs, and its GMACs next to the cheapest fixed setting that reaches
    its R@1."""
    comparison = {}
    for name, stats in adaptive.items():
        reaching = [s["gmacs_mean"] for s in fixed.values() if s["t2v_r1"] >= stats["t2v_r1"]]
        comparison[name] = {
            "t2v_r1": stats["t2v_r1"], "gmacs_mean": stats["gmacs_mean"],
            "fixed_t2v_r1_at_equal_gmacs": fixed_r1_at(stats["gmacs_mean"], fixed),
            "fixed_gmacs_at_equal_r1": min(reaching) if reaching else None}
    return comparison
