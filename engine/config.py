"""Configs and the command line: read a YAML config, put `--opts` over it, check it
against a script's schema (a composition of settings groups) and save what was used."""
import argparse
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from datasets.pretrain import data_source_problem
from models.text import text_config_problem
from models.video_encoder import video_encoder_problem
from utils import (REQUIRED, ConfigError, Settings, missing_problem, unknown_key_problem,
                   value_problem)


def load_config(path) -> Dict[str, Any]:
    """Read a YAML config into a plain dict; a missing or malformed file raises
    ConfigError (a ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        config = YAML(typ="safe").load(path.read_text())
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return config


def parse_opts(opts: Sequence[str]) -> Dict[str, Any]:
    """`["max_epoch=2", "testa_r=[1,12]"]` -> `{"max_epoch": 2, "testa_r": [1, 12]}`;
    values are read as YAML scalars, lists or mappings."""
    parsed = {}
    for opt in opts:
        name, sep, text = opt.partition("=")
        if not sep or not name:
            raise ConfigError(f"--opts: expected key=value, got {opt!r}")
        try:
            parsed[name] = YAML(typ="safe").load(text)
        except YAMLError as err:
            reason = str(err).splitlines()[0]
            raise ConfigError(f"--opts: {name}: not a YAML value ({reason})") from None
    return parsed


def resolve_config(path: str, opts: Sequence[str], schema: Settings,
                   overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The config of `path` with `--opts` and command-line `overrides` over it and the
    schema's defaults filled in. Unknown keys, missing required keys and values of the
    wrong type, choice or range, and video encoder settings that do not fit together
    (e.g. an r too large for the tokens), raise ConfigError naming the file (or `--opts`)
    and the key."""
    file_config = load_config(path)
    opt_config = parse_opts(opts)
    for source, entries in ((path, file_config), ("--opts", opt_config)):
        problems = [unknown_key_problem(name, schema) for name in entries if name not in schema]
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
    config = {**file_config, **opt_config, **(overrides or {})}
    missing = [name for name, setting in schema.items()
               if setting.default is REQUIRED and name not in config]
    if missing:
        raise ConfigError(f"{path}: {missing_problem(missing)}")
    for name, value in config.items():
        problem = value_problem(name, value, schema[name])
        if problem:
            raise ConfigError(f"{'--opts' if name in opt_config else path}: {problem}")
    defaults = {name: setting.default for name, setting in schema.items() if name not in config}
    resolved = {**config, **defaults}
    if "cache_clips" in schema and resolved["cache_clips"] and resolved["num_workers"] > 0:
        raise ConfigError(f"{path}: cache_clips keeps the decoded clips in the main process; "
                          "it needs num_workers: 0")
    if "train_shards" in schema:
        source_problem = data_source_problem(resolved)
        if source_problem:
            raise ConfigError(f"{path}: {source_problem}")
    if "text_config" in schema:
        text_problem = text_config_problem(resolved)
        if text_problem:
            raise ConfigError(f"{'--opts' if 'text_config' in opt_config else path}: {text_problem}")
    if "vision_width" in schema:
        encoder_problem = video_encoder_problem(resolved)
        if encoder_problem:
            key, problem = encoder_problem
            raise ConfigError(f"{'--opts' if key in opt_config else path}: {problem}")
    return resolved


def save_config(config: Mapping[str, Any], path: Path) -> None:
    yaml = YAML(typ="safe")
    yaml.default_flow_style = None
    with open(path, "w") as f:
        yaml.dump(dict(config), f)


# command line ------------------------------------------------------------------------
def build_arg_parser(description: str, *, evaluate: bool = True) -> argparse.ArgumentParser:
    """The options every script takes; `evaluate=False` leaves out `--evaluate`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--output_dir", required=True,
                        help="where checkpoints, logs and results go")
    if evaluate:
        parser.add_argument("--evaluate", action="store_true",
                            help="only evaluate --checkpoint (or the config's pretrained) on test")
    parser.add_argument("--resume", action="store_true",
                        help="continue from output_dir/checkpoint_last.pth")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output_dir that holds a previous run, removing "
                             "its checkpoints, log and results")
    parser.add_argument("--checkpoint", help="weights to start from or to evaluate, instead of "
                                             "the config's pretrained")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow checkpoints that hold arbitrary Python objects; unpickling "
                             "them can run code from the file (config key trust_checkpoint)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, values as YAML (max_epoch=2 testa_r=[1,12])")
    return parser


def parse_args(parser: argparse.ArgumentParser,
               argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if getattr(args, "evaluate", False) and args.resume:
        parser.error("--evaluate and --resume exclude each other")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    return args
