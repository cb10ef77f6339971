"""Starting the BLIP text towers from a BERT checkpoint (`text_init`), as BLIP starts its
pre-training from bert-base-uncased: the first layers copied, cross-attention left fresh,
BERT's token-type embedding folded into the position embeddings."""
import os

import torch
from transformers.models.blip.modeling_blip_text import BlipTextModel


# BERT parameters with no counterpart in the BLIP towers
BERT_ONLY_PREFIXES = ("pooler.", "cls.", "embeddings.token_type_embeddings.",
                      "embeddings.position_ids")
BERT_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_bert_state_dict(path: str) -> dict:
    """A BERT state dict from a `.safetensors` / `.bin` / `.pth` file or a directory holding
    `model.safetensors` or `pytorch_model.bin` (a Hugging Face BERT folder), `bert.` prefix
    removed."""
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in BERT_WEIGHT_FILES
                 if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise FileNotFoundError(f"text_init {path}: no {' or '.join(BERT_WEIGHT_FILES)} inside")
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text_init {path}: no such file or directory")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("model", state) if isinstance(state, dict) else state
    except Exception as err:  # the loaders raise many kinds for damaged files
        raise ValueError(f"text_init {path}: not a readable BERT checkpoint "
                         f"({type(err).__name__})") from None
    if not isinstance(state, dict) or not any(k.endswith("word_embeddings.weight") for k in state):
        raise ValueError(f"text_init {path}: not a BERT checkpoint (no word_embeddings.weight)")
    return {key.removeprefix("bert."): value for key, value in state.items()}


@torch.no_grad()
def init_from_bert(tower: BlipTextModel, path: str) -> str:
    """Copy the weights of a pre-trained BERT (e.g. bert-base-uncased, as BLIP does before
    pre-training, or a smaller BERT for small models) into a BLIP text tower.

    Layers beyond the tower's depth are not used; cross-attention stays freshly
    initialised; the rows of `[DEC]` and `[ENC]` keep their initialisation. BERT adds its
    token-type-0 embedding to every token, which the BLIP towers lack, so it is folded
    into the position embeddings: the tower then computes what the BERT computed.
    Returns a one-line report.
    """
    bert = read_bert_state_dict(path)
    own = tower.state_dict()
    copied, unused = 0, 0
    for key, value in bert.items():
        if key.startswith(BERT_ONLY_PREFIXES):
            continue
        if key not in own:
            unused += 1
            continue
        target = own[key]
        if key == "embeddings.word_embeddings.weight" and value.shape[0] <= target.shape[0]:
            target = target[:value.shape[0]]
        if key == "embeddings.position_embeddings.weight" and \
                "embeddings.token_type_embeddings.weight" in bert:
            value = value + bert["embeddings.token_type_embeddings.weight"][0]
        if target.shape != value.shape:
            raise ValueError(f"text_init {path}: {key} has shape {tuple(value.shape)}, the text "
                             f"tower expects {tuple(target.shape)}; set text_config to the "
                             f"BERT's sizes")
        target.copy_(value)
        copied += 1
    if copied == 0:
        raise ValueError(f"text_init {path}: no parameter matches the text tower")
    return f"text_init {path}: {copied} tensors copied, {unused} unused (deeper layers)"
