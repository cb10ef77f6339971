"""Long-form VideoQA model: video-grounded question encoder and answer decoder (BLIP VQA).

Training minimises the weighted NLL of each question's answers. Inference either ranks
a candidate answer list (top-k by first-token probability, then re-scored by the
whole answer's likelihood) or generates an answer with beam search.
"""
from typing import Any, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from einops import rearrange
from torch import nn

from models.text import (TEXT_SETTINGS, build_text_config, build_text_decoder,
                         build_text_encoder, build_tokenizer, encode_grounded, tokenize,
                         with_first_token)
from models.text_guided import selection_of
from models.video_encoder import VIDEO_ENCODER_SETTINGS, build_video_encoder
from utils import QUESTION_SETTINGS, with_defaults


class RankedAnswers(NamedTuple):
    """What `VideoQAModel.rank_answers` ranked by; indices point into the answer list."""
    best: torch.Tensor  # [B]: the chosen answer of each question
    candidates: torch.Tensor  # [B, k]: the k answers with the likeliest first token, likeliest first
    first_token_probs: torch.Tensor  # [B, k]: p(first token | [DEC], question) of each candidate
    scores: torch.Tensor  # [B, k]: each candidate's full-answer score (minus its decoder loss)


class VideoQAModel(nn.Module):
    """`forward(video, questions, answers, weights, n) -> loss`; `rank_answers` and
    `generate_answers` for inference."""

    kind = "VideoQA"  # how load reports name it
    # its top-level parts -> what they are for (load reports)
    part_roles = {"visual_encoder": "video encoder", "text_encoder": "text encoder",
                  "text_decoder": "answer decoder"}

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        config = with_defaults(config, {**VIDEO_ENCODER_SETTINGS, **TEXT_SETTINGS,
                                        **QUESTION_SETTINGS})
        self.tokenizer = build_tokenizer(config["text_encoder"])
        text_config = build_text_config(config, self.tokenizer)
        self.max_question_len = config["max_question_len"]
        self.text_guided = selection_of(config)  # None: every question attends to all tokens
        self.visual_encoder = build_video_encoder(config)
        self.text_encoder = build_text_encoder(text_config, config["text_init"])
        self.text_decoder = build_text_decoder(text_config, config["text_init"])
        self._answer_cache: Optional[Tuple[Tuple[str, ...], torch.Tensor, torch.Tensor]] = None

    def encode_questions(self, video: torch.Tensor, questions: Sequence[str]
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """video `[B, 3, T, H, W]`, B questions -> (question states `[B, Sq, W]` from the
        video-grounded encoder with `[ENC]` first, question mask `[B, Sq]`); with
        `text_guided_k` each question attends to the k tokens it selects."""
        video_embeds, video_mask = self.visual_encoder.forward_with_mask(video)
        input_ids, attention_mask = tokenize(self.tokenizer, questions, video.device,
                                             max_length=self.max_question_len)
        input_ids = with_first_token(input_ids, self.tokenizer.enc_token_id)
        states = encode_grounded(self.text_encoder, input_ids, attention_mask, video_embeds,
                                 video_mask, self.text_guided)
        return states, attention_mask

    def tokenize_answers(self, answers: Sequence[str], device: torch.device
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """answers -> (input_ids `[A, Sa]` starting with `[DEC]`, attention_mask `[A, Sa]`)."""
        input_ids, attention_mask = tokenize(self.tokenizer, answers, device)
        return with_first_token(input_ids, self.tokenizer.bos_token_id), attention_mask

    def answer_loss(self, question_states: torch.Tensor, question_mask: torch.Tensor,
                    answer_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """Decoder loss of each answer `[A, Sa]` given its question `[A, Sq, W]` -> `[A]`,
        summed over tokens (label-smoothed as the text config says; padding ignored)."""
        labels = answer_ids.masked_fill(answer_ids == self.tokenizer.pad_token_id, -100)
        output = self.text_decoder(answer_ids, attention_mask=answer_mask,
                                   encoder_hidden_states=question_states,
                                   encoder_attention_mask=question_mask,
                                   labels=labels, reduction="none")
        return output.loss

    def forward(self, video: torch.Tensor, questions: Sequence[str],
                answers_flat: Sequence[str], weights: torch.Tensor, n: Sequence[int]
                ) -> torch.Tensor:
        """B questions with `n[i]` answers each, the answers flattened in question order
        with weights `[sum(n)]` -> sum of weighted answer losses / B."""
        question_states, question_mask = self.encode_questions(video, questions)
        answers_per_question = torch.as_tensor(n, device=video.device)
        question_states = question_states.repeat_interleave(answers_per_question, dim=0)
        question_mask = question_mask.repeat_interleave(answers_per_question, dim=0)
        answer_ids, answer_mask = self.tokenize_answers(answers_flat, video.device)
        loss = self.answer_loss(question_states, question_mask, answer_ids, answer_mask)
        return (weights.to(loss) * loss).sum() / video.shape[0]

    @torch.no_grad()
    def rank_answers(self, video: torch.Tensor, questions: Sequence[str],
                     answer_list: Sequence[str], k: int) -> RankedAnswers:
        """The best of `answer_list` for each question: of the k answers whose first token
        is likeliest after `[DEC]`, the one whose whole answer the decoder's loss scores best
        (label-smoothed, as BertLMHeadModel in TESTA's models/med.py); with the scores it ranked by."""
        question_states, question_mask = self.encode_questions(video, questions)
        answer_ids, answer_mask = self._tokenized_answer_list(answer_list, video.device)
        num_questions, k = question_states.shape[0], min(k, len(answer_list))

        start_ids = answer_ids[:1, :1].expand(num_questions, 1)  # [B, 1], all [DEC]
        first_logits = self.text_decoder(start_ids, encoder_hidden_states=question_states,
                                         encoder_attention_mask=question_mask,
                                         use_cache=False).logits[:, 0]  # [B, V]
        # at least float32: the logits are bfloat16 under autocast
        probs = first_logits.softmax(dim=-1, dtype=torch.promote_types(first_logits.dtype,
                                                                       torch.float32))
        first_token_probs, candidates = probs[:, answer_ids[:, 1]].topk(k, dim=1)  # [B, k]

        candidate_ids = rearrange(answer_ids[candidates], "b k s -> (b k) s")
        candidate_mask = rearrange(answer_mask[candidates], "b k s -> (b k) s")
        loss = self.answer_loss(question_states.repeat_interleave(k, dim=0),
                                question_mask.repeat_interleave(k, dim=0),
                                candidate_ids, candidate_mask)  # [B*k]
        scores = -rearrange(loss, "(b k) -> b k", k=k)
        best = candidates.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
        return RankedAnswers(best, candidates, first_token_probs, scores)

    def _tokenized_answer_list(self, answer_list: Sequence[str], device: torch.device
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The tokenised candidate list, cached while the same list is passed."""
        answers = tuple(answer_list)
        if self._answer_cache is None or self._answer_cache[0] != answers \
                or self._answer_cache[1].device != device:
            self._answer_cache = (answers, *self.tokenize_answers(answers, device))
        return self._answer_cache[1], self._answer_cache[2]

    @torch.no_grad()
    def generate_answers(self, video: torch.Tensor, questions: Sequence[str],
                         num_beams: int = 3, max_length: int = 10, min_length: int = 1
                         ) -> List[str]:
        """Beam-search an answer for each question (decoding starts at `[DEC]`, stops at
        `[SEP]`).

        The decoder cross-attends to the question without its padding, as in training and
        `rank_answers`. TESTA's models/testa_vqa.py generates with an all-ones question mask instead, so
        there a question's answer depends on the longest question of its batch, a case
        training never showed the decoder; with equally long questions (e.g. one question
        a batch) both give the same answers.
        """
        question_states, question_mask = self.encode_questions(video, questions)
        start_ids = torch.full((question_states.shape[0], 1), self.tokenizer.bos_token_id,
                               dtype=torch.long, device=video.device)
        output_ids = self.text_decoder.generate(
            input_ids=start_ids, max_length=max_length, min_length=min_length,
            num_beams=num_beams, eos_token_id=self.tokenizer.sep_token_id,
            pad_token_id=self.tokenizer.pad_token_id, encoder_hidden_states=question_states,
            encoder_attention_mask=question_mask)
        return self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)


def build_videoqa_model(config: Mapping[str, Any]) -> VideoQAModel:
    """The VideoQA model from a config dict (the keys of configs/vqa_*.yaml)."""
    return VideoQAModel(config)
