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

The model runs under the autocast of `load(amp=...)`, as a run with that `amp` setting
evaluates: by default bfloat16 on GPUs and on CPUs with native bfloat16 (AVX512-BF16,
AMX, Arm BF16), float32 on any other CPU (one log line says why); `amp="none"` is float32.
Features and scores come back in float32 in every mode.
"""
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from datasets import pre_caption, pre_question
from datasets.base import video_batch
from datasets.video import VideoDecodeError, read_test_frames
from models import build_retrieval_model, build_videoqa_model, load_checkpoint
from models import LoadReport, read_checkpoint
from models.checkpoint_reading import not_a_torch_file
from models.text_guided import TokenSelection
from models.video_encoder import cat_token_batches
from engine.config import load_config
from engine.host_memory import keep_freed_memory
from engine.precision import AMP_DTYPES, Precision, build_precision
from engine.saving import save_checkpoint
from tasks import TASKS, task_of_dataset
from tasks.retrieval import (RETRIEVAL_SETTINGS, candidate_masks, encode_texts, match_logits,
                             pair_scores, protocol_scores)
from utils import with_defaults

Video = Union[str, Path, torch.Tensor, np.ndarray]
VIDEO_TYPES = (str, Path, torch.Tensor, np.ndarray)
TRUST_OPTION = "trust=True"  # how `load` allows a file that needs full unpickling
logger = logging.getLogger("testa")
# the evaluation's re-ranking settings, which `VideoText.rerank` follows
RERANK_SETTINGS = {name: RETRIEVAL_SETTINGS[name] for name in ("k_test", "k_test_batch_size")}


@dataclass
class VideoEmbeddings:
    """features `[V, E]` (L2-normalised, for similarities); tokens `[V, N, D]` (the video
    encoder's output after aggregation, which the matching head attends to); mask `[V, N]`:
    the tokens that hold content (None: all; adaptive aggregation pads); ids: each row's
    video (its path, or `#<position>` for a clip given decoded); skipped: (id, reason) of
    the videos left out because they do not decode (`skip_bad=True`)."""
    features: torch.Tensor
    tokens: Optional[torch.Tensor]  # None: features only (`keep_tokens=False`)
    mask: Optional[torch.Tensor] = None
    ids: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    def to(self, device: Union[str, torch.device]) -> "VideoEmbeddings":
        return VideoEmbeddings(*(None if tensor is None else tensor.to(device)
                                 for tensor in (self.features, self.tokens, self.mask)),
                               ids=self.ids, skipped=self.skipped)


@dataclass
class TextEmbeddings:
    """features `[T, E]` (L2-normalised); input_ids and attention_mask `[T, S]` (for the
    matching head); texts: the paragraphs after `pre_caption`."""
    features: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    texts: List[str]


def inference(method):
    """`method` of a wrapper without gradients, under the wrapper's autocast."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with torch.no_grad(), self.precision.autocast():
            return method(self, *args, **kwargs)
    return run


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
        if isinstance(video, np.ndarray):
            video = torch.from_numpy(video)
        expected = (self.num_frm, 3, self.size, self.size)
        if tuple(video.shape) != expected:
            raise ValueError(f"a video tensor must be [T, 3, H, W] = {list(expected)} for this "
                             f"config, got {list(video.shape)}")
        return video

    def batch(self, videos: Sequence[Video]) -> torch.Tensor:
        return video_batch([self.clip(video) for video in videos]).to(self.device)

    def decodable_batch(self, videos: Sequence[Video], ids: Sequence[str],
                        skipped: List[Tuple[str, str]]) -> Tuple[Optional[torch.Tensor], List[str]]:
        """The batch of those `videos` that decode (None: none does) and their ids; each
        that does not is added to `skipped` as (id, reason)."""
        clips, kept = [], []
        for video, video_id in zip(videos, ids):
            try:
                clips.append(self.clip(video))
            except VideoDecodeError as err:
                skipped.append((video_id, str(err)))
                continue
            kept.append(video_id)
        return (video_batch(clips).to(self.device) if clips else None), kept


def checked_videos(videos: Sequence[Video]) -> List[Video]:
    """`videos` as a list, after checking it is a non-empty list of paths and clips."""
    if isinstance(videos, VIDEO_TYPES) or not isinstance(videos, Sequence):
        raise TypeError(f"videos: pass a list of videos (paths or [T, 3, H, W] clips), got "
                        f"{type(videos).__name__}")
    if not videos:
        raise ValueError("videos: the list is empty")
    for index, video in enumerate(videos):
        if not isinstance(video, VIDEO_TYPES):
            raise TypeError(f"videos[{index}]: a path or a [T, 3, H, W] clip, got "
                            f"{type(video).__name__}")
    return list(videos)


def checked_texts(name: str, texts: Sequence[str]) -> List[str]:
    """`texts` as a list, after checking it is a non-empty list of strings."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name}: pass a list of strings, got {type(texts).__name__}"
                        + (f" {texts[:40]!r}" if isinstance(texts, str) else ""))
    if not texts:
        raise ValueError(f"{name}: the list is empty")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}]: a string, got {type(text).__name__}")
    return list(texts)


def checked_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def video_ids(videos: Sequence[Video]) -> List[str]:
    return [str(video) if isinstance(video, (str, Path)) else f"#{position}"
            for position, video in enumerate(videos)]


class VideoText:
    """A retrieval (or pre-training) checkpoint: embeddings, similarities and the
    protocol's re-ranked scores. `model`, `config`, `load_report` and `precision` are public."""

    def __init__(self, model: nn.Module, config: dict, load_report: LoadReport,
                 device: torch.device, precision: Precision):
        config = with_defaults(config, RERANK_SETTINGS)  # pre-training configs lack them
        self.model, self.config, self.load_report = model, config, load_report
        self.reader = ClipReader(config, device)
        self.precision = precision

    @inference
    def embed_videos(self, videos: Sequence[Video], *, batch_size: Optional[int] = None,
                     skip_bad: bool = False, keep_tokens: bool = True,
                     progress: bool = False) -> VideoEmbeddings:
        """Embeddings of `videos` (paths or clips), `batch_size` at a time (default: the
        config's `batch_size_test`, or `batch_size` in a pre-training config). A video that does
        not decode raises VideoDecodeError naming it, or with `skip_bad` is left out, listed
        in the result's `skipped` and counted in a warning. `keep_tokens=False` keeps the
        features only (no re-ranking; for large collections); `progress` shows a bar."""
        videos = checked_videos(videos)
        if batch_size is None:
            batch_size = self.config.get("batch_size_test") or self.config["batch_size"]
        checked_positive("batch_size", batch_size)
        ids, skipped = video_ids(videos), []
        features, tokens, masks, kept = [], [], [], []
        for start in tqdm(range(0, len(videos), batch_size), desc="videos", unit="batch",
                          disable=not progress):
            chunk, chunk_ids = videos[start:start + batch_size], ids[start:start + batch_size]
            if skip_bad:
                batch, chunk_ids = self.reader.decodable_batch(chunk, chunk_ids, skipped)
                if batch is None:
                    continue
            else:
                batch = self.reader.batch(chunk)
            feat, embeds, mask = self.model.encode_video(batch)
            features.append(feat.float())
            if keep_tokens:
                tokens.append(embeds)
                masks.append(mask)
            kept += chunk_ids
        if skipped:
            logger.warning(f"skipped {len(skipped)} of {len(videos)} videos that do not decode "
                           f"(first: {skipped[0][1]})")
        if not features:
            raise VideoDecodeError(f"none of the {len(videos)} videos decodes (first: "
                                   f"{skipped[0][1]})")
        token_batches = cat_token_batches(tokens, masks) if keep_tokens else (None, None)
        return VideoEmbeddings(torch.cat(features), *token_batches, ids=kept, skipped=skipped)

    @inference
    def embed_paragraphs(self, paragraphs: Sequence[str]) -> TextEmbeddings:
        """Paragraphs, as many per forward as the evaluation encodes."""
        paragraphs = checked_texts("paragraphs", paragraphs)
        texts = [pre_caption(text, self.config["max_words"]) for text in paragraphs]
        return TextEmbeddings(*encode_texts(self.model, texts), texts)

    def similarity(self, videos: VideoEmbeddings, texts: TextEmbeddings) -> torch.Tensor:
        """Cosine similarities `[V, T]`, in float32 (or wider) also inside the wrapper's
        autocast, as the evaluation computes them."""
        with torch.autocast(self.precision.device_type, enabled=False):
            return videos.features @ texts.features.t()

    @inference
    def matching_logits(self, videos: VideoEmbeddings, texts: TextEmbeddings,
                        pairs: torch.Tensor) -> torch.Tensor:
        """The matching head's "match" logit `[P]` of (video, text) index pairs `[P, 2]`,
        scored as the evaluation scores them: grouped by video, at most the config's
        `k_test_batch_size` pairs per forward (see `tasks.retrieval.match_logits`)."""
        return match_logits(self.model, pairs, videos.tokens, videos.mask, texts.input_ids,
                            texts.attention_mask, self.config["k_test_batch_size"])

    def rerank(self, videos: VideoEmbeddings, texts: TextEmbeddings, *,
               k: Optional[int] = None, text_guided_k: Optional[int] = None,
               text_guided_rule: str = "text") -> Tuple[torch.Tensor, torch.Tensor]:
        """The evaluation protocol's scores: (v2t `[V, T]`, t2v `[T, V]`). The `k` (default:
        the config's `k_test`) best texts of each video by similarity, and the `k` best
        videos of each text, score `match logit + similarity`; all other pairs -100.
        Scored as the evaluation scores them (`tasks.retrieval.pair_scores`): pairs
        grouped by video, at most the config's `k_test_batch_size` per forward.
        `text_guided_k`: each pair's matching head attends to that many of the video's
        tokens, chosen by `text_guided_rule` (docs/text_guided.md); default: the config's
        `text_guided_k`."""
        if k is not None:
            checked_positive("k", k)
        if videos.tokens is None:
            raise ValueError("videos: embedded with keep_tokens=False, so they cannot be re-ranked")
        selection = None
        if text_guided_k is not None:
            selection = TokenSelection(text_guided_k, text_guided_rule)
            selection.check_tokens(videos.tokens.shape[1], videos.mask)
        sims = self.similarity(videos, texts)
        v2t, t2v = candidate_masks(sims, self.config["k_test"] if k is None else k)
        scores = pair_scores(self.model, sims, (v2t | t2v).nonzero(), videos.tokens, videos.mask,
                             texts.input_ids, texts.attention_mask, self.config["k_test_batch_size"],
                             selection=selection)
        return protocol_scores(scores, v2t, t2v)


    def index(self, videos: Sequence[Video], *, batch_size: int = 8, keep_tokens: bool = True,
              progress: bool = False) -> "VideoIndex":
        """A searchable index of `videos`; those that do not decode are skipped and listed
        in its `videos.skipped`. `keep_tokens=False`: features only, searched by similarity
        alone (no re-ranking; embed_dim numbers a video instead of its N x D tokens)."""
        embeddings = self.embed_videos(videos, batch_size=batch_size, skip_bad=True,
                                       keep_tokens=keep_tokens, progress=progress)
        return VideoIndex(embeddings, self.config, self.load_report.path)

    @torch.no_grad()
    def search(self, index: "VideoIndex", paragraphs: Sequence[str], *, k: int = 10
               ) -> List[List[Tuple[str, float]]]:
        """The best videos of `index` for each paragraph, best first, as (id, score): with
        the index's tokens, the config's `k_test` most similar videos re-scored as the
        evaluation scores them (match logit + similarity) and the `k` best of those;
        features only, the `k` most similar."""
        checked_positive("k", k)
        if index.videos.features.shape[1] != self.config["embed_dim"]:
            raise ValueError(f"the index holds {index.videos.features.shape[1]}-wide features, "
                             f"this model makes {self.config['embed_dim']}-wide ones; search it "
                             f"with the model that made it ({index.checkpoint})")
        videos = index.videos.to(self.reader.device)
        texts = self.embed_paragraphs(paragraphs)
        scores = self.similarity(videos, texts).t()  # [T, V]
        if videos.tokens is not None:
            num_texts, num_videos = scores.shape
            candidates = scores.topk(min(self.config["k_test"], num_videos), dim=1).indices  # [T, K]
            text = torch.arange(num_texts, device=scores.device).repeat_interleave(candidates.shape[1])
            pairs = torch.stack([candidates.flatten(), text], dim=1)  # [T * K, 2] (video, text)
            logits = torch.cat([self.matching_logits(videos, texts, chunk)
                                for chunk in pairs.split(self.config["k_test_batch_size"])])
            reranked = torch.full_like(scores, -torch.inf)
            reranked[pairs[:, 1], pairs[:, 0]] = logits + scores[pairs[:, 1], pairs[:, 0]]
            scores = reranked
        best = scores.topk(min(k, scores.shape[1]), dim=1)
        return [[(videos.ids[video], score) for video, score in zip(row.tolist(), values.tolist())
                 if score > -torch.inf] for row, values in zip(best.indices, best.values)]


INDEX_FORMAT = "testa-video-index/1"


@dataclass
class VideoIndex:
    """A searchable collection (`VideoText.index`, `VideoText.search`): the videos'
    embeddings and the config and checkpoint of the model that made them. Saved as a
    plain tensor file (tensors, strings and containers: it loads with
    `torch.load(weights_only=True)`)."""
    videos: VideoEmbeddings
    config: dict
    checkpoint: str

    def save(self, path: Union[str, Path]) -> None:
        """Write the index to `path` atomically."""
        save_checkpoint(str(path), {
            "format": INDEX_FORMAT, "checkpoint": self.checkpoint, "config": dict(self.config),
            "ids": list(self.videos.ids), "skipped": [list(item) for item in self.videos.skipped],
            "features": self.videos.features.cpu(),
            "tokens": None if self.videos.tokens is None else self.videos.tokens.cpu(),
            "mask": None if self.videos.mask is None else self.videos.mask.cpu()})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "VideoIndex":
        """The index saved at `path`, read weights-only; ValueError naming the file when it
        is no index."""
        if not Path(path).is_file():
            raise ValueError(f"{path}: " + ("a folder, not an index file" if Path(path).is_dir()
                                            else "no such index file"))
        with open(path, "rb") as f:
            what = not_a_torch_file(f.read(512))
        if what:
            raise ValueError(f"{path}: not a video index: {what}")
        try:
            saved = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load raises many kinds for files that are no index
            raise ValueError(f"{path}: not a video index ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:160] if str(err) else ''})") from None
        if not isinstance(saved, dict) or saved.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: not a video index (no format {INDEX_FORMAT!r})")
        videos = VideoEmbeddings(saved["features"], saved["tokens"], saved["mask"],
                                 ids=list(saved["ids"]),
                                 skipped=[tuple(item) for item in saved["skipped"]])
        return cls(videos, saved["config"], saved["checkpoint"])


class VideoQA:
    """A VideoQA checkpoint: answers ranked from a list or generated. `model`, `config`,
    `load_report` and `precision` are public."""

    def __init__(self, model: nn.Module, config: dict, load_report: LoadReport,
                 device: torch.device, precision: Precision):
        self.model, self.config, self.load_report = model, config, load_report
        self.reader = ClipReader(config, device)
        self.precision = precision

    @inference
    def answer(self, videos: Sequence[Video], questions: Sequence[str], *,
               answer_list: Optional[Sequence[str]] = None) -> List[str]:
        """One answer per question, about the video at the same position (a single video
        serves every question). With `answer_list`: the candidate the evaluation ranks
        best (the config's `k_test` likeliest first tokens re-scored by full likelihood);
        without: beam search (the config's `num_beams` and `max_answer_len`)."""
        videos = checked_videos(videos)
        questions = checked_texts("questions", questions)
        if answer_list is not None:
            answer_list = checked_texts("answer_list", answer_list)
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


# what `load` gives for a task's `served_as`: the model it builds and its wrapper (a
# pre-training checkpoint is served by the retrieval model: its captioning decoder goes unused)
SERVED_AS = {"video_text": (build_retrieval_model, VideoText),
             "videoqa": (build_videoqa_model, VideoQA)}


def load(checkpoint: Union[str, Path], *, config: Union[str, Path, dict, None] = None,
         device: Union[str, torch.device] = "cpu", trust: bool = False, amp: str = "bf16"
         ) -> Union[VideoText, VideoQA]:
    """The model of `checkpoint` in eval mode on `device`, built from the config saved in
    the checkpoint (or `config`: a YAML path or a dict, for files that carry none).
    `checkpoint` is a .pth file or an exported folder (`tools/export.py`: safetensors and
    YAML, read with no unpickling), by path, http(s) URL (a folder's ends in `/`) or
    `hf://owner/repo[@revision][/file]` id (downloaded once into the cache);
    `trust=True` allows .pth files that need full unpickling (only for files from a
    trusted source: unpickling can run code). The config's `text_init` is not read: the
    checkpoint holds the text towers.

    The task the checkpoint records (`tasks.TASKS`; older files without the record: the
    task of the config's `dataset`) picks the schema and what is returned: a VideoQA task
    gives a `VideoQA`; retrieval and pre-training give a `VideoText` (a pre-training
    checkpoint's captioning decoder is not used: the load report lists it as unexpected).

    `amp` is the autocast the model runs under, as the `amp` setting of a run: `bf16`
    (default: on GPU, and on CPUs with native bfloat16, else float32), `fp16` (GPU) or
    `none` (float32).

    On a CPU the process's malloc is set to keep freed memory for reuse, as the training
    scripts do there (`engine.host_memory`: no page faults for every forward's
    activations; the resident memory stays near its peak). A `MALLOC_*` or
    `GLIBC_TUNABLES` variable in the environment leaves it as it is.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    checkpoint = str(checkpoint)
    saved = read_checkpoint(checkpoint, trust=trust, trust_option=TRUST_OPTION)[0]
    if config is None:
        config = saved.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"{checkpoint}: holds no config; pass config= (e.g. a configs/*.yaml)")
    elif not isinstance(config, dict):
        config = load_config(config)
    if saved.get("task") in TASKS:
        task = TASKS[saved["task"]]
    elif "dataset" in config:
        task = task_of_dataset(config["dataset"])
    else:
        raise ValueError(f"{checkpoint}: records no task and its config names no dataset; "
                         f"pass config= (e.g. a configs/*.yaml)")
    # the checkpoint holds the text towers: no text_init (a path of the training machine)
    config = with_defaults({**config, "text_init": None}, task.schema, checkpoint)
    build_model, served_as = SERVED_AS[task.served_as]
    model = build_model(config)
    report = load_checkpoint(model, checkpoint, trust=trust, trust_option=TRUST_OPTION)
    device = torch.device(device)
    model = model.to(device).eval()
    keep_freed_memory(device)
    return served_as(model, config, report, device, build_precision(amp, device))
