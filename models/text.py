"""BERT tokenizer with BLIP's `[DEC]`/`[ENC]` tokens, and the BLIP "med" text towers.

The towers are transformers' BLIP text classes: `BlipTextModel` (encoder; text-only
when called without video tokens, video-grounded when given them) and
`BlipTextLMHeadModel` (causal decoder with the LM head). Their parameter names are
those of the original BLIP "med" BERT, so BLIP and TESTA checkpoints load as they are.
"""
import inspect
import logging
import os
import socket
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse

import huggingface_hub
import torch
from huggingface_hub import constants as hub_constants
from transformers import BertTokenizer
from transformers.models.blip.modeling_blip_text import (BlipTextAttention, BlipTextConfig,
                                                         BlipTextLMHeadModel, BlipTextModel,
                                                         BlipTextSelfAttention)

from datasets.annotations import load_json_object
from models.attention import attend, live_key_bias
from models.bert_init import init_from_bert
from models.cost import count, encoder_config
from models.text_guided import (RULES, TokenSelection, choose_tokens, merge_per_text,
                                relevance_of, select_tokens)
from models.video_encoder import VIDEO_ENCODER_SETTINGS
from utils import NONE, Setting, Settings, unknown_key_problem, value_problem, with_defaults

BERT_UNCASED_VOCAB_SIZE = 30522
TEXT_SETTINGS = Settings(title="Text towers", module=__name__, settings={
    "text_encoder": Setting(str, "bert-base-uncased", "tokenizer: hub name, local directory or "
                            "vocab.txt of bert-base-uncased"),
    "med_config": Setting(str, "configs/med_config.json", "JSON of the BLIP text towers' BERT "
                          "configuration (relative: from the working directory or the repo)"),
    "text_config": Setting((dict, NONE), None, "med_config keys (and label_smoothing) to "
                           "override, e.g. {hidden_size: 64}"),
    "text_init": Setting((str, NONE), None, "BERT weights for the text towers (file or Hugging "
                         "Face folder), for training without a BLIP checkpoint"),
    "text_guided_k": Setting((int, NONE), None, "video tokens each (text, video) pair of ITM and "
                             "the VideoQA question encoder cross-attends to, the others merged "
                             "into them (docs/text_guided.md); null: all", min=1),
    "text_guided_rule": Setting(str, "text", "how text_guided_k ranks the tokens: by the text's "
                                "first-layer cross-attention, or by similarity alone (control)",
                                choices=RULES),
})
REPO_ROOT = Path(__file__).resolve().parents[1]
# bert-base-uncased's vocab.txt, byte for byte (models/vocab/README.md): no hub or cache needed
SHIPPED_VOCABS = {"bert-base-uncased": REPO_ROOT / "models" / "vocab" / "bert-base-uncased.txt"}
logger = logging.getLogger(__name__)
TOKENIZER_HINT = ("set text_encoder in the config to a directory holding vocab.txt or to the "
                  "vocab.txt file of bert-base-uncased")
# text_config / med_config.json keys beyond BERT's, with their defaults
MED_DEFAULTS = {"label_smoothing": 0.1}
# what text_config may set: the med_config.json keys that BlipTextConfig takes under the same
# name, and label_smoothing
TEXT_CONFIG_SETTINGS: Settings = {
    "vocab_size": Setting(int, meaning="token embeddings", min=1),
    "hidden_size": Setting(int, meaning="token width", min=1),
    "num_hidden_layers": Setting(int, meaning="layers", min=1),
    "num_attention_heads": Setting(int, meaning="attention heads", min=1),
    "intermediate_size": Setting(int, meaning="MLP width", min=1),
    "hidden_act": Setting(str, meaning="MLP activation"),
    "hidden_dropout_prob": Setting((int, float), meaning="dropout", min=0, max=1),
    "attention_probs_dropout_prob": Setting((int, float), meaning="attention dropout", min=0, max=1),
    "max_position_embeddings": Setting(int, meaning="positions", min=1),
    "layer_norm_eps": Setting((int, float), meaning="LayerNorm epsilon", min=0),
    "pad_token_id": Setting(int, meaning="padding token", min=0),
    "initializer_range": Setting((int, float), meaning="std of the initial weights", min=0),
    "label_smoothing": Setting((int, float), meaning="of the captioning/answer loss", min=0, max=1),
}
MED_CONFIG_KEYS = tuple(key for key in TEXT_CONFIG_SETTINGS if key not in MED_DEFAULTS)


@TEXT_SETTINGS.check
def text_config_problem(config: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """Why `config["text_config"]` cannot build the text towers (an unknown key, a value of
    the wrong type or range, a width the heads do not divide), as ("text_config", problem),
    or None."""
    text_config = config["text_config"] or {}
    problems = [unknown_key_problem(name, TEXT_CONFIG_SETTINGS) for name in text_config
                if name not in TEXT_CONFIG_SETTINGS]
    problems += [value_problem(name, value, TEXT_CONFIG_SETTINGS[name])
                 for name, value in text_config.items() if name in TEXT_CONFIG_SETTINGS]
    problems = [problem for problem in problems if problem]
    if not problems and "hidden_size" in text_config and "num_attention_heads" in text_config \
            and text_config["hidden_size"] % text_config["num_attention_heads"]:
        problems.append(f"hidden_size {text_config['hidden_size']} is not divisible by "
                        f"num_attention_heads {text_config['num_attention_heads']}")
    return ("text_config", f"text_config: {'; '.join(problems)}") if problems else None


@TEXT_SETTINGS.check
def text_guided_problem(config: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """Why `text_guided_k` cannot reduce the video encoder's tokens (adaptive aggregation
    pads them; more than the fewest tokens the encoder gives at the training or test frame
    count), as ("text_guided_k", problem), or None."""
    k = config["text_guided_k"]
    if k is None:
        return None
    if config.get("testa_threshold") is not None:
        return "text_guided_k", ("text_guided_k needs fixed aggregation (testa_threshold: null): "
                                 "adaptive aggregation pads the videos' tokens")
    frames = {config.get(key) for key in ("num_frames", "num_frm_train", "num_frm_test")} - {None}
    tokens = min(count(encoder_config(config, n, True))["tokens_out"] for n in frames)
    if k > tokens:
        return "text_guided_k", (f"text_guided_k {k} is more than the {tokens} tokens the video "
                                 f"encoder gives a video")
    return None


# tokenizer ---------------------------------------------------------------------------
def build_tokenizer(name_or_path: str = "bert-base-uncased") -> BertTokenizer:
    """BERT uncased WordPiece plus `[DEC]` (bos, id 30522) and `[ENC]` (id 30523).

    `name_or_path`: a `vocab.txt` file, a directory holding one, or a hub name.
    `bert-base-uncased` reads the copy of its vocabulary shipped in `models/vocab/`; other
    hub names try the local cache first, the hub only when it is reachable. The tokenizer
    gets an `enc_token_id` attribute.
    """
    name_or_path = str(SHIPPED_VOCABS.get(str(name_or_path), name_or_path))
    tokenizer = BertTokenizer(find_vocab(name_or_path), do_lower_case=True)
    if tokenizer.vocab_size != BERT_UNCASED_VOCAB_SIZE:
        raise ValueError(f"the tokenizer from {name_or_path!r} has {tokenizer.vocab_size} tokens, "
                         f"not the {BERT_UNCASED_VOCAB_SIZE} of bert-base-uncased; {TOKENIZER_HINT}")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def find_vocab(name_or_path: str) -> str:
    """The `vocab.txt` named by `name_or_path`: the file itself, the one in that directory,
    or that hub repository's, from the Hugging Face cache, else downloaded when the hub
    is reachable. The cache is looked up and the file fetched through huggingface_hub,
    as transformers' own local-files-only loading differs between versions (it raises
    in 4.x, returns a tokenizer without vocabulary in 5.x)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if os.path.isdir(name_or_path):
        vocab = os.path.join(name_or_path, "vocab.txt")
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"no vocab.txt in {name_or_path}; {TOKENIZER_HINT}")
        return vocab
    try:
        cached = huggingface_hub.try_to_load_from_cache(name_or_path, "vocab.txt")
    except ValueError:  # not a valid hub repository name either
        raise FileNotFoundError(f"tokenizer {name_or_path!r} is neither a local path nor a hub "
                                f"name; {TOKENIZER_HINT}") from None
    if isinstance(cached, str):
        return cached
    if not _hub_reachable():
        raise FileNotFoundError(f"tokenizer {name_or_path!r} is neither a local path nor in the "
                                f"Hugging Face cache, and the hub is not reachable; {TOKENIZER_HINT}")
    try:
        return huggingface_hub.hf_hub_download(name_or_path, "vocab.txt")
    except Exception as err:  # huggingface_hub raises many kinds (missing repo, HTTP, I/O)
        raise FileNotFoundError(f"tokenizer {name_or_path!r}: no vocab.txt from the hub "
                                f"({type(err).__name__}); {TOKENIZER_HINT}") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (skipped when offline mode is set)."""
    if hub_constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(hub_constants.ENDPOINT)
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def tokenize(tokenizer: BertTokenizer, texts: Sequence[str], device: torch.device,
             max_length: Optional[int] = None, padding: str = "longest"
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """texts -> (input_ids `[B, S]`, attention_mask `[B, S]`) on `device`, starting with
    `[CLS]`, truncated to `max_length` when given."""
    with torch.device("cpu"):  # data, made on the host whatever the default device is
        batch = tokenizer(list(texts), padding=padding, truncation=max_length is not None,
                          max_length=max_length, return_tensors="pt")
    return batch.input_ids.to(device), batch.attention_mask.to(device)


def with_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """A copy of `input_ids [B, S]` whose first token is `token_id` (`[ENC]` or `[DEC]`)."""
    input_ids = input_ids.clone()
    input_ids[:, 0] = token_id
    return input_ids


# text towers -------------------------------------------------------------------------
def build_text_config(config: Mapping[str, Any], tokenizer: BertTokenizer) -> BlipTextConfig:
    """The BLIP "med" BERT configuration of the text towers.

    Read from the JSON file at `config["med_config"]`, with the optional
    `config["text_config"]` dict (med_config.json key names, plus `label_smoothing`)
    merged over it; cross-attention reads video tokens of width `config["vision_width"]`.
    """
    config = with_defaults(config, {**TEXT_SETTINGS,
                                    "vision_width": VIDEO_ENCODER_SETTINGS["vision_width"]})
    med = {**MED_DEFAULTS, **_read_med_config(config["med_config"])}
    med.update(config["text_config"] or {})
    if len(tokenizer) > med["vocab_size"]:
        raise ValueError(f"text vocab_size {med['vocab_size']} is smaller than the tokenizer "
                         f"({len(tokenizer)} tokens)")
    return BlipTextConfig(
        **{key: med[key] for key in MED_CONFIG_KEYS},
        encoder_hidden_size=config["vision_width"],
        is_decoder=True,  # gives every layer its cross-attention, as the "med" towers have
        label_smoothing=med["label_smoothing"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
    )


@TEXT_SETTINGS.check
def med_config_problem(config: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """Why the med_config file cannot build the text towers (missing, not a JSON object,
    a value of the wrong type or range), as ("med_config", problem), or None."""
    try:
        med = _read_med_config(config["med_config"])
    except (FileNotFoundError, ValueError) as err:
        return "med_config", str(err)
    problems = [value_problem(name, value, TEXT_CONFIG_SETTINGS[name])
                for name, value in med.items() if name in TEXT_CONFIG_SETTINGS]
    problems = [problem for problem in problems if problem]
    if problems:
        return "med_config", f"med_config {config['med_config']}: {problems[0]}"
    return None


def _read_med_config(path: str) -> dict:
    """The med_config JSON object; a relative path is tried from the working directory,
    then from the repository root. FileNotFoundError or ValueError in one line naming the
    file."""
    candidates = [Path(path)] if Path(path).is_absolute() else [Path(path), REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return load_json_object(candidate, f"med_config {candidate}")
    raise FileNotFoundError(f"med_config {path!r} not found (looked at "
                            f"{', '.join(str(c) for c in candidates)})")


class KeyMaskedCrossAttention(BlipTextSelfAttention):
    """BLIP text cross-attention that applies the padding mask of its keys (the encoder states).

    From transformers 4.54 on, `BlipTextLayer` hands the encoder mask to its
    `BlipTextAttention` as `attention_mask`, which passes it on as `attention_mask`, while
    `BlipTextSelfAttention` in cross-attention mode reads only `encoder_attention_mask`:
    the mask is dropped and padded keys (e.g. a short question's padding in a batch of
    longer ones) get attention. This module takes the mask under either name.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs):
        return super().forward(hidden_states, attention_mask=attention_mask,
                               encoder_attention_mask=attention_mask, **kwargs)


# transformers < 4.54 routes the encoder mask through `BlipTextAttention` itself
CROSS_ATTENTION_DROPS_KEY_MASK = \
    "encoder_attention_mask" not in inspect.signature(BlipTextAttention.forward).parameters


def mask_cross_attention_keys(tower: BlipTextModel) -> None:
    """Give every layer of `tower` a cross-attention that masks padded keys (see
    `KeyMaskedCrossAttention`), holding the same parameters under the same names; nothing
    to do where transformers applies the mask itself."""
    if not CROSS_ATTENTION_DROPS_KEY_MASK:
        return
    for layer in tower.encoder.layer:
        stock = layer.crossattention.self
        masked = KeyMaskedCrossAttention(tower.config, is_cross_attention=True,
                                         layer_idx=stock.layer_idx)
        masked.load_state_dict(stock.state_dict(), assign=True)
        layer.crossattention.self = masked


def build_text_encoder(text_config: BlipTextConfig, bert_init: Optional[str] = None
                       ) -> BlipTextModel:
    """BERT encoder with cross-attention and no pooler (keys `embeddings.*`, `encoder.layer.*`),
    its BERT weights read from `bert_init` when given (see `init_from_bert`)."""
    encoder = BlipTextModel(text_config, add_pooling_layer=False)
    mask_cross_attention_keys(encoder)
    if bert_init:
        logger.info(init_from_bert(encoder, bert_init))
    return encoder


def build_text_decoder(text_config: BlipTextConfig, bert_init: Optional[str] = None
                       ) -> BlipTextLMHeadModel:
    """Causal BERT decoder with the LM head tied to its word embeddings (`bert.*`, `cls.*`),
    its BERT weights read from `bert_init` when given (see `init_from_bert`)."""
    decoder = BlipTextLMHeadModel(text_config)
    mask_cross_attention_keys(decoder.bert)
    if bert_init:
        logger.info(init_from_bert(decoder.bert, bert_init))
    return decoder


def tie_decoder_to_encoder(encoder: BlipTextModel, decoder: BlipTextLMHeadModel) -> None:
    """Make the decoder use the encoder's modules everywhere except self-attention, as
    BLIP pre-training does; the LM head stays tied to the (now shared) word embeddings."""
    decoder.bert.embeddings = encoder.embeddings
    for encoder_layer, decoder_layer in zip(encoder.encoder.layer, decoder.bert.encoder.layer):
        decoder_layer.crossattention = encoder_layer.crossattention
        decoder_layer.intermediate = encoder_layer.intermediate
        decoder_layer.output = encoder_layer.output
    decoder.cls.predictions.decoder.weight = encoder.embeddings.word_embeddings.weight


def encode_text_only(encoder: BlipTextModel, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
    """Text mode (no cross-attention): `[B, S]` -> hidden states `[B, S, W]`."""
    return encoder(input_ids, attention_mask=attention_mask).last_hidden_state


def encode_grounded(encoder: BlipTextModel, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, video_embeds: torch.Tensor,
                    video_mask: Optional[torch.Tensor] = None,
                    selection: Optional[TokenSelection] = None) -> torch.Tensor:
    """Video-grounded mode: every layer cross-attends to the video tokens `[B, N, D]`
    (those of `video_mask [B, N]` only, if given); `[B, S]` -> hidden states `[B, S, W]`.
    One video for all B texts: `video_embeds [1, N, D]` and `video_mask [1, N]`, which
    goes through `encode_grounded_one_video`. With a `selection`, each text attends to
    the k tokens it selects (models/text_guided.py). Callers put `[ENC]` first."""
    if selection is not None:
        selection.check_tokens(video_embeds.shape[1], video_mask)
    if len(video_embeds) == 1 < len(input_ids):
        return encode_grounded_one_video(encoder, input_ids, attention_mask, video_embeds,
                                         video_mask, selection)
    if selection is not None:
        video_embeds = select_tokens(selection, encoder, input_ids, attention_mask, video_embeds)
    return encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=video_embeds,
                   encoder_attention_mask=video_mask).last_hidden_state


def encode_grounded_one_video(encoder: BlipTextModel, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor, video_embeds: torch.Tensor,
                              video_mask: Optional[torch.Tensor] = None,
                              selection: Optional[TokenSelection] = None) -> torch.Tensor:
    """`encode_grounded` of K texts `[K, S]` against one video `[1, N, D]` (mask `[1, N]`),
    layer by layer with the tower's own modules: self-attention as `BlipTextLayer` runs
    it, then cross-attention with the video projected to keys and values once and the K
    texts folded into the query rows, so that each attention product is one `[K*S, N]`
    matrix product per head instead of K small ones over broadcast keys; then the
    layer's feed-forward. The same numbers as `encoder(...)` with the video copied K times.
    With a `selection`, the tokens are chosen per text at the first layer and each
    layer's projected keys and values are merged per text (`merge_per_text`), which
    equals projecting each text's merged tokens; the attention is then one `[S, k]`
    product per text and head."""
    num_texts, num_words = input_ids.shape
    heads = encoder.config.num_attention_heads

    def split_heads(states: torch.Tensor) -> torch.Tensor:  # [1, L, W] -> [1, H, L, W / H]
        return states.unflatten(-1, (heads, -1)).transpose(1, 2)

    # additive padding mask of the texts' self-attention, as BlipTextModel builds it
    text_bias = ((1.0 - attention_mask[:, None, None, :].to(encoder.dtype))
                 * torch.finfo(encoder.dtype).min)  # [K, 1, 1, S]
    hidden = encoder.embeddings(input_ids=input_ids)  # [K, S, W]
    merge = None
    for depth, layer in enumerate(encoder.encoder.layer):
        attended = layer.attention(hidden, attention_mask=text_bias)[0]  # [K, S, W]
        cross = layer.crossattention.self
        keys, values = cross.key(video_embeds), cross.value(video_embeds)  # [1, N, W]
        dropout = cross.dropout.p if cross.training else 0.0
        if selection is None:
            query = split_heads(cross.query(attended).reshape(1, num_texts * num_words, -1))
            bias = None if video_mask is None else live_key_bias(video_mask.bool(), query.dtype)
            context, _ = attend(query, split_heads(keys), split_heads(values),  # [1, H, K*S, d]
                                query.shape[-1] ** -0.5, bias, dropout_p=dropout)
        else:
            if depth == 0:
                relevance = relevance_of(selection, encoder, input_ids, attention_mask,
                                         video_embeds, attended, keys)  # [K or 1, N]
                merge = choose_tokens(selection, video_embeds, relevance, num_texts)
            keys, values = (merge_per_text(merge, t, num_texts) for t in (keys, values))
            query = split_heads(cross.query(attended))  # [K, H, S, d] over [K, H, k, d]
            context, _ = attend(query, split_heads(keys), split_heads(values),
                                query.shape[-1] ** -0.5, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(num_texts, num_words, -1)  # [K, S, W]
        hidden = layer.feed_forward_chunk(layer.crossattention.output(context, attended))
    return hidden
