"""The CPU demo: train a small TESTA retrieval model on the synthetic long-video set.

    make demo                      # = python tools/demo.py, under 10 minutes on 2 CPU cores
    python tools/demo.py --quick   # about a minute, a smoke run of every step

Generates the synthetic dataset if it is absent (tools/make_synthetic.py), trains
configs/demo_retrieval.yaml with train_retrieval.py (aggregation on), evaluates on the
100 held-out videos, prints R@1/5/10 in both directions next to chance and the video
encoder's GMACs with and without aggregation, draws which frames and patches one test
video's tokens merged, and writes the figures to output/demo/results.json.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from ruamel.yaml import YAML

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
import train_retrieval  # noqa: E402
from models import build_video_encoder  # noqa: E402
from tools.benchmark import count, encoder_config  # noqa: E402
from tools.visualize_aggregation import load_visual_encoder, visualize_video  # noqa: E402

CONFIG = REPO_ROOT / "configs" / "demo_retrieval.yaml"
RECALL_KEYS = [f"{direction}_r{k}" for direction in ("t2v", "v2t") for k in (1, 5, 10)]


class Mode:
    """What one demo run generates and trains."""

    def __init__(self, quick: bool, root: Path):
        self.data = root / "data" / ("synthetic_quick" if quick else "synthetic")
        self.output = root / "output" / ("demo_quick" if quick else "demo")
        # 2000 training and 100 test videos; the quick run: 24 and 8, fewer frames and steps
        self.videos, self.test_videos = (32, 8) if quick else (2100, 100)
        self.overrides = (["max_epoch=1", "num_frames=4", "num_frm_train=4", "num_frm_test=4",
                           "testa_r=[1,3,1,3,1,3,1,3]", "batch_size_train=8", "k_test=4"]
                          if quick else [])


def ensure_dataset(mode: Mode) -> None:
    if (mode.data / "annotations" / "val.json").is_file():
        print(f"dataset: {mode.data} (already there)")
        return
    print(f"dataset: generating {mode.videos} synthetic videos in {mode.data}")
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_synthetic.py"),
                    "--out", str(mode.data), "--videos", str(mode.videos), "--seed", "0", "--size", "64",
                    "--val-fraction", str(mode.test_videos / mode.videos)], check=True)


def train_and_test(mode: Mode) -> dict:
    """Fine-tune from scratch, then test checkpoint_best.pth; the test metrics."""
    opts = [f"video_root={mode.data / 'videos'}",
            f"ann_root={mode.data / 'annotations'}", *mode.overrides]
    train_retrieval.main(["--config", str(CONFIG), "--output_dir", str(mode.output),
                          "--opts", *opts])
    with open(mode.output / "test_metrics.json") as f:
        return json.load(f)["metrics"]


def encoder_gmacs(config: dict) -> tuple:
    """GMACs of the video encoder for one test video, with and without aggregation."""
    return (count(encoder_config(config, None, True), decimals=4)["gmacs"],
            count(encoder_config(config, None, False), decimals=4)["gmacs"])


def draw_test_video(mode: Mode, config: dict) -> Path:
    """The trained encoder's merging of the first test video, after the last block."""
    with open(mode.data / "annotations" / "val.json") as f:
        video = mode.data / "videos" / json.load(f)[0]["video"]
    encoder = build_video_encoder(config).eval()
    load_visual_encoder(encoder, str(mode.output / "checkpoint_best.pth"))
    return visualize_video(encoder, str(video), mode.output / "aggregation.png")


def print_table(results: dict, num_test: int) -> None:
    print(f"\ntest set: {num_test} synthetic long videos, paragraph-to-video retrieval")
    print(f"{'':14}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
    for direction, name in (("t2v", "text->video"), ("v2t", "video->text")):
        print(f"{name:14}" + "".join(f"{results[f'{direction}_r{k}']:8.1f}" for k in (1, 5, 10)))
    print(f"{'chance':14}" + "".join(f"{100 * min(k, num_test) / num_test:8.1f}" for k in (1, 5, 10)))
    reduction = 100 * (1 - results["gmacs_agg"] / results["gmacs_noagg"])
    print(f"\nvideo encoder: {results['gmacs_agg']} GMACs with aggregation, "
          f"{results['gmacs_noagg']} without ({reduction:.0f}% fewer)")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="where data/ and output/ are (default: the current directory)")
    args = parser.parse_args(argv)
    mode = Mode(args.quick, args.root)
    start = time.time()
    torch.manual_seed(0)
    ensure_dataset(mode)
    metrics = train_and_test(mode)
    config = YAML(typ="safe").load((mode.output / "config.yaml").read_text())
    num_test = len(json.loads((mode.data / "annotations" / "val.json").read_text()))
    gmacs_agg, gmacs_noagg = encoder_gmacs(config)
    picture = draw_test_video(mode, config)
    results = {key: round(float(metrics[key]), 2) for key in RECALL_KEYS}
    results.update(chance=round(100 / num_test, 2), gmacs_agg=gmacs_agg, gmacs_noagg=gmacs_noagg,
                   minutes=round((time.time() - start) / 60, 2))
    (mode.output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print_table(results, num_test)
    print(f"aggregation picture: {picture}")
    print(f"results: {mode.output / 'results.json'} ({results['minutes']} minutes)")
    return results


if __name__ == "__main__":
    main()
