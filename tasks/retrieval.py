"""Paragraph-to-video retrieval: its settings, the training losses, and the evaluation
protocol with its metrics.

Evaluation (docs/computation.md, section 6): every text and video is encoded, similarities `v @ t^T` pick the top
`k_test` candidates of each video row and each text row, and the video-grounded encoder
re-scores those pairs as `itm_logit + sim`; all other scores are -100. Each rank encodes
and re-scores the pairs of its own videos, and the score matrices are summed over the
ranks. Recall@K is computed from the two score matrices.
"""
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import RETRIEVAL_READERS, build_retrieval_datasets
from datasets.base import FINETUNE_DATA_SETTINGS
from engine.logs import LOG_SETTINGS, format_metrics, log, progress
from engine.optim import OPTIM_SETTINGS, finetune_schedule, ramped_alpha
from engine.precision import PRECISION_SETTINGS
from engine.run import RUN_SETTINGS, Run
from engine.task import LossFn, Task
from engine.train import FINETUNE_BATCH_SETTINGS, TRAIN_SETTINGS, check_finite
from models.blip_base import MOMENTUM_SETTINGS
from models.collectives import all_reduce_sum
from models.retrieval import RETRIEVAL_MODEL_SETTINGS, build_retrieval_model
from models.text import TEXT_SETTINGS
from models.text_guided import TokenSelection
from models.video_encoder import VIDEO_ENCODER_SETTINGS, cat_token_batches
from utils import CAPTION_SETTINGS, Setting, Settings, compose

TEXT_BATCH_SIZE = 256
BEST_METRIC = "t2v_r_mean"  # the reference keeps the checkpoint best at text-to-video retrieval
NOT_RERANKED = -100.0
DATASETS = {name: build_retrieval_datasets for name in RETRIEVAL_READERS}

RETRIEVAL_SETTINGS = Settings(title="Retrieval task", module=__name__, settings={
    "dataset": Setting(str, meaning="the retrieval dataset (DATASETS.md)",
                       choices=tuple(DATASETS)),
    "k_test": Setting(int, 128, "candidates per video and per text re-scored by the matching "
                      "head", min=1),
    "k_test_batch_size": Setting(int, 64, "candidate pairs of one video re-scored per forward",
                                 min=1),
})
RETRIEVAL_SCHEMA: Settings = compose(
    RUN_SETTINGS, LOG_SETTINGS, PRECISION_SETTINGS, TRAIN_SETTINGS, FINETUNE_BATCH_SETTINGS,
    OPTIM_SETTINGS, VIDEO_ENCODER_SETTINGS, TEXT_SETTINGS, MOMENTUM_SETTINGS,
    RETRIEVAL_MODEL_SETTINGS, CAPTION_SETTINGS, FINETUNE_DATA_SETTINGS, RETRIEVAL_SETTINGS)


# metrics -----------------------------------------------------------------------------
def ranks_in_rows(scores: torch.Tensor) -> torch.Tensor:
    """`[R, C]` scores -> `[R, C]` 0-based rank of every column within its row, best
    first (equal scores keep column order)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    return order.argsort(dim=1)


def recall(ranks: torch.Tensor, k: int) -> float:
    return 100.0 * (ranks < k).double().mean().item()


def itm_eval(scores_v2t, scores_t2v, txt2video: Sequence[int],
             video2txt: Sequence[Sequence[int]]) -> Dict[str, float]:
    """Recall@1/5/10 in percent from score matrices `[V, T]` and `[T, V]`.

    Text-to-video: rank of each text's video. Video-to-text: best rank among the video's
    texts. Returns t2v_r1..., v2t_r1..., their means and the overall mean `r_mean`.
    """
    scores_v2t, scores_t2v = torch.as_tensor(scores_v2t), torch.as_tensor(scores_t2v)
    num_videos, num_texts = len(video2txt), len(txt2video)
    if scores_v2t.shape != (num_videos, num_texts) or scores_t2v.shape != (num_texts, num_videos):
        raise ValueError(f"score matrices {tuple(scores_v2t.shape)} and {tuple(scores_t2v.shape)} "
                         f"do not fit {num_videos} videos and {num_texts} texts")
    if any(len(texts) == 0 for texts in video2txt):
        raise ValueError("every video needs at least one text in video2txt")
    t2v_ranks = ranks_in_rows(scores_t2v)[torch.arange(num_texts), torch.as_tensor(txt2video)]
    v2t_positions = ranks_in_rows(scores_v2t)
    v2t_ranks = torch.stack([v2t_positions[video, list(texts)].min()
                             for video, texts in enumerate(video2txt)])
    metrics = {}
    for direction, ranks in (("t2v", t2v_ranks), ("v2t", v2t_ranks)):
        recalls = {f"{direction}_r{k}": recall(ranks, k) for k in (1, 5, 10)}
        metrics.update(recalls, **{f"{direction}_r_mean": sum(recalls.values()) / 3})
    metrics["r_mean"] = (metrics["t2v_r_mean"] + metrics["v2t_r_mean"]) / 2
    return metrics


# evaluation --------------------------------------------------------------------------
@torch.no_grad()
def encode_texts(model: nn.Module, texts: Sequence[str],
                 autocast: Callable[[], ContextManager] = nullcontext
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Texts, `TEXT_BATCH_SIZE` per forward -> (features `[T, E]` float32, input_ids
    `[T, S]`, attention_mask `[T, S]`)."""
    features, ids, masks = [], [], []
    for start in progress(range(0, len(texts), TEXT_BATCH_SIZE), "texts"):
        batch = texts[start:start + TEXT_BATCH_SIZE]
        with autocast():
            feat, input_ids, attention_mask = model.encode_text(batch)
        features.append(feat.float())
        ids.append(input_ids)
        masks.append(attention_mask)
    return torch.cat(features), torch.cat(ids), torch.cat(masks)


@torch.no_grad()
def encode_videos(model: nn.Module, loader: DataLoader, run: Run
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's videos (index % world_size == rank) -> (features of ALL videos
    `[V, E]` float32, summed over the ranks; this rank's video indices `[V_r]`; their
    tokens `[V_r, N, D]`, kept on the CPU in the autocast dtype, and their content masks
    `[V_r, N]` or None)."""
    features = torch.zeros(len(loader.dataset.video), run.config["embed_dim"], device=run.device)
    own_index, own_features, own_tokens, own_masks = [], [], [], []
    for video, video_index in progress(loader, "videos"):
        owned = video_index % run.world_size == run.rank  # drops the sampler's padding repeats
        if not owned.any():
            continue
        with run.precision.autocast():
            feat, tokens, mask = model.encode_video(video[owned].to(run.device, non_blocking=True))
        own_index.append(video_index[owned])
        own_features.append(feat.float())
        # in the dtype autocast gives the matching head's key and value projections
        own_tokens.append(tokens.to(run.precision.dtype or tokens.dtype).cpu())
        own_masks.append(None if mask is None else mask.cpu())
    if not own_index:  # fewer videos than ranks
        return all_reduce_sum(features), torch.zeros(0, dtype=torch.long), torch.zeros(0), None
    own_index = torch.cat(own_index)
    features[own_index.to(run.device)] = torch.cat(own_features)
    return (all_reduce_sum(features), own_index, *cat_token_batches(own_tokens, own_masks))


def candidate_masks(sims: torch.Tensor, k_test: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """sims `[V, T]` -> (top-k texts of every video, top-k videos of every text), both
    as boolean `[V, T]` masks."""
    num_videos, num_texts = sims.shape
    v2t = torch.zeros_like(sims, dtype=torch.bool)
    v2t.scatter_(1, sims.topk(min(k_test, num_texts), dim=1).indices, True)
    t2v = torch.zeros_like(sims, dtype=torch.bool)
    t2v.scatter_(0, sims.topk(min(k_test, num_videos), dim=0).indices, True)
    return v2t, t2v


def protocol_scores(scores: torch.Tensor, v2t: torch.Tensor, t2v: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Re-ranked scores `[V, T]` and the candidate masks of `candidate_masks` -> the
    protocol's (v2t `[V, T]`, t2v `[T, V]`): pairs outside each direction's top k score
    NOT_RERANKED."""
    return torch.where(v2t, scores, NOT_RERANKED), torch.where(t2v, scores, NOT_RERANKED).t()


@torch.no_grad()
def match_logits(model: nn.Module, pairs: torch.Tensor, video_tokens: torch.Tensor,
                 video_masks: Optional[torch.Tensor], text_ids: torch.Tensor,
                 text_mask: torch.Tensor, batch_size: int, *,
                 video_rows: Optional[torch.Tensor] = None,
                 autocast: Callable[[], ContextManager] = nullcontext,
                 selection: Optional[TokenSelection] = None) -> torch.Tensor:
    """The matching head's "match" logit `[P]` (float32 or wider, on the texts' device) of
    (video, text) index pairs `[P, 2]`.

    Video `i` is row `video_rows[i]` (default: `i`) of `video_tokens [V', N, D]` and of
    its content mask `video_masks [V', N]` (None: all tokens hold content); text `j` is
    row `j` of `text_ids` and `text_mask [T, S]`. The pairs are grouped by video, and each
    forward scores one video against at most `batch_size` of its texts: the video's tokens
    go in once, `[1, N, D]`, so each layer's cross-attention projects them to keys and
    values once for all of those texts (`itm_logits`), and memory stays bounded by
    `batch_size` whatever the number of pairs. The tokens may live on the CPU; one
    video's at a time goes to the texts' device. `selection`: text-guided token selection
    (default: the model's `text_guided_k`); the keys and values are then merged per text.
    """
    device = text_ids.device
    scored, values = [], []
    order = pairs[:, 0].argsort(stable=True)  # [P] grouped by video
    videos, counts = pairs[order, 0].unique_consecutive(return_counts=True)
    for video, group in progress(list(zip(videos.tolist(), order.split(counts.tolist()))),
                                 "re-ranking"):
        row = video if video_rows is None else int(video_rows[video])
        tokens = video_tokens[row:row + 1].to(device, non_blocking=True)  # [1, N, D]
        mask = (None if video_masks is None
                else video_masks[row:row + 1].to(device, non_blocking=True))  # [1, N]
        for chunk in group.tensor_split(-(-len(group) // batch_size)):  # even chunks <= batch_size
            text = pairs[chunk, 1].to(device)
            with autocast():
                match = model.itm_logits(tokens, text_ids[text], text_mask[text], mask,
                                         selection)  # [K, 2]
            scored.append(chunk)
            values.append(match[:, 1])
    if not values:
        return torch.zeros(0, device=device)
    logits = torch.empty(len(pairs), device=device,  # float64 runs stay float64
                         dtype=torch.promote_types(values[0].dtype, torch.float32))
    logits[torch.cat(scored).to(device)] = torch.cat(values).to(logits.dtype)
    return logits


def pair_scores(model: nn.Module, sims: torch.Tensor, pairs: torch.Tensor,
                video_tokens: torch.Tensor, video_masks: Optional[torch.Tensor],
                text_ids: torch.Tensor, text_mask: torch.Tensor, batch_size: int, *,
                video_rows: Optional[torch.Tensor] = None,
                autocast: Callable[[], ContextManager] = nullcontext,
                selection: Optional[TokenSelection] = None) -> torch.Tensor:
    """`itm_logit[:, 1] + sim` of the (video, text) pairs `[P, 2]` in a matrix like sims
    `[V, T]`, 0 elsewhere (the other arguments as for `match_logits`)."""
    logits = match_logits(model, pairs, video_tokens, video_masks, text_ids, text_mask,
                          batch_size, video_rows=video_rows, autocast=autocast,
                          selection=selection)
    video, text = pairs.unbind(1)
    scores = torch.zeros_like(sims)
    scores[video, text] = logits.to(sims) + sims[video, text]
    return scores


@torch.no_grad()
def rerank(model: nn.Module, run: Run, sims: torch.Tensor, candidates: torch.Tensor,
           own_index: torch.Tensor, own_tokens: torch.Tensor, own_masks: Optional[torch.Tensor],
           text_ids: torch.Tensor, text_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`itm_logit[:, 1] + sim` of every candidate pair `[V, T]` (0 elsewhere); each rank
    scores the pairs of its own videos (`pair_scores`, at most `batch_size` pairs per
    forward), and the ranks' matrices are summed."""
    num_videos = sims.shape[0]
    local_row = torch.full((num_videos,), -1, dtype=torch.long, device=own_index.device)
    local_row[own_index] = torch.arange(len(own_index), device=own_index.device)
    owned = (local_row >= 0).to(sims.device)
    pairs = (candidates & owned[:, None]).nonzero()  # [P, 2] (video, text)
    scores = pair_scores(model, sims, pairs, own_tokens, own_masks, text_ids, text_mask,
                         batch_size, video_rows=local_row, autocast=run.precision.autocast)
    return all_reduce_sum(scores)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, run: Run) -> Tuple[torch.Tensor, torch.Tensor]:
    """Score matrices (v2t `[V, T]`, t2v `[T, V]`) of the protocol, on the CPU."""
    model.eval()
    text_feat, text_ids, text_mask = encode_texts(model, loader.dataset.text,
                                                     run.precision.autocast)
    video_feat, own_index, own_tokens, own_masks = encode_videos(model, loader, run)
    check_finite(text_feat, "text features")
    check_finite(video_feat, "video features")
    sims = video_feat @ text_feat.t()  # [V, T]
    v2t, t2v = candidate_masks(sims, run.config["k_test"])
    scores = rerank(model, run, sims, v2t | t2v, own_index, own_tokens, own_masks, text_ids,
                    text_mask, run.config["k_test_batch_size"])
    check_finite(scores, "re-ranked scores")
    scores_v2t, scores_t2v = protocol_scores(scores, v2t, t2v)
    return scores_v2t.cpu(), scores_t2v.cpu()


def evaluate_split(model: nn.Module, loader: DataLoader, run: Run, split: str) -> Dict[str, float]:
    scores_v2t, scores_t2v = evaluate(model, loader, run)
    dataset = loader.dataset
    metrics = itm_eval(scores_v2t, scores_t2v, dataset.txt2video, dataset.video2txt)
    log(f"{split}: " + format_metrics(metrics))
    if dataset.challenge_submission and run.is_main:
        write_submission(run.output_dir, scores_t2v)
    return metrics


def write_submission(output_dir: Path, scores_t2v: torch.Tensor) -> None:
    """Condensed Movies challenge files: score_test_t2v.npy and submission.zip."""
    scores_path = output_dir / "score_test_t2v.npy"
    np.save(scores_path, scores_t2v.numpy())
    with zipfile.ZipFile(output_dir / "submission.zip", "w") as archive:
        archive.write(scores_path, "sim_matrix_test.npy")


# training ----------------------------------------------------------------------------
def make_losses(train_model: nn.Module, run: Run, train_loader: DataLoader) -> LossFn:
    """VTC + VTM of a batch; the distillation weight ramps up over the first epoch."""
    steps_per_epoch = len(train_loader)  # a resumed epoch's loader holds only its remaining steps

    def losses_of(batch, epoch: int, step: int) -> Dict[str, torch.Tensor]:
        video, caption, video_index = batch
        alpha = ramped_alpha(run.config["alpha"], epoch, step, steps_per_epoch)
        loss_vtc, loss_vtm = train_model(video.to(run.device, non_blocking=True), caption, alpha,
                                         video_index.to(run.device))
        return {"loss_vtc": loss_vtc, "loss_vtm": loss_vtm}
    return losses_of


TASK = Task("retrieval", "train_retrieval.py", RETRIEVAL_SCHEMA, build_retrieval_model, make_losses,
            finetune_schedule, DATASETS, served_as="video_text", evaluate=evaluate_split,
            best_metric=BEST_METRIC, outputs=("score_test_t2v.npy", "submission.zip"))
