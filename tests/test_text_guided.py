"""Text-guided token selection before cross-attention (`text_guided_k`, models/text_guided.py):
the selection and merge on a hand-made case, the relevance against transformers' own
attention weights, the re-ranking path (keys and values merged per text) against the
straightforward one (tokens merged, then the encoder per pair) in float64, off and k = all
tokens against today's computation, the config errors, training with it on, and the API."""

import pytest
import torch

import testa
from engine.config import resolve_config
from engine.precision import build_precision
from models import build_retrieval_model, build_videoqa_model
from models.text import (build_text_config, build_text_encoder, build_tokenizer,
                         encode_grounded, encode_grounded_one_video)
from models import text_guided
from models.text_guided import (TokenSelection, attention_relevance, choose_tokens,
                                first_layer_queries, relevance_of, select_tokens,
                                similarity_relevance)
from tasks.retrieval import RETRIEVAL_SCHEMA
from helpers import write_config
from utils import ConfigError

TOKENS = 10  # what the tiny video encoder gives a video (tests/helpers.py tiny_config)


@pytest.fixture(scope="module")
def encoder(tiny_config):
    torch.manual_seed(0)
    text_config = build_text_config(tiny_config(), build_tokenizer())
    return build_text_encoder(text_config).double().eval()


def texts_of(num_texts: int, num_words: int = 9):
    """Random word ids `[K, S]` and a padding mask of texts of different lengths."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, 30000, (num_texts, num_words), generator=generator)
    lengths = torch.randint(1, num_words + 1, (num_texts,), generator=generator)
    lengths[0] = num_words
    return input_ids, (torch.arange(num_words)[None] < lengths[:, None]).long()


def test_keeps_the_k_most_relevant_and_merges_the_rest_into_their_most_similar_kept_token():
    """Hand-made: 5 tokens, relevance keeps the class token and tokens 1 and 3; token 2
    (close to 1) and token 4 (close to 3) merge into them, size-weighted; nothing is lost."""
    tokens = torch.tensor([[[5.0, 5.0], [0.0, 1.0], [0.2, 1.0], [1.0, -1.0], [1.0, -0.8]]],
                          dtype=torch.float64)
    relevance = torch.tensor([[0.0, 0.9, 0.1, 0.8, 0.2]], dtype=torch.float64)
    merge = choose_tokens(TokenSelection(3), tokens, relevance)
    merged, size = merge.merge(tokens, torch.ones(1, 5, 1, dtype=torch.float64))
    expected = torch.tensor([[[5.0, 5.0], [0.1, 1.0], [1.0, -0.9]]], dtype=torch.float64)
    assert torch.allclose(merged, expected, rtol=0, atol=1e-15)
    assert size.flatten().tolist() == [1.0, 2.0, 2.0]
    assert choose_tokens(TokenSelection(5), tokens, relevance) is None  # k = all: nothing merges


@pytest.mark.parametrize("videos", [1, 7])
def test_texts_matched_in_chunks_choose_as_all_at_once(monkeypatch, videos):
    """The matching runs over chunks of texts to bound its memory; a chunk of one text
    (the smallest bound) gives the indices of matching all seven texts at once."""
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(videos, 12, 4, generator=generator, dtype=torch.float64)
    relevance = torch.rand(7, 12, generator=generator, dtype=torch.float64)
    whole = choose_tokens(TokenSelection(4), tokens, relevance)
    monkeypatch.setattr(text_guided, "MATCHING_BYTES", 1)
    chunked = choose_tokens(TokenSelection(4), tokens, relevance)
    for name in ("keep_idx", "src_idx", "dst_idx"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name


def test_similarity_relevance_is_minus_the_closest_neighbour(monkeypatch):
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 1.0]]], dtype=torch.float64)
    expected = -torch.tensor([[0.5 ** 0.5, 1.0, 1.0, 0.5 ** 0.5]], dtype=torch.float64)
    assert torch.allclose(similarity_relevance(tokens), expected, rtol=0, atol=1e-15)
    three = torch.cat([tokens, tokens.flip(1), 2 * tokens])  # [3, 4, 2]
    monkeypatch.setattr(text_guided, "MATCHING_BYTES", 1)  # one video per chunk
    assert torch.allclose(similarity_relevance(three),
                          torch.cat([expected, expected.flip(1), expected]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("chunked", [False, True])
def test_text_relevance_is_the_first_cross_attention_layers_attention(encoder, monkeypatch,
                                                                      chunked):
    """The rule `text`'s relevance = transformers' own first-layer cross-attention weights
    (`output_attentions`), averaged over heads and over each text's words; the same when
    the texts go one per chunk (the bound on its memory at its smallest)."""
    if chunked:
        monkeypatch.setattr(text_guided, "MATCHING_BYTES", 1)
    input_ids, text_mask = texts_of(4)
    video = torch.randn(4, TOKENS, 64, dtype=torch.float64)
    with torch.no_grad():
        weights = encoder(input_ids, attention_mask=text_mask, encoder_hidden_states=video,
                          output_attentions=True).cross_attentions[0]  # [K, H, S, N]
        cross = encoder.encoder.layer[0].crossattention.self
        relevance = attention_relevance(cross, first_layer_queries(encoder, input_ids, text_mask),
                                        cross.key(video), text_mask, 4)
    words = text_mask[:, :, None].double()
    expected = (weights.mean(dim=1) * words).sum(dim=1) / words.sum(dim=1)
    assert torch.allclose(relevance, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", ["text", "similarity"])
@pytest.mark.parametrize("k", [1, 4, TOKENS])
def test_rerank_path_merges_keys_and_values_as_merging_the_tokens_first(encoder, rule, k):
    """One video against K texts with the keys and values merged per text
    (`encode_grounded_one_video`) = each text's merged tokens through transformers' own
    forward, float64 within 1e-12; k = all tokens = no selection."""
    input_ids, text_mask = texts_of(5)
    video = torch.randn(1, TOKENS, 64, dtype=torch.float64)
    selection = TokenSelection(k, rule)
    with torch.no_grad():
        folded = encode_grounded_one_video(encoder, input_ids, text_mask, video, None, selection)
        merged = select_tokens(selection, encoder, input_ids, text_mask, video)  # [K, k, D]
        per_pair = encoder(input_ids, attention_mask=text_mask,
                           encoder_hidden_states=merged).last_hidden_state
        off = encode_grounded_one_video(encoder, input_ids, text_mask, video)
    assert merged.shape == (5, k, 64)
    assert (folded - per_pair).abs().max().item() <= 1e-12
    assert torch.equal(encode_grounded(encoder, input_ids, text_mask, video, None, selection),
                       folded)
    if k == TOKENS:
        assert (folded - off).abs().max().item() <= 1e-12
    else:
        assert (folded - off).abs().max().item() > 1e-6


def test_rerank_path_in_chunks_of_one_text_gives_the_same_hidden_states(encoder, monkeypatch):
    """The memory bound (texts merged and matched in chunks) changes no number."""
    input_ids, text_mask = texts_of(5)
    video = torch.randn(1, TOKENS, 64, dtype=torch.float64)
    selection = TokenSelection(4, "text")
    with torch.no_grad():
        whole = encode_grounded_one_video(encoder, input_ids, text_mask, video, None, selection)
        monkeypatch.setattr(text_guided, "MATCHING_BYTES", 1)
        chunked = encode_grounded_one_video(encoder, input_ids, text_mask, video, None, selection)
    assert torch.equal(chunked, whole)


def test_the_rules_differ_in_the_relevance_only(encoder):
    """Both rules choose and merge through `choose_tokens`; the text rule's choice varies
    with the text, the control's is one per video."""
    input_ids, text_mask = texts_of(6)
    video = torch.randn(1, TOKENS, 64, dtype=torch.float64)
    kept = {}
    for rule in ("text", "similarity"):
        selection = TokenSelection(4, rule)
        relevance = relevance_of(selection, encoder, input_ids, text_mask, video)
        expected = choose_tokens(selection, video, relevance, 6)
        merged = select_tokens(selection, encoder, input_ids, text_mask, video)
        tokens = video.expand(6, -1, -1)
        assert torch.equal(merged, expected.merge(tokens, tokens.new_ones(6, TOKENS, 1))[0])
        kept[rule] = {tuple(row) for row in expected.keep_idx[..., 0].tolist()}
    assert len(kept["similarity"]) == 1 and len(kept["text"]) > 1


def test_off_builds_and_scores_as_without_the_key(tiny_config, captions):
    torch.manual_seed(0)
    model = build_retrieval_model(tiny_config()).double().eval()
    assert model.text_guided is None
    with_key = build_retrieval_model(tiny_config(text_guided_k=None)).double().eval()
    with_key.load_state_dict(model.state_dict())
    video = torch.randn(1, TOKENS, 64, dtype=torch.float64)
    input_ids, text_mask = model.tokenize(captions)
    with torch.no_grad():
        assert torch.equal(model.itm_logits(video, input_ids, text_mask),
                           with_key.itm_logits(video, input_ids, text_mask))


@pytest.mark.parametrize("opts, problem", [
    (["text_guided_k=0"], "text_guided_k must be >= 1, got 0"),
    ([f"text_guided_k={TOKENS + 1}"],
     f"text_guided_k {TOKENS + 1} is more than the {TOKENS} tokens the video encoder gives a video"),
    (["text_guided_k=3", "testa_r=[1,2,1,2]", "testa_threshold=0.9"],
     "text_guided_k needs fixed aggregation (testa_threshold: null)"),
    (["text_guided_k=3", "text_guided_rule=words"], "text_guided_rule must be one of text, similarity"),
])
def test_bad_settings_are_one_line_errors(tmp_path, opts, problem):
    config = write_config(tmp_path / "retrieval.yaml", "retrieval_activitynet_f32.yaml",
                          num_frm_test=4, testa_r=[1, 1], depth=2)
    assert resolve_config(config, [f"text_guided_k={TOKENS}"], RETRIEVAL_SCHEMA)["text_guided_k"] == TOKENS
    with pytest.raises(ConfigError) as error:
        resolve_config(config, opts, RETRIEVAL_SCHEMA)
    message = str(error.value)
    assert problem in message and "\n" not in message and message.startswith("--opts")


def test_training_steps_run_with_gradients_through_the_selection(tiny_config, tiny_video,
                                                                 captions):
    """Retrieval (VTC + ITM) and VideoQA with text_guided_k: finite losses, and the
    gradient reaches the video encoder through the merged tokens of the matching head
    and of the question encoder."""
    torch.manual_seed(0)
    retrieval = build_retrieval_model(tiny_config(text_guided_k=3))
    assert retrieval.text_guided == TokenSelection(3, "text")
    loss_vtc, loss_vtm = retrieval(tiny_video(4), captions, 0.4, torch.arange(4))
    loss_vtm.backward()
    assert torch.isfinite(loss_vtc) and torch.isfinite(loss_vtm)
    assert retrieval.visual_encoder.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert retrieval.itm_head.weight.grad.abs().sum() > 0

    videoqa = build_videoqa_model(tiny_config(text_guided_k=2, text_guided_rule="similarity"))
    loss = videoqa(tiny_video(2), ["what color is it?", "how many shapes move?"],
                   ["red", "blue", "three"], torch.ones(3), [2, 1])
    loss.backward()
    assert torch.isfinite(loss)
    assert videoqa.visual_encoder.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    states, _ = videoqa.encode_questions(tiny_video(2), ["what color is it?", "how many?"])
    videoqa.text_guided = None
    assert not torch.allclose(states, videoqa.encode_questions(tiny_video(2), ["what color is it?",
                                                                               "how many?"])[0])


def test_api_rerank_with_text_guided_k(tiny_config, captions):
    """`VideoText.rerank(..., text_guided_k=k)` = the evaluation of a model built with the
    config key; k = all tokens = off (float64); a bad k is a one-line error before work."""
    torch.manual_seed(0)
    config = tiny_config(k_test=3, k_test_batch_size=2)
    model = build_retrieval_model(config).double().eval()
    guided = build_retrieval_model(tiny_config(k_test=3, k_test_batch_size=2, text_guided_k=4)
                                   ).double().eval()
    guided.load_state_dict(model.state_dict())
    cpu = build_precision("none", torch.device("cpu"))
    api, api_guided = (testa.VideoText(m, config, None, torch.device("cpu"), cpu)
                       for m in (model, guided))
    generator = torch.Generator().manual_seed(3)
    videos = testa.VideoEmbeddings(
        torch.nn.functional.normalize(torch.randn(4, 16, generator=generator, dtype=torch.float64), dim=1),
        torch.randn(4, TOKENS, 64, generator=generator, dtype=torch.float64), None)
    texts = api.embed_paragraphs(captions)
    texts.features = texts.features.double()

    v2t, t2v = api.rerank(videos, texts, text_guided_k=4)
    expected_v2t, expected_t2v = api_guided.rerank(videos, texts)
    assert torch.equal(v2t, expected_v2t) and torch.equal(t2v, expected_t2v)
    off_v2t, _ = api.rerank(videos, texts)
    assert (v2t - off_v2t).abs().max() > 1e-6
    all_v2t, all_t2v = api.rerank(videos, texts, text_guided_k=TOKENS)
    assert (all_v2t - off_v2t).abs().max() <= 1e-12
    control, _ = api.rerank(videos, texts, text_guided_k=4, text_guided_rule="similarity")
    assert (control - v2t).abs().max() > 1e-6
    for k, problem in ((0, "text_guided_k must be an int >= 1, got 0"),
                       (TOKENS + 1, f"text_guided_k {TOKENS + 1} is more than the {TOKENS} tokens")):
        with pytest.raises(ValueError, match=problem):
            api.rerank(videos, texts, text_guided_k=k)
    with pytest.raises(ValueError, match="text_guided_rule must be one of"):
        api.rerank(videos, texts, text_guided_k=3, text_guided_rule="words")
