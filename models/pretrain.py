"""Video-language pre-training model: VTC + VTM + captioning (CAP), BLIP style.

The caption decoder shares every module with the text encoder except its
self-attention layers; the state dict still lists both `text_encoder.*` and
`text_decoder.*`, as BLIP and TESTA checkpoints do.
"""
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch

from models.collectives import concat_all_gather
from models.blip_base import (BLIP_BASE_SETTINGS, MomentumVideoTextModel, NegativePool,
                              enqueue, momentum_contrastive_loss, pick_hard_negatives,
                              register_queues)
from models.text import build_text_decoder, tie_decoder_to_encoder, with_first_token
from utils import with_defaults


class PretrainModel(MomentumVideoTextModel):
    """`forward(video, caption, alpha) -> (loss_vtc, loss_vtm, loss_cap)`.

    Each video's only positive is its own caption; hard negatives come from this
    process's batch.
    """

    kind = "pre-training"  # how load reports name it
    part_roles = {**MomentumVideoTextModel.part_roles, "text_decoder": "captioning decoder"}

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        config = with_defaults(config, BLIP_BASE_SETTINGS)
        self.text_decoder = build_text_decoder(self.text_encoder.config, config["text_init"])
        tie_decoder_to_encoder(self.text_encoder, self.text_decoder)
        register_queues(self, config["embed_dim"], config["queue_size"], pointer="queue_ptr")

    def forward(self, video: torch.Tensor, caption: Sequence[str], alpha: float
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """video `[B, 3, T, H, W]`, B captions, distillation weight alpha ->
        (loss_vtc, loss_vtm, loss_cap)."""
        self.clamp_temperature()
        video_feat, video_embeds, video_mask = self.encode_video(video)
        text_feat, input_ids, attention_mask = self.encode_text(caption)
        batch = video_feat.shape[0]

        with torch.no_grad():
            self.momentum_update()
            video_feat_m, text_feat_m = self.momentum_features(video, input_ids, attention_mask)
            queue_size = self.image_queue.shape[1]
            targets = torch.eye(batch, batch + queue_size, device=video_feat.device)  # [B, B+Q]
        loss_vtc = momentum_contrastive_loss(video_feat, text_feat, video_feat_m, text_feat_m,
                                             self.image_queue, self.text_queue, targets,
                                             alpha, self.temp)
        enqueue((self.image_queue, self.text_queue),
                (concat_all_gather(video_feat_m), concat_all_gather(text_feat_m)), self.queue_ptr)

        own_index = torch.arange(batch, device=video_feat.device)
        pool = NegativePool(video_embeds, video_feat_m, text_feat_m, input_ids, attention_mask,
                            own_index, video_mask)
        negatives = pick_hard_negatives(video_feat.detach(), text_feat.detach(), own_index, pool,
                                        self.temp.detach())
        loss_vtm = self.matching_loss(video_embeds, input_ids, attention_mask, negatives,
                                      video_mask)

        loss_cap = self.caption_loss(video_embeds, input_ids, attention_mask, video_mask)
        return loss_vtc, loss_vtm, loss_cap

    def caption_loss(self, video_embeds: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, video_mask: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
        """Label-smoothed LM loss of the captions `[B, S]` (`[DEC]` first, padding
        ignored) given the video tokens `[B, N, D]` (those of `video_mask [B, N]`)."""
        decoder_ids = with_first_token(input_ids, self.tokenizer.bos_token_id)
        labels = decoder_ids.masked_fill(decoder_ids == self.tokenizer.pad_token_id, -100)
        output = self.text_decoder(decoder_ids, attention_mask=attention_mask,
                                   encoder_hidden_states=video_embeds,
                                   encoder_attention_mask=video_mask, labels=labels)
        return output.loss


def build_pretrain_model(config: Mapping[str, Any]) -> PretrainModel:
    """The pre-training model from a config dict (the keys of configs/pretrain_*.yaml)."""
    return PretrainModel(config)
