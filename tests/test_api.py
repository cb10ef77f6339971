"""testa.py, the Python API: the README block runs as written, and the API gives what the
evaluation gives (same decoding, cleaning and protocol scores)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML

import testa
import train_retrieval
from engine import precision
from datasets import load_video, read_frames
from datasets.base import stack_clips
from engine.precision import build_precision
from engine.run import Run
from engine.saving import model_checkpoint, save_checkpoint
from models import build_retrieval_model, build_videoqa_model
from helpers import read_metrics, run_script
from tools import demo
from tasks import build_datasets
from tasks.retrieval import candidate_masks, itm_eval, protocol_scores, rerank

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A folder laid out as the repository root after `make demo`, from the quick demo:
    data/synthetic (16 videos, 8 held out) and output/demo/checkpoint_best.pth."""
    root = tmp_path_factory.mktemp("root")
    demo.main(["--quick", "--data", str(root / "data" / "synthetic"),
               "--out", str(root / "output" / "demo")])
    return root


@pytest.fixture(scope="module")
def model(demo_root):
    return testa.load(demo_root / "output" / "demo" / "checkpoint_best.pth")


def readme_python_api_block() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section has one code block"
    return blocks[0]


@pytest.mark.slow
def test_readme_python_api_block_runs_as_written(demo_root):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", readme_python_api_block()], cwd=demo_root,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "clip and file agree: True" in done.stdout
    assert "best video of each paragraph:" in done.stdout


@pytest.mark.slow
def test_rerank_scores_reproduce_the_demo_test_metrics(demo_root, tmp_path):
    """itm_eval over the API's protocol scores of the held-out videos = the evaluation's
    metrics of the demo's checkpoint, both in float32 (in bfloat16 two near-equal scores of
    the 8 videos can swap between two ways of batching the same work)."""
    checkpoint = demo_root / "output" / "demo" / "checkpoint_best.pth"
    run_script(train_retrieval.main, "--evaluate", "--checkpoint", checkpoint,
               "--output_dir", tmp_path / "evaluated", "--opts", "amp=none")
    model = testa.load(checkpoint, amp="none")
    data = demo_root / "data" / "synthetic"
    records = json.loads((data / "annotations" / "val.json").read_text())
    videos = model.embed_videos([data / "videos" / record["video"] for record in records])
    texts = model.embed_paragraphs([" ".join(record["caption"]) for record in records])
    v2t, t2v = model.rerank(videos, texts)
    metrics = itm_eval(v2t, t2v, list(range(len(records))), [[i] for i in range(len(records))])
    assert metrics == pytest.approx(read_metrics(tmp_path / "evaluated" / "eval_results.json"))
    # outside the top k of both directions the protocol's score is -100
    assert (v2t == -100).sum(dim=1).tolist() == [len(records) - model.config["k_test"]] * len(records)


@pytest.mark.slow
def test_paths_and_decoded_clips_embed_alike(demo_root, model):
    path = demo_root / "data" / "synthetic" / "videos" / "v_synth00003.mp4"
    config = model.config
    frames = read_frames(str(path), config["num_frm_test"], "uniform", config["image_size"])
    normalised = load_video(str(path), config["num_frm_test"], "uniform", config["image_size"])
    from_path, from_uint8, from_float = (model.embed_videos([video]).features
                                         for video in (path, frames, normalised))
    torch.testing.assert_close(from_uint8, from_path)
    torch.testing.assert_close(from_float, from_path)
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        model.embed_videos([frames[:1]])


@pytest.mark.slow
def test_paragraphs_get_the_datasets_cleaning(model):
    texts = model.embed_paragraphs(["On a NAVY background,   a red circle moves left!"])
    assert texts.texts == ["on a navy background, a red circle moves left"]


def test_load_autocasts_in_bf16_where_native_unless_told_otherwise(demo_root, monkeypatch):
    checkpoint = demo_root / "output" / "demo" / "checkpoint_best.pth"
    with pytest.raises(ValueError, match="amp must be one of bf16, fp16, none, got 'fp8'"):
        testa.load(checkpoint, amp="fp8")
    monkeypatch.setattr(precision, "cpu_bf16_problem", lambda: "this CPU has no AMX-BF16")
    assert testa.load(checkpoint).precision.dtype is None
    monkeypatch.setattr(precision, "cpu_bf16_problem", lambda: None)
    native, full = testa.load(checkpoint), testa.load(checkpoint, amp="none")
    assert native.precision.dtype is torch.bfloat16 and full.precision.dtype is None
    paragraphs = ["a red circle moves left.", "a blue square moves up."]
    in_bf16, in_fp32 = native.embed_paragraphs(paragraphs), full.embed_paragraphs(paragraphs)
    with torch.no_grad():
        expected = full.model.encode_text(in_fp32.texts)[0]  # float32, no autocast
    assert in_bf16.features.dtype == in_fp32.features.dtype == torch.float32
    assert torch.equal(in_fp32.features, expected)
    difference = (in_bf16.features - in_fp32.features).abs().max()
    assert 0 < difference < 0.05  # bfloat16 rounding: ran in bf16, and close


@pytest.mark.slow
def test_videoqa_answers_match_the_models_ranking_on_the_eval_clips(demo_root, tmp_path):
    """A VideoQA checkpoint: the API's answers = rank_answers on the test split's clips."""
    data = demo_root / "data" / "synthetic"
    config = YAML(typ="safe").load((REPO_ROOT / "configs" / "demo_videoqa.yaml").read_text())
    config.update(video_root=str(data / "videos"),
                  ann_root=str(data / "annotations"), num_frames=4, num_frm_train=4,
                  num_frm_test=4, k_test=4)
    torch.manual_seed(0)
    model = build_videoqa_model(config).eval()
    save_checkpoint(str(tmp_path / "vqa.pth"), model_checkpoint(model, config, epoch=0))

    test_set = build_datasets(config)[2]
    items = [test_set[index] for index in range(3)]
    clips = stack_clips([clip for clip, _, _ in items])
    questions = [question for _, question, _ in items]
    qa = testa.load(tmp_path / "vqa.pth")
    assert isinstance(qa, testa.VideoQA)
    with torch.no_grad(), qa.precision.autocast():  # the evaluation's autocast for amp bf16
        ranked = model.rank_answers(clips, questions, test_set.answer_list, 4)
    expected = [test_set.answer_list[i] for i in ranked.best.tolist()]

    paths = [test_set.video[test_set.questions[index].video_index] for index in range(3)]
    assert qa.answer(paths, questions, answer_list=test_set.answer_list) == expected
    generated = qa.answer(paths[:1], questions)  # one video for every question
    assert len(generated) == 3 and all(isinstance(answer, str) for answer in generated)


def test_rerank_scores_as_the_evaluation_in_bounded_forwards(tiny_config, captions, tmp_path):
    """`VideoText.rerank` = the evaluation's `tasks.retrieval.rerank` + `protocol_scores` on
    the same embeddings (float64, padded video tokens), = every candidate pair scored alone;
    and no forward holds more than one video or `k_test_batch_size` texts."""
    torch.manual_seed(0)
    config = tiny_config(k_test=2, k_test_batch_size=2)
    model = build_retrieval_model(config).double().eval()
    cpu_precision = build_precision("none", torch.device("cpu"))
    api = testa.VideoText(model, config, None, torch.device("cpu"), cpu_precision)
    generator = torch.Generator().manual_seed(3)
    lengths = torch.tensor([17, 9, 12, 17, 5])
    mask = (torch.arange(17)[None] < lengths[:, None]).long()  # [5, 17], as adaptive pads
    videos = testa.VideoEmbeddings(
        torch.nn.functional.normalize(torch.randn(5, 16, generator=generator, dtype=torch.float64), dim=1),
        torch.randn(5, 17, 64, generator=generator, dtype=torch.float64), mask)
    texts = api.embed_paragraphs(captions + ["a red circle moves left", "a car drives at night"])
    texts.features = texts.features.double()

    cross = model.text_encoder.encoder.layer[0].crossattention.self
    keys, queries = [], []  # video batch of each key projection, text batch of each query's
    hooks = [cross.key.register_forward_pre_hook(lambda module, args: keys.append(len(args[0]))),
             cross.query.register_forward_pre_hook(
                 lambda module, args: queries.append(len(args[0])))]
    v2t, t2v = api.rerank(videos, texts)
    for hook in hooks:
        hook.remove()
    assert keys and set(keys) == {1} and len(queries) == len(keys) and max(queries) <= 2

    sims = videos.features @ texts.features.t()  # [5, 6]
    top_v2t, top_t2v = candidate_masks(sims, 2)
    run = Run(config, tmp_path, torch.device("cpu"), cpu_precision)
    scores = rerank(model, run, sims, top_v2t | top_t2v, torch.arange(5), videos.tokens, mask,
                    texts.input_ids, texts.attention_mask, 2)
    evaluation_v2t, evaluation_t2v = protocol_scores(scores, top_v2t, top_t2v)
    assert torch.equal(v2t, evaluation_v2t) and torch.equal(t2v, evaluation_t2v)

    expected = torch.full_like(sims, -100.0)
    with torch.no_grad():
        for video, text in (top_v2t | top_t2v).nonzero().tolist():
            expected[video, text] = sims[video, text] + model.itm_logits(
                videos.tokens[video:video + 1], texts.input_ids[text:text + 1],
                texts.attention_mask[text:text + 1], mask[video:video + 1])[0, 1]
    assert (v2t - torch.where(top_v2t, expected, -100.0)).abs().max() <= 1e-12
    assert (t2v - torch.where(top_t2v, expected, -100.0).t()).abs().max() <= 1e-12
    assert (v2t == -100).sum().item() == 5 * (6 - 2)
