"""The scaling study's rows: how the cost of TESTA, no aggregation and ToMe grows with the
number of frames (tools/scaling.py describes the settings and writes the table and figure).

Every row is counted on the meta device (`count_row`); `measure_rows` times and measures
the rows predicted to finish within a time limit, cheapest first, and marks a row whose
largest attention matrix would not fit in the free memory instead of running it.
"""
import functools
import multiprocessing
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from models.cost import count
from models.timing import build, peak_memory_mb, step, time_alternately
from models.video_encoder import VIDEO_ENCODER_SETTINGS
from utils import with_defaults

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
class ScalingSetting:
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
    ScalingSetting("testa_rt1_rs12", "TESTA R_T=1, R_S=12", testa_fixed(1, 12), "tab:blue", "-"),
    ScalingSetting("testa_rt4_rs8", "TESTA R_T=4, R_S=8", testa_fixed(4, 8), "tab:green", "-"),
    ScalingSetting("testa_rt1_rs2", "TESTA R_T=1, R_S=2", testa_fixed(1, 2), "tab:cyan", "-"),
    ScalingSetting("testa_budget_1041", "TESTA, fixed 1041-token output", testa_budget, "tab:purple", "-."),
    ScalingSetting("no_agg", "no aggregation", no_aggregation, "black", "--"),
    ScalingSetting("tome_r197", "ToMe r=197 (fixed)", tome(scaled=False), "tab:red", ":"),
    ScalingSetting("tome_r197_scaled", "ToMe r=197*T/16", tome(scaled=True), "tab:orange", ":"),
)


def row_config(base: dict, setting: ScalingSetting, frames: int) -> dict:
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


def count_row(setting: ScalingSetting, frames: int, config: dict) -> Dict[str, object]:
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
    queue.put(time_alternately([functools.partial(step, encoder, video, train)], runs)[0])


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
