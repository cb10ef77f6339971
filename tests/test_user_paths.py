"""The paths a new user walks: evaluating a checkpoint with its own config and only the
test split's files, `--opts` dicts, checkpoint files that are not checkpoints, and the
Python API's edges."""
import argparse
import builtins
import importlib
import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

import testa
import train_retrieval
from engine.config import resolve_config
from ruamel.yaml import YAML
from utils import ConfigError
from datasets import VideoDecodeError, read_frames
from datasets.issues import DataIssues
from datasets.retrieval import read_activitynet
from engine.saving import model_checkpoint, save_checkpoint
from helpers import REPO_ROOT, read_metrics, run_script, write_gray_video
from models import build_videoqa_model
from models.checkpoint_reading import CheckpointError
from tasks import TASKS


@pytest.fixture(scope="module")
def trained(retrieval_config, tmp_path_factory) -> Path:
    """A one-epoch retrieval run on the synthetic data: checkpoint_best.pth and
    test_metrics.json."""
    output_dir = tmp_path_factory.mktemp("trained")
    run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", output_dir,
               "--opts", "max_epoch=1")
    return output_dir


def only_test_annotations(synthetic: Path, tmp_path: Path) -> Path:
    """A copy of the annotations holding only what the test split reads (ActivityNet
    Captions tests on val.json)."""
    ann_root = tmp_path / "annotations"
    ann_root.mkdir()
    shutil.copy(synthetic / "annotations" / "val.json", ann_root / "val.json")
    return ann_root


def test_zero_shot_evaluation_needs_only_the_test_split_and_no_config(trained, synthetic, tmp_path):
    ann_root = only_test_annotations(synthetic, tmp_path)
    printed = run_script(train_retrieval.main, "--output_dir", tmp_path / "eval", "--evaluate",
                         "--checkpoint", trained / "checkpoint_best.pth",
                         "--opts", f"ann_root={ann_root}", f"video_root={synthetic / 'videos'}")
    assert "checkpoint_best.pth" in printed
    assert read_metrics(tmp_path / "eval" / "eval_results.json") == pytest.approx(
        read_metrics(trained / "test_metrics.json"))


def test_evaluation_with_a_config_that_contradicts_the_weights_names_both(
        trained, retrieval_config, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", tmp_path,
                   "--evaluate", "--checkpoint", trained / "checkpoint_best.pth",
                   "--opts", "vision_width=128", "num_heads=2")
    message = str(stopped.value)
    assert "\n" not in message
    assert retrieval_config in message and "checkpoint_best.pth" in message


def test_evaluation_does_not_read_the_text_init_of_the_training_machine(
        trained, synthetic, tmp_path):
    ann_root = only_test_annotations(synthetic, tmp_path)
    run_script(train_retrieval.main, "--output_dir", tmp_path / "eval", "--evaluate",
               "--checkpoint", trained / "checkpoint_best.pth",
               "--opts", f"ann_root={ann_root}", f"video_root={synthetic / 'videos'}",
               f"text_init={tmp_path / 'gone' / 'bert'}")
    assert read_metrics(tmp_path / "eval" / "eval_results.json") == pytest.approx(
        read_metrics(trained / "test_metrics.json"))


# item 2: a mapping in --opts merges into the config's mapping --------------------------
@pytest.mark.parametrize("opts", [["text_config={hidden_size: 32}"], ["text_config.hidden_size=32"]])
def test_a_mapping_in_opts_merges_into_the_configs_mapping(retrieval_config, tmp_path, opts):
    run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir", tmp_path,
               "--opts", "max_epoch=1", *opts)
    saved = YAML(typ="safe").load(tmp_path / "config.yaml")["text_config"]
    assert saved == {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "intermediate_size": 128}
    weights = torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)["model"]
    assert weights["text_encoder.embeddings.word_embeddings.weight"].shape[1] == 32
    assert not any(key.startswith("text_encoder.encoder.layer.2.") for key in weights)


def test_dotted_opts_keys_are_checked(retrieval_config):
    schema = TASKS["retrieval"].schema
    with pytest.raises(ConfigError, match=r"--opts: text_config and text_config.hidden_size are both"):
        resolve_config(retrieval_config, ["text_config={}", "text_config.hidden_size=32"], schema)
    with pytest.raises(ConfigError, match=r"--opts: max_epoch.x: max_epoch is not a mapping"):
        resolve_config(retrieval_config, ["max_epoch.x=1"], schema)
    with pytest.raises(ConfigError, match=r"unknown key 'text_confg' \(did you mean 'text_config'"):
        resolve_config(retrieval_config, ["text_confg.hidden_size=32"], schema)
    with pytest.raises(ConfigError, match=r"text_config: unknown key 'hiden_size'"):
        resolve_config(retrieval_config, ["text_config.hiden_size=32"], schema)


# item 5: what a file given as a checkpoint is -------------------------------------------
class WritesMarker:
    """Unpickling this creates `marker` (any code a crafted file could run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize("kind, what", [
    ("video", "not a PyTorch checkpoint: an MP4/MOV video"),
    ("random", "not a PyTorch checkpoint: neither a zip archive (torch.save's format) nor a "
               "pickle; it starts with bytes"),
    ("pickle", "not a PyTorch checkpoint: a plain Python pickle"),
    ("empty", "not a PyTorch checkpoint: an empty file"),
    ("folder", "a folder, not a checkpoint file"),
])
def test_a_file_that_is_no_checkpoint_is_named_and_no_trust_is_advised(
        trained, retrieval_config, tmp_path, kind, what):
    path = tmp_path / f"{kind}.pth"
    if kind == "video":
        write_gray_video(str(path), 8)
    elif kind == "random":
        path.write_bytes(bytes(range(7, 255)) * 20)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"model": {"a": 1}}))
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.mkdir()
    with pytest.raises(SystemExit) as stopped:
        run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir",
                   tmp_path / "out", "--evaluate", "--checkpoint", path)
    assert str(stopped.value).startswith(f"error: {path}: {what}")
    assert "trust" not in str(stopped.value)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{path}: {what}")):
        testa.load(path)


def test_a_pickle_needing_trust_names_its_globals_and_the_apis_keyword(trained, tmp_path):
    marker = tmp_path / "marker"
    saved = torch.load(trained / "checkpoint_best.pth", weights_only=True)
    crafted = tmp_path / "crafted.pth"
    torch.save({**saved, "payload": WritesMarker(marker)}, crafted)
    with pytest.raises(CheckpointError) as refused:
        testa.load(crafted)
    assert str(refused.value) == (
        f"{crafted}: holds Python objects outside the safe list (io.open), and unpickling them "
        f"can run code from the file; pass trust=True only if you trust where the file comes from")
    assert not marker.exists()


# item 4: the Python API's edges -------------------------------------------------------
@pytest.fixture(scope="module")
def api(trained):
    return testa.load(trained / "checkpoint_best.pth")


@pytest.fixture(scope="module")
def qa(synthetic, tmp_path_factory):
    config = YAML(typ="safe").load((REPO_ROOT / "configs" / "demo_videoqa.yaml").read_text())
    config.update(video_root=str(synthetic / "videos"), ann_root=str(synthetic / "annotations"),
                  num_frames=4, num_frm_train=4, num_frm_test=4, k_test=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qa") / "vqa.pth"
    save_checkpoint(str(path), model_checkpoint(build_videoqa_model(config).eval(), config,
                                                epoch=0, task="videoqa"))
    return testa.load(path)


def synthetic_videos(synthetic: Path, count: int) -> list:
    return sorted((synthetic / "videos").glob("*.mp4"))[:count]


@pytest.mark.parametrize("call, error, message", [
    (lambda m, v: m.embed_videos([]), ValueError, "videos: the list is empty"),
    (lambda m, v: m.embed_videos(v[0]), TypeError, "videos: pass a list of videos"),
    (lambda m, v: m.embed_videos([v[0], None]), TypeError, r"videos\[1\]: a path or a"),
    (lambda m, v: m.embed_videos(v, batch_size=0), ValueError, "batch_size must be a positive"),
    (lambda m, v: m.embed_paragraphs([]), ValueError, "paragraphs: the list is empty"),
    (lambda m, v: m.embed_paragraphs("a dog runs"), TypeError, "paragraphs: pass a list of strings"),
    (lambda m, v: m.embed_paragraphs(["a dog", None]), TypeError,
     r"paragraphs\[1\]: a string, got NoneType"),
])
def test_api_inputs_are_checked_before_any_work(api, synthetic, call, error, message):
    with pytest.raises(error, match=message):
        call(api, synthetic_videos(synthetic, 2))


@pytest.mark.parametrize("k", [0, -3, 1.5, True])
def test_rerank_refuses_a_k_that_is_no_positive_integer(api, synthetic, k):
    videos = api.embed_videos(synthetic_videos(synthetic, 2))
    texts = api.embed_paragraphs(["a red circle", "a blue square"])
    with pytest.raises(ValueError, match=f"k must be a positive integer, got {k!r}"):
        api.rerank(videos, texts, k=k)
    v2t, _ = api.rerank(videos, texts, k=1)
    assert (v2t != -100).sum(dim=1).tolist() == [1, 1]  # k=1: one candidate text per video


def test_numpy_clips_embed_as_tensors_and_ids_name_the_videos(api, synthetic):
    path = synthetic_videos(synthetic, 1)[0]
    clip = read_frames(str(path), api.config["num_frm_test"], "uniform", api.config["image_size"])
    embeddings = api.embed_videos([path, clip.numpy()])
    torch.testing.assert_close(embeddings.features[1], embeddings.features[0])
    assert embeddings.ids == [str(path), "#1"]


def test_bad_videos_are_told_apart_and_skipped_on_request(api, synthetic, tmp_path):
    good = synthetic_videos(synthetic, 2)
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "random.mp4").write_bytes(bytes(range(7, 255)) * 20)
    (tmp_path / "truncated.mp4").write_bytes(good[0].read_bytes()[:good[0].stat().st_size // 2])
    (tmp_path / "empty.mp4").write_bytes(b"")
    expected = {"missing.mp4": "no such file", "folder.mp4": "a folder, not a video file",
                "random.mp4": "not a video file the decoder can open",
                "truncated.mp4": "an MP4/MOV file that cannot be opened: truncated or damaged",
                "empty.mp4": "an empty file"}
    for name, problem in expected.items():
        with pytest.raises(VideoDecodeError, match="^" + re.escape(f"{tmp_path / name}: {problem}")):
            api.embed_videos([good[0], tmp_path / name])
    bad = [tmp_path / name for name in expected]
    mixed = api.embed_videos([bad[0], good[0], *bad[1:3], good[1], *bad[3:]], batch_size=2,
                             skip_bad=True)
    assert mixed.ids == [str(path) for path in good]
    assert [video_id for video_id, _ in mixed.skipped] == [str(path) for path in bad]
    torch.testing.assert_close(mixed.features, api.embed_videos(good).features)


def test_answer_checks_questions_and_answer_lists(qa, synthetic):
    video = synthetic_videos(synthetic, 1)
    with pytest.raises(TypeError, match="questions: pass a list of strings, got str 'what color"):
        qa.answer(video, "what color?")
    with pytest.raises(ValueError, match="answer_list: the list is empty"):
        qa.answer(video, ["what color?"], answer_list=[])
    assert qa.answer(video, ["what color?"], answer_list=["navy", "teal"])[0] in ("navy", "teal")


# item 6: what a newcomer reads ----------------------------------------------------------
SCRIPTS = ["train_retrieval", "train_videoqa", "pretrain"] + [
    f"tools.{path.stem}" for path in sorted((REPO_ROOT / "tools").glob("*.py"))]


class ParserReached(Exception):
    """Raised instead of parsing, carrying the script's parser."""


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_option_has_help_and_shows_its_default(name, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))  # as when run: tools import each other
    module = importlib.import_module(name)

    def reached(parser, *args, **kwargs):
        raise ParserReached(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", reached)
    with pytest.raises(ParserReached) as caught:
        module.main([])
    parser = caught.value.args[0]
    description = (parser.description or "").strip()
    assert description.endswith((".", ")")), f"{name}: description cut: {description[-60:]!r}"
    shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        if action.default not in (None, False, [], argparse.SUPPRESS) and not shows_defaults:
            assert "default" in action.help, f"{name}: {action.option_strings} hides its default"


def test_a_plain_string_caption_is_named_as_such(synthetic, tmp_path):
    records = json.loads((synthetic / "annotations" / "val.json").read_text())
    records[0]["caption"] = " ".join(records[0]["caption"])
    (tmp_path / "val.json").write_text(json.dumps(records))
    issues = DataIssues("test")
    pairs = read_activitynet(str(tmp_path), str(synthetic / "videos"), "val", issues)
    assert len(pairs) == len(records) - 1
    assert issues.skip_reasons() == "1 string caption (a list of sentences expected)"


def test_readme_says_where_the_api_block_runs_and_the_quick_demos_paths():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    assert "output/demo_quick/" in section and "data/synthetic_quick/" in section
    assert "repository root" in section and "site-packages" in section
    run = (REPO_ROOT / "RUN.md").read_text().split("\n## CPU\n", 1)[1]
    for key in ("num_heads=2", "testa_r=", "pretrained=null", "num_frm_test=4", "num_frm_train=4"):
        assert key in run
    assert "### Your own videos" in (REPO_ROOT / "DATASETS.md").read_text()
