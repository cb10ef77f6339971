"""Configs and the command line: read a YAML config, put `--opts` over it, check it
against a script's schema (a composition of settings groups) and save what was used."""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

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
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(err)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return config


def yaml_problem(err: YAMLError) -> str:
    """What ruamel.yaml found wrong, with its line: e.g. 'found duplicate key "a" with
    value "2" (original value: "1"), line 3'."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return problem if mark is None else f"{problem}, line {mark.line + 1}"


def parse_opts(opts: Sequence[str]) -> Dict[str, Any]:
    """`["max_epoch=2", "testa_r=[1,12]", "text_config.hidden_size=60"]` -> `{"max_epoch": 2,
    "testa_r": [1, 12], "text_config.hidden_size": 60}`; values are read as YAML scalars,
    lists or mappings. A key given twice is an error."""
    parsed = {}
    for opt in opts:
        name, sep, text = opt.partition("=")
        if not sep or not name:
            raise ConfigError(f"--opts: expected key=value, got {opt!r}")
        if name in parsed:
            raise ConfigError(f"--opts: {name} is given twice")
        try:
            parsed[name] = YAML(typ="safe").load(text)
        except YAMLError as err:
            raise ConfigError(f"--opts: {name}: not a YAML value ({yaml_problem(err)})") from None
    return parsed


def format_opts(values: Mapping[str, Any]) -> List[str]:
    """The `--opts` entries that `parse_opts` reads back as `values` (each value as JSON,
    which is YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def merge_opts(base: Mapping[str, Any], opts: Mapping[str, Any], schema: Settings
               ) -> Dict[str, Any]:
    """The `--opts` entries as config values over `base`: a mapping given for a key whose
    value in `base` is a mapping merges into it (`text_config={hidden_size: 60}` keeps the
    other text_config keys), and a dotted key sets one entry of a mapping key
    (`text_config.hidden_size=60`). A dotted key of a key that takes no mapping, or given
    together with the whole key, is an error."""
    problems = [unknown_key_problem(key, schema)
                for key in (name.partition(".")[0] for name in opts) if key not in schema]
    if problems:
        raise ConfigError("--opts: " + "; ".join(problems))
    merged: Dict[str, Any] = {}
    for name, value in opts.items():
        key, dot, entry = name.partition(".")
        if dot:
            if not entry:
                raise ConfigError(f"--opts: {name}: a dotted key is <key>.<entry>")
            if key in opts:
                raise ConfigError(f"--opts: {key} and {name} are both given; give one")
            if not takes_mapping(schema[key]):
                raise ConfigError(f"--opts: {name}: {key} is not a mapping "
                                  f"({schema[key].type_names}); pass {key}=<value>")
            value = {entry: value}
        previous = merged.get(key, base.get(key))
        if isinstance(value, dict) and isinstance(previous, dict):
            value = {**previous, **value}
        merged[key] = value
    return merged


def takes_mapping(setting) -> bool:
    types = setting.types if isinstance(setting.types, tuple) else (setting.types,)
    return dict in types


def resolve_config(path: str, opts: Sequence[str], schema: Settings,
                   overrides: Optional[Mapping[str, Any]] = None, *,
                   saved: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The config of `path` (or `saved`, a config that `path` names the origin of, e.g. a
    checkpoint's) with `--opts` (see `merge_opts`) and command-line `overrides` over it and
    the schema's defaults filled in. Unknown keys, missing required keys and values of the
    wrong type, choice or range, and settings that do not fit together (the checks of the
    schema's groups, e.g. an r too large for the video encoder's tokens), raise ConfigError
    naming the file (or `--opts`) and the key."""
    file_config = load_config(path) if saved is None else dict(saved)
    problems = [unknown_key_problem(name, schema) for name in file_config if name not in schema]
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    opt_config = merge_opts(file_config, parse_opts(opts), schema)
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
    for check in schema.checks:  # across keys, declared with the groups that own them
        found = check(resolved)
        if found:
            key, problem = found
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
    parser.add_argument("--config", required=not evaluate,
                        help="YAML config (configs/*.yaml)" + (
                            "; with --evaluate, default: the config saved in --checkpoint"
                            if evaluate else ""))
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
    if args.config is None and not (args.evaluate and args.checkpoint):
        parser.error("--config is needed, unless --evaluate evaluates a --checkpoint that holds "
                     "its config")
    if getattr(args, "evaluate", False) and args.resume:
        parser.error("--evaluate and --resume exclude each other")
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    return args
