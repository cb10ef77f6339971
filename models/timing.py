"""Timing the video encoder: forwards (and training steps) timed alternately, the memory
one step needs beyond the model and input, GEMM rates for a roofline (the encoder's own
linear layers alone, timed in turn with the encoder, and the best of a few large matrix
products), the rate of its attention kernel alone, the GPUs' nominal peak rates, and the
op classes of a profile table."""
import multiprocessing
import os
import resource
import statistics
import time
from typing import Callable, List, Optional, Tuple

import torch

from models.attention import attend
from models.cost import video_shape
from models.video_encoder import build_video_encoder

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
# nominal dense (no sparsity) bf16 = fp16 tensor-core TFLOP/s from the vendors' data sheets,
# matched against torch.cuda.get_device_name(), most specific name first
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                   ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0),
                   ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
                   ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0))


def build(config: dict, device: str, dtype: torch.dtype, train: bool,
          video: Optional[torch.Tensor] = None, batch: int = 1):
    """The encoder at `dtype` and its input `[batch, 3, T, H, W]`: random, or `video`
    `[1, 3, T, H, W]` repeated `batch` times."""
    encoder = build_video_encoder(config).to(device=device, dtype=dtype).train(train)
    if video is None:
        video = torch.randn(video_shape(config, batch))
    else:
        video = video.expand(batch, -1, -1, -1, -1)
    return encoder, video.to(device=device, dtype=dtype).contiguous()


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


def time_alternately(steps: List[Callable[[], None]], runs: int) -> List[float]:
    """Median seconds of each step after one warm-up, running them in turn so that drift
    and the load of other processes hit all alike."""
    for run in steps:
        run()
    samples = [[] for _ in steps]
    for _ in range(runs):
        for samples_of, run in zip(samples, steps):
            start = time.perf_counter()
            run()
            samples_of.append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def rss_peak_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    # VmHWM belongs to this address space; ru_maxrss would carry the parent's peak
    # across fork + exec.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def current_rss_mb() -> float:
    """This process's resident set now, MB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def in_fresh_process(target: Callable, *args):
    """`target(*args, queue)` in a spawned process, and what it put on `queue`. Large
    blocks there come straight from mmap and go back to the system when freed, so the
    child's peak resident set follows its live tensors instead of malloc's cached arenas."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # the child starts with this environment
    try:
        child.start()
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the measuring process failed (exit code {child.exitcode})")
    return queue.get(timeout=60)


def _peak_memory_child(config: dict, dtype: torch.dtype, train: bool, threads: int,
                       video: Optional[torch.Tensor], batch: int, queue) -> None:
    torch.set_num_threads(threads)
    encoder, video = build(config, "cpu", dtype, train, video, batch)
    baseline = current_rss_mb()
    step(encoder, video, train)
    queue.put(rss_peak_mb() - baseline)


def peak_memory_mb(config: dict, device: str, dtype: torch.dtype, train: bool,
                   video: Optional[torch.Tensor] = None, batch: int = 1) -> float:
    """Memory one step needs beyond the model and input (MB)."""
    if device.startswith("cuda"):
        encoder, video = build(config, device, dtype, train, video, batch)
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(encoder, video, train)
        peak = torch.cuda.max_memory_allocated() - baseline
        del encoder, video
        torch.cuda.empty_cache()
        return round(peak / 2**20, 1)
    return round(in_fresh_process(_peak_memory_child, config, dtype, train,
                                  torch.get_num_threads(), video, batch), 1)


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


def peak_tflops(device_name: str) -> Optional[float]:
    """The nominal dense bf16/fp16 rate of a GPU by its name, or None if not in the table."""
    return next((tflops for name, tflops in GPU_PEAK_TFLOPS if name in device_name), None)


def op_class(name: str) -> str:
    """The profile table's class of an aten op name."""
    for op_class_name, fragments in OP_CLASSES:
        if any(fragment in name for fragment in fragments):
            return op_class_name
    return "other"


def encoder_gemms(config: dict, device: str, dtype: torch.dtype, tokens: Tuple[int, ...],
                  train: bool = False) -> Tuple[Callable[[], None], float]:
    """The encoder's linear layers alone, as it runs them: (a step running `F.linear` with
    bias at each of its weight shapes (qkv, projection, MLP in and out) for every token
    count of `tokens`, its FLOPs). Timed in turn with the encoder, its rate is the GEMM
    rate the encoder could reach under the same load; training adds the two products of
    each backward."""
    width, hidden = config["vision_width"], int(config["vision_width"] * 4)
    shapes = [(width, 3 * width), (width, width), (width, hidden), (hidden, width)]  # (in, out)
    products = []
    for m in tokens:
        for k, n in shapes:
            x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=train)
            weight = torch.randn(n, k, device=device, dtype=dtype, requires_grad=train)
            bias = torch.randn(n, device=device, dtype=dtype, requires_grad=train)
            products.append((x, weight, bias))
    flops = sum(2 * x.shape[0] * x.shape[1] * w.shape[0] for x, w, _ in products) * (3 if train else 1)

    def run() -> None:
        for x, weight, bias in products:
            if train:
                torch.nn.functional.linear(x, weight, bias).sum().backward()
            else:
                with torch.inference_mode():
                    torch.nn.functional.linear(x, weight, bias)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return run, float(flops)


def encoder_attention(config: dict, device: str, dtype: torch.dtype, batch: int = 1
                      ) -> Tuple[Callable[[], None], float]:
    """The first block's attention alone, as the encoder runs it (inference): a step
    running `models.attention.attend` at its temporal shape (each patch over the T
    frames) and its spatial shape (each frame's patches and class token), and its FLOPs
    (the two products, 4 x queries x keys x head width). Timed in turn with the encoder,
    its rate says how far the attention kernel is from the linear layers' GEMM rate."""
    heads, width = config["num_heads"], config["vision_width"]
    frames, patches = config["num_frames"], (config["image_size"] // config["patch_size"]) ** 2
    shapes = [(batch * patches, frames), (batch * frames, patches + 1)]  # (sequences, length)
    inputs = [[torch.randn(sequences, heads, length, width // heads, device=device, dtype=dtype)
               for _ in range(3)] for sequences, length in shapes]  # q, k, v
    scale = (width // heads) ** -0.5
    flops = sum(4 * sequences * heads * length * length * (width // heads)
                for sequences, length in shapes)

    def run() -> None:
        with torch.inference_mode():
            for q, k, v in inputs:
                attend(q, k, v, scale)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return run, float(flops)
