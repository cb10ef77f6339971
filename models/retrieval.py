"""Video-text retrieval model: VTC with momentum distillation and VTM with hard negatives,
on the BLIP base (models/blip_base.py), with feature queues that carry video indices."""
from typing import Any, Mapping, Sequence, Tuple

import torch

from models.collectives import concat_all_gather
from models.blip_base import (BLIP_BASE_SETTINGS, MomentumVideoTextModel, NegativePool,
                              enqueue, momentum_contrastive_loss, pick_hard_negatives,
                              register_queues)
from utils import Setting, Settings, with_defaults

RETRIEVAL_MODEL_SETTINGS = Settings(title="Retrieval model", module=__name__, settings={
    "negative_all_rank": Setting(bool, False, "mine hard negatives from every rank's batch"),
})


class RetrievalModel(MomentumVideoTextModel):
    """TESTA retrieval: `forward(video, caption, alpha, idx) -> (loss_vtc, loss_vtm)`.

    Pairs with the same video index count as positives, in the batch and in the queue.
    """

    kind = "retrieval"  # how load reports name it

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        config = with_defaults(config, {**BLIP_BASE_SETTINGS, **RETRIEVAL_MODEL_SETTINGS})
        self.negative_all_rank = config["negative_all_rank"]
        register_queues(self, config["embed_dim"], config["queue_size"], pointer="ptr_queue",
                        with_video_index=True)

    def forward(self, video: torch.Tensor, caption: Sequence[str], alpha: float,
                idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """video `[B, 3, T, H, W]`, B captions, distillation weight alpha, video indices
        `[B]` -> (loss_vtc, loss_vtm)."""
        self.clamp_temperature()
        idx = idx.view(-1).to(self.idx_queue.device)
        video_feat, video_embeds, video_mask = self.encode_video(video)
        text_feat, input_ids, attention_mask = self.encode_text(caption)

        with torch.no_grad():
            self.momentum_update()
            video_feat_m, text_feat_m = self.momentum_features(video, input_ids, attention_mask)
            is_positive = idx[:, None] == torch.cat([idx, self.idx_queue[0]])[None]  # [B, B+Q]
            targets = is_positive.float() / is_positive.sum(dim=1, keepdim=True)
        loss_vtc = momentum_contrastive_loss(video_feat, text_feat, video_feat_m, text_feat_m,
                                             self.image_queue, self.text_queue, targets,
                                             alpha, self.temp)
        enqueue((self.image_queue, self.text_queue, self.idx_queue),
                (concat_all_gather(video_feat_m), concat_all_gather(text_feat_m),
                 concat_all_gather(idx)[:, None]),
                self.ptr_queue)

        pool = NegativePool(video_embeds, video_feat.detach(), text_feat.detach(), input_ids,
                            attention_mask, idx, video_mask)
        if self.negative_all_rank:
            pool = pool.gathered()
        negatives = pick_hard_negatives(video_feat.detach(), text_feat.detach(), idx, pool,
                                        self.temp.detach())
        loss_vtm = self.matching_loss(video_embeds, input_ids, attention_mask, negatives,
                                      video_mask)
        return loss_vtc, loss_vtm


def build_retrieval_model(config: Mapping[str, Any]) -> RetrievalModel:
    """The retrieval model from a config dict (the keys of configs/retrieval_*.yaml)."""
    return RetrievalModel(config)
