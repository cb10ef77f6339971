"""The synthetic long-video set (datasets/synthetic.py, tools/make_synthetic.py) and
tools/compress_videos.py: formats, determinism, failures."""
import filecmp
import importlib.util
import json
import multiprocessing
import os
import shutil
import sys

import numpy as np
import pytest

from datasets import compression
from datasets import synthetic as generator
from datasets.decoders import open_reader
from tasks import build_datasets
from tools import make_synthetic

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that multiprocessing can pickle its functions
    spec.loader.exec_module(module)
    return module


compress_videos = load_tool("compress_videos")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synthetic"))
    make_synthetic.main(["--out", out, "--videos", "10", "--seed", "3", "--workers", "2"])
    return out


def rendered(spec) -> np.ndarray:
    return np.stack(list(generator.render(spec, 112)))


def test_synthetic_is_deterministic_per_seed(synthetic, tmp_path):
    make_synthetic.main(["--out", str(tmp_path), "--videos", "10", "--seed", "3", "--workers", "1"])
    names = sorted(os.listdir(os.path.join(synthetic, "annotations")))
    assert names == sorted(os.listdir(tmp_path / "annotations"))
    match, mismatch, errors = filecmp.cmpfiles(os.path.join(synthetic, "annotations"),
                                               tmp_path / "annotations", names, shallow=False)
    assert not mismatch and not errors
    # the rendered frames are a function of the seed, in any process
    keys = generator.first_event_keys(3)
    specs = [generator.make_spec(i, 3, keys, (16, 32)) for i in range(10)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        in_workers = pool.map(rendered, specs, chunksize=4)
    assert all(np.array_equal(rendered(spec), frames) for spec, frames in zip(specs, in_workers))
    # x264 may round a block differently in a pool worker (seen here: 1 video of 10, mean
    # difference 0.16 grey levels), so the encoded videos are compared decoded, on average
    names = sorted(os.listdir(os.path.join(synthetic, "videos")))
    assert names == sorted(os.listdir(tmp_path / "videos"))
    for name in names:
        first = open_reader(os.path.join(synthetic, "videos", name), None)
        second = open_reader(str(tmp_path / "videos" / name), None)
        assert first.num_frames == second.num_frames
        every_frame = range(first.num_frames)
        difference = first.get(every_frame).numpy().astype(int) - second.get(every_frame).numpy().astype(int)
        assert abs(difference).mean() < 0.5, name
    other = generator.make_spec(0, 4, generator.first_event_keys(4), (16, 32))
    assert other != generator.make_spec(0, 3, generator.first_event_keys(3), (16, 32))


def test_synthetic_captions_format(synthetic):
    ann = os.path.join(synthetic, "annotations")
    with open(os.path.join(ann, "train.json")) as f:
        train = json.load(f)
    with open(os.path.join(ann, "val.json")) as f:
        val = json.load(f)
    assert [r["video"] for r in train] == [f"v_synth{i:05d}.mp4" for i in range(8)]
    assert [r["video"] for r in val] == ["v_synth00008.mp4", "v_synth00009.mp4"]
    for record in train + val:
        assert 3 <= len(record["caption"]) <= 5
        assert record["caption"][0].startswith("on a") and " background, a " in record["caption"][0]
        assert all(sentence.endswith(".") and " moves " in sentence for sentence in record["caption"])


def test_synthetic_videos_match_their_description(synthetic):
    keys = generator.first_event_keys(3)
    spec = generator.make_spec(0, 3, keys, (16, 32))
    reader = open_reader(os.path.join(synthetic, "videos", "v_synth00000.mp4"), None)
    assert reader.num_frames == sum(event.num_frames for event in spec.events)
    assert reader.get([0]).shape == (1, 112, 112, 3) and round(reader.fps) == 8
    top_left = reader.get([0])[0].numpy()[2, 2].astype(int)
    assert np.abs(top_left - generator.BACKGROUNDS[spec.background]).max() < 12
    first = spec.events[0]
    middle = reader.get([first.num_frames // 2])[0].numpy().astype(int)
    colour = np.array(generator.SHAPE_COLOURS[first.colour])
    assert (np.abs(middle - colour).max(axis=-1) < 40).sum() > 30  # the shape's pixels are there


def test_synthetic_qa_format_and_loaders(synthetic):
    ann = os.path.join(synthetic, "annotations")
    for split, videos in (("train", 8), ("val", 1), ("test", 1)):
        with open(os.path.join(ann, f"{split}_q.json")) as f:
            questions = json.load(f)
        with open(os.path.join(ann, f"{split}_a.json")) as f:
            answers = json.load(f)
        assert len(questions) == len(answers) == 5 * videos
        assert [q["question_id"] for q in questions] == [a["question_id"] for a in answers]
        assert all(len(a["answer"].split()) == 1 and isinstance(a["type"], int) for a in answers)
    config = {"video_root": os.path.join(synthetic, "videos"), "ann_root": ann, "num_frm_train": 8,
              "num_frm_test": 8, "image_size": 64, "max_words": 64, "max_question_len": 35}
    train, val, test = build_datasets(dict(config, dataset="retrieval_activitynet"))
    assert (len(train), len(val), len(test)) == (8, 2, 2)
    train, val, test = build_datasets(dict(config, dataset="activitynet_qa"))
    assert (len(train), len(val), len(test)) == (40, 5, 5)
    assert train[0][0].shape == (8, 3, 64, 64) and "no bad data" in train.summary()


def make_inputs(root, synthetic) -> str:
    source = os.path.join(synthetic, "videos", "v_synth00000.mp4")
    os.makedirs(root / "in" / "sub")
    shutil.copy(source, root / "in" / "a.mp4")
    shutil.copy(source, root / "in" / "sub" / "b.mkv")
    shutil.copy(source, root / "in" / "video-c")  # QuerYD names have no suffix
    (root / "in" / "broken.webm").write_bytes(b"not a video")
    (root / "in" / "notes.txt").write_text("ignored")
    return str(root / "in")


@pytest.mark.parametrize("backend", ["pyav", "ffmpeg"])
def test_compress_videos(backend, synthetic, tmp_path, capsys):
    if backend == "ffmpeg" and shutil.which("ffmpeg") is None:
        pytest.skip("no ffmpeg binary")
    source = make_inputs(tmp_path, synthetic)
    output = str(tmp_path / "out")
    args = ["--input", source, "--output", output, "--fps", "4", "--short-side", "64", "--duration", "3",
            "--workers", "2", "--backend", backend]
    assert compress_videos.main(args) == 0
    assert compression.find_videos(output) == ["a.mp4", os.path.join("sub", "b.mp4"), "video-c.mp4"]
    reader = open_reader(os.path.join(output, "sub", "b.mp4"), None)
    assert reader.get([0]).shape == (1, 64, 64, 3) and round(reader.fps) == 4
    assert reader.num_frames == 12
    report = capsys.readouterr()
    assert "broken.webm" in report.err and "3 videos written, 0 already there, 1 failed" in report.out
    assert compress_videos.main(args) == 0
    assert "0 videos written, 3 already there, 1 failed" in capsys.readouterr().out


def test_compress_output_sizes():
    settings = compression.Settings(fps=None, size=None, short_side=224, duration=None, backend="pyav")
    assert compression.output_size(1280, 720, settings) == (398, 224)
    assert compression.output_size(720, 1280, settings) == (224, 398)
    square = compression.Settings(fps=6, size=224, short_side=None, duration=None, backend="pyav")
    assert compression.output_size(1280, 720, square) == (224, 224)
