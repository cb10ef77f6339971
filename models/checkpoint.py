"""Load BLIP and TESTA checkpoints into the models, and save checkpoints atomically.

Files are read weights-only (no code from the file runs) and may be named by URL or
hf:// id (see `models.hub`). Loading rules (docs/computation.md, section 7): a DDP
`module.` prefix removed, queues dropped, spatial attention copied to temporal attention
where the file has none (BLIP image checkpoints), `pos_embed` and `time_embed` resized to the model, non-strict load,
momentum towers missing from the file copied from their main towers, `position_ids`
ignored. A file that fills too little of the model or holds non-finite weights is refused
before the model changes. Every step is recorded in a `LoadReport`, which also says
which missing and unexpected keys are expected for the model's task and why.
"""
import argparse
import os
import pickle
import re
import secrets
import signal
import threading
from contextlib import contextmanager
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from models import hub
from models.resize import grid_side, resize_along_time, resize_patch_grid
from models.video_encoder import VideoEncoder

# missing keys that image (BLIP) checkpoints cannot provide: new layers keep their init
EXPECTED_MISSING = re.compile(r"\.(temporal_fc\.(weight|bias)|temporal_scaling|time_embed)$")
SPATIAL_TO_TEMPORAL = {"attn": "temporal_attn", "norm1": "temporal_norm1"}
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(attn|norm1)\.(.+)$")
TEMPORAL_SCALING = re.compile(r"\.temporal_scaling$")
DDP_PREFIX = "module."
MODEL_KINDS = {"RetrievalModel": "retrieval", "VideoQAModel": "VideoQA",
               "PretrainModel": "pre-training"}
PART_NAMES = {"visual_encoder": "video-encoder", "text_encoder": "text-encoder",
              "text_decoder": "text-decoder"}
# what the parts a model may lack are for, to say why the file's copy goes unused
PART_ROLES = {"text_decoder": "captioning/answer decoder",
              "temporal_scaling": "learned per-frame scaling of pre-training; this config has "
                                  "learnable_temporal_scaling off",
              "itm_head": "video-text matching head",
              "vision_proj": "contrastive projection", "text_proj": "contrastive projection",
              "temp": "contrastive temperature"}


class CheckpointError(ValueError):
    """A file that cannot be loaded into the model; the message names the file."""


@dataclass
class LoadReport:
    """What `load_checkpoint` did.

    loaded: tensors copied from the file into the model; missing / unexpected: model
    keys the file did not fill / file keys the model has no place for; temporal_copied:
    temporal keys made from spatial ones; interpolated: `"key old->new"` resizes;
    dropped: queue entries left out; momentum_copied: momentum keys filled from their
    main towers; ignored: `position_ids` buffers; notes: anything else worth knowing;
    model_kind / model_parts: the task of the model and its top-level modules, which
    tell unexpected keys of parts this model does not have (expected, unused) from others.
    """
    path: str
    loaded: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    temporal_copied: List[str] = field(default_factory=list)
    interpolated: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    momentum_copied: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    model_kind: str = "model"
    model_parts: List[str] = field(default_factory=list)
    ddp_prefix_removed: int = 0

    @property
    def expected_missing(self) -> List[str]:
        return [key for key in self.missing if EXPECTED_MISSING.search(key)]

    @property
    def other_missing(self) -> List[str]:
        return [key for key in self.missing if not EXPECTED_MISSING.search(key)]

    def _unused_as(self, key: str) -> Optional[str]:
        """What an unexpected key is, when it is expected to go unused: a part this model
        does not have, or a temporal_scaling this model's config turned off."""
        if _part(key) not in self.model_parts:
            return _part(key)
        return "temporal_scaling" if TEMPORAL_SCALING.search(key) else None

    @property
    def unused_parts(self) -> Dict[str, int]:
        """Parts of the file's model that this model does not use -> their tensor count."""
        return dict(Counter(filter(None, map(self._unused_as, self.unexpected))))

    @property
    def other_unexpected(self) -> List[str]:
        return [key for key in self.unexpected if self._unused_as(key) is None]

    def needs_attention(self) -> bool:
        """Keys missing or unexpected for no known reason."""
        return bool(self.other_missing or self.other_unexpected)

    def summary(self) -> str:
        """One line, e.g. `loaded ckpt.pth: 512 tensors, 0 missing, 71 unexpected (71
        expected: text_decoder unused by retrieval), 4 queues dropped`."""
        missing = f"{len(self.missing)} missing"
        if self.expected_missing:
            missing += f" ({len(self.expected_missing)} expected)"
        unexpected = f"{len(self.unexpected)} unexpected"
        if self.unused_parts:
            names = [part for part in self.unused_parts if not part.endswith("_m")]
            if len(names) < len(self.unused_parts):
                names.append("momentum towers")
            unexpected += (f" ({sum(self.unused_parts.values())} expected: "
                           f"{', '.join(names)} unused by {self.model_kind})")
        parts = [f"{self.loaded} tensors", missing, unexpected]
        if self.ddp_prefix_removed:
            parts.append(f"{DDP_PREFIX!r} prefix removed")
        if self.temporal_copied:
            parts.append(f"{len(self.temporal_copied)} temporal copied")
        resizes = dict.fromkeys(entry.split(".")[-1] for entry in self.interpolated)
        parts += [f"{resize} interpolated" for resize in resizes]
        if self.dropped:
            parts.append(f"{len(self.dropped)} queues dropped")
        if self.momentum_copied:
            parts.append(f"{len(self.momentum_copied)} momentum copied")
        return f"loaded {os.path.basename(self.path)}: " + ", ".join(parts)

    def __str__(self) -> str:
        lines = [self.summary(), f"  file: {self.path}"]
        sections = [
            ("missing, not in the file (left at their initial values)", self.other_missing),
            ("missing, expected: video-only parts an image checkpoint lacks (temporal_fc "
             "starts at its initial values, time_embed too)", self.expected_missing),
            ("unexpected, in the file but not in the model (not used)", self.other_unexpected),
            ("temporal attention initialised from spatial attention (the image checkpoint "
             "has none)", self.temporal_copied),
            ("interpolated to the model's frames or patch grid", self.interpolated),
            ("queues dropped (the model starts its own; sizes differ between configs)",
             self.dropped),
            ("momentum towers copied from their main towers", self.momentum_copied),
            ("ignored (position_ids buffers of older transformers)", self.ignored),
        ]
        for title, keys in sections:
            if keys:
                lines.append(f"  {title}:")
                lines += [f"    {entry}" for entry in _group_keys(keys)]
        if self.unused_parts:
            lines.append(f"  unexpected, expected: parts a {self.model_kind} model does not use:")
            lines += [f"    {part} ({count} tensor{'s' * (count != 1)}): {_role(part)}"
                      for part, count in self.unused_parts.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _role(part: str) -> str:
    if part.endswith("_m"):
        return f"momentum copy of {part[:-2]} (used only in training with distillation)"
    return PART_ROLES.get(part, "part of another task's model")


def _group_keys(keys: List[str], max_lines_per_module: int = 8) -> List[str]:
    """Readable lines for many keys: numbered layers collapsed (`a.blocks.*.b (x12)`),
    and a top-level module with more than `max_lines_per_module` lines as one line."""
    by_module: Dict[str, Counter] = {}
    for key in keys:
        module = key.split(".")[0]
        by_module.setdefault(module, Counter())[re.sub(r"\.\d+\.", ".*.", key)] += 1
    lines = []
    for module, names in by_module.items():
        if len(names) > max_lines_per_module:
            lines.append(f"{module}.* ({sum(names.values())} tensors)")
        else:
            lines += [name if count == 1 else f"{name} (x{count})" for name, count in names.items()]
    return lines


# reading -----------------------------------------------------------------------------
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


# converting --------------------------------------------------------------------------
def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                       report: LoadReport) -> Dict[str, torch.Tensor]:
    """Apply the loading rules to a file's state dict for `model`, recording each step."""
    model_state = model.state_dict()
    converted = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            report.ignored.append(key)
        elif "queue" in key:
            report.dropped.append(key)
        else:
            converted[key] = value
    for prefix, encoder in _video_encoders(model):
        _copy_spatial_to_temporal(converted, prefix, encoder, report)
        _resize(converted, prefix + "pos_embed", model_state, _resize_pos_embed, report)
        _resize(converted, prefix + "time_embed", model_state, _resize_along_time, report)
        for index in range(len(encoder.blocks)):
            _resize(converted, f"{prefix}blocks.{index}.temporal_scaling", model_state,
                    _resize_along_time, report)
    return converted


def _video_encoders(model: nn.Module) -> List[Tuple[str, VideoEncoder]]:
    """(`"visual_encoder."`-style key prefix, module) of every video encoder in the model."""
    return [(name + ".", module) for name, module in model.named_modules()
            if isinstance(module, VideoEncoder) and name]


def _copy_spatial_to_temporal(state_dict: Dict[str, torch.Tensor], prefix: str,
                              encoder: VideoEncoder, report: LoadReport) -> None:
    """`blocks.i.attn.*` -> `blocks.i.temporal_attn.*`, `blocks.i.norm1.*` ->
    `blocks.i.temporal_norm1.*`, where the file lacks the temporal key and the model has it."""
    encoder_keys = set(encoder.state_dict())
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = BLOCK_KEY.match(key[len(prefix):])
        if match is None:
            continue
        block, spatial, name = match.groups()
        temporal = f"blocks.{block}.{SPATIAL_TO_TEMPORAL[spatial]}.{name}"
        if temporal in encoder_keys and prefix + temporal not in state_dict:
            state_dict[prefix + temporal] = state_dict[key]
            report.temporal_copied.append(prefix + temporal)


def _resize(state_dict: Dict[str, torch.Tensor], key: str, model_state: Mapping[str, torch.Tensor],
            resize: Callable[..., torch.Tensor], report: LoadReport) -> None:
    """Replace `state_dict[key]` by `resize(old, model shape, key, path)` when shapes differ."""
    if key not in state_dict or key not in model_state:
        return
    old, target = state_dict[key], model_state[key]
    if old.shape == target.shape:
        return
    state_dict[key] = resize(old, target.shape, key, report.path)
    report.interpolated.append(f"{key} {old.shape[1]}->{target.shape[1]}")


def _resize_pos_embed(pos_embed: torch.Tensor, shape: torch.Size, key: str,
                      path: str) -> torch.Tensor:
    """`[1, 1+L0, D]` -> `[1, 1+L, D]`: the square patch grid resized bicubically (as
    BLIP does), the class slot kept."""
    old_side, new_side = grid_side(pos_embed.shape[1] - 1), grid_side(shape[1] - 1)
    if old_side is None or new_side is None or pos_embed.shape[2] != shape[2]:
        raise CheckpointError(f"{path}: {key} has shape {tuple(pos_embed.shape)}, which cannot "
                              f"be resized to the model's {tuple(shape)}")
    return resize_patch_grid(pos_embed, (new_side, new_side), mode="bicubic")


def _resize_along_time(embed: torch.Tensor, shape: torch.Size, key: str,
                       path: str) -> torch.Tensor:
    """`[1, T0, C]` -> `[1, T, C]` by nearest interpolation along time."""
    if embed.dim() != 3 or embed.shape[0] != 1 or embed.shape[2] != shape[2]:
        raise CheckpointError(f"{path}: {key} has shape {tuple(embed.shape)}, which cannot "
                              f"be resized to the model's {tuple(shape)}")
    return resize_along_time(embed, shape[1])


def _check_shapes(path: str, state_dict: Mapping[str, torch.Tensor],
                  model_state: Mapping[str, torch.Tensor]) -> None:
    for key, value in state_dict.items():
        if key in model_state and value.shape != model_state[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)} in the file but "
                                  f"{tuple(model_state[key].shape)} in the model")


# loading -----------------------------------------------------------------------------
def load_checkpoint(model: nn.Module, location: str, *, trust: bool = False) -> LoadReport:
    """Load a BLIP or TESTA checkpoint (path, URL or hf:// id) into `model` (non-strict)
    and report what happened. Bad files, files that fill too little of the model and
    non-finite weights raise `CheckpointError` before the model is changed."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    path = local_file(location)
    checkpoint, notes = read_checkpoint(path, trust=trust)
    if path != location:
        notes.insert(0, f"downloaded from {location}")
    report = LoadReport(path=path, notes=notes,
                        model_kind=MODEL_KINDS.get(type(model).__name__, type(model).__name__))
    state_dict = _strip_ddp_prefix(checkpoint["model"], report)
    state_dict = convert_state_dict(state_dict, model, report)
    model_state = model.state_dict()
    _check_shapes(path, state_dict, model_state)
    _check_coverage(path, state_dict, model_state)
    _check_finite(path, state_dict, model_state)

    result = model.load_state_dict(state_dict, strict=False)
    report.loaded = sum(key in model_state for key in state_dict)
    report.unexpected = list(result.unexpected_keys)
    report.model_parts = sorted({_part(key) for key in model_state})
    missing = [key for key in result.missing_keys if "queue" not in key]
    report.momentum_copied = _copy_missing_momentum(model, missing)
    report.missing = [key for key in missing if key not in set(report.momentum_copied)]
    return report


def _strip_ddp_prefix(state_dict: Mapping[str, torch.Tensor],
                      report: LoadReport) -> Dict[str, torch.Tensor]:
    """Keys saved from a DistributedDataParallel wrapper (`module.visual_encoder...`)
    without their `module.` prefix, noted in the report."""
    stripped = {key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key: value
                for key, value in state_dict.items()}
    report.ddp_prefix_removed = sum(key.startswith(DDP_PREFIX) for key in state_dict)
    if report.ddp_prefix_removed:
        report.notes.append(f"removed the {DDP_PREFIX!r} prefix of {report.ddp_prefix_removed} "
                            f"keys (saved from a DistributedDataParallel wrapper)")
    return stripped


def _part(key: str) -> str:
    return key.split(".")[0]


def _check_coverage(path: str, state_dict: Mapping[str, torch.Tensor],
                    model_state: Mapping[str, torch.Tensor]) -> None:
    """Every part of the model (video encoder, text encoder, heads; momentum copies and
    queues aside) must get at least half of its tensors from the file (an image
    checkpoint fills all but the few new video layers); otherwise the file is for
    another model or has renamed keys."""
    needed: Dict[str, List[str]] = {}
    for key in model_state:
        part = _part(key)
        if not (part.endswith("_m") or "queue" in key or key.endswith("position_ids")):
            needed.setdefault(part, []).append(key)
    main_parts = list(PART_NAMES)  # the towers first, in this order, then the heads
    for part, keys in sorted(needed.items(), key=lambda item: (
            main_parts.index(item[0]) if item[0] in main_parts else len(main_parts))):
        matched = sum(key in state_dict for key in keys)
        if 2 * matched < len(keys):
            raise CheckpointError(
                f"{path}: fills too little of the model: {matched} of {len(keys)} "
                f"{PART_NAMES.get(part, part)} tensors matched (the file's keys look like "
                f"{_example_key(state_dict)!r}, the model's like {keys[0]!r})")


def _example_key(state_dict: Mapping[str, torch.Tensor]) -> str:
    return next(iter(state_dict), "<none>")


def _check_finite(path: str, state_dict: Mapping[str, torch.Tensor],
                  model_state: Mapping[str, torch.Tensor]) -> None:
    for key, value in state_dict.items():
        if key in model_state and value.is_floating_point():
            bad = value.numel() - int(torch.isfinite(value).sum())
            if bad:
                raise CheckpointError(f"{path}: {key} holds {bad} non-finite values (NaN or "
                                      f"inf) of {value.numel()}; the model would be broken")


@torch.no_grad()
def _copy_missing_momentum(model: nn.Module, missing: List[str]) -> List[str]:
    """Fill momentum keys (`<tower>_m.*`) the file lacked from their main towers."""
    model_state = model.state_dict()
    copied = []
    for key in missing:
        tower, _, rest = key.partition(".")
        main_key = f"{tower[:-2]}.{rest}"
        if tower.endswith("_m") and main_key in model_state:
            model_state[key].copy_(model_state[main_key])
            copied.append(key)
    return copied


# saving ------------------------------------------------------------------------------
TEMPORARY = re.compile(r"^\..+\.pth\.\w+\.tmp$")  # `.checkpoint_last.pth.<random>.tmp`


def save_checkpoint(path: str, model: nn.Module, config: Mapping, epoch: int,
                    optimizer: Optional[torch.optim.Optimizer] = None, **extra: Any) -> None:
    """Write `{"model", "config", "epoch", "optimizer", **extra}` to `path` atomically:
    a temporary file in the same folder, synced, then renamed over `path`.

    The file's permissions follow the umask like every other output. The temporary
    file is removed when writing fails or SIGINT/SIGTERM arrive meanwhile; a failed
    write raises CheckpointError naming the file and the reason ("no space left on
    device while writing ...").
    """
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    checkpoint = {"model": model.state_dict(), "config": _plain(config), "epoch": epoch,
                  "optimizer": None if optimizer is None else optimizer.state_dict(), **extra}
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    with _signals_raise() as signals:
        try:
            os.makedirs(directory, exist_ok=True)
            _write(tmp_path, checkpoint, signals)
            signals.check()  # nothing replaces `path` once a signal came
            os.replace(tmp_path, path)
        except OSError as err:
            raise CheckpointError(f"{_reason(err)} while writing {path}") from None
        finally:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)


def _write(path: str, checkpoint: Mapping[str, Any], signals: "_Signals") -> None:
    # mode 0o666 less the umask, as open() gives every other output
    writer = _FileWriter(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), signals)
    try:
        torch.save(checkpoint, writer)
    except RuntimeError:
        # torch.save turns whatever a write raised into an opaque RuntimeError: raise the
        # original (an OSError, or the SystemExit/KeyboardInterrupt of a signal)
        if writer.error is not None:
            raise writer.error from None
        raise
    finally:
        writer.close()


class _FileWriter:
    """The file torch.save writes to; keeps what a failed write raised, which torch.save
    itself replaces by a RuntimeError that does not say what happened. Each write first
    raises for a signal that came meanwhile (see `_Signals`)."""

    def __init__(self, fd: int, signals: "_Signals"):
        self.fd, self.signals, self.error = fd, signals, None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            self.signals.check()
            while view:
                view = view[os.write(self.fd, view):]
        except BaseException as err:  # also a signal's exception raised meanwhile
            self.error = err
            raise
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            if self.error is None:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)


def _reason(err: OSError) -> str:
    """`No space left on device` -> `no space left on device`."""
    text = err.strerror or str(err)
    return text[:1].lower() + text[1:]


class _Signals:
    """The SIGTERM/SIGINT that came during a save. The handler raises at once, but an
    exception raised while a finalizer runs (e.g. a `__del__` during garbage collection)
    is printed and dropped, so `check` raises it again where the save can act on it."""

    def __init__(self):
        self.signum: Optional[int] = None

    def handle(self, signum: int, frame) -> None:
        self.signum = signum
        self.check()

    def check(self) -> None:
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is not None:
            raise SystemExit(128 + self.signum)


@contextmanager
def _signals_raise():
    """During the block SIGTERM raises SystemExit(143) and SIGINT KeyboardInterrupt, so
    that cleanup code runs; yields the `_Signals` to check. Only for signals with their
    default handling and on the main thread, where Python handles signals; a handler set
    by the program stays."""
    signals = _Signals()
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    handled = ([signum for signum, default in defaults.items()
                if signal.getsignal(signum) is default]
               if threading.current_thread() is threading.main_thread() else [])
    for signum in handled:
        signal.signal(signum, signals.handle)
    try:
        yield signals
    finally:
        for signum in handled:
            signal.signal(signum, defaults[signum])


def remove_stale_temporaries(directory: str) -> List[str]:
    """Delete the temporary checkpoint files that killed runs left in `directory`; their
    names. Call it before this run saves anything there."""
    removed = []
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if TEMPORARY.match(name):
                os.unlink(os.path.join(directory, name))
                removed.append(name)
    return removed


def _plain(value: Any) -> Any:
    """Config as plain Python containers and scalars (YAML loaders return their own
    subclasses), so the saved file loads with `weights_only=True`."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for scalar_type in (bool, int, float, str):
        if isinstance(value, scalar_type):
            return scalar_type(value)
    return value
