"""A synthetic long-video dataset: coloured shapes moving over static backgrounds.

Each video is a sequence of 3-5 events; in each event one shape (circle, square, triangle,
diamond or cross; small or large; one of ten colours) crosses a static per-video gradient
background to the left, right, up or down. The paragraph describes the events in order, one
sentence each, the first naming the background: "on a navy background, a small red circle moves
left. a large white square moves up. ..."  The (background, first colour, first shape) triple
cycles through a seeded permutation of all 345 contrasting triples, so any 345 consecutive
videos differ in it.

`write_set` writes the videos, the ActivityNet Captions and ActivityNet-QA annotations and
settings.json (the `GenerationSettings` the set was made with, which `check_stamp` compares
before a folder is reused); `write_pretrain_list` turns its captions into a pre-training list.
tools/make_synthetic.py and tools/make_pretrain_list.py are their command lines.
"""
import json
import os
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Optional

import av
import numpy as np

from .annotations import DataError, RepeatedKeys, load_json_list, load_json_object

SHAPE_COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 90, 230), "yellow": (240, 220, 30),
    "purple": (140, 50, 180), "orange": (250, 140, 20), "white": (250, 250, 250),
    "cyan": (40, 220, 230), "pink": (250, 130, 190), "black": (10, 10, 10),
}
BACKGROUNDS = {
    "gray": (120, 120, 120), "brown": (110, 70, 35), "navy": (25, 30, 85), "olive": (105, 110, 35),
    "teal": (25, 105, 105), "beige": (225, 205, 160), "maroon": (95, 20, 35),
    "lavender": (185, 170, 225),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.16, "large": 0.26}  # half-extent of the shape, as a fraction of the frame side
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
NUMBER_WORDS = {3: "three", 4: "four", 5: "five"}
MIN_CONTRAST = 120.0  # RGB distance between a shape colour and its background
TRAVEL = 0.3  # a shape moves from centre - TRAVEL to centre + TRAVEL along its direction
# ActivityNet-QA question types
MOTION, OBJECT, COLOR, NUMBER = 0, 5, 4, 7


@dataclass(frozen=True)
class Event:
    shape: str
    colour: str
    size: str
    direction: str
    num_frames: int
    lane: float  # position across the direction of motion, as a fraction of the frame side


@dataclass(frozen=True)
class VideoSpec:
    name: str
    background: str
    events: tuple[Event, ...]


def contrasting_colours(background: str) -> list[str]:
    bg = np.array(BACKGROUNDS[background], dtype=float)
    return [name for name, rgb in SHAPE_COLOURS.items() if np.linalg.norm(np.array(rgb) - bg) >= MIN_CONTRAST]


def first_event_keys(seed: int) -> list[tuple[str, str, str]]:
    """All contrasting (background, colour, shape) triples in a seeded order."""
    keys = [(bg, colour, shape) for bg in BACKGROUNDS for colour in contrasting_colours(bg) for shape in SHAPES]
    order = np.random.default_rng([seed, 2**31]).permutation(len(keys))
    return [keys[i] for i in order]


def make_spec(index: int, seed: int, keys: list, frames_per_event: tuple[int, int]) -> VideoSpec:
    rng = np.random.default_rng([seed, index])
    background, first_colour, first_shape = keys[index % len(keys)]
    num_events = int(rng.integers(3, 6))
    others = [c for c in contrasting_colours(background) if c != first_colour]
    colours = [first_colour] + [str(c) for c in rng.choice(others, num_events - 1, replace=False)]
    shapes = [first_shape] + [str(s) for s in rng.choice(SHAPES, num_events - 1)]
    events = tuple(
        Event(shape, colour, str(rng.choice(list(SIZES))), str(rng.choice(list(DIRECTIONS))),
              int(rng.integers(frames_per_event[0], frames_per_event[1] + 1)), float(rng.uniform(0.3, 0.7)))
        for shape, colour in zip(shapes, colours))
    return VideoSpec(f"synth{index:05d}", background, events)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels of `shape` of half-extent `r`; dx, dy: offsets of each pixel from its centre."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    arm = r / 3
    return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))


def background_image(background: str, size: int) -> np.ndarray:
    """Static vertical gradient from the colour (top) to 75% of it (bottom): uint8 [H, W, 3]."""
    shade = np.linspace(1.0, 0.75, size)[:, None, None]
    column = shade * np.array(BACKGROUNDS[background], dtype=float)  # [H, 1, 3]
    return np.broadcast_to(column, (size, size, 3)).round().astype(np.uint8)


def render(spec: VideoSpec, size: int):
    """Frames uint8 [H, W, 3], event after event."""
    background = background_image(spec.background, size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for event in spec.events:
        move_x, move_y = DIRECTIONS[event.direction]
        colour = np.array(SHAPE_COLOURS[event.colour], dtype=np.uint8)
        for step in range(event.num_frames):
            progress = -TRAVEL + 2 * TRAVEL * step / max(event.num_frames - 1, 1)
            centre_x = 0.5 + move_x * progress if move_x else event.lane
            centre_y = 0.5 + move_y * progress if move_y else event.lane
            frame = background.copy()
            frame[shape_mask(event.shape, x - centre_x, y - centre_y, SIZES[event.size])] = colour
            yield frame


def video_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(path: str, frames, size: int, fps: int) -> None:
    """Encode RGB frames to `path` (single-threaded; the decoded frames depend on the seed
    only, the bytes may differ between runs by encoder rounding)."""
    codec = video_codec()
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "crf": "18"}
        else:
            stream.bit_rate = 800_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def describe(event: Event) -> str:
    return f"a {event.size} {event.colour} {event.shape} moves {event.direction}."


def paragraph(spec: VideoSpec) -> list[str]:
    sentences = [describe(event) for event in spec.events]
    article = "an" if spec.background[0] in "aeiou" else "a"
    sentences[0] = f"on {article} {spec.background} background, " + sentences[0]
    return sentences


def questions(spec: VideoSpec) -> list[tuple[str, str, int]]:
    """(question, one-word answer, ActivityNet-QA type) about the video."""
    first, last = spec.events[0], spec.events[-1]
    return [
        ("what color is the background?", spec.background, COLOR),
        ("what color is the first shape?", first.colour, COLOR),
        ("what shape appears first?", first.shape, OBJECT),
        ("how many shapes appear in the video?", NUMBER_WORDS[len(spec.events)], NUMBER),
        ("which direction does the last shape move?", last.direction, MOTION),
    ]


def write_one(job: tuple[VideoSpec, str, int, int]) -> None:
    spec, video_dir, size, fps = job
    write_video(os.path.join(video_dir, f"v_{spec.name}.mp4"), render(spec, size), size, fps)


def captions_annotation(specs: list[VideoSpec]) -> list[dict]:
    return [{"video": f"v_{spec.name}.mp4", "caption": paragraph(spec)} for spec in specs]


def qa_annotation(specs: list[VideoSpec]) -> tuple[list[dict], list[dict]]:
    question_records, answer_records = [], []
    for spec in specs:
        for number, (question, answer, kind) in enumerate(questions(spec)):
            question_id = f"v_{spec.name}_{number}"
            question_records.append({"question": question, "question_id": question_id, "video_name": spec.name})
            answer_records.append({"answer": answer, "question_id": question_id, "type": kind})
    return question_records, answer_records


def write_json(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)


def write_annotations(ann_dir: str, train: list[VideoSpec], held_out: list[VideoSpec]) -> None:
    write_json(os.path.join(ann_dir, "train.json"), captions_annotation(train))
    write_json(os.path.join(ann_dir, "val.json"), captions_annotation(held_out))
    half = len(held_out) // 2
    for split, specs in (("train", train), ("val", held_out[:half]), ("test", held_out[half:])):
        question_records, answer_records = qa_annotation(specs)
        write_json(os.path.join(ann_dir, f"{split}_q.json"), question_records)
        write_json(os.path.join(ann_dir, f"{split}_a.json"), answer_records)


SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class GenerationSettings:
    """What a written set depends on (not where it goes or how many processes write it)."""
    videos: int = 500
    seed: int = 0
    frames_per_event: tuple[int, int] = (16, 32)
    size: int = 112  # frame side in pixels
    fps: int = 8
    val_fraction: float = 0.2  # held-out videos (val.json)

    def stamp(self) -> dict:
        """The settings as settings.json records them."""
        return dict(asdict(self), frames_per_event=list(self.frames_per_event))

    def arguments(self) -> list[str]:
        """The options of tools/make_synthetic.py that write this set."""
        return ["--videos", str(self.videos), "--seed", str(self.seed),
                "--frames-per-event", *map(str, self.frames_per_event), "--size", str(self.size),
                "--fps", str(self.fps), "--val-fraction", str(self.val_fraction)]


def write_set(settings: GenerationSettings, out: str, workers: int) -> dict:
    """Write the set under `out` (videos/, annotations/, settings.json) with `workers`
    processes; what was written: videos, frames, train and held-out video counts."""
    video_dir = os.path.join(out, "videos")
    ann_dir = os.path.join(out, "annotations")
    os.makedirs(video_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    keys = first_event_keys(settings.seed)
    specs = [make_spec(i, settings.seed, keys, settings.frames_per_event) for i in range(settings.videos)]
    jobs = [(spec, video_dir, settings.size, settings.fps) for spec in specs]
    if workers > 1:
        with Pool(workers) as pool:
            pool.map(write_one, jobs, chunksize=4)
    else:
        for job in jobs:
            write_one(job)
    num_held_out = round(settings.videos * settings.val_fraction)
    num_train = settings.videos - num_held_out
    write_annotations(ann_dir, specs[:num_train], specs[num_train:])
    write_json(os.path.join(out, SETTINGS_FILE), settings.stamp())
    frames = sum(event.num_frames for spec in specs for event in spec.events)
    return {"videos": settings.videos, "frames": frames, "train": num_train, "held_out": num_held_out}


def check_stamp(folder: Path, settings: GenerationSettings) -> bool:
    """Whether `folder` holds a set made with `settings` (True: reuse it) or nothing yet
    (False: write it); a DataError when it was made with other or unknown settings."""
    stamp = folder / SETTINGS_FILE
    wanted = settings.stamp()
    if stamp.is_file():
        found = load_json_object(stamp)
        if found == wanted:
            return True
        differences = ", ".join(f"{key} {found.get(key)!r} instead of {value!r}"
                                for key, value in wanted.items() if found.get(key) != value)
        raise DataError(f"{folder} was made with other settings ({differences})")
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder} holds files but no {SETTINGS_FILE}, so its settings are unknown")
    return False


def pretrain_records(source: Path, captions: list) -> list:
    """ActivityNet Captions records `{"video", "caption": [sentences]}` of the file `source`
    -> `{"path", "caption"}`; a record of another shape raises DataError naming it."""
    records = []
    for position, record in enumerate(captions):
        where = f"{source}[{position}]"
        if isinstance(record, RepeatedKeys):
            raise DataError(f"{where}: {record.problem()}")
        video = record.get("video") if isinstance(record, dict) else None
        sentences = record.get("caption") if isinstance(record, dict) else None
        if (not isinstance(video, str) or not isinstance(sentences, list)
                or not all(isinstance(sentence, str) for sentence in sentences)):
            raise DataError(f"{where}: expected a 'video' path and a 'caption' list of sentences")
        records.append({"path": video, "caption": " ".join(sentences)})
    return records


def data_settings(data: Path) -> dict[str, str]:
    """The config's `video_root` and `ann_root` for the set written to `data`."""
    return {"video_root": str(data / "videos"), "ann_root": str(data / "annotations")}


def pretrain_list_path(data: Path) -> Path:
    """Where `write_pretrain_list` puts a set's pre-training list unless told otherwise."""
    return data / "annotations" / "pretrain.json"


def write_pretrain_list(data: Path, split: str = "train", limit: Optional[int] = None,
                        out: Optional[Path] = None) -> Path:
    """Write the pre-training list of a set's `split` captions (the first `limit` videos),
    to `out` (default: `pretrain_list_path`), and say so."""
    source = data / "annotations" / f"{split}.json"
    if not source.is_file():
        raise DataError(f"{source}: not found (write the set with tools/make_synthetic.py)")
    records = pretrain_records(source, load_json_list(str(source))[:limit])
    out = out or pretrain_list_path(data)
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {len(records)} videos with their paragraphs to {out}")
    return out
