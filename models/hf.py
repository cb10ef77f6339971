"""`hf://` locations: files and exported models of Hugging Face hub repositories, fetched
by huggingface_hub (its cache, revisions, and tokens for private repositories: the
`HF_TOKEN` variable or `huggingface-cli login`).

    hf://<owner>/<repo>                    the exported model at the repository's root
    hf://<owner>/<repo>/<folder>           the exported model in a folder
    hf://<owner>/<repo>/<dir>/<file.pth>   one file (a name with a suffix)
    hf://<owner>/<repo>@<revision>/...     a branch, tag or commit instead of main

`HF_ENDPOINT` (a mirror) and `HF_HUB_CACHE` are read when a location is resolved, so
they take effect when set after import too.
"""
import os
from typing import NamedTuple, Optional

from models.exported import EXPORT_FILES

PREFIX = "hf://"


class HubLocation(NamedTuple):
    repo_id: str
    revision: Optional[str]
    path: str  # inside the repository; "" for its root


class HubError(ValueError):
    """An hf:// location that cannot be parsed or fetched; the message names it."""


def parse(location: str) -> HubLocation:
    parts = location[len(PREFIX):].split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise HubError(f"{location}: an hf:// location is hf://<owner>/<repo>[@<revision>][/<path>]")
    repo, _, revision = parts[1].partition("@")
    if not repo or (parts[1].endswith("@")):
        raise HubError(f"{location}: no repository or revision after '@'")
    path = "/".join(part for part in parts[2:] if part)
    return HubLocation(f"{parts[0]}/{repo}", revision or None, path)


def names_a_file(path: str) -> bool:
    return "." in path.rsplit("/", 1)[-1]


def resolve(location: str) -> str:
    """The local path of `location` in huggingface_hub's cache (downloaded when absent):
    the file, or for an exported model the folder holding its files."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise HubError(f"HF_ENDPOINT={endpoint!r}: expected an http(s):// address")
    where = parse(location)
    files = [where.path] if names_a_file(where.path) else \
        [f"{where.path}/{name}".lstrip("/") for name in EXPORT_FILES]
    local = []
    for name in files:
        try:
            local.append(hf_hub_download(where.repo_id, name, revision=where.revision,
                                         endpoint=endpoint,
                                         cache_dir=os.environ.get("HF_HUB_CACHE") or None))
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError,
                ValueError) as err:
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise HubError(f"{location}: cannot fetch {name} of {where.repo_id}"
                           f"{'@' + where.revision if where.revision else ''} ({reason})") from None
    return local[0] if names_a_file(where.path) else os.path.dirname(local[0])
