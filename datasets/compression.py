"""Re-encoding videos to a lower frame rate and size (audio dropped), with the ffmpeg
binary or PyAV: the library behind tools/compress_videos.py."""
import os
import subprocess
from dataclasses import dataclass
from fractions import Fraction

import av


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
