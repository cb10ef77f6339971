"""Checkpoint loading rules (BLIP -> TESTA, other frame counts and image sizes), atomic
saving, and clear errors for bad files."""
import argparse
import os
import pickle
import re

import numpy as np
import pytest
import torch

from engine.saving import model_checkpoint, save_checkpoint
from models import (CheckpointError, build_pretrain_model, build_retrieval_model,
                    load_checkpoint, read_checkpoint)

TEMPORAL = re.compile(r"\.(temporal_\w+|time_embed)(\.|$)")


def blip_layout(state_dict: dict) -> dict:
    """What an image (BLIP) checkpoint holds: no temporal parts, no time_embed."""
    return {key: value for key, value in state_dict.items() if not TEMPORAL.search(key)}


def test_blip_checkpoint_gets_temporal_attention_from_spatial(tiny_config, tmp_path):
    torch.manual_seed(0)
    source = build_retrieval_model(tiny_config())
    state = {key: value for key, value in blip_layout(source.state_dict()).items()
             if not key.startswith(("visual_encoder_m.", "text_encoder_m."))}
    state["text_encoder.embeddings.position_ids"] = torch.arange(512)[None]
    path = tmp_path / "model_base.pth"
    torch.save({"model": state}, path)

    model = build_retrieval_model(tiny_config())
    report = load_checkpoint(model, str(path))

    for block, loaded in zip(source.visual_encoder.blocks, model.visual_encoder.blocks):
        torch.testing.assert_close(loaded.temporal_attn.qkv.weight, block.attn.qkv.weight)
        torch.testing.assert_close(loaded.temporal_attn.proj.bias, block.attn.proj.bias)
        torch.testing.assert_close(loaded.temporal_norm1.weight, block.norm1.weight)
        torch.testing.assert_close(loaded.attn.qkv.weight, block.attn.qkv.weight)
    for main, momentum in ((model.visual_encoder, model.visual_encoder_m),
                           (model.text_encoder, model.text_encoder_m)):
        for (name, param), param_m in zip(main.state_dict().items(), momentum.state_dict().values()):
            torch.testing.assert_close(param_m, param, msg=name)

    assert len(report.temporal_copied) == 2 * 6  # 2 blocks x qkv, proj, temporal_norm1 (w, b)
    assert all("text_" not in key for key in report.temporal_copied)
    assert sorted(report.missing) == sorted(report.expected_missing)
    assert "visual_encoder.blocks.0.temporal_fc.weight" in report.missing
    assert "visual_encoder.time_embed" in report.missing
    assert report.unexpected == [] and len(report.dropped) == 4
    assert report.ignored == ["text_encoder.embeddings.position_ids"]
    assert any(key.startswith("text_encoder_m.") for key in report.momentum_copied)
    assert report.summary() == (f"loaded model_base.pth: {report.loaded} tensors, 5 missing "
                                f"(5 expected), 0 unexpected, 12 temporal copied, "
                                f"4 queues dropped, {len(report.momentum_copied)} momentum copied")
    assert "missing, expected" in str(report) and "temporal_fc" in str(report)


def test_time_embed_nearest_interpolated_from_8_to_32_frames(tiny_config, tmp_path):
    source = build_retrieval_model(tiny_config(num_frames=8, testa_r=0))
    with torch.no_grad():
        for encoder in (source.visual_encoder, source.visual_encoder_m):
            encoder.time_embed.copy_(torch.arange(8.0)[None, :, None].expand(1, 8, 64))
    path = tmp_path / "testa_f8.pth"
    save_checkpoint(str(path), model_checkpoint(source, tiny_config(num_frames=8), epoch=0))

    model = build_retrieval_model(tiny_config(num_frames=32, testa_r=0))
    report = load_checkpoint(model, str(path))
    frame_of = [i // 4 for i in range(32)]  # nearest: output frame i reads frame floor(i * 8 / 32)
    for encoder in (model.visual_encoder, model.visual_encoder_m):
        assert encoder.time_embed.shape == (1, 32, 64)
        assert encoder.time_embed[0, :, 0].tolist() == frame_of
        assert (encoder.time_embed[0, :, 5] == encoder.time_embed[0, :, 0]).all()
    assert report.summary() == (f"loaded testa_f8.pth: {report.loaded} tensors, 0 missing, "
                                "0 unexpected, time_embed 8->32 interpolated, 4 queues dropped")


def test_pos_embed_grid_interpolated_class_slot_kept(tiny_config, tmp_path):
    source = build_retrieval_model(tiny_config(image_size=48, testa_r=0))  # 3x3 patches
    with torch.no_grad():
        pos_embed = torch.cat([torch.full((1, 1, 64), -7.0), torch.full((1, 9, 64), 2.5)], dim=1)
        source.visual_encoder.pos_embed.copy_(pos_embed)
    path = tmp_path / "model_384.pth"
    torch.save({"model": source.state_dict()}, path)

    model = build_retrieval_model(tiny_config(image_size=32, testa_r=0))  # 2x2 patches
    report = load_checkpoint(model, str(path))
    loaded = model.visual_encoder.pos_embed
    assert loaded.shape == (1, 5, 64)
    assert (loaded[0, 0] == -7.0).all()
    torch.testing.assert_close(loaded[0, 1:], torch.full((4, 64), 2.5))
    assert "visual_encoder.pos_embed 10->5" in report.interpolated
    assert "pos_embed 10->5 interpolated" in report.summary()


def test_save_is_atomic_and_round_trips(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    path = tmp_path / "out" / "checkpoint_best.pth"
    save_checkpoint(str(path), model_checkpoint(model, tiny_config(), epoch=3, task="pretraining",
                                                optimizer=optimizer, best=0.5))

    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert set(saved) == {"model", "config", "epoch", "task", "optimizer", "best"}
    assert saved["epoch"] == 3 and saved["config"]["vision_width"] == 64
    assert saved["task"] == "pretraining"
    assert os.listdir(path.parent) == ["checkpoint_best.pth"]

    fresh = build_pretrain_model(tiny_config())
    report = load_checkpoint(fresh, str(path))
    assert report.missing == [] and report.unexpected == [] and report.notes == []
    for key, value in model.state_dict().items():
        if "queue" not in key:
            torch.testing.assert_close(fresh.state_dict()[key], value, msg=key)

    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(str(path), model_checkpoint(model, tiny_config(), epoch=4,
                                                    unpicklable=lambda: None))
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["checkpoint_best.pth"]


def test_numpy_scalars_and_namespaces_load_without_trust(tiny_config, tmp_path):
    """What BLIP-style training scripts put next to the weights is on the safe list."""
    model = build_retrieval_model(tiny_config())
    path = tmp_path / "numpy_config.pth"
    torch.save({"model": model.state_dict(), "config": {"lr": np.float64(1e-5)},
                "args": argparse.Namespace(seed=np.int64(3)), "scores": np.zeros(3)}, path)
    checkpoint, notes = read_checkpoint(str(path))
    assert checkpoint["config"]["lr"] == 1e-5 and checkpoint["args"].seed == 3
    assert notes == []
    report = load_checkpoint(model, str(path))
    assert report.missing == [] and report.notes == []


def test_a_checkpoint_is_mapped_and_read_where_it_cannot_be_mapped(tmp_path, monkeypatch):
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save({"model": weights, "config": {"a": 1}}, tmp_path / "c.pth")
    load, calls = torch.load, []

    def recorded(*args, mmap=None, **kwargs):
        calls.append(mmap)
        if mmap:
            raise OSError("mmap: operation not supported")  # as on such a file system
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recorded)
    checkpoint, _ = read_checkpoint(str(tmp_path / "c.pth"))
    assert calls == [True, None]  # mapped first, then read
    assert torch.equal(checkpoint["model"]["w"], weights["w"])


@pytest.fixture(scope="module")
def tiny_retrieval(tiny_config):
    return build_retrieval_model(tiny_config())


def write_bad_file(tmp_path, kind: str, model) -> str:
    path = tmp_path / f"{kind}.pth"
    good = {"model": model.state_dict()}
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"model": {"a": 1}}))
    elif kind == "no_model":
        torch.save({"state_dict": model.state_dict()}, path)
    elif kind == "non_tensor":
        torch.save({"model": {**model.state_dict(), "vision_proj.bias": [1, 2, 3]}}, path)
    elif kind == "wrong_shape":
        torch.save({"model": {**model.state_dict(), "itm_head.weight": torch.zeros(3, 64)}}, path)
    return str(path)


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such checkpoint file"),
    ("directory", "a folder, not a checkpoint file"),
    ("text", "not a PyTorch checkpoint"),
    ("truncated", "not a PyTorch checkpoint, or truncated"),
    ("plain_pickle", "not a PyTorch checkpoint"),
    ("no_model", "expected a dict with a 'model' state dict"),
    ("non_tensor", "'vision_proj.bias' is list, not a tensor"),
    ("wrong_shape", r"itm_head.weight has shape \(3, 64\) in the file but \(2, 64\) in the model"),
])
def test_bad_files_raise_clear_errors(tmp_path, tiny_retrieval, kind, message):
    path = write_bad_file(tmp_path, kind, tiny_retrieval)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(tiny_retrieval, path)
    assert path in str(error.value)
    assert isinstance(error.value, ValueError)
