"""The BLIP base that retrieval and pre-training share, and their shared losses.

`MomentumVideoTextModel` holds the video and text towers, the projections to the
`embed_dim` space, the ITM head, the temperature and the momentum copies of the towers
(pairs `<tower>` / `<tower>_m`). The losses: contrastive with momentum distillation over
the feature queues (VTC), and matching with hard negatives (VTM).
"""
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.collectives import (all_gather_with_grad, all_reduce_max, concat_all_gather,
                                is_distributed)
from models.text import (TEXT_SETTINGS, build_text_config, build_text_encoder,
                         build_tokenizer, encode_grounded, encode_text_only, tokenize,
                         with_first_token)
from models.text_guided import TokenSelection, selection_of
from models.video_encoder import (VIDEO_ENCODER_SETTINGS, build_video_encoder, pad_tokens,
                                  pool_tokens)
from utils import CAPTION_SETTINGS, NUMBER, Setting, Settings, with_defaults

MOMENTUM_SETTINGS = Settings(title="Momentum model and queues", module=__name__, settings={
    "embed_dim": Setting(int, 256, "width of the video-text similarity space", min=1),
    "queue_size": Setting(int, 57600, "features kept in each queue (a multiple of the global "
                          "batch)", min=1),
    "momentum": Setting(NUMBER, 0.995, "momentum of the momentum towers", min=0, max=1),
    "alpha": Setting(NUMBER, 0.4, "distillation weight of the momentum targets", min=0, max=1),
})
BLIP_BASE_SETTINGS: Settings = {**VIDEO_ENCODER_SETTINGS, **TEXT_SETTINGS, **MOMENTUM_SETTINGS,
                                **CAPTION_SETTINGS}


class MomentumVideoTextModel(nn.Module):
    """Video encoder, text encoder, projections, ITM head, temperature, momentum towers."""

    momentum_towers = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")
    # its top-level parts -> what they are for (load reports say why a file's copy goes
    # unused by a model without the part)
    part_roles = {"visual_encoder": "video encoder", "text_encoder": "text encoder",
                  "vision_proj": "contrastive projection", "text_proj": "contrastive projection",
                  "itm_head": "video-text matching head", "temp": "contrastive temperature",
                  **{f"{tower}_m": f"momentum copy of {tower} (used only in training with "
                                   "distillation)" for tower in momentum_towers}}

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        config = with_defaults(config, BLIP_BASE_SETTINGS)
        self.tokenizer = build_tokenizer(config["text_encoder"])
        text_config = build_text_config(config, self.tokenizer)
        embed_dim = config["embed_dim"]
        self.max_words = config["max_words"]
        self.momentum = config["momentum"]
        self.text_guided = selection_of(config)  # None: every pair attends to all tokens

        self.visual_encoder = build_video_encoder(config)
        self.text_encoder = build_text_encoder(text_config, config["text_init"])
        vision_width, text_width = self.visual_encoder.embed_dim, text_config.hidden_size
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))

        self.visual_encoder_m = build_video_encoder(config)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = build_text_encoder(text_config)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self.copy_to_momentum()

    def encode_video(self, video: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """video `[B, 3, T, H, W]` -> (feature `[B, E]` L2-normalised from the mean of the
        tokens, all tokens `[B, N, D]`, which tokens hold content `[B, N]` or None if all:
        adaptive aggregation pads the videos that kept fewer tokens)."""
        video_embeds, video_mask = self.visual_encoder.forward_with_mask(video)
        video_feat = F.normalize(self.vision_proj(pool_tokens(video_embeds, video_mask)), dim=-1)
        return video_feat, video_embeds, video_mask

    def tokenize(self, captions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """captions -> (input_ids, attention_mask) `[B, max_words]` on the model's device."""
        return tokenize(self.tokenizer, captions, self.temp.device, max_length=self.max_words,
                        padding="max_length")

    def encode_text(self, captions: Sequence[str]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions -> (feature `[B, E]` L2-normalised from `[CLS]`, input_ids `[B, S]`,
        attention_mask `[B, S]`)."""
        input_ids, attention_mask = self.tokenize(captions)
        text_embeds = encode_text_only(self.text_encoder, input_ids, attention_mask)
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)
        return text_feat, input_ids, attention_mask

    def itm_logits(self, video_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, video_mask: Optional[torch.Tensor] = None,
                   selection: Optional[TokenSelection] = None) -> torch.Tensor:
        """Match scores `[K, 2]` of K (video tokens `[K, N, D]` with their content mask
        `[K, N]` or None, text `[K, S]`) pairs: the video-grounded encoder with `[ENC]`
        first, ITM head on its first output. One video against K texts: tokens `[1, N, D]`
        and mask `[1, N]`; each layer's cross-attention then projects the video's tokens
        to keys and values once and attends with the K texts' queries as one block of
        rows (what re-ranking does; the scores equal those of K copies of the video).
        `selection`: the text-guided token selection of each pair (default: the config's
        `text_guided_k`, `self.text_guided`)."""
        input_ids = with_first_token(input_ids, self.tokenizer.enc_token_id)
        grounded = encode_grounded(self.text_encoder, input_ids, attention_mask, video_embeds,
                                   video_mask, selection or self.text_guided)
        return self.itm_head(grounded[:, 0])

    def clamp_temperature(self) -> None:
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

    @torch.no_grad()
    def momentum_features(self, video: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(video feature `[B, E]`, text feature `[B, E]`) from the momentum towers."""
        video_embeds, video_mask = self.visual_encoder_m.forward_with_mask(video)
        video_feat = F.normalize(self.vision_proj_m(pool_tokens(video_embeds, video_mask)), dim=-1)
        text_embeds = encode_text_only(self.text_encoder_m, input_ids, attention_mask)
        text_feat = F.normalize(self.text_proj_m(text_embeds[:, 0]), dim=-1)
        return video_feat, text_feat

    def _tower_pairs(self):
        for name in self.momentum_towers:
            yield getattr(self, name), getattr(self, name + "_m")

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        """Momentum towers := main towers; they take no gradient."""
        for tower, tower_m in self._tower_pairs():
            tower_m.load_state_dict(tower.state_dict())
            tower_m.requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """`p_m <- momentum * p_m + (1 - momentum) * p` for every tower parameter."""
        params, params_m = [], []
        for tower, tower_m in self._tower_pairs():
            params += [param.detach() for param in tower.parameters()]
            params_m += list(tower_m.parameters())
        torch._foreach_mul_(params_m, self.momentum)  # one fused kernel per list, not per tensor
        torch._foreach_add_(params_m, params, alpha=1.0 - self.momentum)

    def matching_loss(self, video_embeds: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, negatives: "HardNegatives",
                      video_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """VTM cross-entropy over B positive pairs, B' (text, negative video) pairs and
        B' (negative text, video) pairs, B' the rows that have a negative (all B, unless
        the batch holds a video several times and the pool has nothing else)."""
        batch = video_embeds.shape[0]
        if video_mask is not None:  # the negatives may come padded to more slots
            video_embeds, video_mask = pad_tokens(video_embeds, video_mask,
                                                  negatives.video_embeds.shape[1])
        neg_videos, neg_ids, neg_masks, neg_video_masks = (
            negatives.video_embeds, negatives.input_ids, negatives.attention_mask, negatives.video_mask)
        pos_videos, pos_ids, pos_masks, pos_video_masks = video_embeds, input_ids, attention_mask, video_mask
        if not bool(negatives.has_negative.all()):  # leave out the placeholders
            keep = negatives.has_negative
            neg_videos, neg_ids, neg_masks = neg_videos[keep], neg_ids[keep], neg_masks[keep]
            pos_videos, pos_ids, pos_masks = video_embeds[keep], input_ids[keep], attention_mask[keep]
            if video_mask is not None:
                neg_video_masks, pos_video_masks = neg_video_masks[keep], video_mask[keep]
        num_negative = neg_videos.shape[0]
        videos = torch.cat([video_embeds, neg_videos, pos_videos])  # [B + 2B', N, D]
        texts = torch.cat([input_ids, pos_ids, neg_ids])  # [B + 2B', S]
        masks = torch.cat([attention_mask, pos_masks, neg_masks])
        video_masks = (None if video_mask is None
                       else torch.cat([video_mask, neg_video_masks, pos_video_masks]))
        logits = self.itm_logits(videos, texts, masks, video_masks)  # [B + 2B', 2]
        labels = torch.cat([torch.ones(batch, dtype=torch.long, device=logits.device),
                            torch.zeros(2 * num_negative, dtype=torch.long, device=logits.device)])
        return F.cross_entropy(logits, labels)


# losses and queues ---------------------------------------------------------------------
def momentum_contrastive_loss(video_feat: torch.Tensor, text_feat: torch.Tensor,
                              video_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
                              video_queue: torch.Tensor, text_queue: torch.Tensor,
                              targets: torch.Tensor, alpha: float, temp: torch.Tensor
                              ) -> torch.Tensor:
    """Video-text contrastive loss with momentum distillation, in float32 or wider.

    Features `[B, E]` (momentum ones `*_m` without gradient), queues `[E, Q]`, targets
    `[B, B+Q]` (rows sum to 1); each direction's soft target is
    `alpha * softmax(momentum similarities) + (1 - alpha) * targets`.
    """
    dtype = torch.promote_types(video_feat.dtype, torch.float32)  # float64 runs stay float64
    video_feat, text_feat, video_feat_m, text_feat_m = (
        feat.to(dtype) for feat in (video_feat, text_feat, video_feat_m, text_feat_m))
    with torch.autocast(device_type=video_feat.device.type, enabled=False):
        video_bank = torch.cat([video_feat_m.t(), video_queue.to(dtype)], dim=1)  # [E, B+Q]
        text_bank = torch.cat([text_feat_m.t(), text_queue.to(dtype)], dim=1)  # [E, B+Q]
        with torch.no_grad():
            v2t_targets = alpha * F.softmax(video_feat_m @ text_bank / temp, dim=1) \
                + (1 - alpha) * targets
            t2v_targets = alpha * F.softmax(text_feat_m @ video_bank / temp, dim=1) \
                + (1 - alpha) * targets
        v2t_logits = video_feat @ text_bank / temp  # [B, B+Q]
        t2v_logits = text_feat @ video_bank / temp
        loss_v2t = -(F.log_softmax(v2t_logits, dim=1) * v2t_targets).sum(dim=1).mean()
        loss_t2v = -(F.log_softmax(t2v_logits, dim=1) * t2v_targets).sum(dim=1).mean()
    return (loss_v2t + loss_t2v) / 2


def register_queues(model: nn.Module, embed_dim: int, queue_size: int, *, pointer: str,
                    with_video_index: bool = False) -> None:
    """Buffers `image_queue` and `text_queue` `[E, Q]` (random unit columns), with
    `with_video_index` an `idx_queue` `[1, Q]` (-100: empty), and the write pointer `[1]`
    under the name `pointer` (the released checkpoints call it `ptr_queue` in retrieval
    and `queue_ptr` in pre-training)."""
    model.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
    model.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
    if with_video_index:
        model.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
    model.register_buffer(pointer, torch.zeros(1, dtype=torch.long))


@torch.no_grad()
def enqueue(queues: Sequence[torch.Tensor], columns: Sequence[torch.Tensor],
            ptr: torch.Tensor) -> None:
    """Write `columns[i]` `[M, C_i]` (the whole world's batch) into `queues[i]` `[C_i, Q]`
    at the pointer, then advance the pointer `[1]` by M modulo Q."""
    batch, queue_size = columns[0].shape[0], queues[0].shape[1]
    if queue_size % batch:
        raise ValueError(f"queue_size {queue_size} is not a multiple of the global batch size "
                         f"{batch} (batch per process x processes); change queue_size or the batch")
    start = int(ptr)
    for queue, column in zip(queues, columns):
        queue[:, start:start + batch] = column.t()
    ptr[0] = (start + batch) % queue_size


@dataclass
class NegativePool:
    """Hard-negative candidates: this process's batch or, `gathered()`, every rank's.

    video_embeds `[M, N, D]` (carries gradient), video_feat / text_feat `[M, E]`,
    input_ids / attention_mask `[M, S]`, idx `[M]` (video index of each pair),
    video_mask `[M, N]` (tokens with content; None: all).
    """
    video_embeds: torch.Tensor
    video_feat: torch.Tensor
    text_feat: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    idx: torch.Tensor
    video_mask: Optional[torch.Tensor] = None

    def gathered(self) -> "NegativePool":
        video_embeds, video_mask = self.video_embeds, self.video_mask
        if video_mask is not None and is_distributed():  # ranks may keep different token counts
            length = torch.tensor(video_embeds.shape[1], device=video_embeds.device)
            all_reduce_max(length)
            video_embeds, video_mask = pad_tokens(video_embeds, video_mask, int(length))
        return NegativePool(all_gather_with_grad(video_embeds),
                            concat_all_gather(self.video_feat), concat_all_gather(self.text_feat),
                            concat_all_gather(self.input_ids),
                            concat_all_gather(self.attention_mask), concat_all_gather(self.idx),
                            None if video_mask is None else concat_all_gather(video_mask))


@dataclass
class HardNegatives:
    """One negative video for each text and one negative text for each video, for the
    rows of the batch that have a negative at all.

    video_embeds `[B, N, D]`, input_ids / attention_mask `[B, S]`; has_negative `[B]`:
    False where every pool entry shares the row's video index (the entries of that row
    are placeholders and take no part in the loss); video_mask `[B, N]` (tokens with
    content; None: all).
    """
    video_embeds: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    has_negative: torch.Tensor
    video_mask: Optional[torch.Tensor] = None


def pick_hard_negatives(video_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor,
                        pool: NegativePool, temp: torch.Tensor) -> HardNegatives:
    """Sample from `pool` a negative video per text (by text-video similarity) and a
    negative text per video (by video-text similarity); same-index entries never. A row
    whose every pool entry shares its index (a batch holding one video twice) has no
    negative: `has_negative` is False there."""
    with torch.no_grad():
        is_positive = idx[:, None] == pool.idx[None]  # [B, M]
        video_for_text = sample_negatives(text_feat @ pool.video_feat.t() / temp, is_positive)
        text_for_video = sample_negatives(video_feat @ pool.text_feat.t() / temp, is_positive)
    return HardNegatives(pool.video_embeds[video_for_text], pool.input_ids[text_for_video],
                         pool.attention_mask[text_for_video], ~is_positive.all(dim=1),
                         None if pool.video_mask is None else pool.video_mask[video_for_text])


def sample_negatives(sim: torch.Tensor, is_positive: torch.Tensor) -> torch.Tensor:
    """One column per row of `sim [B, M]`, drawn with probability softmax(sim) over the
    columns where `is_positive [B, M]` is False -> indices `[B]`. A row without such a
    column draws from all its columns (a placeholder the caller leaves out). NaN
    similarities (a model gone non-finite) count as 0, so that the draw succeeds and the
    training loop reports the non-finite loss."""
    no_negative = is_positive.all(dim=1, keepdim=True)  # [B, 1]
    weights = sim.float().nan_to_num(nan=0.0).masked_fill(is_positive & ~no_negative, float("-inf")).softmax(dim=1)
    return torch.multinomial(weights, 1).squeeze(1)
