"""Frame-index sampling and clip reading, through decord or PyAV (`datasets/decoders.py`)."""
import math
import random

import torch
from einops import rearrange
from torchvision.transforms.v2 import functional as F

from .decoders import Decoder, VideoDecodeError, open_reader
from .transforms import normalize

SAMPLING_STRATEGIES = ("uniform", "nlvl_uniform", "nlvl_rand", "rand", "headtail")
RANDOM_STRATEGIES = ("nlvl_rand", "rand", "headtail")
TEST_STRATEGY = "uniform"  # how evaluation clips sample their frames


def evenly_spaced_indices(start: int, length: int, num_frm: int) -> list[int]:
    """floor(start + i * length / num_frm): repeats frames, in order, when length < num_frm."""
    return [start + i * length // num_frm for i in range(num_frm)]


def sample_frame_indices(num_frames: int, num_frm: int, strategy: str = "uniform",
                         rng: random.Random | None = None, start: int = 0,
                         end: int | None = None) -> list[int]:
    """Indices of `num_frm` frames of the range [start, end) of a video of `num_frames` frames.

    - uniform: TESTA's `np.arange(start, end, length / num_frm, dtype=int)` (data/video_dataset.py), i.e. the
      integer stride `length // num_frm` from `start`;
    - nlvl_uniform: evenly spaced, `floor(start + i * length / num_frm)`;
    - nlvl_rand: nlvl_uniform plus a random offset inside each stride;
    - rand: a sorted random sample;
    - headtail: a sorted random half from each half of the range.
    A range shorter than `num_frm` gives evenly spaced indices (frames repeated) for every strategy.
    """
    if strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"unknown frame sampling strategy {strategy!r}; expected one of {SAMPLING_STRATEGIES}")
    if strategy in RANDOM_STRATEGIES and rng is None:
        raise ValueError(f"frame sampling strategy {strategy!r} needs an rng")
    end = num_frames if end is None else end
    length = end - start
    if length <= 0 or num_frm <= 0:
        raise ValueError(f"cannot sample {num_frm} frames from the empty range [{start}, {end})")
    if length < num_frm or strategy == "nlvl_uniform":
        return evenly_spaced_indices(start, length, num_frm)
    if strategy == "uniform":
        stride = length // num_frm
        return [start + i * stride for i in range(num_frm)]
    if strategy == "nlvl_rand":
        base = evenly_spaced_indices(start, length, num_frm)
        bounds = base[1:] + [end]
        return [index + rng.randrange(bound - index) for index, bound in zip(base, bounds)]
    if strategy == "rand":
        return sorted(rng.sample(range(start, end), num_frm))
    middle = start + length // 2
    head = sorted(rng.sample(range(start, middle), num_frm // 2))
    tail = sorted(rng.sample(range(middle, end), num_frm - num_frm // 2))
    return head + tail


def frame_range(num_frames: int, fps: float, start_time: float | None,
                end_time: float | None) -> tuple[int, int]:
    """[start, end) frame range of the times in seconds, clamped to the video, never empty."""
    start = 0 if start_time is None else min(max(int(start_time * fps), 0), num_frames - 1)
    end = num_frames if end_time is None else min(math.ceil(end_time * fps), num_frames)
    return start, max(end, start + 1)


def read_frames(path: str, num_frm: int, strategy: str = "uniform", size: int | None = None,
                rng: random.Random | None = None, start_time: float | None = None,
                end_time: float | None = None, *, decoder: Decoder | None = None) -> torch.Tensor:
    """Decode `num_frm` frames as uint8 `[T, 3, H, W]`, resized to `size` x `size` on decode,
    by `decoder` (default: decord if installed, else PyAV; see `datasets/decoders.py`)."""
    reader = open_reader(path, size, decoder)
    start, end = frame_range(reader.num_frames, reader.fps, start_time, end_time)
    indices = sample_frame_indices(reader.num_frames, num_frm, strategy, rng, start, end)
    frames = rearrange(reader.get(indices), "t h w c -> t c h w").contiguous()  # [T, 3, H, W]
    if reader.width != size:
        frames = F.resize(frames, [size, size], antialias=True)
    return frames


def load_video(path: str, num_frm: int, strategy: str = "uniform", size: int | None = None,
               rng: random.Random | None = None, start_time: float | None = None,
               end_time: float | None = None, *, decoder: Decoder | None = None) -> torch.Tensor:
    """`read_frames` then CLIP normalisation: float32 `[T, 3, H, W]`."""
    return normalize(read_frames(path, num_frm, strategy, size, rng, start_time, end_time,
                                 decoder=decoder))


def read_test_frames(path: str, num_frm: int, size: int) -> torch.Tensor:
    """The frames of `path` that an evaluation clip holds: `num_frm` frames sampled as the
    test split samples them, at `size` x `size`, uint8 `[T, 3, H, W]`."""
    return read_frames(path, num_frm, TEST_STRATEGY, size)
