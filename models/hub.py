"""Checkpoints by URL or hub id: downloaded once into a cache and reused offline.

    http(s)://host/path/file.pth    fetched as it is
    http(s)://host/path/folder/     an exported model (models/exported.py): its files
    hf://<owner>/<repo>[/...]        a Hugging Face hub repository's file or exported model,
                                     through huggingface_hub and its cache (models/hf.py)

URL downloads land in `$TESTA_CACHE` (default `~/.cache/testa`) under `<host>/<path>`. A file in
the cache is used without any request; a download goes to a temporary file in the same
folder, is checked against the announced length and only then renamed into place, so
the cache never holds a partial file.
"""
import http.client
import os
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from tqdm import tqdm

from models import hf
from models.exported import EXPORT_FILES

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
PARTIAL_SUFFIX = ".part"


class DownloadError(ValueError):
    """A checkpoint URL that cannot be fetched; the message names the URL."""


def is_remote(location: str) -> bool:
    return location.startswith(("http://", "https://", "hf://"))


def cache_dir() -> Path:
    return Path(os.environ.get("TESTA_CACHE") or Path.home() / ".cache" / "testa")


def cached_path(url: str) -> Path:
    """Where `url` is kept: `<cache>/<host>/<path>` (a query string is not part of it)."""
    split = urlsplit(url)
    parts = [part for part in split.path.split("/") if part not in ("", ".", "..")]
    if not parts:
        raise DownloadError(f"{url}: the URL names no file")
    return cache_dir().joinpath(split.netloc.replace(":", "_"), *parts)


def resolve(location: str) -> str:
    """A local path for `location`: itself when it is not a URL or hub id, else the
    cached download (fetched now when it is not in the cache yet): a file, or the folder
    of an exported model's files for a URL ending in `/`."""
    if location.startswith(hf.PREFIX):
        try:
            return hf.resolve(location)
        except hf.HubError as err:
            raise DownloadError(str(err)) from None
    if not is_remote(location):
        return location
    if location.endswith("/"):  # an exported model's folder
        local = [resolve(location + name) for name in EXPORT_FILES]
        return os.path.dirname(local[0])
    path = cached_path(location)
    if not path.is_file():
        download(location, path)
    return str(path)


def download(url: str, path: Path) -> None:
    """Fetch `url` into `path` atomically, with a progress bar; DownloadError naming the
    URL on any failure, leaving nothing in the cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_partial_downloads(path.parent)
    partial = path.parent / f".{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            expected = _content_length(response)
            received = _copy(response, partial, expected, path.name)
        if expected is not None and received != expected:
            raise DownloadError(f"{url}: download ended after {received} of {expected} bytes")
        os.replace(partial, path)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: download failed (HTTP {err.code} {err.reason})") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or repr(err)
        raise DownloadError(f"{url}: download failed ({reason}); not in the cache "
                            f"{path.parent} either") from None
    finally:
        partial.unlink(missing_ok=True)


def _content_length(response) -> Optional[int]:
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _copy(response, partial: Path, total: Optional[int], name: str) -> int:
    received = 0
    with open(partial, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                        unit_divisor=1024, desc=name, disable=None) as bar:
        while chunk := response.read(CHUNK_BYTES):
            f.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    return received


def remove_partial_downloads(directory: Path) -> None:
    """Delete the temporary files of killed downloads: those untouched for longer than
    the read timeout (a live download, of another process too, writes more often)."""
    for leftover in directory.glob(f".*{PARTIAL_SUFFIX}"):
        try:
            if time.time() - leftover.stat().st_mtime > TIMEOUT_S:
                leftover.unlink()
        except FileNotFoundError:  # another process removed or renamed it meanwhile
            pass
