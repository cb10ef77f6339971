"""Reading annotation files. A missing, unreadable or wrongly shaped file is an error (a
one-line `DataError` naming the file); a bad record inside a good file is skipped and counted.
A JSON object that gives a key twice is a bad record (json itself would keep the last value
without a word), and a file whose top-level object does is an error.

Caption pickles are read by an unpickler that builds plain containers, strings and numbers
only: a pickle that names any other class or function is refused, never run.
"""
import csv
import io
import json
import os
import pickle
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from .issues import DataIssues

JSON_TYPE_NAMES = {dict: "object", list: "list", str: "string", int: "number", float: "number",
                   bool: "boolean", type(None): "null"}
# the only globals a caption pickle may name: containers pickled by reference (protocols 0-2
# spell `builtins` as `__builtin__`), and the codec function protocols 0-2 store bytes with
PICKLE_GLOBALS = {(module, name) for module in ("builtins", "__builtin__")
                  for name in ("set", "frozenset")} | {("collections", "OrderedDict"),
                                                       ("_codecs", "encode")}


class DataError(ValueError):
    """An annotation file or a split that cannot be used; the message names the file and says
    what is wrong, in one line."""


def require_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: annotation file not found (DATASETS.md says where each "
                                f"dataset's files go; --opts sets the config's data paths)")
    return path


@contextmanager
def utf8_text(path: str) -> Iterator[io.TextIOWrapper]:
    """The file opened as UTF-8 text; bytes that are not UTF-8 raise DataError naming it."""
    with open(require_file(path), encoding="utf-8", newline="") as f:
        try:
            yield f
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text ({error.reason})") from None


class RepeatedKeys(dict):
    """A JSON object in which an object (itself, or one inside it) gives a key more than
    once: the values json keeps (the last), and `repeated`, a (where, key) pair for each
    such key, `where` the path of the object inside this one (() for itself)."""

    def __init__(self, pairs: list, repeated: list[tuple[tuple, str]]):
        super().__init__(pairs)
        self.repeated = repeated

    def problem(self) -> str:
        return ", ".join(f"{key!r} given twice" + (f" in {json_path(where)}" if where else "")
                         for where, key in self.repeated)


def json_path(where: tuple) -> str:
    """('shards', 0, 'meta') -> 'shards[0].meta'."""
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def repeats_inside(value: Any) -> list[tuple[tuple, str]]:
    """The (where, key) pairs of a parsed JSON value (objects inside lists included)."""
    if isinstance(value, RepeatedKeys):
        return value.repeated
    if isinstance(value, list):
        return [((index, *where), key) for index, item in enumerate(value)
                for where, key in repeats_inside(item)]
    return []


def _json_object(pairs: list) -> dict:
    """json's object_pairs_hook: a dict, or RepeatedKeys where a key repeats in the object
    or in an object inside it (those are built first, so their marks are passed up)."""
    counts = Counter(key for key, _ in pairs)
    repeated = [((), key) for key in sorted(key for key, n in counts.items() if n > 1)]
    for key, value in pairs:
        repeated += [((key, *where), inner) for where, inner in repeats_inside(value)]
    return RepeatedKeys(pairs, repeated) if repeated else dict(pairs)


def parse_json(text: str) -> Any:
    """`json.loads` that marks objects giving a key twice, or holding one that does
    (RepeatedKeys)."""
    return json.loads(text, object_pairs_hook=_json_object)


def load_json(path: str) -> Any:
    with utf8_text(path) as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{path}: the file is empty, expected JSON")
    try:
        found = parse_json(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} "
                        f"column {error.colno})") from None
    if isinstance(found, RepeatedKeys):
        raise DataError(f"{path}: the top-level object has {found.problem()}")
    return found


def load_json_object(path: Path, name: Optional[str] = None) -> dict:
    """The JSON object in the file `path`; DataError in one line starting with `name` (by
    default the path) when it is unreadable, not JSON, not an object or gives a key twice."""
    name = name or str(path)
    try:
        found = parse_json(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{name}: not readable JSON ({err})") from None
    if not isinstance(found, dict):
        raise DataError(f"{name}: expected a JSON object, got {type(found).__name__}")
    if isinstance(found, RepeatedKeys):
        raise DataError(f"{name}: {found.problem()}")
    return found


def json_type(value: Any) -> str:
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def load_json_list(path: str) -> list:
    records = load_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got a JSON {json_type(records)}")
    return records


def without_repeated_keys(records: Iterable[tuple[str, Any]],
                          issues: DataIssues) -> Iterator[tuple[str, Any]]:
    """The (source, record) pairs whose record gives no key twice; the others are skipped
    and counted."""
    for source, record in records:
        if isinstance(record, RepeatedKeys):
            issues.skip("key given twice", f"{source} ({record.problem()})")
            continue
        yield source, record


def iter_json_records(path: str, issues: DataIssues) -> Iterator[tuple[str, Any]]:
    """(source, record) for each record of a JSON list file (source `path[position]`); a
    record giving a key twice is skipped and counted."""
    records = load_json_list(path)
    return without_repeated_keys(((f"{path}[{position}]", record)
                                  for position, record in enumerate(records)), issues)


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle naming a class or function outside PICKLE_GLOBALS."""


class PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, sets, strings, bytes and numbers; refuses every other
    global, so no code named in the file runs."""

    def find_class(self, module: str, name: str):
        if (module, name) in PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name}")


def load_plain_pickle(path: str) -> Any:
    """The object of a pickle of plain data; anything else raises DataError naming the file."""
    with open(require_file(path), "rb") as f:
        try:
            return PlainUnpickler(f).load()
        except RefusedGlobal as error:
            raise DataError(f"{path}: refused: the pickle names {error}, but a caption pickle may "
                            f"hold only containers, strings and numbers") from None
        except Exception as error:  # a damaged pickle raises many kinds
            raise DataError(f"{path}: not a readable pickle ({type(error).__name__}: "
                            f"{str(error)[:100]})") from None


def iter_jsonl(path: str, issues: DataIssues) -> Iterator[tuple[str, dict]]:
    """(source, record) for each JSON object line; malformed lines and objects giving a key
    twice are skipped and counted."""
    return without_repeated_keys(_jsonl_objects(path, issues), issues)


def _jsonl_objects(path: str, issues: DataIssues) -> Iterator[tuple[str, dict]]:
    """(source, object) for each JSON object line; malformed lines are skipped and counted."""
    with utf8_text(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{line_number}"
            try:
                record = parse_json(line)
            except json.JSONDecodeError:
                issues.skip("malformed annotation", source)
                continue
            if not isinstance(record, dict):
                issues.skip("malformed annotation", source)
                continue
            yield source, record


def iter_csv(path: str) -> Iterator[tuple[str, dict]]:
    """(source, row) for each data row of a CSV file with a header."""
    with utf8_text(path) as f:
        for row_number, row in enumerate(csv.DictReader(f), start=2):
            yield f"{path}:{row_number}", row


def string_fields(record: Any, *keys: str) -> tuple[str, ...] | None:
    """The values of `keys` if `record` is a dict holding a string under each, else None."""
    if not isinstance(record, dict):
        return None
    values = tuple(record.get(key) for key in keys)
    return values if all(isinstance(value, str) for value in values) else None


def first_existing(candidates: tuple[str, ...]) -> str | None:
    return next((path for path in candidates if os.path.exists(path)), None)
