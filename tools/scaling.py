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
import multiprocessing
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a script
from engine.config import load_config  # noqa: E402
from models.cost import count  # noqa: E402
from models.timing import build, peak_memory_mb, time_alternately  # noqa: E402
from models.video_encoder import VIDEO_ENCODER_SETTINGS  # noqa: E402
from utils import with_defaults  # noqa: E402

DEFAULT_FRAMES = (8, 16, 32, 64, 96, 128)
TOME_FRAMES = 16  # the frame count at which ToMe's r was matched to TESTA (Table 6)
TOME_R = 197
BUDGET_FRAMES, BUDGET_PATCHES = 20, 52  # TESTA-f32's output, plus the class token
BUDGET_PATCH_TOKENS = BUDGET_FRAMES * BUDGET_PATCHES
BYTES_PER_ELEMENT = 4  # float32
CSV_FIELDS = ("frames", "setting", "label", "gmacs", "tokens_in", "tokens_out", "seconds",
              "peak_mem_mb", "attn_matrix_gb", "status")

DIVIDED = {"attention_type": "divided_space_time", "merging_type": "frame&patch"}
JOINT = {"attention_type": "joint_space_time", "merging_type": "patch"}


@dataclass(frozen=True)
class Setting:
    """One curve: how to change the base config for a frame count, and how to draw it."""
    name: str
    label: str
    overrides: Callable[[int, int, int], dict]  # (frames, patches per frame, depth) -> config keys
    color: str
    linestyle: str


def testa_fixed(r_frame: int, r_patch: int) -> Callable[[int, int, int], dict]:
    """TESTA removing `r_frame` frames and `r_patch` patches in every block."""
    def overrides(frames: int, patches: int, depth: int) -> dict:
        return dict(DIVIDED, token_merging=True, testa_r=[r_frame, r_patch] * depth)
    return overrides


def spread(total: int, steps: int) -> List[int]:
    """`total` split over `steps` as evenly as possible, the larger parts first."""
    return [total // steps + (step < total % steps) for step in range(steps)]


def budget_r(frames: int, patches: int, depth: int) -> List[int]:
    """`testa_r` ([r_T, r_S] per block) whose output is `BUDGET_PATCH_TOKENS` patch tokens."""
    frames_out = min(frames, BUDGET_FRAMES)
    patches_out = min(patches, BUDGET_PATCH_TOKENS // frames_out)
    frame_steps = spread(frames - frames_out, depth)
    patch_steps = spread(patches - patches_out, depth)
    return [r for pair in zip(frame_steps, patch_steps) for r in pair]


def testa_budget(frames: int, patches: int, depth: int) -> dict:
    return dict(DIVIDED, token_merging=True, testa_r=budget_r(frames, patches, depth))


def no_aggregation(frames: int, patches: int, depth: int) -> dict:
    return dict(DIVIDED, token_merging=False)


def tome(scaled: bool) -> Callable[[int, int, int], dict]:
    """ToMe merging r=197 tokens per block, or 197 * T / 16 when `scaled`."""
    def overrides(frames: int, patches: int, depth: int) -> dict:
        r = TOME_R * frames // TOME_FRAMES if scaled else TOME_R
        return dict(JOINT, token_merging=True, testa_r=r)
    return overrides


SETTINGS = (
    Setting("testa_rt1_rs12", "TESTA R_T=1, R_S=12", testa_fixed(1, 12), "tab:blue", "-"),
    Setting("testa_rt4_rs8", "TESTA R_T=4, R_S=8", testa_fixed(4, 8), "tab:green", "-"),
    Setting("testa_rt1_rs2", "TESTA R_T=1, R_S=2", testa_fixed(1, 2), "tab:cyan", "-"),
    Setting("testa_budget_1041", "TESTA, fixed 1041-token output", testa_budget, "tab:purple", "-."),
    Setting("no_agg", "no aggregation", no_aggregation, "black", "--"),
    Setting("tome_r197", "ToMe r=197 (fixed)", tome(scaled=False), "tab:red", ":"),
    Setting("tome_r197_scaled", "ToMe r=197*T/16", tome(scaled=True), "tab:orange", ":"),
)


def row_config(base: dict, setting: Setting, frames: int) -> dict:
    base = with_defaults(base, VIDEO_ENCODER_SETTINGS)
    patches = (base["image_size"] // base["patch_size"]) ** 2
    return dict(base, num_frames=frames, **setting.overrides(frames, patches, base["depth"]))


def attention_matrix_gb(config: dict) -> float:
    """GB of the largest attention matrix one block would materialise (all heads, batch 1)."""
    frames = config["num_frames"]
    patches = (config["image_size"] // config["patch_size"]) ** 2
    if config["attention_type"] == "joint_space_time":
        elements = (1 + frames * patches) ** 2
    else:  # spatial attention per frame, temporal attention per patch position
        elements = max(frames * (1 + patches) ** 2, patches * frames ** 2)
    return elements * config["num_heads"] * BYTES_PER_ELEMENT / 2**30


def available_memory_gb(device: str) -> float:
    """Free memory of the device (CPU: MemAvailable)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] / 2**30
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def count_row(setting: Setting, frames: int, config: dict) -> Dict[str, object]:
    """GMACs, tokens and attention-matrix size of one row, on the meta device."""
    row = dict.fromkeys(CSV_FIELDS)
    row.update(frames=frames, setting=setting.name, label=setting.label)
    try:
        row.update(count(config))
    except ValueError as error:  # an r the frame count cannot take
        row["status"] = f"not applicable: {error}"
        return row
    row["attn_matrix_gb"] = round(attention_matrix_gb(config), 2)
    return row


class TimePredictor:
    """Predicts a row's measuring time from the seconds per GMAC seen so far.

    A setting's own rate is used once it has one, else the slowest rate of any setting.
    """

    def __init__(self, passes: int):
        self.passes = passes  # forwards per row: warm-up, timed runs, memory pass
        self.rates: Dict[str, float] = {}

    def predict(self, setting: str, gmacs: float) -> Optional[float]:
        rate = self.rates.get(setting, max(self.rates.values(), default=None))
        return None if rate is None else rate * gmacs * self.passes

    def observe(self, setting: str, gmacs: float, seconds: float) -> None:
        self.rates[setting] = max(self.rates.get(setting, 0.0), seconds / gmacs)


def _timing_child(config: dict, device: str, runs: int, train: bool, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    encoder, video = build(config, device, torch.float32, train)
    queue.put(time_alternately([(encoder, video)], runs, train)[0])


def step_seconds(config: dict, device: str, runs: int, train: bool) -> float:
    """Median seconds of one forward (or training step), timed in a fresh process.

    This process stays small that way, which `peak_memory_mb` needs on CPU: its child
    reads the peak resident set with getrusage, which includes this process's resident
    set at the moment the child is spawned.
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_timing_child,
                            args=(config, device, runs, train, torch.get_num_threads(), queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the timing process exited with {child.exitcode} "
                           f"({config['num_frames']} frames)")
    return queue.get()


def measure_rows(rows: List[dict], configs: List[dict], device: str, runs: int,
                 time_limit: float, train: bool) -> None:
    """Fill seconds and peak memory of the rows that fit, cheapest first; set every status."""
    predictor = TimePredictor(passes=runs + 2)
    countable = [i for i, row in enumerate(rows) if row["status"] is None]
    for index in sorted(countable, key=lambda i: rows[i]["gmacs"]):
        row, config = rows[index], configs[index]
        if runs == 0:
            row["status"] = "counted only"
            continue
        if row["attn_matrix_gb"] > available_memory_gb(device):
            row["status"] = "exceeds memory"
            continue
        predicted = predictor.predict(row["setting"], row["gmacs"])
        if predicted is not None and predicted > time_limit:
            row["status"] = "counted only"
            continue
        print(f"measuring {row['label']} at {row['frames']} frames "
              f"(predicted {'?' if predicted is None else round(predicted)} s)", flush=True)
        row["seconds"] = round(step_seconds(config, device, runs, train), 3)
        row["peak_mem_mb"] = peak_memory_mb(config, device, torch.float32, train)
        row["status"] = "measured"
        predictor.observe(row["setting"], row["gmacs"], row["seconds"])


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
    args = parser.parse_args(argv)

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
