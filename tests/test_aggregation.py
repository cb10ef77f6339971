"""Bipartite merging, voting, sizes, sources and the r schedule, against plain loops."""
import pytest
import torch

from models.aggregation import _rows, bipartite_matching, importance_matching, pruning
from models.token_state import parse_merging_types, parse_r
from tests.reference_testa import merge_frames, merge_patches


@pytest.mark.parametrize("layout", ["contiguous", "strided", "expanded", "shared index"])
def test_row_selection_equals_a_gather_along_the_token_axis(layout):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 5)  # [..., N, C]
    idx = torch.randint(0, 9, (2, 3, 4, 1))  # [..., k, 1], repeats allowed
    if layout == "strided":  # every other token, as set A of bipartite matching
        x, idx = x[..., ::2, :], idx % 5
    elif layout == "expanded":  # one map seen by every patch position
        x = x[:, :1].expand(2, 3, 9, 5)
    elif layout == "shared index":  # one frame choice for all patch positions
        idx = idx[:, :1]
    expected = x.gather(-2, idx.expand(2, 3, 4, 5))
    assert torch.equal(_rows(x, idx), expected)


def _patch_merge(tokens, size, metric, r):
    reduce = bipartite_matching(metric, r, reserved=1, protect_first=True, vote_frames=False)
    return reduce.merge(tokens, size)


@pytest.mark.parametrize("num_tokens,r", [(17, 1), (17, 4), (17, 8), (16, 7), (197, 12)])
def test_patch_merge_matches_loop_implementation(num_tokens, r):
    torch.manual_seed(num_tokens + r)
    frames, dim = 3, 8
    tokens = torch.randn(frames, num_tokens, dim, dtype=torch.float64)
    metric = torch.randn(frames, num_tokens, 5, dtype=torch.float64)
    size = torch.randint(1, 4, (frames, num_tokens, 1)).double()
    merged, new_size = _patch_merge(tokens, size, metric, r)
    for f in range(frames):
        expected, expected_size = merge_patches(tokens[f], size[f, :, 0], metric[f], r, True)
        torch.testing.assert_close(merged[f], expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(new_size[f, :, 0], expected_size, rtol=0, atol=0)


@pytest.mark.parametrize("num_frames,r,class_token", [(8, 1, True), (9, 3, True), (8, 4, False), (3, 1, True)])
def test_frame_merge_matches_loop_implementation(num_frames, r, class_token):
    torch.manual_seed(num_frames * 10 + r)
    batch, patches, dim = 2, 6, 8
    frames = torch.randn(batch, patches, num_frames, dim, dtype=torch.float64)
    metric = torch.randn(batch, patches, num_frames, 5, dtype=torch.float64)
    size = torch.randint(1, 3, (batch, patches, num_frames, 1)).double()
    reduce = bipartite_matching(metric, r, reserved=int(class_token), protect_first=False, vote_frames=True)
    merged, new_size = reduce.merge(frames, size)
    for b in range(batch):
        expected, expected_size = merge_frames(frames[b], size[b, ..., 0], metric[b], r, class_token)
        torch.testing.assert_close(merged[b], expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(new_size[b, ..., 0], expected_size, rtol=0, atol=0)


def test_patch_voting_hand_worked():
    """Two patch positions prefer frame 1 for frame 0, one prefers frame 3: frame 0 goes to 1.

    Frames 0, 2 are set A; frames 1, 3 set B. Metrics are unit vectors in 2-D."""
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    near0 = torch.tensor([0.8, 0.6])
    # per patch: frames [f0, f1, f2, f3]
    metric = torch.stack([
        torch.stack([e0, e0, e1, near0]),     # f0 -> f1 (1.0), f2 -> f3 (0.6)
        torch.stack([e0, near0, e1, e1]),     # f0 -> f1 (0.8), f2 -> f3 (1.0)
        torch.stack([e0, e1, e1, near0]),     # f0 -> f3 (0.8), f2 -> f1 (1.0)
    ])[None]  # [B=1, L=3, T=4, 2]
    reduce = bipartite_matching(metric, 1, reserved=1, protect_first=False, vote_frames=True)
    # f0 (A index 0): partners B0, B0, B1 -> B0 (frame 1); scores 1.0, 0.8, 0.8 -> mode 0.8
    # f2 (A index 1): partners B1, B1, B0 -> B1 (frame 3); scores 0.6, 1.0, 1.0 -> mode 1.0
    # so f2 merges first, into frame 3, and every patch follows the same decision
    assert reduce.src_idx[0, :, 0, 0].tolist() == [1, 1, 1]
    assert reduce.dst_idx[0, :, 0, 0].tolist() == [1, 1, 1]
    frames = torch.arange(4.0).repeat(3, 1)[None, ..., None]  # value = frame index
    merged, size = reduce.merge(frames, torch.ones_like(frames))
    assert merged[0, :, :, 0].tolist() == [[0.0, 1.0, 2.5]] * 3
    assert size[0, :, :, 0].tolist() == [[1.0, 1.0, 2.0]] * 3


def test_class_token_is_never_merged_and_stays_first():
    torch.manual_seed(0)
    tokens = torch.randn(4, 9, 3)
    metric = tokens.clone()
    metric[:, 0] = metric[:, 1]  # the class token is the best match of token 1
    merged, _ = _patch_merge(tokens, torch.ones(4, 9, 1), metric, 4)
    assert torch.equal(merged[:, 0], tokens[:, 0])


def test_size_weighted_average_preserves_weighted_sum():
    torch.manual_seed(1)
    tokens = torch.randn(2, 5, 33, 16, dtype=torch.float64)
    size = torch.randint(1, 5, (2, 5, 33, 1)).double()
    metric = torch.randn(2, 5, 33, 8, dtype=torch.float64)
    for r in (1, 5, 16):
        merged, new_size = _patch_merge(tokens, size, metric, r)
        assert merged.shape[-2] == 33 - r
        torch.testing.assert_close((merged * new_size).sum(-2), (tokens * size).sum(-2))
        torch.testing.assert_close(new_size.sum(-2), size.sum(-2))


def test_sources_partition_the_original_tokens():
    torch.manual_seed(2)
    tokens = torch.randn(1, 21, 4)
    source = torch.eye(21)[None]
    for r in (3, 4, 5):
        reduce = bipartite_matching(tokens, r, reserved=1, protect_first=True, vote_frames=False)
        tokens, _ = reduce.merge(tokens, torch.ones_like(tokens[..., :1]))
        source = reduce.merge_source(source)
    assert source.shape == (1, 21 - 12, 21)
    assert torch.equal(source.sum(dim=-2), torch.ones(1, 21))  # every original token in one group


def test_r_is_capped_at_half_the_unprotected_tokens():
    metric = torch.randn(1, 1, 5, 4)
    reduce = bipartite_matching(metric, 10, reserved=1, protect_first=False, vote_frames=True)
    assert reduce.src_idx.shape[-2] == 2  # (5 - 1) // 2
    assert bipartite_matching(torch.randn(1, 1, 2, 4), 1, reserved=1, protect_first=False,
                              vote_frames=True) is None  # (2-1)//2 = 0
    assert bipartite_matching(torch.randn(1, 1, 2, 4), 1, reserved=0, protect_first=False,
                              vote_frames=True).src_idx.shape[-2] == 1


def test_importance_merge_moves_least_attended_tokens_and_keeps_the_class_token():
    torch.manual_seed(3)
    tokens = torch.randn(1, 7, 4, dtype=torch.float64)
    importance = torch.tensor([[0.0, 5.0, 0.1, 3.0, 0.2, 4.0, 6.0]], dtype=torch.float64)
    reduce = importance_matching(tokens, importance, 2, reserved=1, protect_first=True,
                                 share_over_patches=False)
    assert reduce.src_idx[0, :, 0].tolist() == [2, 4]  # least important, class token excluded
    assert reduce.keep_idx[0, :, 0].tolist() == [0, 1, 3, 5, 6]
    assert 0 not in reduce.dst_idx[0, :, 0].tolist()
    merged, size = reduce.merge(tokens, torch.ones_like(tokens[..., :1]))
    torch.testing.assert_close((merged * size).sum(-2), tokens.sum(-2))
    kept = pruning(importance, 2, reserved=1, protect_first=True, share_over_patches=False)
    assert torch.equal(kept.merge_source(tokens), tokens[:, [0, 1, 3, 5, 6]])


def test_parse_r_forms():
    assert parse_r([1, 12], 4) == [1, 12, 0, 0]
    assert parse_r(3, 4) == [3, 3, 3, 3]
    # ToMe's schedule: r=8, inflection -0.5 -> min 12, max 4 over 5 operations
    assert parse_r((8, -0.5), 5) == [12, 10, 8, 6, 4]
    assert parse_r([8, 0.0], 3) == [8, 8, 8]
    with pytest.raises(ValueError, match="entries"):
        parse_r([1] * 5, 4)
    with pytest.raises(ValueError, match="non-negative"):
        parse_r([1, -2], 4)


def test_parse_merging_types():
    assert parse_merging_types("frame&patch", 3) == ["frame&patch"] * 3
    assert parse_merging_types("frame-patch", 4) == ["frame", "patch", "frame", "patch"]
    assert parse_merging_types("patch-frame", 3) == ["patch", "frame", "patch"]
    with pytest.raises(ValueError, match="merging_type 'token'"):
        parse_merging_types("token", 3)
