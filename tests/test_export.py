"""Pickle-free checkpoints: tools/export.py writes model.safetensors, config.yaml and a
model card; testa.load, --checkpoint and pretrained read the folder (local, by URL, or
hf://) without unpickling anything."""
import pickle
from pathlib import Path

import pytest
import torch

import testa
import train_retrieval
from helpers import Server, read_metrics, run_script
from tools import export


@pytest.fixture(scope="module")
def trained(retrieval_config, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("trained")
    run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", output_dir,
               "--opts", "max_epoch=1")
    return output_dir


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exported") / "tiny_retrieval"
    run_script(export.main, trained / "checkpoint_best.pth", folder)
    return folder


def videos_of(synthetic: Path) -> list:
    return sorted((synthetic / "videos").glob("*.mp4"))[:3]


PARAGRAPHS = ["a red circle moves left.", "a blue square moves up."]


def no_unpickling(monkeypatch):
    """Any pickle or torch.load call from here on fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling on a pickle-free path")

    class Refused:
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refused)
    monkeypatch.setattr(torch, "load", refuse)


def test_export_holds_weights_config_and_card(trained, exported):
    assert sorted(path.name for path in exported.iterdir()) == [
        "README.md", "config.yaml", "model.safetensors"]
    card = (exported / "README.md").read_text()
    assert "retrieval" in card and 'testa.load("tiny_retrieval")' in card
    metrics = read_metrics(trained / "test_metrics.json")
    assert f"- t2v_r1: {metrics['t2v_r1']:.2f}" in card


def test_exported_folder_embeds_as_the_pth_with_no_unpickling(trained, exported, synthetic,
                                                               monkeypatch):
    from_pth = testa.load(trained / "checkpoint_best.pth")
    expected_videos = from_pth.embed_videos(videos_of(synthetic))
    expected_texts = from_pth.embed_paragraphs(PARAGRAPHS)
    expected_scores = from_pth.rerank(expected_videos, expected_texts)
    no_unpickling(monkeypatch)
    model = testa.load(exported)
    assert model.load_report.notes == ["read from model.safetensors (no unpickling)"]
    assert model.config == from_pth.config
    videos = model.embed_videos(videos_of(synthetic))
    texts = model.embed_paragraphs(PARAGRAPHS)
    torch.testing.assert_close(videos.features, expected_videos.features, rtol=0, atol=0)
    torch.testing.assert_close(videos.tokens, expected_videos.tokens, rtol=0, atol=0)
    torch.testing.assert_close(texts.features, expected_texts.features, rtol=0, atol=0)
    for got, want in zip(model.rerank(videos, texts), expected_scores):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_evaluating_the_export_reproduces_the_run(trained, exported, synthetic, tmp_path,
                                                  monkeypatch):
    no_unpickling(monkeypatch)
    run_script(train_retrieval.main, "--output_dir", tmp_path / "eval", "--evaluate",
               "--checkpoint", exported, "--opts", f"ann_root={synthetic / 'annotations'}",
               f"video_root={synthetic / 'videos'}")
    assert read_metrics(tmp_path / "eval" / "eval_results.json") == pytest.approx(
        read_metrics(trained / "test_metrics.json"))


@pytest.fixture
def hub(exported, tmp_path, monkeypatch):
    root = tmp_path / "served"
    for revision in ("main", "v1"):
        folder = root / "someone" / "testa-tiny" / "resolve" / revision
        folder.mkdir(parents=True)
        for path in exported.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
    (root / "plain" / "tiny").mkdir(parents=True)
    for path in exported.iterdir():
        (root / "plain" / "tiny" / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("TESTA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    served = Server(root)
    monkeypatch.setenv("HF_ENDPOINT", served.url)
    yield served
    served.close()


@pytest.mark.parametrize("location", ["hf://someone/testa-tiny", "hf://someone/testa-tiny@v1",
                                      "url"])
def test_exported_folder_by_hub_id_or_url_then_offline(hub, exported, synthetic, monkeypatch,
                                                       location):
    location = f"{hub.url}/plain/tiny/" if location == "url" else location
    expected = testa.load(exported).embed_paragraphs(PARAGRAPHS).features
    no_unpickling(monkeypatch)
    model = testa.load(location)
    torch.testing.assert_close(model.embed_paragraphs(PARAGRAPHS).features, expected)
    fetched = list(hub.requests)
    assert sorted(path.rsplit("/", 1)[1] for path in fetched) == ["config.yaml", "model.safetensors"]
    revision = "v1" if "@v1" in location else "main"
    if location.startswith("hf://"):
        assert all(f"/someone/testa-tiny/resolve/{revision}/" in path for path in fetched)
    hub.close()  # offline from here on: the cache serves it
    if location.startswith("hf://"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.testing.assert_close(testa.load(location).embed_paragraphs(PARAGRAPHS).features, expected)


def test_missing_hub_repository_is_one_line(hub, tmp_path):
    with pytest.raises(Exception) as failed:
        testa.load("hf://someone/absent")
    message = str(failed.value)
    assert message.startswith("hf://someone/absent: cannot fetch model.safetensors of someone/absent")
    assert "\n" not in message
