"""One CUDA GPU, measured: the encoder forward and a paper-size retrieval training step.

    python tools/gpu_check.py                       # prints a markdown table
    python tools/gpu_check.py --config configs/retrieval_queryd_f32.yaml --runs 3

Rows: the 32- and 96-frame video encoder forward (batch `--batch`), one retrieval
training step (the config's `batch_size_train`, AdamW, loss scaling in fp16) and one
retrieval evaluation of `--eval-videos` videos with as many paragraphs (encode both, then
re-rank the config's `k_test` candidates of every video and paragraph), each in bf16 and
fp16 autocast, with and without token aggregation. Columns: videos per second (median of
`--runs` after one warm-up), the allocator's peak memory in GiB (model included), which
scaled-dot-product-attention kernel ran (from the profiler), and the model-FLOP
utilisation: the matrix FLOPs the step ran (counted by torch's FlopCounterMode: linear
layers, convolutions, attention, backward included) per second over the GPU's nominal dense
bf16/fp16 tensor rate (`models.timing.GPU_PEAK_TFLOPS`, or `--peak-tflops`). Random weights: the speed
and memory do not depend on them. A row that runs out of memory says so and the others go
on. On a machine without CUDA it says so and exits with 0.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import build_retrieval_model, build_video_encoder  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.precision import Precision  # noqa: E402
from engine.run import Run  # noqa: E402
from models.timing import peak_tflops  # noqa: E402
from models.video_encoder import cat_token_batches  # noqa: E402
from tasks.retrieval import RETRIEVAL_SCHEMA, candidate_masks, encode_texts, rerank  # noqa: E402
from utils import with_defaults  # noqa: E402

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# aten ops of torch.nn.functional.scaled_dot_product_attention's kernels
SDPA_KERNELS = {"_scaled_dot_product_flash_attention": "flash",
                "_scaled_dot_product_efficient_attention": "mem-efficient",
                "_scaled_dot_product_cudnn_attention": "cudnn",
                "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)"}
# the hidden --cpu-dry-run: a tiny model that runs every code path in seconds on CPU
DRY_RUN = dict(image_size=32, vision_width=64, num_heads=2, depth=2, testa_r=[1, 1],
               embed_dim=16, queue_size=8, batch_size_train=2, batch_size_test=2, k_test=2,
               text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128))


def sdpa_kernel(run: Callable[[], None], device: str) -> str:
    """Which attention kernel one call of `run` used ('math' when no fused one ran)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    names = {event.key.removeprefix("aten::") for event in prof.key_averages()}
    used = sorted({kernel for op, kernel in SDPA_KERNELS.items() if op in names})
    return "+".join(used) if used else "math"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(run: Callable[[], None], batch: int, runs: int, device: str) -> Dict[str, object]:
    """videos/s, peak GiB, the SDPA kernel and the matrix TFLOP/s of `run`, which
    processes `batch` videos."""
    with FlopCounterMode(display=False) as flops:
        run()  # warm-up, counting its FLOPs
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    median = statistics.median(seconds)
    return {"videos_per_s": batch / median, "peak_gib": peak, "sdpa": sdpa_kernel(run, device),
            "tflops": flops.get_total_flops() / median / 1e12}


def forward_row(config: dict, batch: int, dtype: torch.dtype, runs: int, device: str
                ) -> Dict[str, object]:
    encoder = build_video_encoder(config).to(device).eval()
    size = config["image_size"]
    video = torch.randn(batch, 3, config["num_frames"], size, size, device=device)

    def run() -> None:
        with torch.inference_mode(), torch.autocast(device, dtype=dtype):
            encoder(video)
    return measure(run, batch, runs, device)


def training_row(config: dict, dtype: torch.dtype, runs: int, device: str) -> Dict[str, object]:
    model = build_retrieval_model(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device, enabled=dtype is torch.float16)
    batch, size = config["batch_size_train"], config["image_size"]
    video = torch.randn(batch, 3, config["num_frames"], size, size, device=device)
    words = "a person talks about the long video while the camera moves across the room"
    caption = [" ".join([words] * 8)] * batch  # past max_words: every text is full length
    idx = torch.arange(batch, device=device)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype):
            loss_vtc, loss_vtm = model(video, caption, alpha=0.4, idx=idx)
        scaler.scale(loss_vtc + loss_vtm).backward()
        scaler.step(optimizer)
        scaler.update()
    return measure(run, batch, runs, device)


def evaluation_row(config: dict, videos: int, dtype: torch.dtype, runs: int, device: str
                   ) -> Dict[str, object]:
    """The retrieval evaluation of `videos` random videos and as many paragraphs: both
    encoded in the config's test batches, then the `k_test` candidates of every video and
    paragraph re-ranked `k_test_batch_size` pairs at a time (tasks/retrieval.py)."""
    model = build_retrieval_model(config).to(device).eval()
    size, batch = config["image_size"], config["batch_size_test"]
    clips = torch.randn(batch, 3, config["num_frames"], size, size, device=device)
    words = "a person talks about the long video while the camera moves across the room"
    paragraphs = [f"{index} " + " ".join([words] * 8) for index in range(videos)]
    evaluation = Run(config, Path("."), torch.device(device),
                     Precision(device, dtype, torch.amp.GradScaler(device, enabled=False)))

    @torch.no_grad()
    def run() -> None:
        features, tokens, masks = [], [], []
        with torch.autocast(device, dtype=dtype):
            for start in range(0, videos, batch):
                feature, token, mask = model.encode_video(clips[:min(batch, videos - start)])
                features.append(feature.float())
                tokens.append(token)
                masks.append(mask)
            text_feat, ids, attention = encode_texts(model, paragraphs)
        sims = torch.cat(features) @ text_feat.t()  # [V, T]
        v2t, t2v = candidate_masks(sims, config["k_test"])
        rerank(model, evaluation, sims, v2t | t2v, torch.arange(videos),
               *cat_token_batches(tokens, masks), ids, attention, config["k_test_batch_size"])
    return measure(run, videos, runs, device)


ROW_KINDS = ("forward", "train step", "evaluation")


def rows(config: dict, frame_counts: List[int], batch: int, eval_videos: int, runs: int,
         device: str, peak: Optional[float], what: List[str] = ROW_KINDS
         ) -> List[Dict[str, object]]:
    results = []
    kinds = ([("forward", f) for f in frame_counts] + [("train step", frame_counts[0])]
             + [("evaluation", f) for f in frame_counts])
    kinds = [(kind, frames) for kind, frames in kinds if kind in what]
    for kind, frames in kinds:
        for aggregate in (True, False):
            for dtype_name, dtype in AUTOCAST_DTYPES.items():
                setting = dict(config, num_frames=frames,
                               token_merging=aggregate and config["token_merging"])
                row = {"what": kind, "frames": frames, "aggregation": aggregate,
                       "dtype": dtype_name, "batch": {"forward": batch, "evaluation": eval_videos}
                       .get(kind, setting["batch_size_train"])}
                try:
                    if kind == "forward":
                        row.update(forward_row(setting, batch, dtype, runs, device))
                    elif kind == "evaluation":
                        row.update(evaluation_row(setting, eval_videos, dtype, runs, device))
                    else:
                        row.update(training_row(setting, dtype, runs, device))
                except torch.OutOfMemoryError:
                    row.update(videos_per_s=None, peak_gib=None, sdpa="out of memory", tflops=None)
                row["mfu"] = None if peak is None or row["tflops"] is None else row["tflops"] / peak
                if device == "cuda":
                    torch.cuda.empty_cache()
                results.append(row)
                print(table_line(row), flush=True)
    return results


def table_line(row: Dict[str, object]) -> str:
    speed = "-" if row["videos_per_s"] is None else f"{row['videos_per_s']:.2f}"
    peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
    tflops = "-" if row["tflops"] is None else f"{row['tflops']:.1f}"
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    return (f"| {row['what']} | {row['frames']} | {'yes' if row['aggregation'] else 'no'} | "
            f"{row['dtype']} | {row['batch']} | {speed} | {peak} | {row['sdpa']} | {tflops} | {mfu} |")


TABLE_HEADER = ("| what | frames | aggregation | dtype | batch | videos/s | peak GiB | SDPA kernel "
                "| TFLOP/s | MFU |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/retrieval_queryd_f32.yaml",
                        help="model and training batch of the rows (paper size by default)")
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 96],
                        help="frame counts of the forward rows; the training step uses the first")
    parser.add_argument("--batch", type=int, default=8, help="videos per forward")
    parser.add_argument("--rows", nargs="+", choices=ROW_KINDS, default=list(ROW_KINDS),
                        help="which kinds of row to measure (default: all)")
    parser.add_argument("--eval-videos", type=int, default=256,
                        help="videos (and paragraphs) of the evaluation rows")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per row after a warm-up")
    parser.add_argument("--peak-tflops", type=float,
                        help="the GPU's dense bf16/fp16 TFLOP/s for the MFU column (default: "
                             "from GPU_PEAK_TFLOPS by the device name)")
    parser.add_argument("--text-encoder", help="tokenizer (default: the config's text_encoder)")
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing measured")
        return 0
    device = "cpu" if args.cpu_dry_run else "cuda"
    config = with_defaults(load_config(args.config), RETRIEVAL_SCHEMA, args.config)
    config.pop("pretrained", None)  # random weights
    if args.cpu_dry_run:
        config.update(DRY_RUN)
    if args.text_encoder:
        config["text_encoder"] = args.text_encoder
    name = "CPU (dry run, tiny model)" if args.cpu_dry_run else torch.cuda.get_device_name()
    peak = args.peak_tflops or (None if args.cpu_dry_run else peak_tflops(name))
    peak_text = "unknown (--peak-tflops)" if peak is None else f"{peak:g} TFLOP/s"
    print(f"{name}, torch {torch.__version__}, {args.config}; dense bf16/fp16 peak {peak_text}")
    print(TABLE_HEADER, flush=True)
    rows(config, args.frames, args.batch, args.eval_videos, args.runs, device, peak, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
