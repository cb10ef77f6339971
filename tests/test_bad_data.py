"""Bad annotation files as a user hits them: through the scripts' `main(argv)`, each ends in the
exact one-line `error: <file>: <problem>` before any training step, and writes no checkpoint,
log or result. A crafted caption pickle is refused without running its payload."""
import json
import os
import pickle
from pathlib import Path

import pytest

import pretrain
import train_retrieval
import train_videoqa
from helpers import write_config, write_gray_video
from tools import make_pretrain_list


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("video") / "gray.mp4"
    write_gray_video(str(path), 12)
    return str(path)


def retrieval_root(tmp_path: Path, video: str, train, val=None) -> tuple[Path, Path]:
    """ActivityNet Captions layout: annotation text (or records) per split, videos v_a, v_b."""
    ann, videos = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir()
    videos.mkdir()
    for name in ("v_a.mp4", "v_b.mp4"):
        os.symlink(video, videos / name)
    good = [{"video": "v_a.mp4", "caption": ["a gray clip."]},
            {"video": "v_b.mp4", "caption": ["another one."]}]
    for split, content in (("train", train), ("val", good if val is None else val)):
        text = content if isinstance(content, str) else json.dumps(content)
        (ann / f"{split}.json").write_text(text)
    return ann, videos


def fails_with(main, config: str, output_dir: Path, *extra) -> str:
    """The script's one-line error; checks that nothing was written (no folder made)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", config, "--output_dir", str(output_dir), *extra])
    message = str(exit_info.value.code)
    assert "\n" not in message and message.startswith("error: ")
    assert not output_dir.exists()  # the folder is taken only after every check
    return message


def retrieval_config(tmp_path: Path, ann: Path, videos: Path) -> str:
    return write_config(
        tmp_path / "retrieval.yaml", "retrieval_activitynet_f32.yaml", video_root=str(videos),
        ann_root=str(ann), num_frm_test=4, max_words=16, batch_size_train=2, batch_size_test=2,
        embed_dim=16, queue_size=8, k_test=2, max_epoch=1)


TWO_MALFORMED = [{"video": "v_a.mp4"}, {"video": 3, "caption": ["a clip."]}]


@pytest.mark.parametrize("train, problem", [
    ('[{"video": "v_a.mp4", ', "not valid JSON (Expecting property name enclosed in double quotes "
                               "at line 1 column 23)"),
    ("", "the file is empty, expected JSON"),
    ('{"video": "v_a.mp4", "caption": ["a clip."]}', "expected a JSON list of records, got a JSON object"),
    ("[]", "the train split has no records"),
    (TWO_MALFORMED, "the train split has no usable record (2 malformed annotation)"),
    ([{"video": "v_x.mp4", "caption": ["gone."]}, {"video": "v_y.mp4", "caption": ["gone too."]}],
     "the train split has no usable record (2 missing video)"),
    ([{"video": "v_a.mp4", "caption": ["  "]}], "the train split has no usable record (1 empty caption)"),
    # json would keep the last "video" without a word
    ('[{"video": "v_a.mp4", "caption": ["a clip."], "video": "v_b.mp4"}]',
     "the train split has no usable record (1 key given twice)"),
    ('{"video": "v_a.mp4", "video": "v_b.mp4"}', "the top-level object has 'video' given twice"),
    # inside a record: an object in a list in an object
    ('[{"video": "v_a.mp4", "caption": ["a clip."], "meta": {"cuts": [{"t": 1, "t": 2}]}}]',
     "the train split has no usable record (1 key given twice)"),
    ('{"records": [[{"a": 1}, {"b": 1, "b": 2}]], "c": {"d": 0, "d": 1}}',
     "the top-level object has 'b' given twice in records[0][1], 'd' given twice in c"),
])
def test_bad_train_file_is_one_line_before_training(tmp_path, video, train, problem):
    ann, videos = retrieval_root(tmp_path, video, train)
    message = fails_with(train_retrieval.main, retrieval_config(tmp_path, ann, videos), tmp_path / "out")
    assert message == f"error: {ann / 'train.json'}: {problem}"


def test_not_utf8_annotation_is_one_line(tmp_path, video):
    ann, videos = retrieval_root(tmp_path, video, train="[]")
    (ann / "train.json").write_bytes(b'[{"video": "v_a.mp4", "caption": ["caf\xe9"]}]')
    message = fails_with(train_retrieval.main, retrieval_config(tmp_path, ann, videos), tmp_path / "out")
    assert message == f"error: {ann / 'train.json'}: not UTF-8 text (invalid continuation byte)"


def test_undecodable_train_videos_stop_before_training(tmp_path, video):
    good = [{"video": "v_a.mp4", "caption": ["a gray clip."]}]
    ann, videos = retrieval_root(tmp_path, video, train=[{"video": "v_bad1.mp4", "caption": ["x y."]},
                                                        {"video": "v_bad2.mp4", "caption": ["z."]}],
                                 val=good)
    (videos / "v_bad1.mp4").write_bytes(b"not a video")
    (videos / "v_bad2.mp4").write_bytes(b"\x00" * 64)
    message = fails_with(train_retrieval.main, retrieval_config(tmp_path, ann, videos), tmp_path / "out")
    assert message == f"error: {ann / 'train.json'}: none of the 2 videos of the train split can be decoded"


def test_some_bad_records_are_skipped_and_counted_not_fatal(tmp_path, video):
    """The other side of the line: a file with usable records trains; bad ones are counted."""
    good = [{"video": "v_a.mp4", "caption": ["a gray clip."]}, {"video": "v_b.mp4", "caption": ["more."]}]
    ann, videos = retrieval_root(tmp_path, video, train=good + TWO_MALFORMED)
    output_dir = tmp_path / "out"
    train_retrieval.main(["--config", retrieval_config(tmp_path, ann, videos),
                          "--output_dir", str(output_dir)])
    assert (output_dir / "checkpoint_last.pth").is_file()


def test_empty_test_split_of_videoqa(tmp_path, video):
    ann, videos = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir()
    videos.mkdir()
    os.symlink(video, videos / "v_a.mp4")
    for split in ("train", "val", "test"):
        questions = [{"question": "what is it", "question_id": 1, "video_name": "a"}]
        answers = [{"answer": "gray", "question_id": 1, "type": 0}]
        if split == "test":
            questions = [{"question": "what", "question_id": 2, "video_name": "missing"}]
            answers = [{"answer": "x", "question_id": 2, "type": 0}]
        (ann / f"{split}_q.json").write_text(json.dumps(questions))
        (ann / f"{split}_a.json").write_text(json.dumps(answers))
    config = write_config(tmp_path / "vqa.yaml", "vqa_activitynet_f32.yaml", video_root=str(videos),
                          ann_root=str(ann), num_frm_test=4, max_question_len=12,
                          batch_size_train=1, batch_size_test=1, k_test=1, max_epoch=1)
    message = fails_with(train_videoqa.main, config, tmp_path / "out")
    assert message == (f"error: {ann / 'test_q.json'}, {ann / 'test_a.json'}: the test split has no "
                       "usable record (1 missing video)")


def test_pretrain_file_of_the_wrong_shape(tmp_path):
    train_file = tmp_path / "pretrain.json"
    train_file.write_text(json.dumps({"path": "a.mp4", "caption": "a clip"}))
    config = write_config(tmp_path / "pretrain.yaml", "pretrain_from_blip.yaml",
                          train_file=[str(train_file)], video_resize=40, batch_size=2,
                          embed_dim=16, queue_size=8, max_words=16, max_epoch=1)
    message = fails_with(pretrain.main, config, tmp_path / "out")
    assert message == f"error: {train_file}: expected a JSON list of records, got a JSON object"


class LeavesAMarker:
    """Unpickling this calls `open(marker, "w")`: a payload that would leave a file behind."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_queryd_caption_pickle_cannot_run_code(tmp_path, video):
    ann, videos, marker = tmp_path / "ann", tmp_path / "videos", tmp_path / "marker"
    ann.mkdir()
    videos.mkdir()
    os.symlink(video, videos / "video-a")
    captions = {"video-a": [["a", "gray", "clip"]], "payload": LeavesAMarker(str(marker))}
    caption_file = ann / "raw_captions_combined_filtered.pkl"
    caption_file.write_bytes(pickle.dumps(captions))
    for split in ("train", "val", "test"):
        (ann / f"exists_{split}_list.txt").write_text("video-a\n")
    config = write_config(
        tmp_path / "queryd.yaml", "retrieval_queryd_f32.yaml", video_root=str(videos),
        ann_root=str(ann), num_frm_test=4, max_words=16, batch_size_train=1, batch_size_test=1,
        embed_dim=16, queue_size=8, k_test=1, max_epoch=1)
    message = fails_with(train_retrieval.main, config, tmp_path / "out")
    assert message == (f"error: {caption_file}: refused: the pickle names io.open, but a "
                       "caption pickle may hold only containers, strings and numbers")
    assert not marker.exists()
    pickle.loads(pickle.dumps(LeavesAMarker(str(marker))))  # the payload is real: plain pickle runs it
    assert marker.exists()


@pytest.mark.parametrize("captions, problem", [
    ('[{"video": "a.mp4", ', "train.json: not valid JSON (Expecting property name enclosed in "
                            "double quotes at line 2 column 1)"),
    ('{"video": "a.mp4"}', "train.json: expected a JSON list of records, got a JSON object"),
    ('[{"video": "a.mp4", "caption": ["x."], "video": "b.mp4"}]', "train.json[0]: 'video' given twice"),
    ('[{"video": "a.mp4", "caption": ["x."]}, {"video": "b.mp4", "caption": "x."}]',
     "train.json[1]: expected a 'video' path and a 'caption' list of sentences"),
    ('[7]', "train.json[0]: expected a 'video' path and a 'caption' list of sentences"),
])
def test_pretrain_list_from_a_bad_captions_file_is_one_line(tmp_path, captions, problem):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text(captions + "\n")
    with pytest.raises(SystemExit) as failed:
        make_pretrain_list.main(["--data", str(tmp_path)])
    assert str(failed.value.code) == f"error: {tmp_path / 'annotations'}/{problem}"
    assert not (tmp_path / "annotations" / "pretrain.json").exists()
