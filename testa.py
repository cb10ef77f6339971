"""TESTA from Python: load a trained model with its config, embed videos and paragraphs,
score pairs, answer questions.

    import testa
    model = testa.load("output/demo/checkpoint_best.pth")  # retrieval or pre-training weights
    videos = model.embed_videos(["a.mp4", "b.mp4"])        # features [2, E], tokens [2, N, D]
    texts = model.embed_paragraphs(["a red circle moves left.", "a blue square moves up."])
    model.similarity(videos, texts)                         # [2, 2] cosine similarities
    v2t, t2v = model.rerank(videos, texts)                  # the evaluation protocol's scores

    qa = testa.load("output/demo_videoqa/checkpoint_best.pth")  # VideoQA weights
    qa.answer(["a.mp4"], ["what color is the background?"], answer_list=["navy", "teal"])

Videos are given as file paths, decoded as the test split's loader decodes them (the
config's `num_frm_test` frames, `uniform` sampling, `image_size` pixels, CLIP
normalisation), or as clips already decoded: `[T, 3, H, W]` tensors, uint8 as
`datasets.read_frames` returns them (normalised here) or float as `datasets.load_video`
returns them (already normalised). Texts get the datasets' cleaning (`pre_caption`,
`pre_question`) before tokenisation.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from datasets import pre_caption, pre_question
from datasets.base import video_batch
from datasets.video import read_test_frames
from models import build_retrieval_model, build_videoqa_model, load_checkpoint
from models.checkpoint import LoadReport, read_checkpoint
from models.video_encoder import cat_token_batches
from engine.config import load_config
from tasks.pretraining import PRETRAIN_SCHEMA
from tasks.retrieval import (RETRIEVAL_SCHEMA, RETRIEVAL_SETTINGS, candidate_masks, encode_texts,
                             match_logits, pair_scores, protocol_scores)
from tasks.videoqa import VIDEOQA_SCHEMA
from utils import with_defaults

# the schema of a checkpoint's config, by its `dataset` (any other: a retrieval dataset)
SCHEMAS = {"activitynet_qa": VIDEOQA_SCHEMA, "pretrain_video": PRETRAIN_SCHEMA}

Video = Union[str, Path, torch.Tensor]
# the evaluation's re-ranking settings, which `VideoText.rerank` follows
RERANK_SETTINGS = {name: RETRIEVAL_SETTINGS[name] for name in ("k_test", "k_test_batch_size")}


@dataclass
class VideoEmbeddings:
    """features `[V, E]` (L2-normalised, for similarities); tokens `[V, N, D]` (the video
    encoder's output after aggregation, which the matching head attends to); mask `[V, N]`:
    the tokens that hold content (None: all; adaptive aggregation pads)."""
    features: torch.Tensor
    tokens: torch.Tensor
    mask: Optional[torch.Tensor] = None


@dataclass
class TextEmbeddings:
    """features `[T, E]` (L2-normalised); input_ids and attention_mask `[T, S]` (for the
    matching head); texts: the paragraphs after `pre_caption`."""
    features: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    texts: List[str]


class ClipReader:
    """Paths and decoded clips -> a normalised batch `[B, 3, T, H, W]` of the config's
    frame count and size."""

    def __init__(self, config: dict, device: torch.device):
        # pre-training configs have no test split: the encoder's frame count
        self.num_frm = config["num_frm_test"] if "num_frm_test" in config else config["num_frames"]
        self.size = config["image_size"]
        self.device = device

    def clip(self, video: Video) -> torch.Tensor:
        """`[T, 3, H, W]`: uint8 as decoded, or float already normalised."""
        if isinstance(video, (str, Path)):
            return read_test_frames(str(video), self.num_frm, self.size)
        expected = (self.num_frm, 3, self.size, self.size)
        if tuple(video.shape) != expected:
            raise ValueError(f"a video tensor must be [T, 3, H, W] = {list(expected)} for this "
                             f"config, got {list(video.shape)}")
        return video

    def batch(self, videos: Sequence[Video]) -> torch.Tensor:
        if isinstance(videos, (str, Path, torch.Tensor)):
            raise TypeError("pass a list of videos (paths or [T, 3, H, W] tensors)")
        return video_batch([self.clip(video) for video in videos]).to(self.device)


class VideoText:
    """A retrieval (or pre-training) checkpoint: embeddings, similarities and the
    protocol's re-ranked scores. `model`, `config` and `load_report` are public."""

    def __init__(self, model: nn.Module, config: dict, load_report: LoadReport,
                 device: torch.device):
        config = with_defaults(config, RERANK_SETTINGS)  # pre-training configs lack them
        self.model, self.config, self.load_report = model, config, load_report
        self.reader = ClipReader(config, device)

    @torch.no_grad()
    def embed_videos(self, videos: Sequence[Video], *,
                     batch_size: Optional[int] = None) -> VideoEmbeddings:
        """Videos, `batch_size` per forward (default: the config's `batch_size_test`, or
        `batch_size` in a pre-training config)."""
        batch_size = batch_size or self.config.get("batch_size_test") or self.config["batch_size"]
        features, tokens, masks = [], [], []
        for start in range(0, len(videos), batch_size):
            feat, embeds, mask = self.model.encode_video(self.reader.batch(videos[start:start + batch_size]))
            features.append(feat)
            tokens.append(embeds)
            masks.append(mask)
        return VideoEmbeddings(torch.cat(features), *cat_token_batches(tokens, masks))

    @torch.no_grad()
    def embed_paragraphs(self, paragraphs: Sequence[str]) -> TextEmbeddings:
        """Paragraphs, as many per forward as the evaluation encodes."""
        if isinstance(paragraphs, str):
            raise TypeError("pass a list of paragraphs")
        texts = [pre_caption(text, self.config["max_words"]) for text in paragraphs]
        return TextEmbeddings(*encode_texts(self.model, texts), texts)

    def similarity(self, videos: VideoEmbeddings, texts: TextEmbeddings) -> torch.Tensor:
        """Cosine similarities `[V, T]`."""
        return videos.features @ texts.features.t()

    @torch.no_grad()
    def matching_logits(self, videos: VideoEmbeddings, texts: TextEmbeddings,
                        pairs: torch.Tensor) -> torch.Tensor:
        """The matching head's "match" logit `[P]` of (video, text) index pairs `[P, 2]`,
        scored as the evaluation scores them: grouped by video, at most the config's
        `k_test_batch_size` pairs per forward (see `tasks.retrieval.match_logits`)."""
        return match_logits(self.model, pairs, videos.tokens, videos.mask, texts.input_ids,
                            texts.attention_mask, self.config["k_test_batch_size"])

    def rerank(self, videos: VideoEmbeddings, texts: TextEmbeddings, *,
               k: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The evaluation protocol's scores: (v2t `[V, T]`, t2v `[T, V]`). The `k` (default:
        the config's `k_test`) best texts of each video by similarity, and the `k` best
        videos of each text, score `match logit + similarity`; all other pairs -100.
        Scored as the evaluation scores them (`tasks.retrieval.pair_scores`): pairs
        grouped by video, at most the config's `k_test_batch_size` per forward."""
        sims = self.similarity(videos, texts)
        v2t, t2v = candidate_masks(sims, k or self.config["k_test"])
        scores = pair_scores(self.model, sims, (v2t | t2v).nonzero(), videos.tokens, videos.mask,
                             texts.input_ids, texts.attention_mask, self.config["k_test_batch_size"])
        return protocol_scores(scores, v2t, t2v)


class VideoQA:
    """A VideoQA checkpoint: answers ranked from a list or generated. `model`, `config`
    and `load_report` are public."""

    def __init__(self, model: nn.Module, config: dict, load_report: LoadReport,
                 device: torch.device):
        self.model, self.config, self.load_report = model, config, load_report
        self.reader = ClipReader(config, device)

    @torch.no_grad()
    def answer(self, videos: Sequence[Video], questions: Sequence[str], *,
               answer_list: Optional[Sequence[str]] = None) -> List[str]:
        """One answer per question, about the video at the same position (a single video
        serves every question). With `answer_list`: the candidate the evaluation ranks
        best (the config's `k_test` likeliest first tokens re-scored by full likelihood);
        without: beam search (the config's `num_beams` and `max_answer_len`)."""
        if len(videos) == 1:
            videos = list(videos) * len(questions)
        if len(videos) != len(questions):
            raise ValueError(f"{len(videos)} videos for {len(questions)} questions; pass one video "
                             "per question or a single video")
        video = self.reader.batch(videos)
        cleaned = [pre_question(question, self.config["max_question_len"]) for question in questions]
        if answer_list is None:
            return self.model.generate_answers(video, cleaned, num_beams=self.config["num_beams"],
                                               max_length=self.config["max_answer_len"])
        ranked = self.model.rank_answers(video, cleaned, list(answer_list), self.config["k_test"])
        return [answer_list[index] for index in ranked.best.tolist()]


def load(checkpoint: Union[str, Path], *, config: Union[str, Path, dict, None] = None,
         device: Union[str, torch.device] = "cpu", trust: bool = False
         ) -> Union[VideoText, VideoQA]:
    """The model of `checkpoint` in eval mode on `device`, built from the config saved in
    the checkpoint (or `config`: a YAML path or a dict, for files that carry none).
    `checkpoint` is a path, an http(s) URL or an `hf://owner/repo/file` id (downloaded
    once into the cache); `trust=True` allows files that need full unpickling (only for
    files from a trusted source: unpickling can run code).

    A VideoQA config (`dataset: activitynet_qa`) gives a `VideoQA`; retrieval and
    pre-training configs give a `VideoText` (a pre-training checkpoint's captioning
    decoder is not used: the load report lists it as unexpected).
    """
    checkpoint = str(checkpoint)
    if config is None:
        config = read_checkpoint(checkpoint, trust=trust)[0].get("config")
        if not isinstance(config, dict):
            raise ValueError(f"{checkpoint}: holds no config; pass config= (e.g. a configs/*.yaml)")
    elif not isinstance(config, dict):
        config = load_config(config)
    if "dataset" not in config:
        raise ValueError(f"{checkpoint}: its config names no dataset; pass config= "
                         f"(e.g. a configs/*.yaml)")
    config = with_defaults(config, SCHEMAS.get(config["dataset"], RETRIEVAL_SCHEMA), checkpoint)
    is_videoqa = config["dataset"] == "activitynet_qa"
    model = (build_videoqa_model if is_videoqa else build_retrieval_model)(config)
    report = load_checkpoint(model, checkpoint, trust=trust)
    device = torch.device(device)
    model = model.to(device).eval()
    return (VideoQA if is_videoqa else VideoText)(model, config, report, device)
