"""The one rule for output folders, used by the scripts and the tools: check first
(nothing is created or changed), take the folder only once every other check has passed,
release it at the end. A tool that writes one file checks it the same way first
(`check_output_file`): an existing file is replaced only when told to.

Checking refuses a path that cannot be a writable folder, a folder holding results of an
earlier run (files matching `outputs`) unless the run continues it (`resume`) or
replaces them (`overwrite`), and a folder another live run has taken. Taking creates the
folder, writes the lock file `.testa.lock` (pid, host) exclusively, checks again under
the lock and only then deletes the earlier results (`overwrite`). A lock whose process
is gone (same host) is stale and replaced; one from another host is refused with its
path, to be removed by hand.
"""
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from utils import ConfigError

LOCK_FILE = ".testa.lock"
_held: List["OutputDir"] = []  # folders this process has taken, released by release_held


@dataclass
class OutputDir:
    """An output folder and what counts as an earlier run's results in it."""
    path: Path
    outputs: Sequence[str]  # glob patterns of results (a file or folder of an earlier run)
    resume: bool = False
    overwrite: bool = False
    flag: str = "--output_dir"  # how the user named it, for the messages
    hint: str = "pass --resume to continue it or --overwrite to replace it"
    taken: bool = field(default=False, init=False)

    def __post_init__(self):
        self.path = Path(self.path)

    def previous(self) -> List[str]:
        """The earlier results in the folder (names)."""
        if not self.path.is_dir():
            return []
        return sorted({p.name for pattern in self.outputs for p in self.path.glob(pattern)})

    def check(self) -> None:
        """ConfigError in one line for a folder this run cannot use; changes nothing."""
        where = f"{self.flag}: {self.path}"
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{where}: a file is in the way, not a folder")
        if self.path.is_dir():
            _check_writable(self.path, where)
            self._check_lock(where)
        else:
            ancestor = self.path.absolute().parent
            while not ancestor.exists():
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                raise ConfigError(f"{where}: cannot create the folder (Not a directory)")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise ConfigError(f"{where}: cannot create the folder (Permission denied "
                                  f"in {ancestor})")
        previous = self.previous()
        if previous and not self.resume and not self.overwrite:
            shown = ", ".join(previous[:3]) + (", ..." if len(previous) > 3 else "")
            raise ConfigError(f"{where}: holds a previous run ({shown}); {self.hint}")

    def take(self) -> None:
        """Create the folder, lock it, check again and (with `overwrite`) delete the
        earlier results. Call once every check of the run has passed."""
        if self.taken:
            return
        where = f"{self.flag}: {self.path}"
        self.check()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"{where}: cannot create the folder ({err.strerror})") from None
        self._lock(where)
        self.taken = True
        _held.append(self)
        try:
            self.check()  # another run may have finished in it meanwhile
        except ConfigError:
            self.release()
            raise
        if self.overwrite and not self.resume:
            for name in self.previous():
                path = self.path / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    def release(self) -> None:
        """Remove the lock (when this process holds it)."""
        if not self.taken:
            return
        self.taken = False
        if self in _held:
            _held.remove(self)
        lock = self.path / LOCK_FILE
        if _lock_owner(lock) == _me():
            lock.unlink(missing_ok=True)

    def _lock(self, where: str) -> None:
        lock = self.path / LOCK_FILE
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._check_lock(where)  # raises unless the lock is stale
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({**_me(), "started": time.time()}, f)
            return
        raise ConfigError(f"{where}: another run took the folder at the same time")

    def _check_lock(self, where: str) -> None:
        """ConfigError when another live run holds the folder; a stale lock passes."""
        lock = self.path / LOCK_FILE
        owner = _lock_owner(lock)
        if owner is None or owner == _me():
            return
        if owner.get("host") == socket.gethostname() and not _alive(owner.get("pid")):
            return
        raise ConfigError(f"{where}: in use by another run (pid {owner.get('pid')} on "
                          f"{owner.get('host')}, {lock}); if no run is using the folder, "
                          f"delete that file")


def check_output_file(path: Path, flag: str, overwrite: bool) -> None:
    """ConfigError in one line for a file a tool cannot write: a folder in the way, a file
    already there (unless `overwrite`), a folder that cannot be created or written, or one
    another live run has taken. Changes nothing."""
    path = Path(path)
    where = f"{flag}: {path}"
    if path.is_dir():
        raise ConfigError(f"{where}: a folder is in the way, not a file")
    if path.exists() and not overwrite:
        raise ConfigError(f"{where}: exists; pass --overwrite to replace it, or another {flag}")
    OutputDir(path.absolute().parent, (), flag=flag).check()


def release_held() -> None:
    """Release every folder this process has taken (at the end of a script)."""
    for output in list(_held):
        output.release()


@contextmanager
def taken(output: OutputDir) -> Iterator[OutputDir]:
    """Take `output` for the block (after its caller's checks), release it after."""
    output.take()
    try:
        yield output
    finally:
        output.release()


def _check_writable(path: Path, where: str) -> None:
    try:
        probe, probe_path = tempfile.mkstemp(dir=path, prefix=".write_test_")
        os.close(probe)
        os.remove(probe_path)
    except OSError as err:
        raise ConfigError(f"{where}: cannot write there ({err.strerror})") from None


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _lock_owner(lock: Path) -> Optional[dict]:
    """The pid and host in `lock`; None without a lock. A lock that cannot be read (being
    written, damaged) counts as one of an unknown live run on this host."""
    try:
        owner = json.loads(lock.read_text())
        return {"pid": int(owner["pid"]), "host": str(owner["host"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return {"pid": "unknown", "host": socket.gethostname()}


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return True  # unknown: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True
