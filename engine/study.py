"""Bookkeeping of the studies that train one config under several settings and seeds
(tools/adaptive_study.py, tools/text_guided_study.py): a run is reused when its folder
holds a finished run with the same values, continued when it stopped, and the test
metrics are summarised over the seeds (mean and standard error) and compared seed by
seed."""
import json
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Sequence

from ruamel.yaml import YAML

from engine.config import format_opts

TrainMain = Callable[[List[str]], None]  # an entry script's main: train_retrieval.main, ...


def train_or_reuse(train_main: TrainMain, config: Path, overrides: Mapping[str, Any],
                   out: Path) -> Dict[str, float]:
    """The test metrics of `config` trained with `overrides` in `out` by `train_main`. A
    finished run there is reused when its saved config has the same values (other values
    are an error naming the key), a stopped one is continued (--resume) or, stopped before
    its first checkpoint, started again."""
    metrics = out / "test_metrics.json"
    if (out / "config.yaml").is_file():
        saved = YAML(typ="safe").load((out / "config.yaml").read_text())
        for key, value in overrides.items():
            if saved.get(key) != value:
                raise SystemExit(f"error: {out}: a run with {key}={saved.get(key)!r}, not "
                                 f"{value!r}; remove the folder or pass another --runs")
    if not metrics.is_file():
        restart = ["--resume"] if (out / "checkpoint_last.pth").is_file() else ["--overwrite"]
        train_main(["--config", str(config), "--output_dir", str(out), *restart,
                    "--opts", *format_opts(overrides)])
    return json.loads(metrics.read_text())["metrics"]


def mean_and_se(values: Sequence[float]) -> Dict[str, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt n), to 3
    decimals; the error is NaN for one value."""
    values = [float(v) for v in values]
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return {"mean": round(statistics.fmean(values), 3), "se": round(se, 3), "n": len(values)}


def summarise_seeds(by_seed: Mapping[int, Mapping[str, float]]) -> Dict[str, Dict[str, float]]:
    """metric -> `mean_and_se` over the seeds of one setting's runs (seed -> metrics)."""
    metrics = next(iter(by_seed.values()))
    return {metric: mean_and_se([run[metric] for run in by_seed.values()]) for metric in metrics}


def paired_difference(a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]],
                      metric: str) -> Dict[str, float]:
    """`mean_and_se` over the seeds of metric(a) - metric(b), seed by seed (seeds of `a`)."""
    return mean_and_se([a[seed][metric] - b[seed][metric] for seed in a])
