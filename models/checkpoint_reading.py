"""Reading checkpoint files: weights-only (no code from the file runs unless trusted), by
path, URL or hf:// id (see `models.hub`), with a one-line `CheckpointError` naming the
file for anything that cannot be read."""
import argparse
import os
import pickle
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch

from models import hub


class CheckpointError(ValueError):
    """A file that cannot be loaded into the model; the message names the file."""


def _safe_globals() -> List[Any]:
    """The non-tensor objects a checkpoint may hold besides containers, strings and
    numbers: argparse.Namespace (scripts that save their `args`) and numpy scalars,
    dtypes and arrays (metrics, configs), under numpy 1's and numpy 2's module names."""
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [argparse.Namespace, np.dtype, np.ndarray, *dtypes,
            *[(getattr(multiarray, name), f"{module}.multiarray.{name}")
              for name in ("scalar", "_reconstruct") for module in ("numpy.core", "numpy._core")]]


SAFE_GLOBALS = _safe_globals()
TRUST_HINT = ("pass --trust_checkpoint (config key trust_checkpoint: true) only if you trust "
              "where the file comes from")


def local_file(location: str) -> str:
    """`location` itself, or for a URL or hf:// id its copy in the download cache."""
    try:
        return hub.resolve(location)
    except hub.DownloadError as err:
        raise CheckpointError(str(err)) from None


def read_checkpoint(location: str, *, trust: bool = False) -> Tuple[Dict[str, Any], List[str]]:
    """The checkpoint dict at `location` (a path, URL or hf:// id) and notes on how it
    was read.

    Read with `torch.load(weights_only=True)`, which builds tensors, containers, numbers
    and the `SAFE_GLOBALS` only; nothing in the file can run code. A file holding other
    Python objects is unpickled in full (which can run code) only with `trust`.
    """
    path = local_file(location)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    notes = []
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint "
                                  f"({_first_line(err)})") from None
        unsafe = _unsafe_globals(path)
        if not trust:
            if unsafe:
                raise CheckpointError(f"{path}: holds Python objects outside the safe list "
                                      f"({unsafe}), and unpickling them can run code from the "
                                      f"file; {TRUST_HINT}") from None
            raise CheckpointError(f"{path}: not a PyTorch checkpoint that loads safely "
                                  f"({_weights_only_reason(err)}); {TRUST_HINT}") from None
        checkpoint = _load_full_pickle(path)
        notes.append(f"unpickled in full, trusted ({unsafe or 'legacy pickle'})")
    except Exception as err:  # torch.load raises many kinds for damaged files
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or truncated "
                              f"({type(err).__name__}: {_first_line(err)})") from None
    _check_layout(path, checkpoint)
    return checkpoint, notes


def _unsafe_globals(path: str) -> str:
    """The file's globals that are not on the safe list, read without running them
    ("" when there are none or the file cannot be scanned)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint, or damaged: torch.load has said enough
        return ""


def _weights_only_reason(err: Exception) -> str:
    """The line of torch's weights-only error that says what it could not read."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            reason = line[len("WeightsUnpickler error:"):].strip()
            return (reason or (lines[index + 1] if index + 1 < len(lines) else ""))[:200]
    return _first_line(err)


def _load_full_pickle(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or truncated "
                              f"({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    return str(err).strip().split("\n")[0][:200]


def _check_layout(path: str, checkpoint: Any) -> None:
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("model"), Mapping):
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict, found "
                              f"{_describe(checkpoint)}")
    for key, value in checkpoint["model"].items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: model entry {key!r} is {type(value).__name__}, "
                                  f"not a tensor")


def _describe(checkpoint: Any) -> str:
    if isinstance(checkpoint, Mapping):
        return f"a dict with keys {sorted(map(str, checkpoint))[:8]}"
    return type(checkpoint).__name__
