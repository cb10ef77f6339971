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
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing import Pool

import av
from tqdm import tqdm

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".flv", ".m4v", ".mpg", ".mpeg", ".3gp", ".wmv")
CRF = "23"


@dataclass(frozen=True)
class Settings:
    fps: float | None
    size: int | None
    short_side: int | None
    duration: float | None
    backend: str  # "ffmpeg" or "pyav"


def is_video_name(name: str) -> bool:
    """A video suffix, or no suffix at all (QuerYD names its videos `video-<id>`)."""
    suffix = os.path.splitext(name)[1].lower()
    return not name.startswith(".") and (suffix in VIDEO_SUFFIXES or not suffix)


def find_videos(root: str) -> list[str]:
    """Relative paths of the video files under `root`, sorted."""
    found = []
    for folder, _, files in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, name), root) for name in files if is_video_name(name)]
    return sorted(found)


def even(value: float) -> int:
    return max(2, int(round(value / 2)) * 2)


def output_size(width: int, height: int, settings: Settings) -> tuple[int, int]:
    """(width, height) of the output: a square, or the short side scaled, kept even for yuv420p."""
    if settings.size:
        return settings.size, settings.size
    if settings.short_side:
        scale = settings.short_side / min(width, height)
        return even(width * scale), even(height * scale)
    return even(width), even(height)


def ffmpeg_command(source: str, target: str, settings: Settings) -> list[str]:
    filters = []
    if settings.fps:
        filters.append(f"fps={settings.fps}")
    if settings.size:
        filters.append(f"scale={settings.size}:{settings.size}")
    elif settings.short_side:
        side = settings.short_side
        filters.append(f"scale='if(gt(iw,ih),-2,{side})':'if(gt(iw,ih),{side},-2)'")
    command = ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", source]
    if settings.duration:
        command += ["-t", str(settings.duration)]
    if filters:
        command += ["-vf", ",".join(filters)]
    return command + ["-an", "-sn", "-dn", "-c:v", "libx264", "-preset", "fast", "-crf", CRF,
                      "-pix_fmt", "yuv420p", "-threads", "1", target]


def reencode_ffmpeg(source: str, target: str, settings: Settings) -> None:
    result = subprocess.run(ffmpeg_command(source, target, settings), capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"ffmpeg exited with {result.returncode}"]
        raise RuntimeError(lines[-1])


def reencode_pyav(source: str, target: str, settings: Settings) -> None:
    """Decode, keep the frame nearest each output tick of 1/fps, resize, encode."""
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = Fraction(settings.fps).limit_denominator(1001) if settings.fps else (
            stream.average_rate or stream.guessed_rate or Fraction(25))
        width, height = output_size(stream.codec_context.width, stream.codec_context.height, settings)
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        with av.open(target, "w") as output:
            encoder = output.add_stream(codec, rate=rate)
            encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
            encoder.codec_context.thread_count = 1
            if codec == "libx264":
                encoder.options = {"preset": "fast", "crf": CRF}
            start = None
            next_tick = 0
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                start = frame.time if start is None else start
                tick = round((frame.time - start) * rate)
                if settings.duration and tick >= settings.duration * rate:
                    break
                if tick < next_tick:
                    continue
                resized = frame.reformat(width=width, height=height, format="yuv420p")
                for index in range(next_tick, tick + 1):  # repeats the frame when the rate goes up
                    resized.pts = index
                    resized.time_base = 1 / rate
                    output.mux(encoder.encode(resized))
                next_tick = tick + 1
            if next_tick == 0:
                raise RuntimeError("no frames decoded")
            output.mux(encoder.encode())


def compress_one(job: tuple[str, str, Settings]) -> tuple[str, str | None]:
    """(source, error message or None); the output appears only when the encode succeeded."""
    source, target, settings = job
    partial = target[:-len(".mp4")] + ".partial.mp4"
    try:
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        reencode = reencode_ffmpeg if settings.backend == "ffmpeg" else reencode_pyav
        reencode(source, partial, settings)
        os.replace(partial, target)
        return source, None
    except Exception as error:  # any failure of one file is reported, the others go on
        if os.path.exists(partial):
            os.remove(partial)
        return source, f"{type(error).__name__}: {error}"


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
