"""Cost of the TESTA video encoder for one video: GMACs, tokens, time, peak memory.

    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --runs 0 --json
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --compare-no-agg --runs 3
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --train --compare-no-agg
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --compare-dtype --runs 3 --json
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --dtype bf16 --profile

GMACs are multiply-accumulates of the forward / 1e9, counted with torch's FLOP counter
on the meta device (no computation runs). `seconds` is the median wall time of `--runs`
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
from engine.config import load_config  # noqa: E402
from models import build_video_encoder  # noqa: E402
from models.video_encoder import VIDEO_ENCODER_SETTINGS  # noqa: E402
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


def build(config: dict, device: str, dtype: torch.dtype, train: bool):
    encoder = build_video_encoder(config).to(device=device, dtype=dtype).train(train)
    video = torch.randn(video_shape(config), device=device, dtype=dtype)
    return encoder, video


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


def _peak_memory_child(config: dict, dtype: torch.dtype, train: bool, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    encoder, video = build(config, "cpu", dtype, train)
    baseline = _current_rss_mb()
    step(encoder, video, train)
    queue.put(_rss_peak_mb() - baseline)


def peak_memory_mb(config: dict, device: str, dtype: torch.dtype, train: bool) -> float:
    """Memory one step needs beyond the model and input (MB)."""
    if device.startswith("cuda"):
        encoder, video = build(config, device, dtype, train)
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
                            args=(config, dtype, train, torch.get_num_threads(), queue))
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
    return {name: round(secs, 4) for name, secs in seconds.items()}


def measure(configs: List[dict], runs: int, device: str, dtypes: List[torch.dtype], train: bool,
            compile_encoder: bool = False, profile_step: bool = False) -> List[Dict[str, float]]:
    """One result per (config, dtype) pair, configs outer; all timed alternately."""
    pairs = [(config, dtype) for config in configs for dtype in dtypes]
    results = [count(config) for config, _ in pairs]
    if runs == 0:
        for result in results:
            result.update(seconds=None, peak_mem_mb=None)
        return results
    setups = [build(config, device, dtype, train) for config, dtype in pairs]
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
    for result, (config, dtype), secs in zip(results, pairs, seconds):
        result["seconds"] = round(secs, 4)
        result["peak_mem_mb"] = peak_memory_mb(config, device, dtype, train)
        flops = 2e9 * count(config, decimals=None)["gmacs"] * (3 if train else 1)
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

    dtype_names = ["fp32", "bf16"] if args.compare_dtype else [args.dtype]
    if args.runs:
        check_dtypes(dtype_names, args.device, args.allow_slow_bf16)
    config = encoder_config(load_config(args.config), args.frames, aggregate=not args.no_agg)
    configs = [config]
    if args.compare_no_agg:
        configs.append(encoder_config(config, None, aggregate=False))
    results = measure(configs, args.runs, args.device, [DTYPES[name] for name in dtype_names],
                      args.train, compile_encoder=args.compile, profile_step=args.profile)

    report = dict(config=args.config, frames=config["num_frames"],
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
