"""What a run prints and writes: console lines and progress bars on rank 0, log.jsonl
records and JSON result files in the output folder."""
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from tqdm import tqdm

from engine.distributed import get_rank

LOG_FILE = "log.jsonl"


def log(message: str) -> None:
    """Print on rank 0 only, without breaking progress bars."""
    if get_rank() == 0:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def progress(iterable: Iterable, description: str, total: Optional[int] = None) -> Iterable:
    """A tqdm bar on rank 0; the plain iterable elsewhere."""
    return tqdm(iterable, desc=description, total=total, disable=get_rank() != 0,
                dynamic_ncols=True, leave=False)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    return "  ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in metrics.items())


def append_jsonl(output_dir: Path, record: Mapping[str, Any]) -> None:
    """One JSON line in output_dir/log.jsonl (rank 0)."""
    if get_rank() == 0:
        with open(Path(output_dir) / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json(output_dir: Path, name: str, content: Any) -> None:
    """output_dir/name as indented JSON (rank 0)."""
    if get_rank() == 0:
        with open(Path(output_dir) / name, "w") as f:
            json.dump(content, f, indent=1)
