"""Checkpoints written atomically: the caller builds the dict (`model_checkpoint`), and
`save_checkpoint` writes it to a temporary file in the same folder, synced, then renamed
over the target, so a killed run never leaves a half-written checkpoint under its name."""
import os
import re
import secrets
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from engine.signals import SignalCatcher, signals_raise
from models.checkpoint_reading import CheckpointError

TEMPORARY = re.compile(r"^\..+\.pth\.\w+\.tmp$")  # `.checkpoint_last.pth.<random>.tmp`


def model_checkpoint(model: nn.Module, config: Mapping, epoch: int, *, task: Optional[str] = None,
                     optimizer: Optional[torch.optim.Optimizer] = None,
                     **extra: Any) -> Dict[str, Any]:
    """`{"model", "config", "epoch", "task", "optimizer", **extra}` of `model` (unwrapped
    from DistributedDataParallel); `task` names the registered task that trained it (see
    tasks/__init__.py), which `testa.load` reads. The config is stored as plain containers,
    so the file loads with `weights_only=True`."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {"model": model.state_dict(), "config": _plain(config), "epoch": epoch, "task": task,
            "optimizer": None if optimizer is None else optimizer.state_dict(), **extra}


def save_checkpoint(path: str, checkpoint: Mapping[str, Any]) -> None:
    """Write `checkpoint` to `path` atomically: a temporary file in the same folder,
    synced, then renamed over `path`.

    The file's permissions follow the umask like every other output. The temporary
    file is removed when writing fails or SIGINT/SIGTERM arrive meanwhile; a failed
    write raises CheckpointError naming the file and the reason ("no space left on
    device while writing ...").
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    with signals_raise() as signals:
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


def _write(path: str, checkpoint: Mapping[str, Any], signals: SignalCatcher) -> None:
    # mode 0o666 less the umask, as open() gives every other output
    writer = _FileWriter(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), signals)
    try:
        torch.save(checkpoint, writer)
    except RuntimeError:
        # torch.save turns whatever a write raised into an opaque RuntimeError: raise the
        # original (an OSError, or the exception of a signal)
        if writer.error is not None:
            raise writer.error from None
        raise
    finally:
        writer.close()


class _FileWriter:
    """The file torch.save writes to; keeps what a failed write raised, which torch.save
    itself replaces by a RuntimeError that does not say what happened. Each write first
    raises for a signal that came meanwhile (see `SignalCatcher`)."""

    def __init__(self, fd: int, signals: SignalCatcher):
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
    subclasses)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for scalar_type in (bool, int, float, str):
        if isinstance(value, scalar_type):
            return scalar_type(value)
    return value
