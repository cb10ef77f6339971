"""Write a synthetic long-video dataset: coloured shapes moving over static backgrounds.

Each video is a sequence of 3-5 events, described one sentence each (datasets/synthetic.py).

Layout written under --out:
    videos/v_synth00000.mp4 ...        H.264 (mpeg4 if PyAV lacks libx264), --size px, --fps fps
    annotations/train.json, val.json   ActivityNet Captions format, val = the last --val-fraction
    annotations/{train,val,test}_q.json, {train,val,test}_a.json
                                       ActivityNet-QA format; val and test halve the held-out videos
    settings.json                      the generation settings (what tools/demo.py checks before
                                       reusing the folder)

    python tools/make_synthetic.py --out data/synthetic --videos 500 --seed 0
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a script
from datasets.synthetic import GenerationSettings, SETTINGS_FILE, video_codec, write_set  # noqa: E402
from engine.output_dir import OutputDir, taken  # noqa: E402
from utils import ConfigError  # noqa: E402

DEFAULTS = GenerationSettings()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (videos/ and annotations/ inside)")
    parser.add_argument("--videos", type=int, default=DEFAULTS.videos, help="videos to make")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="seed of the shapes, colours and motions")
    parser.add_argument("--frames-per-event", type=int, nargs=2, default=DEFAULTS.frames_per_event,
                        metavar=("MIN", "MAX"), help="frames of each event, drawn between MIN and MAX")
    parser.add_argument("--size", type=int, default=DEFAULTS.size, help="frame side in pixels")
    parser.add_argument("--fps", type=int, default=DEFAULTS.fps, help="frame rate of the videos")
    parser.add_argument("--val-fraction", type=float, default=DEFAULTS.val_fraction,
                        help="held-out videos (val.json)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="videos written in parallel (default: the CPU count)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the videos/, annotations/ and settings.json already in --out")
    args = parser.parse_args(argv)
    if args.videos < 1 or not 1 <= args.frames_per_event[0] <= args.frames_per_event[1]:
        parser.error("need --videos >= 1 and 1 <= MIN <= MAX for --frames-per-event")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    output = OutputDir(args.out, ("videos", "annotations", SETTINGS_FILE), overwrite=args.overwrite,
                       flag="--out", hint="pass --overwrite to replace it, or another --out")
    try:
        with taken(output):
            write(args)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


def write(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    settings = GenerationSettings(args.videos, args.seed, tuple(args.frames_per_event), args.size,
                                  args.fps, args.val_fraction)
    written = write_set(settings, args.out, args.workers)
    print(f"wrote {args.videos} videos ({written['frames']} frames, {video_codec()}, {args.size}px, "
          f"{args.fps} fps; {written['train']} train, {written['held_out']} val) to {args.out} in "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
