"""Cost of the TESTA video encoder for one video: GMACs, tokens, time, peak memory.

    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --runs 0 --json
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --compare-no-agg --runs 3
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --train --compare-no-agg
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --compare-dtype --runs 3 --json
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --dtype bf16 --profile
    python tools/benchmark.py --config configs/retrieval_queryd_f32_adaptive.yaml --video clip.mp4 --runs 0 --json

GMACs are multiply-accumulates of the forward / 1e9, counted with torch's FLOP counter
on the meta device (no computation runs). With `--video` the encoder (random weights,
`--seed`) runs on that video, decoded at the config's frames and size, and `tokens_out` /
`gmacs` count the tokens that hold content (adaptive aggregation keeps more tokens for busy
videos; see `traced_gmacs`); an adaptive config needs `--video`. `seconds` is the median wall time of `--runs`
forwards (forward + backward with `--train`) after one warm-up; weights and input are
cast to `--dtype`. `peak_mem_mb` is the memory the forward (or training step) needs
beyond the loaded model and input: on CUDA the allocator's peak, on CPU the growth of
the peak resident set of a fresh process whose large allocations go back to the system
as soon as they are freed.

The roofline: `achieved_gflops` is 2 x MACs / seconds, and `peak_fraction` is that over
`gemm_gflops`, the best rate of a few large matrix products at the same dtype measured
in the same process (the encoder's qkv, MLP and a square shape). `--compare-dtype`
times float32 and bfloat16 alternately and gives each of these keys one value per dtype.
`--profile` adds one profiled forward per dtype, its time summed by op class.
"""
import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets.transforms import normalize  # noqa: E402
from datasets.video import read_frames  # noqa: E402
from engine.config import load_config  # noqa: E402
from models import build_video_encoder  # noqa: E402
from models.video_encoder import VIDEO_ENCODER_SETTINGS, token_mask  # noqa: E402
from utils import with_defaults  # noqa: E402
from engine.precision import cpu_bf16_problem  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# aten op name fragments -> op class of the profile table, first match wins
OP_CLASSES = (
    ("attention", ("attention", "softmax", "flash", "baddbmm")),
    ("GEMM", ("addmm", "aten::mm", "bmm", "matmul", "linear", "conv", "mkldnn")),
    ("merging", ("sort", "gather", "scatter", "aten::mode", "aten::max", "amax", "topk", "index",
                 "vector_norm")),
    ("copies", ("copy", "clone", "contiguous", "aten::cat", "repeat", "stack", "fill", "zero")),
    ("norms/elementwise", ("layer_norm", "gelu", "add", "mul", "div", "log", "tanh",
                           "mean", "sum", "sub", "where", "eq", "ne")),
)


def encoder_config(config: dict, frames: Optional[int], aggregate: bool) -> dict:
    config = with_defaults(config, VIDEO_ENCODER_SETTINGS)
    config["token_merging"] = aggregate and config["token_merging"]
    if frames is not None:
        config["num_frames"] = frames
    return config


def video_shape(config: dict, batch: int = 1) -> tuple:
    size = config["image_size"]
    return (batch, 3, config["num_frames"], size, size)


def count(config: dict, decimals: int = 1) -> Dict[str, float]:
    """GMACs (rounded to `decimals`; None: unrounded) and token counts of one forward,
    on the meta device."""
    with torch.device("meta"):
        encoder = build_video_encoder(config)
        video = torch.empty(video_shape(config))
        with FlopCounterMode(display=False) as counter:
            tokens = encoder(video)
    num_frames, size = config["num_frames"], config["image_size"]
    tokens_in = 1 + num_frames * (size // config["patch_size"]) ** 2
    gmacs = counter.get_total_flops() / 2e9
    return {"gmacs": gmacs if decimals is None else round(gmacs, decimals),
            "tokens_in": tokens_in, "tokens_out": tokens.shape[1]}


def _matching_macs(tokens: torch.Tensor, head_dim: int) -> torch.Tensor:
    """MACs of bipartite matching scores over `tokens` live tokens (|A| x |B| x Dh)."""
    return (tokens + 1).div(2, rounding_mode="floor") * tokens.div(2, rounding_mode="floor") * head_dim


def traced_gmacs(config: dict, trace: List[torch.Tensor], plan: List[tuple], class_token: bool
                 ) -> List[float]:
    """GMACs of one forward for every video of a batch, counting only the tokens that hold
    content (size > 0), from the sizes a divided-attention encoder traced
    (`forward_with_state(..., trace=True)`: per block, the sizes its temporal attention,
    spatial attention and MLP saw), its `(r_frame, r_patch)` plan and whether it protects a
    class token (matching is skipped where nothing can merge). The same terms as
    the FLOP counter: linear layers, attention products (QK^T and AV), matching scores and
    the patch embedding; norms and softmax are free."""
    dim = config["vision_width"]
    hidden = 4 * dim  # the encoder's MLP ratio
    head_dim = dim // config["num_heads"]
    first = trace[0]  # [B, T0, 1+L0, 1]
    frames, patches = first.shape[1], first.shape[2] - 1
    macs = torch.full((first.shape[0],), float(frames * patches * 3 * config["patch_size"] ** 2 * dim),
                      dtype=torch.float64)
    for temporal, spatial, mlp, (r_frame, r_patch) in zip(trace[0::3], trace[1::3], trace[2::3], plan):
        live = temporal[:, :, 1:, 0] > 0  # [B, T, L]
        per_position = live.sum(dim=1).double()  # [B, L]: frames each temporal attention sees
        macs += live.sum(dim=(1, 2)) * 5 * dim * dim + 2 * dim * per_position.square().sum(dim=1)
        live_frames = live.any(dim=2).sum(dim=1)  # [B]
        if r_frame > 0:
            can_merge = live_frames - int(class_token) >= 2
            macs += _matching_macs(per_position, head_dim).sum(dim=1) * can_merge
        live = spatial[:, :, 1:, 0] > 0
        per_frame = (1 + live.sum(dim=2).double()) * live.any(dim=2)  # [B, T]: frames with content
        macs += per_frame.sum(dim=1) * 4 * dim * dim + 2 * dim * per_frame.square().sum(dim=1)
        if r_patch > 0:
            can_merge = per_frame - int(class_token) >= 2
            macs += (_matching_macs(per_frame, head_dim) * can_merge).sum(dim=1)
        macs += (1 + (mlp[:, :, 1:, 0] > 0).sum(dim=(1, 2))) * 2 * dim * hidden
    return (macs / 1e9).tolist()


def load_video(config: dict, path: str) -> torch.Tensor:
    """A real video `[1, 3, T, H, W]`, normalised: the config's frames (uniform, as tests
    sample) at its image size."""
    frames = read_frames(path, config["num_frames"], "uniform", config["image_size"])  # [T, 3, H, W] uint8
    return normalize(frames).transpose(0, 1)[None]


def count_on_video(config: dict, video: torch.Tensor, seed: int, decimals: int = 1
                   ) -> Dict[str, float]:
    """GMACs (rounded to `decimals`; None: unrounded) and token counts of one forward on
    `video`, counting tokens with content."""
    config = with_defaults(config, VIDEO_ENCODER_SETTINGS)
    if config["attention_type"] != "divided_space_time":
        return count(config, decimals)  # no content-dependent modes there
    torch.manual_seed(seed)
    encoder = build_video_encoder(config).eval()
    with torch.no_grad():
        _, state = encoder.forward_with_state(video, trace=True)
    gmacs = traced_gmacs(config, state.trace, encoder.plan, encoder.blocks[0].class_token)[0]
    tokens_in = 1 + video.shape[2] * (video.shape[3] // config["patch_size"]) ** 2
    return {"gmacs": gmacs if decimals is None else round(gmacs, decimals), "tokens_in": tokens_in,
            "tokens_out": int(token_mask(state).sum())}


def build(config: dict, device: str, dtype: torch.dtype, train: bool,
          video: Optional[torch.Tensor] = None):
    encoder = build_video_encoder(config).to(device=device, dtype=dtype).train(train)
    if video is None:
        video = torch.randn(video_shape(config))
    return encoder, video.to(device=device, dtype=dtype)


def step(encoder, video: torch.Tensor, train: bool) -> None:
    """One forward (and backward when training), synchronised."""
    if train:
        encoder.zero_grad(set_to_none=True)
        encoder(video).float().mean().backward()
    else:
        with torch.inference_mode():
            encoder(video)
    if video.is_cuda:
        torch.cuda.synchronize()


def timed(encoder, video: torch.Tensor, train: bool) -> float:
    start = time.perf_counter()
    step(encoder, video, train)
    return time.perf_counter() - start


def time_alternately(setups: List[tuple], runs: int, train: bool) -> List[float]:
    """Median seconds of each setup, running them in turn so that drift hits all alike."""
    for encoder, video in setups:
        step(encoder, video, train)
    samples = [[] for _ in setups]
    for _ in range(runs):
        for samples_of, (encoder, video) in zip(samples, setups):
            samples_of.append(timed(encoder, video, train))
    return [statistics.median(s) for s in samples]


def _rss_peak_mb() -> float:
    # VmHWM belongs to this address space; ru_maxrss would carry the parent's peak
    # across fork + exec.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_memory_child(config: dict, dtype: torch.dtype, train: bool, threads: int,
                       video: Optional[torch.Tensor], queue) -> None:
    torch.set_num_threads(threads)
    encoder, video = build(config, "cpu", dtype, train, video)
    baseline = _current_rss_mb()
    step(encoder, video, train)
    queue.put(_rss_peak_mb() - baseline)


def peak_memory_mb(config: dict, device: str, dtype: torch.dtype, train: bool,
                   video: Optional[torch.Tensor] = None) -> float:
    """Memory one step needs beyond the model and input (MB)."""
    if device.startswith("cuda"):
        encoder, video = build(config, device, dtype, train, video)
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(encoder, video, train)
        peak = torch.cuda.max_memory_allocated() - baseline
        del encoder, video
        torch.cuda.empty_cache()
        return round(peak / 2**20, 1)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_memory_child,
                            args=(config, dtype, train, torch.get_num_threads(), video, queue))
    # Large blocks straight from mmap go back to the system when freed, so the child's
    # peak resident set follows the live tensors instead of malloc's cached arenas.
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        child.start()
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"peak-memory child process failed (exit code {child.exitcode})")
    return round(queue.get(timeout=60), 1)


def gemm_gflops(config: dict, device: str, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best GFLOP/s of a few large matrix products at `dtype`: the encoder's qkv and MLP
    shapes over all input tokens, and a square product of 2*width."""
    tokens = 1 + config["num_frames"] * (config["image_size"] // config["patch_size"]) ** 2
    width = config["vision_width"]
    shapes = [(tokens, width, 3 * width), (tokens, width, 4 * width),
              (tokens, 4 * width, width), (2 * width, 2 * width, 2 * width)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        for run in range(repeats + 1):  # the first run warms up
            start = time.perf_counter()
            a @ b
            if a.is_cuda:
                torch.cuda.synchronize()
            if run:
                best = max(best, 2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return best


def op_class(name: str) -> str:
    """The profile table's class of an aten op name."""
    for op_class_name, fragments in OP_CLASSES:
        if any(fragment in name for fragment in fragments):
            return op_class_name
    return "other"


def profile_by_class(encoder, video: torch.Tensor, train: bool) -> Dict[str, float]:
    """Seconds of one step by op class (self time of each aten op, so nothing counts twice)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if video.is_cuda else [])
    with profile(activities=activities) as prof:
        step(encoder, video, train)
    seconds = {name: 0.0 for name, _ in OP_CLASSES}
    seconds["other"] = 0.0
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            self_us = event.self_device_time_total if video.is_cuda else event.self_cpu_time_total
            seconds[op_class(event.key)] += self_us / 1e6
    return {name: round(secs, 6) for name, secs in seconds.items()}  # the profiler counts µs


def measure(configs: List[dict], runs: int, device: str, dtypes: List[torch.dtype], train: bool,
            compile_encoder: bool = False, profile_step: bool = False,
            video: Optional[torch.Tensor] = None, seed: int = 0) -> List[Dict[str, float]]:
    """One result per (config, dtype) pair, configs outer; all timed alternately; on
    `video` when given (else random input)."""
    pairs = [(config, dtype) for config in configs for dtype in dtypes]
    exact = [count(config, decimals=None) if video is None
             else count_on_video(config, video, seed, decimals=None) for config, _ in pairs]
    results = [dict(result, gmacs=round(result["gmacs"], 1)) for result in exact]
    if runs == 0:
        for result in results:
            result.update(seconds=None, peak_mem_mb=None)
        return results
    setups = [build(config, device, dtype, train, video) for config, dtype in pairs]
    if compile_encoder:
        for index, (encoder, video) in enumerate(setups):
            encoder = torch.compile(encoder)
            start = time.perf_counter()
            step(encoder, video, train)  # compiles
            results[index]["compile_seconds"] = round(time.perf_counter() - start, 1)
            setups[index] = (encoder, video)
    seconds = time_alternately(setups, runs, train)
    if profile_step:
        for result, (encoder, video) in zip(results, setups):
            result["profile"] = profile_by_class(encoder, video, train)
    del setups
    peaks = {dtype: gemm_gflops(configs[0], device, dtype) for dtype in dtypes}
    for index, (result, (config, dtype), secs) in enumerate(zip(results, pairs, seconds)):
        result["seconds"] = round(secs, 4)
        result["peak_mem_mb"] = peak_memory_mb(config, device, dtype, train, video)
        flops = 2e9 * exact[index]["gmacs"] * (3 if train else 1)
        result["achieved_gflops"] = round(flops / secs / 1e9, 3)
        result["gemm_gflops"] = round(peaks[dtype], 3)
        result["peak_fraction"] = round(flops / secs / 1e9 / peaks[dtype], 3)
    return results


def print_profile(results: List[Dict[str, float]], names: List[str]) -> None:
    classes = list(results[0]["profile"])
    print(f"{'op class':>18} " + " ".join(f"{name + ' s':>10} {'%':>5}" for name in names))
    totals = [sum(result["profile"].values()) for result in results]
    for op_class_name in classes:
        cells = [(r["profile"][op_class_name], 100 * r["profile"][op_class_name] / max(t, 1e-9))
                 for r, t in zip(results, totals)]
        print(f"{op_class_name:>18} " + " ".join(f"{s:10.3f} {p:5.1f}" for s, p in cells))
    print(f"{'total':>18} " + " ".join(f"{t:10.3f} {100:5.1f}" for t in totals))


def check_dtypes(dtypes: List[str], device: str, allow_slow_bf16: bool) -> None:
    """One-line error before any work when a dtype cannot run fast here."""
    if "fp16" in dtypes and not device.startswith("cuda"):
        raise SystemExit("benchmark: --dtype fp16 is for CUDA devices; use fp32 or bf16 on CPU")
    if "bf16" in dtypes and device == "cpu" and not allow_slow_bf16:
        problem = cpu_bf16_problem()
        if problem is not None:
            raise SystemExit(f"benchmark: bf16 on CPU: {problem}; pass --allow-slow-bf16 "
                             "to time it anyway")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--frames", type=int, help="number of input frames (default: the config's)")
    parser.add_argument("--no-agg", action="store_true", help="turn token aggregation off")
    compare = parser.add_mutually_exclusive_group()
    compare.add_argument("--compare-no-agg", action="store_true",
                         help="also measure the no-aggregation twin, alternately, and report speedup")
    compare.add_argument("--compare-dtype", action="store_true",
                         help="time fp32 and bf16 alternately and report dtype_speedup")
    parser.add_argument("--video", help="count (and time) on this video instead of random input")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (--video)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (0: count only)")
    parser.add_argument("--train", action="store_true", help="time forward + backward at batch 1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="weights and input dtype (default fp32)")
    parser.add_argument("--allow-slow-bf16", action="store_true",
                        help="time bf16 on a CPU without native bfloat16 instructions")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the encoder; compile time is reported, not timed")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step and print its time by op class")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if args.runs < 0:
        raise SystemExit(f"--runs must be 0 or more, got {args.runs}")
    if args.video and not Path(args.video).is_file():
        raise SystemExit(f"--video {args.video}: no such file")

    dtype_names = ["fp32", "bf16"] if args.compare_dtype else [args.dtype]
    if args.runs:
        check_dtypes(dtype_names, args.device, args.allow_slow_bf16)
    config = encoder_config(load_config(args.config), args.frames, aggregate=not args.no_agg)
    configs = [config]
    if args.compare_no_agg:
        configs.append(encoder_config(config, None, aggregate=False))
    video = None if args.video is None else load_video(config, args.video)
    if video is None and config["token_merging"] and config["testa_threshold"] is not None:
        raise SystemExit(f"benchmark: {args.config} sets testa_threshold, so the cost depends on "
                         "the video; pass --video PATH")
    results = measure(configs, args.runs, args.device, [DTYPES[name] for name in dtype_names],
                      args.train, compile_encoder=args.compile, profile_step=args.profile,
                      video=video, seed=args.seed)

    report = dict(config=args.config, video=args.video, frames=config["num_frames"],
                  aggregation=bool(config["token_merging"]), mode="train" if args.train else "forward",
                  device=args.device, dtype="fp32,bf16" if args.compare_dtype else args.dtype,
                  compiled=args.compile, **results[0])
    names = ["this config"]
    if args.compare_no_agg:
        report["no_agg"] = results[1]
        names.append("no aggregation")
        if results[0]["seconds"]:
            report["speedup"] = round(results[1]["seconds"] / results[0]["seconds"], 3)
    if args.compare_dtype:
        names = dtype_names
        for key in ("seconds", "peak_mem_mb", "achieved_gflops", "gemm_gflops",
                    "peak_fraction", "compile_seconds", "profile"):
            if key in results[0]:
                report[key] = dict(zip(dtype_names, (result[key] for result in results)))
        if results[0]["seconds"]:
            report.update(seconds_fp32=results[0]["seconds"], seconds_bf16=results[1]["seconds"],
                          dtype_speedup=round(results[0]["seconds"] / results[1]["seconds"], 3))
    for name, result in zip(names, results):
        line = (f"{name:>15}: {result['gmacs']:8.1f} GMACs  tokens {result['tokens_in']:>6} -> "
                f"{result['tokens_out']:<6} seconds {result['seconds']}  peak_mem_mb {result['peak_mem_mb']}")
        if result["seconds"]:
            line += (f"  {result['achieved_gflops']} GFLOP/s = {result['peak_fraction']:.2f} of "
                     f"the {result['gemm_gflops']} GFLOP/s GEMM rate")
        if "compile_seconds" in result:
            line += f"  (compiled in {result['compile_seconds']} s)"
        print(line)
    if "speedup" in report:
        print(f"{'speedup':>15}: {report['speedup']:.2f}x")
    if "dtype_speedup" in report:
        print(f"{'bf16 speedup':>15}: {report['dtype_speedup']:.2f}x")
    if args.profile and args.runs:
        print_profile(results, names)
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
