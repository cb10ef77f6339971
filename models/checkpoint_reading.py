"""Reading checkpoints: .pth files weights-only (no code from the file runs unless
trusted) and exported folders (model.safetensors + config.yaml, models/exported.py) with
no unpickling at all, by path, URL or hf:// id (see `models.hub`), with a one-line
`CheckpointError` naming the file for anything that cannot be read."""
import argparse
import os
import pickle
import re
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch

from models import hub
from models.exported import WEIGHTS_FILE, ExportError, is_export, read_export


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
# how the scripts allow full unpickling; `testa.load` names its own (trust=True)
SCRIPT_TRUST_OPTION = "--trust_checkpoint (config key trust_checkpoint: true)"
# the first pickle of a legacy (non-zip) torch.save file: protocol 2, then the magic number
ZIP_HEADER = b"PK\x03\x04"  # torch.save's format
LEGACY_TORCH_HEADER = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# what a file that is not a checkpoint is, by its first bytes (offset, bytes, description)
FILE_SIGNATURES = ((4, b"ftyp", "an MP4/MOV video"), (0, b"\x1a\x45\xdf\xa3", "a Matroska/WebM video"),
                   (0, b"RIFF", "a RIFF file (AVI video or WAV audio)"), (0, b"\x1f\x8b", "a gzip file"),
                   (257, b"ustar", "a tar archive"), (0, b"\x89PNG", "a PNG image"),
                   (0, b"\xff\xd8\xff", "a JPEG image"), (0, b"{", "a JSON file"))


def local_file(location: str) -> str:
    """`location` itself, or for a URL or hf:// id its copy in the download cache."""
    try:
        return hub.resolve(location)
    except hub.DownloadError as err:
        raise CheckpointError(str(err)) from None


def read_checkpoint(location: str, *, trust: bool = False,
                    trust_option: str = SCRIPT_TRUST_OPTION) -> Tuple[Dict[str, Any], List[str]]:
    """The checkpoint dict at `location` (a path, URL or hf:// id) and notes on how it
    was read.

    An exported folder (or its .safetensors file) is read by safetensors and YAML. A
    file is read with `torch.load(weights_only=True)`, which builds tensors, containers, numbers
    and the `SAFE_GLOBALS` only; nothing in the file can run code (a zip-format file is
    memory-mapped: its tensors are read when used). A PyTorch checkpoint
    holding other Python objects is unpickled in full (which can run code) only with
    `trust`; the error without it names those objects and `trust_option`, how the caller
    allows it. A file that is no PyTorch checkpoint (a video, a plain pickle, random
    bytes) is said to be one, by its first bytes, before torch reads it.
    """
    path = local_file(location)
    if is_export(path):
        try:
            checkpoint = read_export(path)
        except ExportError as err:
            raise CheckpointError(str(err)) from None
        _check_layout(path, checkpoint)
        return checkpoint, ["read from model.safetensors (no unpickling)"]
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: a folder, not a checkpoint file nor an exported model "
                              f"(no {WEIGHTS_FILE} in it)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(512)
    what = not_a_torch_file(head)
    if what:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: {what}")
    trust_hint = f"pass {trust_option} only if you trust where the file comes from"
    notes = []
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = _load_weights_only(path, mapped=head.startswith(ZIP_HEADER))
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint "
                                  f"({_first_line(err)})") from None
        unsafe = _unsafe_globals(path) or _refused_global(err)
        if not trust:
            if unsafe:
                raise CheckpointError(f"{path}: holds Python objects outside the safe list "
                                      f"({unsafe}), and unpickling them can run code from the "
                                      f"file; {trust_hint}") from None
            raise CheckpointError(f"{path}: not a PyTorch checkpoint that loads safely "
                                  f"({_weights_only_reason(err)}); {trust_hint}") from None
        checkpoint = _load_full_pickle(path)
        notes.append(f"unpickled in full, trusted ({unsafe or 'legacy pickle'})")
    except Exception as err:  # torch.load raises many kinds for damaged files
        raise CheckpointError(f"{path}: not a PyTorch checkpoint, or truncated "
                              f"({type(err).__name__}: {_first_line(err)})") from None
    _check_layout(path, checkpoint)
    return checkpoint, notes


def _load_weights_only(path: str, mapped: bool) -> Any:
    """torch.load with weights_only. A zip archive (torch.save's format, `mapped`) is
    memory-mapped, not read: its tensors are read from the page cache when used, so reading
    a checkpoint for its config costs nothing and the ranks of a node share the pages of the
    weights they load. Where the file cannot be mapped it is read."""
    if mapped:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:  # refused by weights_only: the caller says why
            raise
        except Exception:  # e.g. a file system without mmap; a damaged file fails again below
            pass
    return torch.load(path, map_location="cpu", weights_only=True)


def not_a_torch_file(head: bytes) -> str:
    """What a file is when its first bytes `head` are neither a zip archive (torch.save's
    format) nor a legacy torch.save pickle ("" when they are one of those): said before
    torch reads a checkpoint or a video index."""
    if head.startswith(ZIP_HEADER) or head.startswith(LEGACY_TORCH_HEADER):
        return ""
    if not head:
        return "an empty file"
    if head[:1] == b"\x80":
        return "a plain Python pickle (torch.save writes a zip archive)"
    for offset, signature, description in FILE_SIGNATURES:
        if head[offset:offset + len(signature)] == signature:
            return description
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return (f"neither a zip archive (torch.save's format) nor a pickle; it starts with "
                f"bytes {head[:8].hex(' ')}")


def _refused_global(err: Exception) -> str:
    """The global a legacy (non-zip) file names that the weights-only unpickler refused."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
    return found.group(1) if found else ""


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
