"""Retrieval metrics against hand-built score matrices, and the evaluation protocol
(top-k candidates re-scored as `itm_logit + sim`, -100 elsewhere) with a stand-in model
whose similarities and match logits are known."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from engine.precision import build_precision
from engine.run import Run
from tasks.retrieval import candidate_masks, evaluate, itm_eval, ranks_in_rows

METRIC_NAMES = ["t2v_r1", "t2v_r5", "t2v_r10", "t2v_r_mean",
                "v2t_r1", "v2t_r5", "v2t_r10", "v2t_r_mean", "r_mean"]


def scores_with_ranks(num_cols: int, targets, ranks) -> torch.Tensor:
    """`[len(targets), num_cols]` scores where column `targets[i]` sits at 0-based rank
    `ranks[i]` of row i (the other columns keep their order)."""
    rows = []
    for target, rank in zip(targets, ranks):
        order = [c for c in range(num_cols) if c != target]
        order.insert(rank, target)
        row = torch.empty(num_cols)
        row[order] = torch.arange(num_cols, 0, -1, dtype=torch.float)  # best first
        rows.append(row)
    return torch.stack(rows)


def test_small_hand_built_example():
    # 3 videos, 4 texts: video 0 has texts 0 and 1, video 1 text 2, video 2 text 3
    txt2video, video2txt = [0, 0, 1, 2], [[0, 1], [2], [3]]
    scores_t2v = torch.tensor([[0.9, 0.1, 0.2],     # text 0: its video 0 first
                               [0.1, 0.8, 0.3],     # text 1: video 0 third
                               [0.5, 0.4, 0.6],     # text 2: video 1 third
                               [-100., 0.2, 0.7]])  # text 3: video 2 first
    scores_v2t = torch.tensor([[0.1, 0.7, 0.2, 0.3],   # video 0: text 1 first
                               [0.9, 0.1, 0.5, 0.2],   # video 1: text 2 second
                               [0.4, 0.3, 0.2, 0.1]])  # video 2: text 3 fourth
    metrics = itm_eval(scores_v2t, scores_t2v, txt2video, video2txt)
    assert list(metrics) == METRIC_NAMES
    assert metrics["t2v_r1"] == pytest.approx(50.0)
    assert metrics["t2v_r5"] == metrics["t2v_r10"] == pytest.approx(100.0)
    assert metrics["v2t_r1"] == pytest.approx(100 / 3)
    assert metrics["v2t_r5"] == metrics["v2t_r10"] == pytest.approx(100.0)
    assert metrics["t2v_r_mean"] == pytest.approx(250 / 3)
    assert metrics["v2t_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert metrics["r_mean"] == pytest.approx((metrics["t2v_r_mean"] + metrics["v2t_r_mean"]) / 2)


def test_recall_thresholds_at_1_5_10():
    # 12 videos with one text each; the ground truth at ranks 0, 4, 5, 9, 10, 11
    ranks = [0, 4, 5, 9, 10, 11] * 2
    identity = list(range(12))
    scores = scores_with_ranks(12, identity, ranks)
    metrics = itm_eval(scores, scores, identity, [[i] for i in identity])
    for direction in ("t2v", "v2t"):
        assert metrics[f"{direction}_r1"] == pytest.approx(100 / 6)   # rank 0
        assert metrics[f"{direction}_r5"] == pytest.approx(200 / 6)   # ranks 0, 4
        assert metrics[f"{direction}_r10"] == pytest.approx(400 / 6)  # ranks 0, 4, 5, 9


def test_video_to_text_uses_best_ranked_text_of_the_video():
    txt2video, video2txt = [0, 0, 0, 1], [[0, 1, 2], [3]]
    scores_v2t = torch.tensor([[0.0, 0.1, 0.9, 0.5],   # text 2 of video 0 ranks first
                               [0.9, 0.8, 0.7, 0.1]])  # video 1's only text ranks last
    scores_t2v = torch.eye(4, 2)
    metrics = itm_eval(scores_v2t, scores_t2v, txt2video, video2txt)
    assert metrics["v2t_r1"] == pytest.approx(50.0)
    assert metrics["v2t_r5"] == pytest.approx(100.0)


def test_ties_keep_column_order():
    ranks = ranks_in_rows(torch.tensor([[1.0, 3.0, 3.0, -100.0, -100.0]]))
    assert ranks.tolist() == [[2, 0, 1, 3, 4]]


def test_score_matrix_shapes_are_checked():
    with pytest.raises(ValueError, match="do not fit 2 videos and 3 texts"):
        itm_eval(torch.zeros(2, 3), torch.zeros(2, 3), [0, 1, 1], [[0], [1, 2]])


# the protocol with a stand-in model ---------------------------------------------------
SIMS = torch.tensor([[0.9, 0.1, 0.3, 0.2],  # [V=3, T=4] similarities v @ t^T
                     [0.2, 0.8, 0.1, 0.4],
                     [0.3, 0.2, 0.7, 0.6]])
ITM = torch.tensor([[0.5, -1.0, 2.0, 0.0],  # match logit of every (video, text) pair
                    [1.0, 0.2, -0.5, 3.0],
                    [0.0, 0.4, 0.1, -2.0]])


class KnownScoresModel(torch.nn.Module):
    """Video i has feature row i of `video_feat`, text j row j of `text_feat`, with
    `video_feat @ text_feat.T == SIMS`; the match logit of (i, j) is `ITM[i, j]`."""

    def __init__(self):
        super().__init__()
        self.video_feat, self.text_feat = SIMS, torch.eye(4)

    def encode_text(self, captions):
        index = torch.tensor([int(c) for c in captions])
        input_ids = torch.stack([torch.zeros_like(index), index], dim=1)  # [B, 2]
        return self.text_feat[index], input_ids, torch.ones_like(input_ids)

    def encode_video(self, video):
        index = video[:, 0].long()
        return self.video_feat[index], index.float()[:, None, None], None  # tokens [B, 1, 1]

    def itm_logits(self, video_tokens, input_ids, attention_mask, video_mask=None, selection=None):
        assert selection is None  # the known scores are those of every token
        match = ITM[video_tokens[:, 0, 0].long(), input_ids[:, 1]]
        return torch.stack([-match, match], dim=1)


class IndexedVideos(Dataset):
    text = ["0", "1", "2", "3"]
    video = ["v0", "v1", "v2"]

    def __len__(self):
        return len(self.video)

    def __getitem__(self, index):
        return torch.tensor([float(index)]), index


def run_protocol(tmp_path, k_test: int, batch_size: int):
    config = {"k_test": k_test, "k_test_batch_size": batch_size, "embed_dim": 4}
    run = Run(config, tmp_path, torch.device("cpu"), build_precision("none", torch.device("cpu")))
    return evaluate(KnownScoresModel(), DataLoader(IndexedVideos(), batch_size=2), run)


def test_candidate_masks_take_top_k_of_rows_and_columns():
    v2t, t2v = candidate_masks(SIMS, 2)
    assert v2t.tolist() == [[True, False, True, False],   # the 2 best texts of each video
                            [False, True, False, True],
                            [False, False, True, True]]
    assert t2v.tolist() == [[True, False, True, False],   # the 2 best videos of each text
                            [False, True, False, True],
                            [True, True, True, True]]


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_protocol_reranks_top_k_with_itm_plus_sim(tmp_path, batch_size):
    scores_v2t, scores_t2v = run_protocol(tmp_path, k_test=2, batch_size=batch_size)
    v2t, t2v = candidate_masks(SIMS, 2)
    reranked = ITM + SIMS
    torch.testing.assert_close(scores_v2t, torch.where(v2t, reranked, torch.tensor(-100.0)))
    torch.testing.assert_close(scores_t2v, torch.where(t2v, reranked, torch.tensor(-100.0)).t())


def test_protocol_with_k_test_beyond_candidates_scores_everything(tmp_path):
    scores_v2t, scores_t2v = run_protocol(tmp_path, k_test=128, batch_size=5)
    torch.testing.assert_close(scores_v2t, ITM + SIMS)
    torch.testing.assert_close(scores_t2v, (ITM + SIMS).t())
