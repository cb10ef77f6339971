"""Checkpoints by URL or hub id: downloaded once into a cache, verified on every use.

    http(s)://host/path/file.pth    fetched as it is
    http(s)://host/path/folder/     an exported model (models/exported.py): its files
    hf://<owner>/<repo>[/...]        a Hugging Face hub repository's file or exported model,
                                     through huggingface_hub and its cache (models/hf.py)

An entry of the cache (`$TESTA_CACHE`, default `~/.cache/testa`) is the folder
`<sha256 of the normalised URL>/` holding the file under its own name and `entry.json`
with the URL, size and sha256 recorded at download. The whole URL (query included)
names the entry; only the scheme's and host's case, a default port and the fragment are
normalised away, so two URLs of different files never share an entry.

A download goes to a temporary file in the entry's folder, is checked against the
announced length and for being a checkpoint (a PyTorch zip archive or a safetensors file,
complete; a legacy pickle only when its length was announced), and only then renamed
into place. A cached file is used only when its size and sha256 match the record; else
it is fetched again, or refused in one line naming the URL and the file when that fails.
"""
import hashlib
import http.client
import json
import os
import secrets
import shutil
import struct
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple
from urllib.parse import unquote, urlsplit, urlunsplit

from tqdm import tqdm

from models import hf
from models.exported import EXPORT_FILES, WEIGHTS_FILE

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
PARTIAL_SUFFIX = ".part"
ENTRY_FILE = "entry.json"
DEFAULT_PORTS = {"http": 80, "https": 443}
# the cached files this process has hashed: (path, size, mtime_ns, inode) -> sha256
_verified: Dict[Tuple[str, int, int, int], str] = {}


class DownloadError(ValueError):
    """A checkpoint URL that cannot be fetched or whose cached copy cannot be used; the
    message names the URL."""


def is_remote(location: str) -> bool:
    return location.startswith(("http://", "https://", "hf://"))


def cache_dir() -> Path:
    """`$TESTA_CACHE` as an absolute path (default `~/.cache/testa`)."""
    configured = os.environ.get("TESTA_CACHE", "")
    if "\0" in configured:
        raise DownloadError(f"TESTA_CACHE={configured!r}: not a usable folder path")
    return Path(os.path.abspath(os.path.expanduser(configured or "~/.cache/testa")))


def normalise_url(url: str) -> str:
    """`url` with the scheme and host in lower case, without a default port and without
    the fragment (which is not sent); path and query exactly as given. DownloadError for
    a URL without a host or with a bad port."""
    try:
        split = urlsplit(url)
        port = split.port
    except ValueError as err:  # a bad port or IPv6 literal
        raise DownloadError(f"{url}: not a valid URL ({err})") from None
    scheme = split.scheme.lower()
    if scheme not in DEFAULT_PORTS or not split.hostname:
        raise DownloadError(f"{url}: not a valid URL (expected http(s)://<host>/<file>)")
    host = split.hostname  # lower case already
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    userinfo = split.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}" if userinfo else host
    return urlunsplit((scheme, netloc, split.path or "/", split.query, ""))


def file_name(url: str) -> str:
    """The name a download of `url` is kept under: the last part of its path, reduced to
    characters that are safe in a file name."""
    last = unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2])
    safe = "".join(ch if ch.isalnum() or ch in "._-+" else "_" for ch in last).lstrip(".")
    return safe[:200] or "download"


def entry_dir(url: str) -> Path:
    """The cache folder of `url`: named by the sha256 of its normalised form."""
    return cache_dir() / hashlib.sha256(normalise_url(url).encode()).hexdigest()[:32]


def cached_path(url: str) -> Path:
    """Where the download of `url` is kept."""
    return entry_dir(url) / file_name(url)


def resolve(location: str, *, checkpoint: bool = True) -> str:
    """A local path for `location`: itself when it is not a URL or hub id, else the
    cached download, verified against its record (fetched now when it is not in the
    cache yet or no longer matches its record): a file, or the folder of an exported
    model's files for a URL ending in `/`. `hf://` ids go through huggingface_hub and its
    own cache (models/hf.py). `checkpoint=False`: the file is an exported model's config,
    checked only for being a non-empty file that is not an error page."""
    if location.startswith(hf.PREFIX):
        try:
            return hf.resolve(location)
        except hf.HubError as err:
            raise DownloadError(str(err)) from None
    if not is_remote(location):
        return location
    if location.endswith("/"):  # an exported model's folder
        return exported_folder(location)
    url = location
    path = cached_path(url)
    problem = cache_problem(url, path)
    if problem is None:
        return str(path)
    try:
        download(url, path, checkpoint=checkpoint)
    except DownloadError as err:
        if problem == "not cached":
            raise
        raise DownloadError(f"{url}: the cached copy {path} {problem}, and fetching it again "
                            f"failed ({str(err).removeprefix(url + ': ')})") from None
    return str(path)


def exported_folder(location: str) -> str:
    """The files of the exported model at folder URL `location`, each a verified entry of
    its own, linked side by side into the folder URL's entry (the reader wants them in one
    folder)."""
    folder = entry_dir(location)
    _check_inside_cache(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES:
        source = Path(resolve(location + name, checkpoint=name == WEIGHTS_FILE))
        target = folder / name
        if target.is_file() and os.path.samefile(source, target):
            continue
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:  # another file system
            shutil.copyfile(source, target)
    return str(folder)


def cache_problem(url: str, path: Path) -> Optional[str]:
    """None when `path` is the download of `url` as recorded, else what is wrong."""
    record_path = path.parent / ENTRY_FILE
    if not path.is_file() or not record_path.is_file():
        return "not cached"
    try:
        record = json.loads(record_path.read_text())
        size, digest, recorded_url = record["size"], record["sha256"], record["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"has a damaged record ({record_path})"
    if recorded_url != normalise_url(url):
        return f"was recorded for another URL ({recorded_url})"
    if path.stat().st_size != size:
        return f"changed since its download ({path.stat().st_size} bytes, recorded {size})"
    if file_sha256(path) != digest:
        return "changed since its download (its sha256 differs from the recorded one)"
    return None


def file_sha256(path: Path) -> str:
    """The sha256 of `path`, hashed once per process while the file stays as it is."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _verified:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        _verified[key] = digest.hexdigest()
    return _verified[key]


def download(url: str, path: Path, *, checkpoint: bool = True) -> None:
    """Fetch `url` into `path` atomically, with a progress bar, and record its size and
    sha256 beside it; DownloadError naming the URL on any failure, leaving nothing new in
    the cache. The body must be a whole checkpoint (`checkpoint=False`: a text file that is
    not empty and not an HTML page)."""
    directory = path.parent
    _check_inside_cache(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"{url}: cannot create the cache folder {directory} "
                            f"({err.strerror})") from None
    remove_partial_downloads(directory)
    token = secrets.token_hex(4)
    partial = directory / f".{path.name}.{token}{PARTIAL_SUFFIX}"
    record = directory / f".{ENTRY_FILE}.{token}{PARTIAL_SUFFIX}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            expected = _content_length(response)
            content_type = response.headers.get("Content-Type", "")
            received, digest = _copy(response, partial, expected, path.name)
        if expected is not None and received != expected:
            raise DownloadError(f"{url}: download ended after {received} of {expected} bytes")
        problem = (not_a_checkpoint(partial, content_type, length_announced=expected is not None)
                   if checkpoint else not_a_text_file(partial))
        if problem:
            raise DownloadError(f"{url}: the server sent {problem}; nothing was cached")
        record.write_text(json.dumps({"url": normalise_url(url), "size": received,
                                      "sha256": digest, "downloaded": time.time()}) + "\n")
        os.replace(partial, path)
        os.replace(record, directory / ENTRY_FILE)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: download failed (HTTP {err.code} {err.reason})") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
        if isinstance(err, DownloadError):
            raise
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
        raise DownloadError(f"{url}: download failed ({_one_line(reason)}); not in the cache "
                            f"{directory} either") from None
    finally:
        partial.unlink(missing_ok=True)
        record.unlink(missing_ok=True)


def _one_line(reason) -> str:
    text = str(reason).strip() or type(reason).__name__
    return text.splitlines()[0][:200]


def _check_inside_cache(directory: Path) -> None:
    """An entry folder that resolves outside the cache (a link placed there) is refused,
    so no download or clean-up touches files elsewhere."""
    cache = cache_dir().resolve()
    if not directory.resolve().is_relative_to(cache):
        raise DownloadError(f"{directory}: the cache entry resolves outside the cache {cache}")


def _content_length(response) -> Optional[int]:
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _copy(response, partial: Path, total: Optional[int], name: str) -> Tuple[int, str]:
    received, digest = 0, hashlib.sha256()
    with open(partial, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                        unit_divisor=1024, desc=name, disable=None) as bar:
        while chunk := response.read(CHUNK_BYTES):
            f.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    return received, digest.hexdigest()


def not_a_text_file(path: Path) -> Optional[str]:
    """None for a non-empty file that is not an HTML page, else what it is instead."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "an empty body"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        return f"an HTML page (starts {head[:20]!r})"
    return None


def not_a_checkpoint(path: Path, content_type: str = "", *,
                     length_announced: bool = True) -> Optional[str]:
    """None when `path` is a whole checkpoint file, else what it is instead: empty, an
    HTML or text page, a PyTorch zip archive or safetensors file cut short, a legacy
    pickle of unknown length, or something else."""
    size = path.stat().st_size
    if size == 0:
        return "an empty body"
    with open(path, "rb") as f:
        head = f.read(64)
    if content_type.split(";")[0].strip().lower().startswith("text/") or \
            head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"{")):
        return f"a page, not a checkpoint (Content-Type {content_type or 'unset'}, starts {head[:20]!r})"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                if not archive.namelist():
                    return "an empty zip archive"
        except (zipfile.BadZipFile, OSError):
            return f"a zip archive cut short ({size} bytes)"
        return None
    if len(head) >= 8:
        header = struct.unpack("<Q", head[:8])[0]
        if 2 <= header < size and head[8:9] == b"{":
            return _safetensors_problem(path, header, size)
    if head.startswith(b"\x80") and length_announced:
        return None  # a legacy torch.save pickle: whole as far as the announced length tells
    if head.startswith(b"\x80"):
        return (f"a legacy pickle of {size} bytes without a Content-Length, which cannot be "
                "told from a body cut short")
    return f"{size} bytes that are not a PyTorch or safetensors checkpoint (starts {head[:16]!r})"


def _safetensors_problem(path: Path, header_size: int, size: int) -> Optional[str]:
    with open(path, "rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(header_size))
            end = max([entry["data_offsets"][1] for name, entry in header.items()
                       if name != "__metadata__"], default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "a damaged safetensors file"
    expected = 8 + header_size + end
    return None if size == expected else f"a safetensors file cut short ({size} of {expected} bytes)"


def remove_partial_downloads(directory: Path) -> None:
    """Delete the temporary files of killed downloads in the cache entry `directory`:
    those untouched for longer than the read timeout (a live download, of another process
    too, writes more often). Only plain files directly inside the cache are touched."""
    cache = cache_dir().resolve()
    for leftover in directory.glob(f".*{PARTIAL_SUFFIX}"):
        try:
            if leftover.is_symlink() or not leftover.is_file() or \
                    not leftover.resolve().parent.is_relative_to(cache):
                continue
            if time.time() - leftover.stat().st_mtime > TIMEOUT_S:
                leftover.unlink()
        except FileNotFoundError:  # another process removed or renamed it meanwhile
            pass
