"""Shared helpers for the scripts: configs."""
from pathlib import Path
from typing import Any, Dict

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError


def load_config(path) -> Dict[str, Any]:
    """Read a YAML config into a plain dict; a missing or malformed file raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        config = YAML(typ="safe").load(path.read_text())
    except YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a config must be a mapping of keys to values")
    return config
