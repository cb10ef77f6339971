"""Every tensor the model code makes goes where its inputs are: the CPU models run with
the default device set to `meta`, so that a tensor created without an explicit device (a
label, a mask, an index, a queue pointer) is a data-less meta tensor and the first op
that meets the real CPU tensors fails. That is what a GPU run would hit with such a
tensor left on the CPU. The inputs (clips, indices, weights, pre-collated batches) are
data and are made outside that scope; tokenisation makes its tensors on the host itself.

Beam search (`VideoQAModel.generate_answers`) is left out: transformers' own beam search
builds a tensor on the default device and then moves it (generation/utils.py), which is
correct on a GPU but not checkable this way. The GPU suite (tests/test_gpu.py) runs it.
"""
import pytest
import torch

from engine.precision import build_precision
from engine.run import Run
from helpers import CAPTIONS, tiny_config, tiny_video
from models import build_pretrain_model, build_retrieval_model, build_videoqa_model
from tasks.retrieval import evaluate

QUESTIONS = ["what is it?", "what colour is the dog?", "who dances?", "where is the cat?"]


def on_meta_default(step) -> None:
    with torch.device("meta"):
        step()


# fixed and adaptive aggregation, and text-guided selection with both rules
SETTINGS = [{}, {"testa_threshold": 0.5}, {"text_guided_k": 4},
            {"text_guided_k": 4, "text_guided_rule": "similarity"}]


@pytest.mark.parametrize("settings", SETTINGS)
def test_retrieval_training_step_makes_no_tensor_off_the_inputs_device(settings):
    torch.manual_seed(0)
    model = build_retrieval_model(tiny_config(**settings))
    video, idx = tiny_video(4), torch.arange(4)
    for _ in range(3):  # the queues fill and wrap (queue_size 8, batch 4)
        on_meta_default(lambda: sum(model(video, CAPTIONS, 0.4, idx)).backward())
    assert model.image_queue.device.type == "cpu" and int(model.ptr_queue) == 4  # 12 mod 8


def test_pretraining_step_makes_no_tensor_off_the_inputs_device():
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_config())
    video = tiny_video(4)
    on_meta_default(lambda: sum(model(video, CAPTIONS, 0.4)).backward())


@pytest.mark.parametrize("settings", [{}, {"text_guided_k": 4}])
def test_videoqa_training_and_answer_ranking_make_no_tensor_off_the_inputs_device(settings):
    torch.manual_seed(0)
    model = build_videoqa_model(tiny_config(**settings))
    video, weights = tiny_video(4), torch.full((5,), 0.5)
    answers = ["a dog", "red", "two people", "on the sofa", "a cat"]
    on_meta_default(lambda: model(video, QUESTIONS, answers, weights, [2, 1, 1, 1]).backward())
    model.eval()
    ranked = []
    on_meta_default(lambda: ranked.append(model.rank_answers(video, QUESTIONS, answers, k=3)))
    assert ranked[0].best.device.type == "cpu" and ranked[0].best.shape == (4,)


class PrecollatedLoader:
    """The evaluation's loader interface over batches collated beforehand."""

    def __init__(self, videos: torch.Tensor, texts, batch_size: int):
        self.dataset = type("Texts", (), {"video": list(range(len(videos))), "text": texts})()
        self.batches = [(videos[start:start + batch_size], torch.arange(start, start + len(chunk)))
                        for start, chunk in ((s, videos[s:s + batch_size])
                                             for s in range(0, len(videos), batch_size))]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@pytest.mark.parametrize("settings", SETTINGS)
def test_retrieval_evaluation_makes_no_tensor_off_the_inputs_device(settings, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(**settings, k_test=2, k_test_batch_size=3)
    model = build_retrieval_model(config).eval()
    loader = PrecollatedLoader(tiny_video(4), CAPTIONS, batch_size=3)
    run = Run(config, tmp_path, torch.device("cpu"), build_precision("none", torch.device("cpu")))
    expected = evaluate(model, loader, run)
    scores = []
    on_meta_default(lambda: scores.append(evaluate(model, loader, run)))
    for got, want in zip(scores[0], expected):
        assert got.device.type == "cpu"
        torch.testing.assert_close(got, want, rtol=0, atol=0)
