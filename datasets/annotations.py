"""Reading annotation files. A missing or unreadable file is an error; a bad record is skipped."""
import csv
import json
import os
from typing import Any, Iterator

from .issues import DataIssues


def require_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: annotation file not found")
    return path


def load_json(path: str) -> Any:
    with open(require_file(path), encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None


def load_json_list(path: str) -> list:
    records = load_json(path)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list, got {type(records).__name__}")
    return records


def iter_jsonl(path: str, issues: DataIssues) -> Iterator[tuple[str, dict]]:
    """(source, record) for each JSON object line; malformed lines are skipped and counted."""
    with open(require_file(path), encoding="utf-8") as f:
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
    with open(require_file(path), encoding="utf-8", newline="") as f:
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
