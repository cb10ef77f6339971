"""Tokenizer ids and lookup, text configuration, and the BLIP "med" text towers."""
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from models.text import (build_text_config, build_text_decoder, build_text_encoder,
                         build_tokenizer, encode_grounded, encode_grounded_one_video,
                         encode_text_only, tie_decoder_to_encoder)

REPO_ROOT = Path(__file__).resolve().parents[1]
MED_CONFIG = str(REPO_ROOT / "configs" / "med_config.json")
SHIPPED_VOCAB = REPO_ROOT / "models" / "vocab" / "bert-base-uncased.txt"
# sha256 of bert-base-uncased's vocab.txt as published by Google and on the Hugging Face hub
BERT_UNCASED_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


def test_shipped_vocabulary_is_bert_base_uncased():
    data = SHIPPED_VOCAB.read_bytes()
    assert hashlib.sha256(data).hexdigest() == BERT_UNCASED_VOCAB_SHA256
    assert (len(data), data.count(b"\n")) == (231508, 30522)


def test_default_tokenizer_is_offline_and_gives_the_hub_ids(tmp_path, monkeypatch):
    """`bert-base-uncased` needs neither the hub nor its cache: with both unreachable it still
    gives the ids of the hub tokenizer (hand-checked ids of bert-base-uncased)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(socket, "create_connection", None)  # any connection attempt fails
    tokenizer = build_tokenizer()
    ids = tokenizer("A man is cooking pasta; unaffable TESTA!").input_ids
    assert ids == [101, 1037, 2158, 2003, 8434, 24857, 1025, 14477, 20961, 3468, 3231, 2050, 999, 102]


def test_tokenizer_adds_dec_and_enc_tokens(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    shutil.copy(SHIPPED_VOCAB, folder / "vocab.txt")
    for source in ("bert-base-uncased", str(SHIPPED_VOCAB), str(folder)):
        tokenizer = build_tokenizer(source)
        assert len(tokenizer) == 30524
        assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == 30522
        assert tokenizer.enc_token_id == 30523
        assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
        assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) == (101, 102, 0)
        assert tokenizer("Hello World!").input_ids == [101, 7592, 2088, 999, 102]


def test_tokenizer_errors_say_what_to_set(tmp_path):
    hint = "set text_encoder in the config"
    with pytest.raises(FileNotFoundError, match=hint):
        build_tokenizer(str(tmp_path))  # a directory without vocab.txt
    with pytest.raises(FileNotFoundError, match=hint):
        build_tokenizer(str(tmp_path / "missing" / "vocab.txt"))
    small_vocab = tmp_path / "vocab.txt"
    small_vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    with pytest.raises(ValueError, match=hint):
        build_tokenizer(str(small_vocab))


class FakeHub(http.server.ThreadingHTTPServer):
    """A Hugging Face hub on 127.0.0.1 serving one file, bert-base-uncased's `vocab.txt`;
    `requests` lists the (method, path) pairs it was asked for."""

    commit = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, vocab: bytes):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.vocab, self.requests = vocab, []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self._answer(send_body=False)

    def do_GET(self):
        self._answer(send_body=True)

    def _answer(self, send_body: bool):
        hub = self.server
        hub.requests.append((self.command, self.path))
        if self.path != "/google-bert/bert-base-uncased/resolve/main/vocab.txt":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(hub.vocab)))
        self.send_header("ETag", f'"{hashlib.sha256(hub.vocab).hexdigest()}"')
        self.send_header("X-Repo-Commit", hub.commit)
        self.end_headers()
        if send_body:
            self.wfile.write(hub.vocab)

    def log_message(self, *args):
        pass


def build_tokenizers_in_subprocess(names, hf_home, endpoint: str) -> list:
    """build_tokenizer(name) for each name in a fresh Python (the hub settings are read at
    import) -> a line per name: the vocabulary size or the error."""
    code = ("import sys\n"
            "from models.text import build_tokenizer\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        print(len(build_tokenizer(name)))\n"
            "    except Exception as err:\n"
            "        print(type(err).__name__, err)\n")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code, *names], env=env, capture_output=True,
                            text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_tokenizer_from_the_hub_then_from_the_cache(tmp_path):
    """Downloaded once, then read from the cache, also when the hub cannot be reached;
    a name neither cached nor reachable is a one-line error, not a hang."""
    with open(SHIPPED_VOCAB, "rb") as f:
        hub = FakeHub(f.read())
    try:
        lines = build_tokenizers_in_subprocess(
            ["google-bert/bert-base-uncased", "google-bert/bert-base-uncased", "nobody/no-bert"],
            tmp_path, hub.endpoint)
    finally:
        hub.shutdown()
    assert lines[:2] == ["30524", "30524"]
    assert lines[2].startswith("FileNotFoundError tokenizer 'nobody/no-bert': no vocab.txt from "
                               "the hub")
    vocab_requests = [r for r in hub.requests
                      if r[1].startswith("/google-bert/bert-base-uncased/")]
    assert vocab_requests == [("HEAD", "/google-bert/bert-base-uncased/resolve/main/vocab.txt"),
                              ("GET", "/google-bert/bert-base-uncased/resolve/main/vocab.txt")]  # once

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}"
    lines = build_tokenizers_in_subprocess(["google-bert/bert-base-uncased", "nobody/no-bert"],
                                           tmp_path, unreachable)
    assert lines == ["30524", "FileNotFoundError tokenizer 'nobody/no-bert' is neither a local "
                     "path nor in the Hugging Face cache, and the hub is not reachable; "
                     "set text_encoder in the config to a directory holding vocab.txt or to "
                     "the vocab.txt file of bert-base-uncased"]


def test_text_config_from_med_config(tiny_config):
    tokenizer = build_tokenizer()
    config = build_text_config({"med_config": MED_CONFIG, "vision_width": 768}, tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.intermediate_size, config.vocab_size, config.max_position_embeddings) == (3072, 30524, 512)
    assert config.encoder_hidden_size == 768 and config.layer_norm_eps == 1e-12
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.1
    assert config.label_smoothing == 0.1 and config.is_decoder
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (30522, 102, 0)

    tiny = build_text_config(tiny_config(vision_width=48), tokenizer)
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.encoder_hidden_size) == (64, 2, 48)


def test_text_config_initializer_range_sets_the_initial_weight_scale(tiny_config):
    """The pre-training demo widens the towers' initial weights through text_config."""
    def weight_std(text_config):
        torch.manual_seed(0)
        config = build_text_config(tiny_config(text_config=text_config), build_tokenizer())
        encoder = build_text_encoder(config)
        return torch.cat([encoder.encoder.layer[0].attention.self.value.weight.flatten(),
                          encoder.embeddings.word_embeddings.weight.flatten()]).std().item()

    small = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
             "intermediate_size": 128}
    assert weight_std(small) == pytest.approx(0.02, rel=0.05)  # BERT's default
    assert weight_std({**small, "initializer_range": 0.1}) == pytest.approx(0.1, rel=0.05)


def med_layout_keys(layers: int) -> list:
    """The `text_encoder.*` names of BLIP's "med" BERT checkpoints, without the prefix."""
    keys = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for i in range(layers):
        for attention in ("attention", "crossattention"):
            keys += [f"encoder.layer.{i}.{attention}.self.{name}.{p}"
                     for name in ("query", "key", "value") for p in ("weight", "bias")]
            keys += [f"encoder.layer.{i}.{attention}.output.{name}.{p}"
                     for name in ("dense", "LayerNorm") for p in ("weight", "bias")]
        keys += [f"encoder.layer.{i}.{name}.{p}" for name in ("intermediate.dense", "output.dense",
                                                             "output.LayerNorm")
                 for p in ("weight", "bias")]
    return keys


@pytest.fixture
def tiny_text_config(tiny_config):
    return build_text_config(tiny_config(), build_tokenizer())


def test_text_towers_load_blip_med_layout(tiny_text_config):
    config = tiny_text_config
    encoder, decoder = build_text_encoder(config), build_text_decoder(config)
    template = encoder.state_dict()
    med_state = {key: torch.randn_like(template[key]) for key in med_layout_keys(2)}
    med_state["embeddings.position_ids"] = torch.arange(512)[None]  # older files carry it
    result = encoder.load_state_dict(med_state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["embeddings.position_ids"]
    torch.testing.assert_close(encoder.encoder.layer[1].crossattention.self.key.weight,
                               med_state["encoder.layer.1.crossattention.self.key.weight"])

    head = {"cls.predictions.bias": torch.randn(30524),
            "cls.predictions.transform.dense.weight": torch.randn(64, 64),
            "cls.predictions.transform.dense.bias": torch.randn(64),
            "cls.predictions.transform.LayerNorm.weight": torch.randn(64),
            "cls.predictions.transform.LayerNorm.bias": torch.randn(64),
            "cls.predictions.decoder.weight": med_state["embeddings.word_embeddings.weight"]}
    head["cls.predictions.decoder.bias"] = head["cls.predictions.bias"]
    decoder_state = {**{f"bert.{key}": value for key, value in med_state.items()}, **head}
    result = decoder.load_state_dict(decoder_state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["bert.embeddings.position_ids"]
    assert set(decoder.state_dict()) == set(decoder_state) - {"bert.embeddings.position_ids"}


def test_text_only_grounded_and_causal_modes(tiny_text_config):
    torch.manual_seed(0)
    config = tiny_text_config
    encoder, decoder = build_text_encoder(config).eval(), build_text_decoder(config).eval()
    input_ids = torch.tensor([[101, 7592, 2088, 999, 102]])
    mask = torch.ones_like(input_ids)
    video_a, video_b = torch.randn(1, 7, 64), torch.randn(1, 7, 64)
    with torch.no_grad():
        text_only = encode_text_only(encoder, input_ids, mask)
        grounded_a = encode_grounded(encoder, input_ids, mask, video_a)
        grounded_b = encode_grounded(encoder, input_ids, mask, video_b)
        logits = decoder(input_ids, encoder_hidden_states=video_a).logits
        changed = input_ids.clone()
        changed[0, 3] = 2088
        logits_changed = decoder(changed, encoder_hidden_states=video_a).logits
    assert text_only.shape == (1, 5, 64) and logits.shape == (1, 5, 30524)
    assert not torch.allclose(text_only, grounded_a)
    assert not torch.allclose(grounded_a, grounded_b)
    torch.testing.assert_close(logits[:, :3], logits_changed[:, :3])  # causal: no look-ahead
    assert not torch.allclose(logits[:, 3:], logits_changed[:, 3:])


def test_cross_attention_ignores_masked_encoder_states(tiny_text_config):
    """Encoder states the mask hides (padding) change nothing, in both towers."""
    torch.manual_seed(0)
    config = tiny_text_config
    encoder = build_text_encoder(config).double().eval()
    decoder = build_text_decoder(config).double().eval()
    input_ids = torch.tensor([[101, 7592, 2088, 999, 102]])
    mask = torch.ones_like(input_ids)
    states = torch.randn(1, 4, 64, dtype=torch.float64)
    padded = torch.cat([states, 100 * torch.randn(1, 3, 64, dtype=torch.float64)], dim=1)
    padded_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        for tower_output in (
                lambda s, m: encoder(input_ids, attention_mask=mask, encoder_hidden_states=s,
                                     encoder_attention_mask=m).last_hidden_state,
                lambda s, m: decoder(input_ids, attention_mask=mask, encoder_hidden_states=s,
                                     encoder_attention_mask=m).logits):
            expected = tower_output(states, None)
            torch.testing.assert_close(tower_output(padded, padded_mask), expected,
                                       rtol=0, atol=1e-10)
            assert not torch.allclose(tower_output(padded, None), expected)


@pytest.mark.parametrize("video_padding", [False, True])
def test_grounded_encoding_of_one_video_is_transformers_on_its_copies(tiny_text_config,
                                                                      video_padding):
    """K texts against one video (`encode_grounded_one_video`, texts folded into the
    cross-attention's query rows) give, at every position, the float64 hidden states of
    transformers' own forward with the video copied K times, within 1e-12; texts of
    different lengths (padded), the video's padded tokens masked or none."""
    torch.manual_seed(0)
    encoder = build_text_encoder(tiny_text_config).double().eval()
    input_ids = torch.randint(1000, 30000, (5, 9))
    lengths = torch.tensor([9, 3, 6, 9, 1])
    text_mask = (torch.arange(9)[None] < lengths[:, None]).long()  # [5, 9]
    video = torch.randn(1, 11, 64, dtype=torch.float64)
    video_mask = torch.tensor([[1] * 8 + [0] * 3]) if video_padding else None
    with torch.no_grad():
        folded = encode_grounded_one_video(encoder, input_ids, text_mask, video, video_mask)
        copies = encoder(input_ids, attention_mask=text_mask,
                         encoder_hidden_states=video.expand(5, -1, -1),
                         encoder_attention_mask=None if video_mask is None
                         else video_mask.expand(5, -1)).last_hidden_state
    assert folded.shape == copies.shape == (5, 9, 64)
    assert (folded - copies).abs().max().item() <= 1e-12
    assert torch.equal(encode_grounded(encoder, input_ids, text_mask, video, video_mask), folded)


def test_tied_decoder_shares_everything_but_self_attention(tiny_text_config):
    config = tiny_text_config
    encoder, decoder = build_text_encoder(config), build_text_decoder(config)
    tie_decoder_to_encoder(encoder, decoder)
    encoder_params = {id(p) for p in encoder.parameters()}
    unshared = {name for name, p in decoder.named_parameters() if id(p) not in encoder_params}
    assert unshared and all(".attention." in name or name.startswith("cls.") for name in unshared)
    assert decoder.cls.predictions.decoder.weight is encoder.embeddings.word_embeddings.weight


BERT_SIZES = dict(hidden_size=96, num_attention_heads=4, intermediate_size=192)


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory) -> str:
    """A seeded random 6-layer, width-96 BERT uncased saved as a Hugging Face folder
    (model.safetensors + config.json); every parameter, LayerNorms and the token-type
    embedding included, is perturbed away from its initial value."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=30522, num_hidden_layers=6, **BERT_SIZES))
    with torch.no_grad():
        for param in bert.parameters():
            param.add_(0.05 * torch.randn_like(param))
    folder = tmp_path_factory.mktemp("bert")
    bert.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    return str(folder)


def bert_text_config(num_layers: int):
    return build_text_config({"med_config": MED_CONFIG, "vision_width": 64,
                              "text_config": {**BERT_SIZES, "num_hidden_layers": num_layers}},
                             build_tokenizer())


def test_text_tower_from_bert_computes_what_the_bert_computes(small_bert):
    """A BLIP tower initialised from a BERT checkpoint reproduces transformers' BertModel
    (token-type embedding folded into the positions), text-only, in float64."""
    from transformers import BertModel
    bert = BertModel.from_pretrained(small_bert).double().eval()
    tower = build_text_encoder(bert_text_config(6), small_bert).double().eval()
    decoder = build_text_decoder(bert_text_config(6), small_bert)
    tokenizer = build_tokenizer()
    batch = tokenizer(["a large blue triangle moves up.", "on a navy background, a cat"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        ours = encode_text_only(tower, batch.input_ids, batch.attention_mask)
    mask = batch.attention_mask.bool()
    assert (ours - expected.last_hidden_state)[mask].abs().max() < 1e-6  # fp32 fold
    assert torch.equal(decoder.bert.encoder.layer[5].output.dense.weight.double(),
                       bert.encoder.layer[5].output.dense.weight)
    # the [DEC]/[ENC] rows and the cross-attention keep their initialisation
    fresh = build_text_encoder(bert_text_config(6))
    assert not torch.equal(tower.embeddings.word_embeddings.weight[30521].float(),
                           fresh.embeddings.word_embeddings.weight[30521])
    assert tower.encoder.layer[0].crossattention.self.key.weight.shape == (96, 64)


def test_text_tower_from_bert_uses_the_first_layers_and_rejects_bad_files(tiny_config, small_bert, tmp_path):
    from transformers import BertModel
    bert = BertModel.from_pretrained(small_bert)
    tower = build_text_encoder(bert_text_config(2), small_bert)
    assert torch.equal(tower.encoder.layer[1].attention.self.query.weight,
                       bert.encoder.layer[1].attention.self.query.weight)
    with pytest.raises(ValueError, match="hidden_size|shape"):
        build_text_encoder(build_text_config(tiny_config(), build_tokenizer()), small_bert)
    with pytest.raises(FileNotFoundError, match="text_init .*missing"):
        build_text_encoder(bert_text_config(2), str(tmp_path / "missing"))
    not_bert = tmp_path / "weights.pth"
    torch.save({"visual_encoder.cls_token": torch.zeros(1)}, not_bert)
    with pytest.raises(ValueError, match="not a BERT checkpoint"):
        build_text_encoder(bert_text_config(2), str(not_bert))
