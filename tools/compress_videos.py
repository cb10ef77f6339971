"""Re-encode a folder of videos to a lower frame rate and size, audio dropped, in parallel.

    python tools/compress_videos.py --input raw/ActivityNet --output data/ActivityNet/videos --fps 6 --size 224
    python tools/compress_videos.py --input raw/DiDeMo --output data/DiDeMo/videos --fps 30 --size 224 --duration 30

Uses the ffmpeg binary when it is on PATH (--backend auto), else PyAV. Every video under --input
(recursively; a file without a suffix counts as a video) is written to the same relative path
under --output with the suffix .mp4 (H.264, yuv420p). Existing outputs are kept unless
--overwrite; files that fail are skipped and listed.
"""
import argparse
import os
import shutil
import sys
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a script
from datasets.compression import Settings, compress_one, find_videos  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", required=True, help="folder of videos (searched recursively)")
    parser.add_argument("--output", required=True, help="folder for the .mp4 outputs")
    parser.add_argument("--fps", type=float, help="output frame rate (default: the input's)")
    resize = parser.add_mutually_exclusive_group()
    resize.add_argument("--size", type=int, help="square output size in pixels")
    resize.add_argument("--short-side", type=int, help="output short side in pixels, aspect kept")
    parser.add_argument("--duration", type=float, help="keep the first DURATION seconds")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="videos compressed in parallel (default: the CPU count)")
    parser.add_argument("--backend", choices=("auto", "ffmpeg", "pyav"), default="auto",
                        help="encoder: the ffmpeg command, PyAV, or auto (ffmpeg when on PATH)")
    parser.add_argument("--overwrite", action="store_true", help="re-encode existing outputs")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.input):
        print(f"{args.input}: input folder not found", file=sys.stderr)
        return 2
    backend = args.backend
    if backend == "auto":
        backend = "ffmpeg" if shutil.which("ffmpeg") else "pyav"
    settings = Settings(args.fps, args.size, args.short_side, args.duration, backend)
    jobs, existing = [], 0
    for relative in find_videos(args.input):
        target = os.path.join(args.output, os.path.splitext(relative)[0] + ".mp4")
        if os.path.exists(target) and not args.overwrite:
            existing += 1
            continue
        jobs.append((os.path.join(args.input, relative), target, settings))
    failures = []
    with Pool(max(1, args.workers)) as pool:
        progress = tqdm(pool.imap_unordered(compress_one, jobs), total=len(jobs), desc=f"compress ({backend})")
        for source, error in progress:
            if error is not None:
                failures.append((source, error))
    for source, error in sorted(failures):
        print(f"skipped {source}: {error}", file=sys.stderr)
    print(f"{len(jobs) - len(failures)} videos written, {existing} already there, "
          f"{len(failures)} failed -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
