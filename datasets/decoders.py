"""Video readers: decord where it is installed, PyAV everywhere else, with one interface.

Both readers number frames in presentation order from 0, report the stream's average frame
rate, and return the frames asked for as uint8 `[T, H, W, 3]` RGB, resized on decode to
`size` x `size` (native size when `size` is None). The sampling in `datasets/video.py` picks
the indices from `num_frames` and `fps` alone, so both decoders read the same frames.

The decoder is chosen once per process: `TESTA_VIDEO_DECODER=decord|pyav` forces one,
unset (or `auto`) uses decord when it can be imported, else PyAV.
"""
import importlib.util
import os
from typing import Literal, Optional, Protocol, Sequence, get_args

import numpy as np
import torch

Decoder = Literal["decord", "pyav"]
DECODER_ENV = "TESTA_VIDEO_DECODER"  # auto (default), decord or pyav
DECODE_THREADS = 1  # one decoding thread per reader: DataLoader workers give the parallelism
# decord 0.6 returns frames of the wrong size for these output widths (whatever the source);
# such clips are decoded SAFE_DECODE_WIDTH wide and resized with torchvision by the caller
DECORD_BAD_WIDTHS = frozenset({2, 3, 4, 6, 8, 12, 16, 24, 48, 72})
SAFE_DECODE_WIDTH = 96
# PyAV: a target this many frames beyond the last decoded one is reached by seeking to the
# key frame before it instead of decoding every frame in between
SEEK_AHEAD_FRAMES = 32


class VideoDecodeError(RuntimeError):
    """A video file that exists but cannot be opened or decoded."""


def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0][:200]


# container signatures (offset, bytes, name): a file that has one but does not open is damaged
CONTAINER_SIGNATURES = ((4, b"ftyp", "an MP4/MOV"), (0, b"\x1a\x45\xdf\xa3", "a Matroska/WebM"),
                        (0, b"RIFF", "an AVI"))


def open_failure(source) -> str:
    """Why `source` (a path, or bytes in memory such as a shard's sample, named by `str`)
    does not open as a video, told apart by its bytes (decord says "Error reading" for all
    of these): missing, a folder, empty, a known container that is truncated or damaged,
    or not a video at all."""
    path = str(source)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            return f"{path}: no such file"
        if os.path.isdir(source):
            return f"{path}: a folder, not a video file"
        with open(source, "rb") as f:
            head = f.read(16)
    else:
        head = source.getvalue()[:16]
    if not head:
        return f"{path}: an empty file"
    for offset, signature, name in CONTAINER_SIGNATURES:
        if head[offset:offset + len(signature)] == signature:
            return f"{path}: {name} file that cannot be opened: truncated or damaged"
    return f"{path}: not a video file the decoder can open (it starts with bytes {head[:8].hex(' ')})"


def selected_decoder() -> Decoder:
    """The decoder of this process: `TESTA_VIDEO_DECODER`, else decord if importable, else PyAV."""
    choice = os.environ.get(DECODER_ENV, "auto").strip().lower() or "auto"
    if choice == "auto":
        return "decord" if importlib.util.find_spec("decord") is not None else "pyav"
    if choice not in get_args(Decoder):
        raise ValueError(f"{DECODER_ENV}={choice!r}: expected auto, decord or pyav")
    if choice == "decord" and importlib.util.find_spec("decord") is None:
        raise ValueError(f"{DECODER_ENV}=decord: decord is not installed on this platform; "
                         "use pyav (or leave it unset)")
    return choice


def decoder_env_problem() -> Optional[str]:
    """Why `TESTA_VIDEO_DECODER` cannot be used, in one line, or None: for the scripts to
    check before any work instead of failing in a loader worker."""
    try:
        selected_decoder()
    except ValueError as err:
        return str(err)
    return None


class VideoReader(Protocol):
    num_frames: int
    fps: float
    width: int  # of the returned frames, before any fix-up resize by the caller

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 `[T, H, W, 3]` of the frames at `indices` (in any order, repeats allowed)."""


class DecordReader:
    def __init__(self, path: str, size: int | None):
        import decord
        self.path = path
        self.width = SAFE_DECODE_WIDTH if size in DECORD_BAD_WIDTHS else size
        resize = {"width": self.width, "height": size} if size else {}
        try:
            self.reader = decord.VideoReader(path, num_threads=DECODE_THREADS, **resize)
        except Exception as error:  # decord raises RuntimeError or DECORDError on a bad file
            raise VideoDecodeError(open_failure(path)) from error
        self.num_frames = len(self.reader)
        self.fps = self.reader.get_avg_fps()

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        try:
            return torch.from_numpy(self.reader.get_batch(list(indices)).asnumpy())
        except Exception as error:  # DECORDError on a damaged stream
            raise VideoDecodeError(f"{self.path}: {first_line(error)}") from error


class PyAVReader:
    """Frames located by presentation timestamp: the video stream's packets are read once
    (no decoding) to list every frame's pts in presentation order, as decord indexes a file."""

    def __init__(self, path: str, size: int | None):
        import av
        self.path, self.size, self.width = path, size, size
        try:
            self.container = av.open(path)
            if not self.container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            self.stream = self.container.streams.video[0]
            self.stream.thread_count = DECODE_THREADS
            self.frame_pts = sorted(packet.pts for packet in self.container.demux(self.stream)
                                    if packet.pts is not None and packet.size > 0)
        except VideoDecodeError:
            raise
        except Exception as error:  # av.error.FFmpegError (and OSError) on a bad file
            raise VideoDecodeError(open_failure(path)) from error
        self.num_frames = len(self.frame_pts)
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else 0.0

    def _rgb(self, frame) -> np.ndarray:
        width = self.size or frame.width
        height = self.size or frame.height
        return frame.to_ndarray(format="rgb24", width=width, height=height,
                                interpolation="BILINEAR")  # what decord's scaler uses

    def get(self, indices: Sequence[int]) -> torch.Tensor:
        wanted = sorted(set(indices))
        found: dict[int, np.ndarray] = {}
        index_of_pts = {pts: index for index, pts in enumerate(self.frame_pts)}
        last_decoded = None
        try:
            for target in wanted:
                if target in found:
                    continue
                if last_decoded is None or target > last_decoded + SEEK_AHEAD_FRAMES:
                    self.container.seek(self.frame_pts[target], stream=self.stream, backward=True)
                for frame in self.container.decode(self.stream):
                    index = index_of_pts.get(frame.pts)
                    if index is None:
                        continue
                    last_decoded = index
                    if index in wanted and index not in found:
                        found[index] = self._rgb(frame)
                    if index >= target:
                        break
        except Exception as error:  # av.error.FFmpegError on a damaged stream
            raise VideoDecodeError(f"{self.path}: {first_line(error)}") from error
        missing = [index for index in wanted if index not in found]
        if missing:
            raise VideoDecodeError(f"{self.path}: frame {missing[0]} could not be decoded")
        return torch.from_numpy(np.stack([found[index] for index in indices]))


READERS = {"decord": DecordReader, "pyav": PyAVReader}


def open_reader(path: str, size: int | None, decoder: Decoder | None = None) -> VideoReader:
    """A reader of `path` by `decoder` (default: `selected_decoder()`); a file with no frames
    or that cannot be opened raises VideoDecodeError naming it."""
    reader = READERS[decoder or selected_decoder()](path, size)
    if reader.num_frames == 0:
        raise VideoDecodeError(f"{path}: the video has no frames")
    return reader
