"""Retrieval, VideoQA and pre-training models: key layouts, losses, negatives, queues,
answer ranking. Tiny configs (2 layers, width 64) keep every test fast on a CPU."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ruamel.yaml import YAML

from models import build_pretrain_model, build_retrieval_model, build_videoqa_model
from models.blip_base import (HardNegatives, NegativePool, enqueue, pick_hard_negatives,
                              sample_negatives)
from tasks.retrieval import match_logits

REPO_ROOT = Path(__file__).resolve().parents[1]


# the state-dict keys and shapes of the released TESTA checkpoints (tests/data/keys/README.md)
RELEASED_KEYS = REPO_ROOT / "tests" / "data" / "keys"


def read_key_list(path: Path) -> dict:
    """`key [d0, d1]` lines -> {key: [d0, d1]}, without the optional position_ids."""
    keys = {}
    for line in path.read_text().splitlines():
        key, shape = line.split(" ", 1)
        if not key.endswith("position_ids"):
            keys[key] = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
    return keys


# paper-size layouts ------------------------------------------------------------------
@pytest.mark.parametrize("name, config_file, build", [
    ("retrieval", "retrieval_queryd_f32.yaml", build_retrieval_model),
    ("vqa", "vqa_activitynet_f32.yaml", build_videoqa_model),
    ("pretrain", "pretrain_from_blip.yaml", build_pretrain_model),
])
def test_paper_size_state_dict_matches_reference_keys(name, config_file, build):
    config = YAML(typ="safe").load((REPO_ROOT / "configs" / config_file).read_text())
    config.update(med_config=str(REPO_ROOT / "configs" / "med_config.json"))
    with torch.device("meta"):
        model = build(config)
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert ours == read_key_list(RELEASED_KEYS / f"{name}.txt")


# retrieval ---------------------------------------------------------------------------
def test_retrieval_losses_finite_and_decrease(tiny_config, tiny_video, captions):
    torch.manual_seed(0)
    model = build_retrieval_model(tiny_config()).eval()  # eval: no dropout noise
    video, idx = tiny_video(4), torch.arange(4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    totals = []
    for _ in range(5):
        loss_vtc, loss_vtm = model(video, captions, 0.4, idx)
        assert torch.isfinite(loss_vtc) and torch.isfinite(loss_vtm)
        (loss_vtc + loss_vtm).backward()
        optimizer.step()
        optimizer.zero_grad()
        totals.append((loss_vtc + loss_vtm).item())
    assert totals[-1] < totals[0], totals


def test_retrieval_evaluation_methods_shapes(tiny_config, tiny_video, captions):
    model = build_retrieval_model(tiny_config()).eval()
    with torch.no_grad():
        video_feat, video_embeds, video_mask = model.encode_video(tiny_video(2))
        text_feat, input_ids, attention_mask = model.encode_text(captions[:3])
        logits = model.itm_logits(video_embeds[[0, 1, 1]], input_ids, attention_mask)
        enc_first = input_ids.clone()
        enc_first[:, 0] = model.tokenizer.enc_token_id
        logits_enc = model.itm_logits(video_embeds[[0, 1, 1]], enc_first, attention_mask)
    assert video_feat.shape == (2, 16) and text_feat.shape == (3, 16)
    assert torch.allclose(video_feat.norm(dim=-1), torch.ones(2))
    assert torch.allclose(text_feat.norm(dim=-1), torch.ones(3))
    assert video_embeds.shape[0] == 2 and video_embeds.shape[2] == 64 and video_mask is None
    assert input_ids.shape == attention_mask.shape == (3, 16)
    assert (input_ids[:, 0] == model.tokenizer.cls_token_id).all()
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits, logits_enc)  # itm_logits puts [ENC] first itself


def padded_video_tokens(lengths, width: int, seed: int):
    """Random tokens `[V, max(lengths), width]` whose padding slots hold random values too,
    and their content mask `[V, N]`: what adaptive aggregation gives a batch."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(lengths), max(lengths), width, generator=generator, dtype=torch.float64)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return tokens, mask


@pytest.mark.parametrize("adaptive", [False, True])
def test_rerank_computes_cross_attention_keys_once_per_video_and_scores_as_per_pair(
        tiny_config, captions, adaptive):
    """`match_logits` feeds each video's tokens once for a chunk of its texts, so every
    layer's cross-attention keys and values come from `[1, N, D]` and are shared by the
    chunk: the float64 logits equal those of every pair scored alone on its own copy of
    the video (keys and values computed per pair), within 1e-12, with padded video
    tokens and texts of different lengths."""
    torch.manual_seed(0)
    model = build_retrieval_model(tiny_config()).double().eval()
    lengths = [7, 17, 12] if adaptive else [17, 17, 17]
    tokens, video_mask = padded_video_tokens(lengths, 64, seed=1)
    video_mask = video_mask if adaptive else None
    _, input_ids, attention_mask = model.encode_text(captions)  # 4 texts, padded
    assert not bool(attention_mask.all())
    pairs = torch.tensor([[2, 1], [0, 0], [1, 3], [0, 2], [2, 0], [0, 3], [0, 1], [2, 2],
                          [1, 0]])  # video 0 has 4 texts: two chunks of 2 at batch size 3
    shared = match_logits(model, pairs, tokens, video_mask, input_ids, attention_mask, 3)

    cross = model.text_encoder.encoder.layer[0].crossattention.self
    keys, queries = [], []  # video batch of each key projection, text batch of each query's
    hooks = [cross.key.register_forward_pre_hook(lambda module, args: keys.append(len(args[0]))),
             cross.query.register_forward_pre_hook(
                 lambda module, args: queries.append(len(args[0])))]
    match_logits(model, pairs, tokens, video_mask, input_ids, attention_mask, 3)
    for hook in hooks:
        hook.remove()
    assert keys == [1, 1, 1, 1]  # keys of one video per forward
    assert sorted(queries) == [2, 2, 2, 3]  # for all texts of its chunk

    with torch.no_grad():
        alone = torch.stack([model.itm_logits(
            tokens[video:video + 1], input_ids[text:text + 1], attention_mask[text:text + 1],
            None if video_mask is None else video_mask[video:video + 1])[0, 1]
            for video, text in pairs.tolist()])
    assert shared.dtype == torch.float64
    assert (shared - alone).abs().max().item() <= 1e-12
    if adaptive:  # the padding is masked: the padded slots' values do not matter
        tokens[0, 7:] = 100.0
        moved = match_logits(model, pairs, tokens, video_mask, input_ids, attention_mask, 3)
        assert (moved - shared).abs().max().item() <= 1e-12


def test_temperature_is_clamped_each_forward(tiny_config, tiny_video, captions):
    model = build_retrieval_model(tiny_config()).eval()
    with torch.no_grad():
        model.temp.fill_(3.0)
    model(tiny_video(4), captions, 0.4, torch.arange(4))
    assert model.temp.item() == pytest.approx(0.5)


def test_momentum_update_moves_towards_main_towers(tiny_config):
    model = build_retrieval_model(tiny_config())
    with torch.no_grad():
        model.vision_proj.weight.add_(1.0)
    before = model.vision_proj_m.weight.clone()
    model.momentum_update()
    expected = 0.995 * before + 0.005 * model.vision_proj.weight
    torch.testing.assert_close(model.vision_proj_m.weight, expected)
    assert not any(p.requires_grad for p in model.visual_encoder_m.parameters())


def test_hard_negatives_never_pick_the_same_video_index():
    torch.manual_seed(0)
    idx = torch.tensor([0, 0, 1, 2, 2, 3])
    is_positive = idx[:, None] == idx[None]
    sim = torch.where(is_positive, 50.0, -50.0)  # softmax mass sits on the positives
    for _ in range(200):
        picked = sample_negatives(sim, is_positive)
        assert (idx[picked] != idx).all()

    batch, feat = 6, F.normalize(torch.randn(6, 8), dim=-1)
    pool = NegativePool(torch.arange(batch, dtype=torch.float)[:, None, None].expand(-1, 3, 2),
                        feat, feat, torch.arange(batch)[:, None].expand(-1, 5),
                        torch.ones(batch, 5, dtype=torch.long), idx)
    for _ in range(50):
        negatives = pick_hard_negatives(feat, feat, idx, pool, torch.tensor(0.07))
        assert (idx[negatives.video_embeds[:, 0, 0].long()] != idx).all()
        assert (idx[negatives.input_ids[:, 0]] != idx).all()


def test_rows_without_a_negative_are_marked_and_left_out_of_the_matching_loss(tiny_config,
                                                                               tiny_video,
                                                                               captions):
    torch.manual_seed(0)
    idx = torch.tensor([7, 7, 8])  # rows 0 and 1 have a negative (8), row 2 too (7)
    feat = F.normalize(torch.randn(3, 8), dim=-1)
    pool = NegativePool(torch.arange(3, dtype=torch.float)[:, None, None].expand(-1, 3, 2),
                        feat, feat, torch.arange(3)[:, None].expand(-1, 5),
                        torch.ones(3, 5, dtype=torch.long), idx)
    assert pick_hard_negatives(feat, feat, idx, pool, torch.tensor(0.07)).has_negative.all()
    same = torch.tensor([7, 7])  # one video twice: no row has a negative
    pool_same = NegativePool(pool.video_embeds[:2], feat[:2], feat[:2], pool.input_ids[:2],
                             pool.attention_mask[:2], same)
    negatives = pick_hard_negatives(feat[:2], feat[:2], same, pool_same, torch.tensor(0.07))
    assert negatives.has_negative.tolist() == [False, False]

    # the matching loss then holds only the positive pairs: an independent cross-entropy
    model = build_retrieval_model(tiny_config()).eval()
    video_feat, video_embeds, _ = model.encode_video(tiny_video(2))
    _, input_ids, attention_mask = model.encode_text(captions[:2])
    placeholders = HardNegatives(video_embeds, input_ids, attention_mask,
                                 torch.tensor([False, False]))
    loss = model.matching_loss(video_embeds, input_ids, attention_mask, placeholders)
    logits = model.itm_logits(video_embeds, input_ids, attention_mask)
    torch.testing.assert_close(loss, -logits.log_softmax(dim=1)[:, 1].mean())


def test_queue_pointer_wraps_and_rejects_uneven_batches():
    queue, idx_queue, ptr = torch.zeros(2, 6), torch.full((1, 6), -100), torch.zeros(1, dtype=torch.long)
    for step in range(4):
        columns = torch.full((3, 2), float(step))
        enqueue((queue, idx_queue), (columns, torch.full((3, 1), step)), ptr)
        assert int(ptr) == (3 * (step + 1)) % 6
    assert queue[0].tolist() == [2, 2, 2, 3, 3, 3]
    assert idx_queue[0].tolist() == [2, 2, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="multiple of the global batch size"):
        enqueue((queue,), (torch.zeros(4, 2),), ptr)


def test_retrieval_queue_holds_momentum_features_and_indices(tiny_config, tiny_video, captions):
    model = build_retrieval_model(tiny_config()).eval()
    video, idx = tiny_video(4), torch.tensor([5, 6, 7, 8])
    model(video, captions, 0.4, idx)
    input_ids, attention_mask = model.tokenize(captions)
    video_feat_m, text_feat_m = model.momentum_features(video, input_ids, attention_mask)
    torch.testing.assert_close(model.image_queue[:, :4], video_feat_m.t())
    torch.testing.assert_close(model.text_queue[:, :4], text_feat_m.t())
    assert model.idx_queue[0, :4].tolist() == [5, 6, 7, 8] and int(model.ptr_queue) == 4
    model(video, captions, 0.4, idx)
    assert int(model.ptr_queue) == 0


def test_retrieval_under_bfloat16_autocast(tiny_config, tiny_video, captions):
    model = build_retrieval_model(tiny_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_vtc, loss_vtm = model(tiny_video(4), captions, 0.4, torch.arange(4))
    assert loss_vtc.dtype == loss_vtm.dtype == torch.float32
    assert torch.isfinite(loss_vtc) and torch.isfinite(loss_vtm)
    assert model.image_queue.dtype == model.text_queue.dtype == torch.float32
    (loss_vtc + loss_vtm).backward()


# pre-training ------------------------------------------------------------------------
def test_pretrain_losses_finite_and_decrease(tiny_config, tiny_video, captions):
    torch.manual_seed(0)
    model = build_pretrain_model(tiny_config()).eval()
    video = tiny_video(4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first = last = None
    for _ in range(5):
        losses = model(video, captions, 0.4)
        assert all(torch.isfinite(loss) for loss in losses)
        sum(losses).backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first or [loss.item() for loss in losses]
        last = [loss.item() for loss in losses]
    assert last[0] < first[0] and last[2] < first[2], (first, last)
    assert int(model.queue_ptr) == (5 * 4) % 8


def test_pretrain_decoder_shares_all_but_self_attention(tiny_config):
    model = build_pretrain_model(tiny_config())
    encoder, decoder = model.text_encoder, model.text_decoder
    assert decoder.bert.embeddings.word_embeddings.weight is encoder.embeddings.word_embeddings.weight
    assert decoder.cls.predictions.decoder.weight is encoder.embeddings.word_embeddings.weight
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.bert.encoder.layer):
        assert dec_layer.crossattention.self.query.weight is enc_layer.crossattention.self.query.weight
        assert dec_layer.output.dense.weight is enc_layer.output.dense.weight
        assert dec_layer.attention.self.query.weight is not enc_layer.attention.self.query.weight
    keys = model.state_dict().keys()
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight" in keys
    assert "text_encoder.encoder.layer.0.crossattention.self.query.weight" in keys


def test_caption_loss_ignores_padding_and_uses_dec_token(tiny_config, captions):
    model = build_pretrain_model(tiny_config(text_config=dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, label_smoothing=0.0))).eval()
    video_embeds = torch.randn(1, 5, 64)
    input_ids, attention_mask = model.tokenize(captions[:1])
    length = int(attention_mask.sum())
    loss = model.caption_loss(video_embeds, input_ids, attention_mask)
    ids = input_ids[:, :length].clone()
    ids[0, 0] = model.tokenizer.bos_token_id
    logits = model.text_decoder(ids, encoder_hidden_states=video_embeds).logits[0, :-1]
    expected = F.cross_entropy(logits, ids[0, 1:])
    torch.testing.assert_close(loss, expected)


# VideoQA -----------------------------------------------------------------------------
@pytest.fixture
def exact_vqa_config(tiny_config) -> dict:
    """No dropout and no label smoothing, so decoder losses are exact log-likelihoods."""
    return tiny_config(text_config=dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, label_smoothing=0.0))


def answer_log_likelihood(model, question_states, answer: str) -> torch.Tensor:
    """log p(answer tokens, [SEP] | [DEC], question), one unpadded decoder call."""
    ids = model.tokenizer([answer], return_tensors="pt").input_ids
    ids[0, 0] = model.tokenizer.bos_token_id
    logits = model.text_decoder(ids, encoder_hidden_states=question_states).logits
    log_probs = logits[0, :-1].log_softmax(dim=-1)
    return log_probs.gather(1, ids[0, 1:, None]).sum()


def test_vqa_rank_picks_the_most_likely_answer(exact_vqa_config, tiny_video):
    torch.manual_seed(0)
    model = build_videoqa_model(exact_vqa_config).eval()
    video, questions = tiny_video(3), ["what is he doing", "what animal is it", "where are they"]
    answers = ["cooking", "dog", "a big brown dog", "kitchen", "playing the guitar", "yes", "cat"]
    with torch.no_grad():
        states, mask = model.encode_questions(video, questions)
        best = torch.stack([
            torch.stack([answer_log_likelihood(model, states[b:b + 1, :int(mask[b].sum())], a)
                         for a in answers]).argmax()
            for b in range(len(questions))])
    assert model.rank_answers(video, questions, answers, k=len(answers)).best.tolist() == best.tolist()
    assert model.rank_answers(video, questions, answers, k=100).best.tolist() == best.tolist()


def test_vqa_rank_only_rescores_the_top_k_first_tokens(exact_vqa_config, tiny_video):
    torch.manual_seed(1)
    model = build_videoqa_model(exact_vqa_config).eval()
    video, questions = tiny_video(2), ["what is he doing", "what animal is it"]
    answers = ["cooking", "dog", "kitchen", "guitar", "yes", "cat"]
    with torch.no_grad():
        states, mask = model.encode_questions(video, questions)
        start = torch.full((2, 1), model.tokenizer.bos_token_id)
        first_logits = model.text_decoder(start, encoder_hidden_states=states,
                                          encoder_attention_mask=mask).logits[:, 0]
        first_ids = model.tokenizer(answers, return_tensors="pt", padding=True).input_ids[:, 1]
        top2 = first_logits[:, first_ids].topk(2, dim=1).indices
    ranked = model.rank_answers(video, questions, answers, k=2)
    for b in range(2):
        assert ranked.best[b] in top2[b]
    assert torch.equal(ranked.candidates, top2)


def test_vqa_loss_weights_answers_and_decreases(exact_vqa_config, tiny_video):
    torch.manual_seed(0)
    model = build_videoqa_model(exact_vqa_config).eval()
    video, questions = tiny_video(2), ["what is he doing", "what animal is it"]
    answers, weights, n = ["cooking", "making food", "dog"], torch.tensor([0.2, 0.6, 1.0]), [2, 1]
    loss = model(video, questions, answers, weights, n)
    with torch.no_grad():
        states, mask = model.encode_questions(video, questions)
        owners = [0, 0, 1]
        nll = torch.stack([-answer_log_likelihood(model, states[b:b + 1, :int(mask[b].sum())], a)
                           for b, a in zip(owners, answers)])
    torch.testing.assert_close(loss, (weights * nll).sum() / 2)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = model(video, questions, answers, weights, n)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_vqa_greedy_generation_matches_step_by_step_decoding(exact_vqa_config, tiny_video):
    torch.manual_seed(0)
    model = build_videoqa_model(exact_vqa_config).eval()
    video, questions = tiny_video(2), ["what is he doing", "what animal is it"]
    generated = model.generate_answers(video, questions, num_beams=1, max_length=5)
    with torch.no_grad():
        states, mask = model.encode_questions(video, questions)
        expected = []
        for b in range(2):
            ids = torch.tensor([[model.tokenizer.bos_token_id]])
            while ids.shape[1] < 5 and ids[0, -1] != model.tokenizer.sep_token_id:
                logits = model.text_decoder(ids, encoder_hidden_states=states[b:b + 1],
                                            encoder_attention_mask=mask[b:b + 1]).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            expected.append(model.tokenizer.decode(ids[0], skip_special_tokens=True))
    assert generated == expected
    beams = model.generate_answers(video, questions, num_beams=3, max_length=5)
    assert len(beams) == 2 and all(isinstance(answer, str) for answer in beams)


def test_vqa_rank_returns_the_scores_it_ranked_by(exact_vqa_config, tiny_video):
    torch.manual_seed(2)
    model = build_videoqa_model(exact_vqa_config).double().eval()
    video, questions = tiny_video(2).double(), ["what is he doing", "what animal is in the room"]
    answers = ["cooking", "dog", "a big brown dog", "kitchen", "yes"]
    ranked = model.rank_answers(video, questions, answers, k=3)
    assert ranked.candidates.shape == ranked.first_token_probs.shape == ranked.scores.shape == (2, 3)
    with torch.no_grad():
        states, mask = model.encode_questions(video, questions)
        for b in range(2):
            alone = states[b:b + 1, :int(mask[b].sum())]
            start = torch.tensor([[model.tokenizer.bos_token_id]])
            probs = model.text_decoder(start, encoder_hidden_states=alone).logits[0, 0].softmax(-1)
            first_ids = [model.tokenizer(a).input_ids[1] for a in answers]
            expected_candidates = probs[first_ids].topk(3).indices
            assert ranked.candidates[b].tolist() == expected_candidates.tolist()
            for j, index in enumerate(ranked.candidates[b].tolist()):
                torch.testing.assert_close(ranked.first_token_probs[b, j], probs[first_ids[index]],
                                           rtol=0, atol=1e-12)
                torch.testing.assert_close(ranked.scores[b, j],
                                           answer_log_likelihood(model, alone, answers[index]),
                                           rtol=0, atol=1e-12)
            assert ranked.best[b] == ranked.candidates[b, ranked.scores[b].argmax()]


# A question's results must not depend on the other questions of its batch: a shorter
# question is padded, and the decoder must not cross-attend to its padding.
PADDING_QUESTIONS = ["what is it", "what is the man in the red shirt doing in the kitchen",
                     "where are they now"]


def test_vqa_loss_of_a_question_is_the_same_alone_and_batched_with_longer_ones(tiny_config,
                                                                              tiny_video):
    torch.manual_seed(0)
    model = build_videoqa_model(tiny_config()).double().eval()  # label smoothing on, as trained
    video = tiny_video(3).double()
    answers, n = ["a dog", "cooking", "in the kitchen", "outside"], [1, 2, 1]
    alone = model(video[:1], PADDING_QUESTIONS[:1], answers[:1],
                  torch.tensor([0.7], dtype=torch.float64), [1])
    weights = torch.tensor([0.7, 0.0, 0.0, 0.0], dtype=torch.float64)  # only the first question
    batched = model(video, PADDING_QUESTIONS, answers, weights, n) * 3  # the loss divides by B
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-10)


def test_vqa_answers_of_a_question_are_the_same_alone_and_batched_with_longer_ones(tiny_config,
                                                                                 tiny_video):
    torch.manual_seed(0)
    model = build_videoqa_model(tiny_config()).double().eval()
    video = tiny_video(3).double()
    answers = ["cooking", "dog", "a big brown dog", "kitchen", "playing the guitar", "yes", "cat"]
    alone = model.rank_answers(video[:1], PADDING_QUESTIONS[:1], answers, k=4)
    batched = model.rank_answers(video, PADDING_QUESTIONS, answers, k=4)
    assert batched.candidates[0].tolist() == alone.candidates[0].tolist()
    torch.testing.assert_close(batched.first_token_probs[0], alone.first_token_probs[0],
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(batched.scores[0], alone.scores[0], rtol=0, atol=1e-10)
    assert batched.best[0] == alone.best[0]
    for num_beams in (1, 3):
        generated = model.generate_answers(video, PADDING_QUESTIONS, num_beams=num_beams,
                                           max_length=6)
        assert generated[0] == model.generate_answers(video[:1], PADDING_QUESTIONS[:1],
                                                      num_beams=num_beams, max_length=6)[0]
