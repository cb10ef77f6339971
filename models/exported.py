"""Exported models: a folder that holds a checkpoint without any pickle.

    model.safetensors   the state dict (safetensors: tensors and a JSON header only), with
                        the task and epoch in the header's metadata
    config.yaml         the config the weights were trained with
    README.md           a short model card

`read_export` gives the same dict as a checkpoint file (`{"model", "config", "task",
"epoch"}`), so everything that reads checkpoints reads an export; nothing in it is
unpickled. `tools/export.py` writes one from a .pth checkpoint.
"""
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
MODEL_CARD = "README.md"
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE)  # what reading needs (the card is for people)


class ExportError(ValueError):
    """An export folder that cannot be read; the message names the file."""


def is_export(path: str) -> bool:
    """A folder holding model.safetensors, or a .safetensors file (its config next to it)."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, WEIGHTS_FILE))) \
        or (os.path.isfile(path) and path.endswith(".safetensors"))


def read_export(path: str) -> Dict[str, Any]:
    """`{"model": state dict, "config", "task", "epoch"}` of the export at `path` (its
    folder or its .safetensors file), read without unpickling anything."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    weights = os.path.join(path, WEIGHTS_FILE) if os.path.isdir(path) else path
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{weights}: not a readable safetensors file "
                          f"({str(err).splitlines()[0][:200]})") from None
    config_path = os.path.join(folder, CONFIG_FILE)
    config = None
    if os.path.isfile(config_path):
        try:
            config = YAML(typ="safe").load(Path(config_path).read_text())
        except YAMLError as err:
            raise ExportError(f"{config_path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(config, dict):
            raise ExportError(f"{config_path}: a config must be a mapping of keys to values")
    epoch = metadata.get("epoch")
    return {"model": state_dict, "config": config, "task": metadata.get("task") or None,
            "epoch": int(epoch) if epoch and epoch.lstrip("-").isdigit() else None}


def write_export(folder: Path, checkpoint: Mapping[str, Any], card: str) -> None:
    """Write `checkpoint` (a dict with "model" and optionally "config", "task", "epoch")
    as an export into `folder`, with `card` as its README.md. Tensors that share memory
    (tied weights) are stored as copies; loading ties them again."""
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().contiguous().clone()
                  for key, value in checkpoint["model"].items()}
    metadata = {"format": "pt"}
    for key in ("task", "epoch"):
        if checkpoint.get(key) is not None:
            metadata[key] = str(checkpoint[key])
    save_file(state_dict, str(folder / WEIGHTS_FILE), metadata=metadata)
    if checkpoint.get("config") is not None:
        yaml = YAML(typ="safe")
        yaml.default_flow_style = None
        with open(folder / CONFIG_FILE, "w") as f:
            yaml.dump(dict(checkpoint["config"]), f)
    (folder / MODEL_CARD).write_text(card)


def model_card(name: str, checkpoint: Mapping[str, Any],
               metrics: Optional[Mapping[str, float]] = None) -> str:
    """A short README.md: what the model is, its main settings, how to load it, and the
    test metrics of the run that saved it when given."""
    config = checkpoint.get("config") or {}
    num_params = sum(value.numel() for value in checkpoint["model"].values()
                     if isinstance(value, torch.Tensor))
    lines = [f"# {name}", "",
             f"A TESTA model ({checkpoint.get('task') or 'task not recorded'}), "
             f"{num_params / 1e6:.1f}M tensors' values, epoch {checkpoint.get('epoch')}.", ""]
    settings = [f"- {key}: {config[key]}" for key in ("dataset", "image_size", "num_frames",
                                                     "num_frm_test", "vision_width", "depth",
                                                     "testa_r", "merging_type") if key in config]
    if settings:
        lines += ["Settings (config.yaml holds them all):", "", *settings, ""]
    if metrics:
        lines += ["Test metrics of the run that saved it:", "",
                  *[f"- {key}: {value:.2f}" for key, value in metrics.items()], ""]
    lines += ["Files: model.safetensors (weights, no pickle), config.yaml (its config).", "",
              "```python", "import testa", f'model = testa.load("{name}")  # this folder, a URL '
              "to it ending in /, or hf://<owner>/<repo>", "```", ""]
    return "\n".join(lines)
