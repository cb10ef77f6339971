"""Fixtures shared by the test modules: tiny model configs, synthetic clips and captions,
a tiny synthetic long-video dataset and a retrieval config on it (tests/helpers.py builds
them). The run's header names the transformers it imports
(`make test-floor` runs part of the suite on a second version)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import helpers


def pytest_report_header(config):
    return f"transformers {transformers.__version__} ({os.path.dirname(transformers.__file__)})"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are collected everywhere and skipped, with the reason, where
    torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    reason = (f"no CUDA device: torch {torch.__version__} "
              + (f"(CUDA {torch.version.cuda}) sees none" if torch.version.cuda else "is a CPU-only build"))
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_config():
    """`tiny_config(**overrides)` -> a config dict of the tiny models."""
    return helpers.tiny_config


@pytest.fixture(scope="session")
def tiny_video():
    """`tiny_video(batch, seed=0)` -> random clips that fit the tiny models."""
    return helpers.tiny_video


@pytest.fixture(scope="session")
def captions() -> list:
    """Four captions, one per tiny video."""
    return list(helpers.CAPTIONS)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """12 videos (6 train, 6 held out) in the ActivityNet Captions and -QA formats."""
    root = tmp_path_factory.mktemp("synthetic")
    subprocess.run([sys.executable, str(helpers.REPO_ROOT / "tools" / "make_synthetic.py"),
                    "--out", str(root), "--videos", "12", "--seed", "0", "--size", "32",
                    "--frames-per-event", "4", "6", "--val-fraction", "0.5", "--workers", "1"],
                   check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def retrieval_config(synthetic, tmp_path_factory) -> str:
    """The shipped ActivityNet Captions retrieval config with the tiny model, on `synthetic`."""
    return helpers.write_config(
        tmp_path_factory.mktemp("config") / "retrieval.yaml", "retrieval_activitynet_f32.yaml",
        video_root=str(synthetic / "videos"), ann_root=str(synthetic / "annotations"),
        num_frm_test=4, max_words=32, batch_size_train=2, batch_size_test=4, embed_dim=16,
        queue_size=8, k_test=4, k_test_batch_size=3)
