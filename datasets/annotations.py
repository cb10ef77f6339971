"""Reading annotation files. A missing, unreadable or wrongly shaped file is an error (a
one-line `DataError` naming the file); a bad record inside a good file is skipped and counted.

Caption pickles are read by an unpickler that builds plain containers, strings and numbers
only: a pickle that names any other class or function is refused, never run.
"""
import csv
import io
import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

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
        raise FileNotFoundError(f"{path}: annotation file not found")
    return path


@contextmanager
def utf8_text(path: str) -> Iterator[io.TextIOWrapper]:
    """The file opened as UTF-8 text; bytes that are not UTF-8 raise DataError naming it."""
    with open(require_file(path), encoding="utf-8", newline="") as f:
        try:
            yield f
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text ({error.reason})") from None


def load_json(path: str) -> Any:
    with utf8_text(path) as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{path}: the file is empty, expected JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} "
                        f"column {error.colno})") from None


def load_json_object(path: Path, name: Optional[str] = None) -> dict:
    """The JSON object in the file `path`; DataError in one line starting with `name` (by
    default the path) when it is unreadable, not JSON or not an object."""
    name = name or str(path)
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{name}: not readable JSON ({err})") from None
    if not isinstance(found, dict):
        raise DataError(f"{name}: expected a JSON object, got {type(found).__name__}")
    return found


def json_type(value: Any) -> str:
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def load_json_list(path: str) -> list:
    records = load_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got a JSON {json_type(records)}")
    return records


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
    """(source, record) for each JSON object line; malformed lines are skipped and counted."""
    with utf8_text(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{line_number}"
            try:
                record = json.loads(line)
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
