"""What a run prints and writes: console lines and progress bars on rank 0; in the output
folder, log.jsonl (every record with its UTC `time`), optional TensorBoard scalars, JSON
result files and the end-of-run summary (summary.json)."""
import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Mapping, Optional

from tqdm import tqdm

from engine.signals import held_while_fetching
from models.collectives import get_rank
from utils import ConfigError, Setting, Settings

LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
CONFIG_FILE = "config.yaml"

ProgressBar = Literal["auto", "on", "off"]
LOG_SETTINGS = Settings(title="Logs", module=__name__, settings={
    "progress_bar": Setting(str, "auto", "tqdm bars (rank 0, on stderr): auto draws them only "
                            "when stderr is a terminal", choices=("auto", "on", "off")),
    "tensorboard": Setting(bool, False, "also write the numbers of log.jsonl as TensorBoard "
                           "scalars under <output_dir>/tensorboard (needs the tensorboard "
                           "package)"),
})
# fields of a record that index it rather than measure something (no TensorBoard scalar)
INDEX_FIELDS = ("epoch", "step", "global_step", "best_epoch")


# console -----------------------------------------------------------------------------
def log(message: str) -> None:
    """Print on rank 0 only, without breaking progress bars."""
    if get_rank() == 0:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


# like the rank, a property of the process: start_run sets it from the config
_progress_bar: ProgressBar = "auto"


def set_progress_bar(mode: ProgressBar) -> None:
    """Whether `progress` draws bars from now on: `on`, `off`, or `auto` (when stderr is a
    terminal, so batch logs keep only the lines of `log`)."""
    global _progress_bar
    _progress_bar = mode


def progress(iterable: Iterable, description: str, total: Optional[int] = None) -> Iterable:
    """A tqdm bar on rank 0 (see `set_progress_bar`); the plain iterable elsewhere. Each
    item is fetched with SIGTERM and SIGINT held (`held_while_fetching`): the loops over
    DataLoaders go through here."""
    shown = get_rank() == 0 and (_progress_bar == "on"
                                 or (_progress_bar == "auto" and sys.stderr.isatty()))
    return held_while_fetching(tqdm(iterable, desc=description, total=total, disable=not shown,
                                    file=sys.stderr, dynamic_ncols=True, leave=False))


def format_metrics(metrics: Mapping[str, Any]) -> str:
    return "  ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                     for name, value in metrics.items())


def utc_now() -> str:
    """ISO 8601 UTC time to the millisecond: `2026-11-27T18:40:05.123+00:00`."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# files -------------------------------------------------------------------------------
def write_json(output_dir: Path, name: str, content: Any) -> None:
    """output_dir/name as indented JSON (rank 0)."""
    if get_rank() == 0:
        with open(Path(output_dir) / name, "w") as f:
            json.dump(content, f, indent=1)


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The records of a log.jsonl; a line cut short by an interrupted run is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def summary_writer_class() -> type:
    """torch's TensorBoard SummaryWriter; the tensorboard package is imported only here."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard: true needs the tensorboard package, which is not "
                          "installed (pip install tensorboard)") from None
    return SummaryWriter


class RunRecords:
    """The records of one run in its output folder, written by rank 0: log.jsonl lines,
    each with its UTC `time`, and with `tensorboard` their numbers as scalars
    `<kind>/<field>` under output_dir/tensorboard; `finish` ends them with the summary."""

    def __init__(self, output_dir: Path, *, tensorboard: bool = False):
        self.output_dir = Path(output_dir)
        self.started, self.start_time = time.perf_counter(), utc_now()
        self.written: List[Dict[str, Any]] = []  # this run's records, for the summary
        self.writer = None  # TensorBoard's, made at the first record (see `continue_from`)
        self.writer_class, self.purge_step = None, None
        if tensorboard:  # every rank checks the import, so all stop alike without it
            writer_class = summary_writer_class()
            if get_rank() == 0:
                self.writer_class = writer_class

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record` (with a `kind`) to log.jsonl; with TensorBoard, its numbers at
        `global_step` (step records) or `epoch` (0 when it has neither)."""
        if get_rank() != 0:
            return
        record = self._append(record)
        if self.writer_class is None:
            return
        if self.writer is None:
            self.writer = self.writer_class(str(self.output_dir / TENSORBOARD_DIR),
                                            purge_step=self.purge_step)
        x = record.get("global_step", record.get("epoch", 0))
        for name, value in record.items():
            if name not in INDEX_FIELDS and _is_number(value):
                self.writer.add_scalar(f"{record['kind']}/{name}", value, x)
        self.writer.flush()  # records come at log steps only; a crash loses none

    def _append(self, record: Mapping[str, Any]) -> Dict[str, Any]:
        record = {"kind": record["kind"], "time": utc_now(), **record}
        with open(self.output_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.written.append(record)
        return record

    def continue_from(self, epoch: int, step: int, global_step: int) -> None:
        """A resumed run continues at `step` of `epoch` (`global_step`) and writes the
        stopped run's later steps again: they leave log.jsonl (`drop_steps_from`), and
        TensorBoard hides the stopped run's events from `global_step` on (the writer's
        `purge_step`), so every step keeps one record. Call before the first record."""
        self.purge_step = global_step
        self.drop_steps_from(epoch, step)

    def drop_steps_from(self, epoch: int, step: int) -> None:
        """Remove from log.jsonl the step records at or after `step` of `epoch` (rank 0).
        The file is replaced atomically."""
        path = self.output_dir / LOG_FILE
        if get_rank() != 0 or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if not _is_step_from(line, epoch, step)]
        if kept and not kept[-1].endswith("\n"):  # a line cut short by a killed run
            kept[-1] += "\n"
        temporary = path.with_name(f".{LOG_FILE}.tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, path)

    def finish(self, test: Optional[Mapping[str, Any]] = None) -> None:
        """Write output_dir/summary.json and its `"kind": "summary"` record, print it and
        close TensorBoard (rank 0). `test`: the content of the run's test result file."""
        if get_rank() != 0:
            return
        summary = self.summary(test)
        write_json(self.output_dir, SUMMARY_FILE, summary)
        self._append({"kind": "summary", **summary})
        for line in summary_lines(summary):
            log(line)
        if self.writer is not None:
            self.writer.close()

    def summary(self, test: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """This run's times and epochs; the best epoch's record (validation metrics, read
        back from log.jsonl, so a resumed run finds one of an earlier session) and the
        last epoch's (training losses); the test result; the files of the output folder."""
        epochs = [record for record in self.written if record["kind"] == "epoch"]
        summary: Dict[str, Any] = {
            "started": self.start_time, "finished": utc_now(),
            "seconds": round(time.perf_counter() - self.started, 3),
            "epochs_run": len(epochs),
        }
        if epochs:
            last = _epoch_fields(epochs[-1])
            summary["epochs_done"] = last["epoch"] + 1
            best_epoch = last.get("best_epoch")
            if best_epoch is not None and best_epoch >= 0:
                logged = [record for record in read_jsonl(self.output_dir / LOG_FILE)
                          if record["kind"] == "epoch" and record["epoch"] == best_epoch]
                summary["best_epoch"] = _epoch_fields(logged[-1]) if logged else None
            summary["last_epoch"] = last
        if test is not None:
            summary["test"] = dict(test)
        summary["files"] = output_files(self.output_dir)
        return summary


def _is_step_from(line: str, epoch: int, step: int) -> bool:
    """Whether a log.jsonl line is a step record at or after (`epoch`, `step`)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return (isinstance(record, dict) and record.get("kind") == "step"
            and (record["epoch"], record["step"]) >= (epoch, step))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _epoch_fields(record: Mapping[str, Any]) -> Dict[str, Any]:
    return {name: value for name, value in record.items() if name not in ("kind", "time")}


def output_files(output_dir: Path) -> Dict[str, Any]:
    """What the output folder holds, by role, as names inside it (`output_dir` absolute);
    hidden files (the run's lock) are not listed."""
    names = sorted(path.name for path in output_dir.iterdir()
                   if path.is_file() and not path.name.startswith("."))
    named = {"config": CONFIG_FILE, "log": LOG_FILE, "summary": SUMMARY_FILE}
    files: Dict[str, Any] = {
        "output_dir": str(output_dir.resolve()),
        "checkpoints": [name for name in names if name.endswith(".pth")],
        "results": [name for name in names
                    if not name.endswith(".pth") and name not in named.values()],
        **named,
    }
    if (output_dir / TENSORBOARD_DIR).is_dir():
        files["tensorboard"] = TENSORBOARD_DIR
    return files


def summary_lines(summary: Mapping[str, Any]) -> List[str]:
    """The summary as the few lines printed at the end of a run."""
    epochs = (f"{summary['epochs_run']} epoch(s) trained, {summary['epochs_done']} done in all"
              if "epochs_done" in summary else "no training")
    lines = [f"run finished in {timedelta(seconds=round(summary['seconds']))}: {epochs}"]
    best, last = summary.get("best_epoch"), summary.get("last_epoch")
    if best:
        lines.append(f"best epoch {best['epoch']}: " + _measures(best, "val_"))
    elif last:
        lines.append(f"last epoch {last['epoch']}: " + _measures(last, "train_"))
    if "test" in summary:
        test = summary["test"]
        lines.append(f"test of {test['checkpoint']}: " + format_metrics(test["metrics"]))
    files = summary["files"]
    listed = [*files["checkpoints"], *files["results"], files["config"], files["log"],
              files["summary"], *([files["tensorboard"] + "/"] if "tensorboard" in files else [])]
    lines.append(f"files in {files['output_dir']}: " + ", ".join(listed))
    return lines


def _measures(record: Mapping[str, Any], prefix: str) -> str:
    """The record's metrics or losses named `prefix...`, without its durations."""
    return format_metrics({name: value for name, value in record.items()
                           if name.startswith(prefix) and not name.endswith("_seconds")})
