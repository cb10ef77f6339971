"""The TESTA video encoder: layout, exactness against a plain implementation, invariants."""
from pathlib import Path

import pytest
import torch

from helpers import TINY_ENCODER as TINY, random_video, tiny_encoder
from models import build_video_encoder
from models.attention import attend, fused_attention_pays, split_heads
from tests.reference_testa import reference_forward
from engine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RELEASED_KEYS = ROOT / "tests" / "data" / "keys"  # the released checkpoints' layouts

def released_keys(file: str, prefix: str = "visual_encoder."):
    lines = (RELEASED_KEYS / file).read_text().splitlines()
    keys = {}
    for line in lines:
        key, shape = line.split(" ", 1)
        if key.startswith(prefix):
            keys[key[len(prefix):]] = [int(v) for v in shape.strip("[]").split(",") if v.strip()]
    return keys


@pytest.mark.parametrize("config,key_file", [("retrieval_queryd_f32.yaml", "retrieval.txt"),
                                             ("vqa_activitynet_f32.yaml", "vqa.txt"),
                                             ("pretrain_from_blip.yaml", "pretrain.txt")])
def test_state_dict_matches_released_layout(config, key_file):
    with torch.device("meta"):
        encoder = build_video_encoder(load_config(ROOT / "configs" / config))
    state = {k: list(v.shape) for k, v in encoder.state_dict().items()}
    assert state == released_keys(key_file)
    assert list(state) == list(released_keys(key_file))  # same order too
    expected_count = 247 + (12 if config.startswith("pretrain") else 0)
    assert len(state) == expected_count


CASES = [  # (frames, batch, merging_type, testa_r, plan per block)
    (8, 1, "frame&patch", [1, 3] * 12, [(1, 3)] * 12),
    (8, 2, "frame&patch", [1, 3] * 12, [(1, 3)] * 12),
    (16, 1, "frame&patch", [2, 2] * 12, [(2, 2)] * 12),
    (16, 2, "frame&patch", [1, 1] * 12, [(1, 1)] * 12),
    (32, 1, "frame&patch", [3, 1] * 12, [(3, 1)] * 12),
    (32, 2, "frame&patch", [1, 1] * 12, [(1, 1)] * 12),
    (8, 2, "patch", [3] * 12, [(0, 3)] * 12),
    (16, 1, "patch", [2] * 12, [(0, 2)] * 12),
    (32, 2, "patch", [1] * 12, [(0, 1)] * 12),
    (8, 1, "frame&patch", 0, [(0, 0)] * 12),
    (16, 2, "frame&patch", 0, [(0, 0)] * 12),
    (32, 1, "patch", 0, [(0, 0)] * 12),
]


@pytest.mark.parametrize("frames,batch,merging_type,testa_r,plan", CASES)
def test_matches_plain_implementation_float64(frames, batch, merging_type, testa_r, plan):
    encoder = tiny_encoder(frames + batch, num_frames=frames, merging_type=merging_type,
                           testa_r=testa_r)
    video = random_video(batch, frames, seed=frames * batch)
    with torch.no_grad():
        out = encoder(video)
        expected = reference_forward(encoder.state_dict(), video, heads=4, plan=plan)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-6


def test_no_aggregation_is_the_plain_timesformer():
    video = random_video(2, 8)
    off = tiny_encoder(3, token_merging=False, testa_r=[1, 3] * 12)
    zero = tiny_encoder(3, token_merging=True, testa_r=0)
    with torch.no_grad():
        plain = reference_forward(off.state_dict(), video, heads=4, plan=[(0, 0)] * 12)
        assert off(video).shape == (2, 1 + 16 * 8, 64)
        torch.testing.assert_close(off(video), plain, rtol=0, atol=1e-10)
        torch.testing.assert_close(zero(video), plain, rtol=0, atol=1e-10)


def test_learnable_temporal_scaling_matches_plain_implementation():
    encoder = tiny_encoder(5, learnable_temporal_scaling=True, testa_r=[0, 2] * 12)
    video = random_video(1, 8)
    with torch.no_grad():
        expected = reference_forward(encoder.state_dict(), video, heads=4, plan=[(0, 2)] * 12)
        torch.testing.assert_close(encoder(video), expected, rtol=0, atol=1e-8)


def test_token_counts_follow_the_schedule_with_caps():
    """8 frames, R_T=1, R_S=3 for 12 blocks; 16 patches. Frames stop at 2 ((2-1)//2 = 0);
    patches lose min(3, L//2) per block."""
    encoder = tiny_encoder(testa_r=[1, 3] * 12)
    frames = [7, 6, 5, 4, 3, 2, 2, 2, 2, 2, 2, 2]
    patches = [13, 10, 7, 4, 2, 1, 1, 1, 1, 1, 1, 1]
    video = random_video(1, 8)
    with torch.no_grad():
        for block in range(12):
            tokens, state = encoder.forward_with_state(video, num_blocks=block + 1)
            assert (state.num_frames, state.num_patches) == (frames[block], patches[block])
            assert tokens.shape[1] == 1 + frames[block] * patches[block]


@pytest.mark.parametrize("config,frames,agg,gmacs,tokens", [
    ("retrieval_queryd_f32.yaml", None, True, 419.4, 1041),
    ("retrieval_queryd_f32.yaml", None, False, 785.9, 6273),
    ("retrieval_queryd_f96.yaml", None, True, 1379.9, 4801),
    ("retrieval_didemo_f96.yaml", None, False, 2379.9, 18817),
    ("retrieval_queryd_f16.yaml", None, True, 228.7, 689),
    ("retrieval_queryd_f32.yaml", 16, False, 392.1, 3137),
])
def test_paper_cost_table(config, frames, agg, gmacs, tokens):
    from models.cost import count, encoder_config
    result = count(encoder_config(load_config(ROOT / "configs" / config), frames, agg))
    assert result["tokens_out"] == tokens
    assert abs(result["gmacs"] - gmacs) <= 0.005 * gmacs


def test_sources_sizes_and_frames_are_consistent():
    encoder = tiny_encoder(7, testa_r=[1, 3] * 12)
    with torch.no_grad():
        tokens, state = encoder.forward_with_state(random_video(2, 8), track_source=True)
    source = state.source[:, :, 1:]  # [B, T', L', T0*L0]
    assert source.shape == (2, 2, 1, 8 * 16)
    # every original patch token lies in exactly one output token
    assert torch.equal(source.sum(dim=(1, 2)), torch.ones(2, 128, dtype=source.dtype))
    # a token's size is the number of originals it stands for
    torch.testing.assert_close(state.size[:, :, 1:, 0], source.sum(-1))
    assert torch.equal(state.frame_source.sum(1), torch.ones(2, 8, dtype=source.dtype))


def test_sources_for_patch_only_merging_stay_within_their_frame():
    encoder = tiny_encoder(8, merging_type="patch", testa_r=[2] * 12)
    with torch.no_grad():
        _, state = encoder.forward_with_state(random_video(1, 4), track_source=True)
    source = state.source[0, :, 1:].reshape(4, -1, 4, 16)  # [T, L', T0, L0]
    for t in range(4):
        others = [u for u in range(4) if u != t]
        assert source[t][:, others].sum() == 0


def test_proportional_attention_per_frame():
    video = random_video(2, 8)
    plain = tiny_encoder(9, testa_r=0)
    weighted = tiny_encoder(9, testa_r=0, prop_attn=True)
    merging = tiny_encoder(9, testa_r=[1, 3] * 12, prop_attn=True)
    with torch.no_grad():
        torch.testing.assert_close(weighted(video), plain(video), rtol=0, atol=1e-12)  # sizes all 1
        expected = reference_forward(merging.state_dict(), video, heads=4, plan=[(1, 3)] * 12,
                                     prop_attn=True)
        torch.testing.assert_close(merging(video), expected, rtol=0, atol=1e-8)


def test_gradient_checkpointing_gives_the_same_gradients():
    video = random_video(1, 4).float()
    grads = []
    for ckpt in (False, True):
        encoder = tiny_encoder(10, num_frames=4, testa_r=[1, 3] * 12, vit_grad_ckpt=ckpt).float().train()
        encoder(video).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("aggregation", ["geometry", "importance", "prune"])
@pytest.mark.parametrize("merging_type", ["frame&patch", "frame-patch", "patch-frame", "frame", "patch"])
def test_every_mode_runs_and_keeps_counts(aggregation, merging_type):
    testa_r = [1, 2] * 12 if merging_type == "frame&patch" else [1] * 12
    encoder = tiny_encoder(11, merging_type=merging_type, aggregation=aggregation, testa_r=testa_r)
    with torch.no_grad():
        tokens, state = encoder.forward_with_state(random_video(2, 8), track_source=True)
    assert tokens.shape == (2, 1 + state.num_frames * state.num_patches, 64)
    assert torch.isfinite(tokens).all()
    covered = state.source[:, :, 1:].sum(dim=(1, 2))
    if aggregation == "prune":
        assert covered.max() == 1  # dropped tokens are nowhere
    else:
        assert torch.equal(covered, torch.ones_like(covered))


def test_only_temporal_merging_does_not_grow_the_sequence():
    encoder = tiny_encoder(12, merging_type="frame", testa_r=[1] * 12)
    with torch.no_grad():
        tokens, state = encoder.forward_with_state(random_video(1, 8))
    assert state.num_patches == 16
    assert state.num_frames == 1  # no class token protected: (2 - 0) // 2 = 1
    assert tokens.shape[1] == 1 + 16


def test_tome_baseline_joint_attention():
    encoder = tiny_encoder(13, attention_type="joint_space_time", merging_type="patch", testa_r=5)
    with torch.no_grad():
        tokens, state = encoder.forward_with_state(random_video(2, 8), track_source=True)
    assert tokens.shape == (2, 1 + 16 * 8 - 5 * 12, 64)
    source = state.source[:, 1:]
    assert torch.equal(source.sum(1), torch.ones(2, 128, dtype=source.dtype))
    torch.testing.assert_close(state.size[:, 1:, 0], source.sum(-1))


def test_space_only_returns_every_frame():
    encoder = tiny_encoder(14, attention_type="space_only", merging_type="patch", testa_r=1)
    assert "time_embed" not in encoder.state_dict()
    with torch.no_grad():
        tokens = encoder(random_video(2, 4))
    assert tokens.shape == (2, 4 * (1 + 16 - 12), 64)


def test_runs_in_bfloat16_and_resizes_embeddings():
    encoder = tiny_encoder(15, testa_r=[1, 3] * 12).to(torch.bfloat16)
    with torch.no_grad():
        tokens = encoder(random_video(1, 6, size=96).to(torch.bfloat16))  # 6x6 grid, 6 frames
    assert tokens.shape[0] == 1 and torch.isfinite(tokens.float()).all()



@pytest.mark.parametrize("with_bias", [False, True])
def test_explicit_attention_equals_the_fused_kernel_float64(with_bias):
    q, k, v = torch.randn(3, 2, 4, 7, 8, dtype=torch.float64).unbind(0)  # [batch, H, N, Dh]
    bias = None
    if with_bias:  # log sizes, and a key of size 0 (-inf) masked for every query
        size = torch.rand(2, 7, dtype=torch.float64) + 0.5
        size[:, 3] = 0
        bias = size.log()[:, None, None, :]
    fused, no_weights = attend(q, k, v, 8 ** -0.5, bias)
    explicit, weights = attend(q, k, v, 8 ** -0.5, bias, return_attn=True)
    assert no_weights is None and weights.shape == (2, 4, 7, 7)
    torch.testing.assert_close(explicit, fused, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7, dtype=torch.float64))
    if with_bias:
        assert (weights[..., 3] == 0).all()


def test_bfloat16_attention_on_cpu_stays_within_its_rounding():
    # on a CPU, bfloat16 takes the explicit products (faster there than the fused kernel)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 6, 4, 40, 16, dtype=torch.float64).unbind(0)
    assert fused_attention_pays(q) and fused_attention_pays(q.float())
    assert not fused_attention_pays(q.bfloat16()) and not fused_attention_pays(q.half())
    exact, _ = attend(q, k, v, 16 ** -0.5)
    rounded, _ = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), 16 ** -0.5)
    error = (rounded.double() - exact).abs()
    # bfloat16 keeps 8 significant bits (2^-9 relative per rounding); measured: 0.01, 0.0009
    assert error.max() < 0.03 and error.mean() < 0.003


def test_bfloat16_attention_takes_its_softmax_in_float32_and_rounds_it_once():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4, 31, 16) * 2).bfloat16().unbind(0)  # rows of 31 keys
    out, weights = attend(q, k, v, 0.25, return_attn=True)
    logits = (q @ k.transpose(-2, -1)) * 0.25  # bfloat16; exact scaling by a power of two
    assert weights.dtype == torch.float32  # the weights as computed, for importance
    torch.testing.assert_close(weights.double(), logits.double().softmax(dim=-1),
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(out, weights.bfloat16() @ v)  # the product: the weights rounded once


def test_split_heads_gives_views_to_the_fused_kernel_and_one_copy_to_the_products():
    qkv = torch.randn(2, 5, 3 * 4 * 8)  # [batch, N, 3 * H * Dh]
    expected = qkv.reshape(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)  # [3, batch, H, N, Dh]
    q, k, v = split_heads(qkv, 4)  # float32: the fused kernel reads them strided
    assert all(t.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() for t in (q, k, v))
    assert torch.equal(torch.stack([q, k, v]), expected)
    q, k, v = split_heads(qkv.bfloat16(), 4)  # explicit products on a CPU: contiguous
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert torch.equal(torch.stack([q, k, v]), expected.bfloat16())


@pytest.mark.parametrize("overrides,message", [
    (dict(merging_type="tokens"), "merging_type 'tokens'"),
    (dict(aggregation="random"), "aggregation 'random'"),
    (dict(attention_type="axial"), "attention_type 'axial'"),
    (dict(testa_r=[1, 9] * 12), "remove 9 patchs|at most 8"),
    (dict(testa_r=[4, 1] * 12), "at most 3"),
    (dict(testa_r=[1] * 30), "30 entries"),
    (dict(image_size=70), "multiple of patch_size"),
    (dict(num_frames=0), "num_frames"),
])
def test_bad_settings_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_video_encoder(dict(TINY, **overrides))


def test_frames_that_do_not_fit_the_patch_grid_raise():
    encoder = tiny_encoder()
    with pytest.raises(ValueError, match="patch grid"):
        encoder(torch.zeros(1, 3, 8, 72, 64, dtype=torch.float64))


def test_benchmark_cli_counts_without_running(capsys):
    import json
    from tools.benchmark import main
    main(["--config", str(ROOT / "configs" / "retrieval_queryd_f32.yaml"), "--runs", "0",
          "--compare-no-agg", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["gmacs"], report["tokens_in"], report["tokens_out"]) == (419.4, 6273, 1041)
    assert (report["no_agg"]["gmacs"], report["no_agg"]["tokens_out"]) == (785.9, 6273)
    assert report["seconds"] is None and "speedup" not in report
