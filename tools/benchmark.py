"""Cost of the TESTA video encoder: GMACs, tokens, time, throughput, peak memory.

    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --runs 0 --json
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --compare-no-agg --runs 3
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --train --compare-no-agg
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --compare-dtype --runs 3 --json
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --dtype bf16 --profile
    python tools/benchmark.py --config configs/retrieval_queryd_f32.yaml --dtype bf16 --batch 8 --runs 3
    python tools/benchmark.py --config configs/retrieval_queryd_f32_adaptive.yaml --video clip.mp4 --runs 0 --json
    python tools/benchmark.py --config configs/retrieval_activitynet_f96.yaml --rerank --runs 3 --json

GMACs are multiply-accumulates of the forward / 1e9, counted with torch's FLOP counter
on the meta device (no computation runs). With `--video` the encoder (random weights,
`--seed`) runs on that video, decoded at the config's frames and size, and `tokens_out` /
`gmacs` count the tokens that hold content (adaptive aggregation keeps more tokens for busy
videos; see `models.cost.traced_gmacs`); an adaptive config needs `--video`. GMACs and
tokens are per video. `seconds` is the median wall time of `--runs` forwards (forward +
backward with `--train`) of `--batch` videos (default 1; `--video` repeated) after one
warm-up, and `videos_per_second` is the batch over it; weights and input are cast to
`--dtype`. `peak_mem_mb` is the memory the forward (or training step) needs
beyond the loaded model and input: on CUDA the allocator's peak, on CPU the growth of
the peak resident set of a fresh process whose large allocations go back to the system
as soon as they are freed.

The roofline: `achieved_gflops` is 2 x MACs x batch / seconds, and `peak_fraction` is
that over `gemm_gflops`, the rate of the encoder's own linear layers alone: `F.linear`
with bias at its four weight shapes (qkv, projection, MLP in and out) over the token
counts of its first and last blocks, timed in turn with the encoder runs, so that both
see the same load of other processes (`models.timing.encoder_gemms`). `gemm_gflops_best`
is the best rate of a few large bias-free products at the same dtype, measured after
the timing (`models.timing.gemm_gflops`): an upper bound that a loaded machine
understates or overstates. `attention_gflops` (forward only) is the rate of the attention
alone as the encoder computes it (`models.attention.attend` at the first block's temporal
and spatial shapes, `models.timing.encoder_attention`), also timed in turn with the encoder: where it
is far below `gemm_gflops`, attention bounds `peak_fraction` more than its FLOPs suggest.
`--compare-dtype` times float32 and bfloat16 alternately and gives each of these keys
one value per dtype, with `dtype_speedup` (float32 seconds over bfloat16 seconds),
`gemm_ratio` (the two dtypes' `gemm_gflops`) and `speedup_of_gemm_ratio` (the first over
the second: 1 when bfloat16 speeds the whole encoder up as much as its linear layers).
`--compile` wraps the encoder in `torch.compile` (static shapes: fixed-r aggregation;
for inference with frozen weights, which the compiler treats as constants: it folds
them, prepacks them for the GEMM library and fuses the linear layers' neighbours) and
reports the first call's `compile_seconds` apart from the timed runs.
`--profile` adds one profiled forward per dtype, its time summed by op class.
On a CPU the process first has malloc keep freed memory for reuse, as the training
scripts and `testa.load` do there (`engine.host_memory`); `malloc` in the JSON says
whether it did.

`--rerank` times the matching head instead: one video's output tokens at the config's
frames (random) against 128 paragraphs of `max_words` tokens, the config's towers with
random weights, `k_test_batch_size` pairs per forward, with the video's cross-attention
keys and values computed once for its paragraphs (`rerank_seconds_reuse`, what evaluation
and `testa.VideoText.rerank` run) and per pair (`rerank_seconds_per_pair`);
`rerank_speedup` is their ratio and `rerank_max_abs_diff` how far the match logits of
the two differ.
"""
import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a script
from datasets.base import video_batch  # noqa: E402
from datasets.video import read_test_frames  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.host_memory import keep_freed_memory  # noqa: E402
from engine.precision import cpu_bf16_problem  # noqa: E402
from models import build_retrieval_model  # noqa: E402
from models.cost import count, count_on_video, encoder_config  # noqa: E402
from models.timing import (OP_CLASSES, build, encoder_attention, encoder_gemms,  # noqa: E402
                           gemm_gflops, op_class, peak_memory_mb, step, time_alternately)
from tasks.retrieval import RETRIEVAL_SETTINGS, match_logits  # noqa: E402
from utils import with_defaults  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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
            video: Optional[torch.Tensor] = None, seed: int = 0,
            batch: int = 1) -> List[Dict[str, float]]:
    """One result per (config, dtype) pair, configs outer; all timed alternately, each in
    turn with its dtype's GEMM reference (`models.timing.encoder_gemms`); on `video` when
    given (else random input), `batch` videos a forward."""
    pairs = [(config, dtype) for config in configs for dtype in dtypes]
    exact = [count(config, decimals=None) if video is None
             else count_on_video(config, video, seed, decimals=None) for config, _ in pairs]
    results = [dict(result, gmacs=round(result["gmacs"], 1)) for result in exact]
    if runs == 0:
        for result in results:
            result.update(seconds=None, peak_mem_mb=None)
        return results
    setups = [build(config, device, dtype, train, video, batch) for config, dtype in pairs]
    if compile_encoder:
        for index, (encoder, inputs) in enumerate(setups):
            # inference: weights frozen as constants (see the module docstring)
            encoder = torch.compile(encoder, options={"freezing": not train})
            start = time.perf_counter()
            step(encoder, inputs, train)  # compiles
            results[index]["compile_seconds"] = round(time.perf_counter() - start, 1)
            setups[index] = (encoder, inputs)
    steps = [functools.partial(step, encoder, inputs, train) for encoder, inputs in setups]
    # the GEMM reference of each dtype: the linear layers at the first and last blocks' tokens
    gemms = {dtype: encoder_gemms(configs[0], device, dtype, train=train, tokens=(
        batch * exact[0]["tokens_in"], batch * exact[0]["tokens_out"])) for dtype in dtypes}
    # and the attention kernel alone at the first block's shapes (inference)
    attention = {} if train else {dtype: encoder_attention(configs[0], device, dtype, batch)
                                  for dtype in dtypes}
    references = [*gemms.values(), *attention.values()]
    seconds = time_alternately(steps + [run for run, _ in references], runs)
    rates = [flops / secs / 1e9 for (_, flops), secs in zip(references, seconds[len(steps):])]
    gemm_rates = dict(zip(gemms, rates))
    attention_rates = dict(zip(attention, rates[len(gemms):]))
    if profile_step:
        for result, (encoder, inputs) in zip(results, setups):
            result["profile"] = profile_by_class(encoder, inputs, train)
    del setups, steps, gemms, attention, references
    best = {dtype: gemm_gflops(configs[0], device, dtype) for dtype in dtypes}
    for index, (result, (config, dtype), secs) in enumerate(zip(results, pairs, seconds)):
        result["batch"] = batch
        result["seconds"] = round(secs, 4)
        result["videos_per_second"] = round(batch / secs, 3)
        result["peak_mem_mb"] = peak_memory_mb(config, device, dtype, train, video, batch)
        flops = 2e9 * exact[index]["gmacs"] * batch * (3 if train else 1)
        result["achieved_gflops"] = round(flops / secs / 1e9, 3)
        result["gemm_gflops"] = round(gemm_rates[dtype], 3)
        result["peak_fraction"] = round(flops / secs / 1e9 / gemm_rates[dtype], 3)
        result["gemm_gflops_best"] = round(best[dtype], 3)
        if dtype in attention_rates:
            result["attention_gflops"] = round(attention_rates[dtype], 3)
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


RERANK_TEXTS = 128  # the paragraphs one video is re-scored against (the paper's k_test)


def rerank_timing(config: dict, runs: int, device: str, dtype: torch.dtype,
                  seed: int = 0) -> Dict[str, float]:
    """Re-ranking of one video (the encoder's output tokens at the config's frames,
    random) against RERANK_TEXTS paragraphs of `max_words` random tokens with the
    config's towers (random weights), `k_test_batch_size` pairs per forward: median
    seconds with the video's cross-attention keys and values computed once per chunk
    (`tasks.retrieval.match_logits`, what the evaluation and the API run) and per pair
    (the video's tokens copied to every pair), timed alternately, and how far apart
    their match logits are."""
    config = with_defaults(config, {"k_test_batch_size": RETRIEVAL_SETTINGS["k_test_batch_size"]})
    torch.manual_seed(seed)
    model = build_retrieval_model(config).to(device=device, dtype=dtype).eval()
    num_tokens, batch_size = count(config)["tokens_out"], config["k_test_batch_size"]
    tokens = torch.randn(1, num_tokens, model.visual_encoder.embed_dim, device=device, dtype=dtype)
    input_ids = torch.randint(1000, 30000, (RERANK_TEXTS, config["max_words"]), device=device)
    attention_mask = torch.ones_like(input_ids)
    pairs = torch.stack([torch.zeros(RERANK_TEXTS, dtype=torch.long),
                         torch.arange(RERANK_TEXTS)], dim=1).to(device)  # [128, 2] (video, text)

    def reuse(texts: int = RERANK_TEXTS) -> torch.Tensor:
        return match_logits(model, pairs[:texts], tokens, None, input_ids, attention_mask,
                            batch_size)

    def per_pair(texts: int = RERANK_TEXTS) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model.itm_logits(tokens.expand(len(chunk), -1, -1), input_ids[chunk],
                                               attention_mask[chunk])[:, 1].float()
                              for chunk in torch.arange(texts, device=device).split(batch_size)])

    def timed(fn) -> tuple:
        start = time.perf_counter()
        logits = fn()
        if tokens.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, logits

    reuse(2), per_pair(2)  # warm-up
    samples = {"reuse": [], "per_pair": []}
    for _ in range(runs):
        seconds_reuse, logits_reuse = timed(reuse)
        seconds_per_pair, logits_per_pair = timed(per_pair)
        samples["reuse"].append(seconds_reuse)
        samples["per_pair"].append(seconds_per_pair)
    reuse_s, per_pair_s = (statistics.median(samples[name]) for name in ("reuse", "per_pair"))
    return dict(rerank_texts=RERANK_TEXTS, rerank_tokens=num_tokens,
                rerank_batch_size=batch_size, rerank_seconds_reuse=round(reuse_s, 3),
                rerank_seconds_per_pair=round(per_pair_s, 3),
                rerank_speedup=round(per_pair_s / reuse_s, 3),
                rerank_max_abs_diff=float((logits_reuse - logits_per_pair).abs().max()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config whose video encoder is timed")
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
    parser.add_argument("--train", action="store_true", help="time forward + backward")
    parser.add_argument("--batch", type=int, default=1,
                        help="videos per forward (default 1); videos_per_second reports throughput")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to time on")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="weights and input dtype (default fp32)")
    parser.add_argument("--allow-slow-bf16", action="store_true",
                        help="time bf16 on a CPU without native bfloat16 instructions")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the encoder; compile time is reported, not timed")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step and print its time by op class")
    parser.add_argument("--rerank", action="store_true",
                        help=f"time the re-ranking of one video against {RERANK_TEXTS} paragraphs "
                        "with and without its cross-attention keys and values computed once "
                        "(instead of the encoder)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if args.runs < 0:
        raise SystemExit(f"--runs must be 0 or more, got {args.runs}")
    if args.batch < 1:
        raise SystemExit(f"--batch must be 1 or more, got {args.batch}")
    if args.video and not Path(args.video).is_file():
        raise SystemExit(f"--video {args.video}: no such file")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device {args.device!r}: not a device (cpu, cuda or cuda:N)") from None

    malloc = keep_freed_memory(args.device) or "freed memory kept"  # as the scripts run
    dtype_names = ["fp32", "bf16"] if args.compare_dtype else [args.dtype]
    if args.runs:
        check_dtypes(dtype_names, args.device, args.allow_slow_bf16)
    config = encoder_config(load_config(args.config), args.frames, aggregate=not args.no_agg)
    configs = [config]
    if args.compare_no_agg:
        configs.append(encoder_config(config, None, aggregate=False))
    video = None if args.video is None else video_batch(
        [read_test_frames(args.video, config["num_frames"], config["image_size"])])
    if video is None and config["token_merging"] and config["testa_threshold"] is not None:
        raise SystemExit(f"benchmark: {args.config} sets testa_threshold, so the cost depends on "
                         "the video; pass --video PATH")
    if args.rerank:
        return rerank_main(args, config, malloc)
    results = measure(configs, args.runs, args.device, [DTYPES[name] for name in dtype_names],
                      args.train, compile_encoder=args.compile, profile_step=args.profile,
                      video=video, seed=args.seed, batch=args.batch)

    report = dict(config=args.config, video=args.video, frames=config["num_frames"],
                  aggregation=bool(config["token_merging"]), mode="train" if args.train else "forward",
                  device=args.device, dtype="fp32,bf16" if args.compare_dtype else args.dtype,
                  compiled=args.compile, malloc=malloc, **results[0])
    names = ["this config"]
    if args.compare_no_agg:
        report["no_agg"] = results[1]
        names.append("no aggregation")
        if results[0]["seconds"]:
            report["speedup"] = round(results[1]["seconds"] / results[0]["seconds"], 3)
    if args.compare_dtype:
        names = dtype_names
        for key in ("seconds", "videos_per_second", "peak_mem_mb", "achieved_gflops",
                    "gemm_gflops", "gemm_gflops_best", "attention_gflops", "peak_fraction",
                    "compile_seconds", "profile"):
            if key in results[0]:
                report[key] = dict(zip(dtype_names, (result[key] for result in results)))
        if results[0]["seconds"]:
            speedup = results[0]["seconds"] / results[1]["seconds"]
            gemm_ratio = results[1]["gemm_gflops"] / results[0]["gemm_gflops"]
            report.update(seconds_fp32=results[0]["seconds"], seconds_bf16=results[1]["seconds"],
                          dtype_speedup=round(speedup, 3), gemm_ratio=round(gemm_ratio, 3),
                          speedup_of_gemm_ratio=round(speedup / gemm_ratio, 3))
    for name, result in zip(names, results):
        line = (f"{name:>15}: {result['gmacs']:8.1f} GMACs  tokens {result['tokens_in']:>6} -> "
                f"{result['tokens_out']:<6} seconds {result['seconds']}  peak_mem_mb {result['peak_mem_mb']}")
        if result["seconds"]:
            line += (f"  {result['videos_per_second']} videos/s at batch {args.batch}"
                     f"  {result['achieved_gflops']} GFLOP/s = {result['peak_fraction']:.2f} of "
                     f"the {result['gemm_gflops']} GFLOP/s of its linear layers alone "
                     f"(best GEMM {result['gemm_gflops_best']})")
            if "attention_gflops" in result:
                line += f"; its attention kernel alone {result['attention_gflops']} GFLOP/s"
        if "compile_seconds" in result:
            line += f"  (compiled in {result['compile_seconds']} s)"
        print(line)
    if "speedup" in report:
        print(f"{'speedup':>15}: {report['speedup']:.2f}x")
    if "dtype_speedup" in report:
        print(f"{'bf16 speedup':>15}: {report['dtype_speedup']:.2f}x = "
              f"{report['speedup_of_gemm_ratio']:.2f} of the linear layers' "
              f"{report['gemm_ratio']:.2f}x")
    if args.profile and args.runs:
        print_profile(results, names)
    if args.json:
        print(json.dumps(report))
    return report


def rerank_main(args: argparse.Namespace, config: dict, malloc: str) -> dict:
    if args.runs < 1:
        raise SystemExit("benchmark: --rerank times; give --runs 1 or more")
    result = rerank_timing(config, args.runs, args.device, DTYPES[args.dtype], args.seed)
    report = dict(config=args.config, frames=config["num_frames"],
                  aggregation=bool(config["token_merging"]), mode="rerank", device=args.device,
                  dtype=args.dtype, malloc=malloc, **result)
    print(f"re-ranking 1 video ({result['rerank_tokens']} tokens) x {result['rerank_texts']} "
          f"paragraphs, {result['rerank_batch_size']} per forward: "
          f"{result['rerank_seconds_per_pair']} s with keys and values per pair, "
          f"{result['rerank_seconds_reuse']} s computed once per video: "
          f"{result['rerank_speedup']:.2f}x; match logits differ by at most "
          f"{result['rerank_max_abs_diff']:.2g}")
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
