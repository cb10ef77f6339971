"""How the cost of TESTA, no aggregation and ToMe grows with the number of frames.

    python tools/scaling.py --frames 8 16 32 64 96 128 --runs 1 --time-limit 300
        # writes output/scaling.csv and output/scaling.png (--out-csv, --out-png elsewhere)

For every frame count and setting the video encoder's GMACs and output tokens are
counted on the meta device (always). Forward time (median of `--runs` after one warm-up)
and peak memory at batch 1 are measured only where the row is predicted to finish within
`--time-limit` seconds; the other rows are marked 'counted only'. Before running, the
largest attention matrix of the row is estimated (materialised, float32, as eager
attention holds it); a row whose matrix would not fit in the free memory is marked
'exceeds memory' instead of being run. The geometry-based encoder calls fused
scaled_dot_product_attention, which may need far less, so this guard is conservative.
With `--train` the seconds and memory are of one forward + backward (the GMACs stay the
forward's).

Settings (the encoder is the config's ViT-B/16 TimeSformer, only these keys change):
- TESTA with fixed r: R_T=1, R_S=12 (the paper's 32-frame setting), R_T=4, R_S=8 (its
  96-frame setting) and R_T=1, R_S=2 (its 16-frame match for ToMe, Table 6);
- TESTA with a fixed token budget: r chosen per frame count so that the output is always
  TESTA-f32's 1 + 20*52 = 1041 tokens (frames merged down to 20, patches down to 1040 / 20
  per frame; with fewer than 20 frames no frame is merged and each keeps 1040 / T patches);
- no aggregation (divided space-time attention, r = 0);
- ToMe: joint space-time attention with global merging of r tokens per block (class
  token protected). r = 197 matches TESTA R_T=1, R_S=2 at 16 frames (Table 6); it is kept
  fixed, and, as a second curve, scaled with the frames (197 * T / 16) so that the same
  share of tokens goes at every length.
"""
import argparse
import csv
import sys
from pathlib import Path
from typing import List

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a script
from engine.config import load_config  # noqa: E402
from engine.output_dir import check_output_file  # noqa: E402
from models.scaling import CSV_FIELDS, SETTINGS, count_row, measure_rows, row_config  # noqa: E402
from utils import ConfigError  # noqa: E402

DEFAULT_FRAMES = (8, 16, 32, 64, 96, 128)


def write_csv(rows: List[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: List[dict]) -> str:
    header = "| frames | setting | GMACs | tokens in -> out | seconds | peak MB | attn GB | status |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in rows:
        tokens = "" if row["tokens_out"] is None else f"{row['tokens_in']} -> {row['tokens_out']}"
        cells = [row["frames"], row["label"], row["gmacs"], tokens, row["seconds"],
                 row["peak_mem_mb"], row["attn_matrix_gb"], row["status"]]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(rows: List[dict], path: Path, title: str, mode: str) -> None:
    """Two panels: GMACs vs frames and seconds vs frames, one curve per setting."""
    figure, (macs_ax, time_ax) = plt.subplots(1, 2, figsize=(13, 5))
    for setting in SETTINGS:
        mine = [row for row in rows if row["setting"] == setting.name]
        style = dict(color=setting.color, linestyle=setting.linestyle, marker="o",
                     label=setting.label)
        for ax, key in ((macs_ax, "gmacs"), (time_ax, "seconds")):
            points = [(row["frames"], row[key]) for row in mine if row[key] is not None]
            if points:
                ax.plot(*zip(*points), **style)
    frames = sorted({row["frames"] for row in rows})
    for ax, ylabel in ((macs_ax, "GMACs (forward, batch 1)"),
                       (time_ax, f"{mode} seconds (median, batch 1)")):
        ax.set_xscale("log", base=2)
        ax.set_xlim(frames[0] / 1.2, frames[-1] * 1.2)
        if ax.has_data():
            ax.set_yscale("log")
        ax.set_xticks(frames, [str(f) for f in frames])
        ax.set_xlabel("input frames")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    macs_ax.set_title("counted on the meta device")
    time_ax.set_title("measured rows only (missing: counted only / exceeds memory)")
    macs_ax.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {torch.get_num_threads()} threads"


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/retrieval_queryd_f32.yaml",
                        help="base config for the encoder (ViT-B/16 TimeSformer)")
    parser.add_argument("--frames", type=int, nargs="+", default=list(DEFAULT_FRAMES),
                        help="frame counts of the rows")
    parser.add_argument("--settings", nargs="+", choices=[s.name for s in SETTINGS],
                        default=[s.name for s in SETTINGS], help="curves to compute (default: all)")
    parser.add_argument("--train", action="store_true",
                        help="time and measure forward + backward instead of the forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to time on")
    parser.add_argument("--runs", type=int, default=3, help="timed forwards per row (0: count only)")
    parser.add_argument("--time-limit", type=float, default=120.0,
                        help="seconds one row's measurement (warm-up, runs, memory pass) may take")
    parser.add_argument("--out-csv", type=Path, default=Path("output/scaling.csv"),
                        help="the table of rows")
    parser.add_argument("--out-png", default="output/scaling.png", help="'' to draw nothing")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    try:
        check_output_file(args.out_csv, "--out-csv", args.overwrite)
        if args.out_png:
            check_output_file(Path(args.out_png), "--out-png", args.overwrite)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None

    base = load_config(args.config)
    settings = [setting for setting in SETTINGS if setting.name in args.settings]
    pairs = [(setting, frames) for setting in settings for frames in sorted(args.frames)]
    configs = [row_config(base, setting, frames) for setting, frames in pairs]
    rows = [count_row(setting, frames, config) for (setting, frames), config in zip(pairs, configs)]
    measure_rows(rows, configs, args.device, args.runs, args.time_limit, args.train)

    write_csv(rows, args.out_csv)
    print(markdown_table(rows))
    print(f"wrote {args.out_csv}")
    if args.out_png:
        mode = "forward + backward" if args.train else "forward"
        title = f"Video encoder cost vs frames ({device_label(args.device)}, float32, {mode})"
        plot(rows, Path(args.out_png), title, mode)
        print(f"wrote {args.out_png}")
    return rows


if __name__ == "__main__":
    main()
