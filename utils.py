"""What models, datasets and the engine share: the config error, the declaration of a
setting and of a group of settings with its cross-key checks, the one function that fills a
config's defaults from declarations, and the keys that the data and the models both read.

Every setting is declared once, as a `Setting` in a group next to the code that reads it
(`VIDEO_ENCODER_SETTINGS` in models/video_encoder.py, `TEXT_SETTINGS` in models/text.py,
...). The scripts' schemas are compositions of those groups; builders call
`with_defaults` on the config dict they are given and then index it directly.
"""
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple


class ConfigError(ValueError):
    """A config file or `--opts` entry that cannot be used; the message names where."""


class _Required:
    """The default of keys a config must set."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()
NUMBER = (int, float)
NONE = type(None)


@dataclass(frozen=True)
class Setting:
    """One config key.

    Args:
        types: the accepted type or tuple of types (`NONE` admits null).
        default: the value when the config leaves the key out; `REQUIRED`: it must set it.
        meaning: one line for the key reference (docs/config_keys.md).
        choices: the allowed values of a string key.
        min, max: inclusive bounds of a number (list entries are not checked).
    """
    types: Any
    default: Any = REQUIRED
    meaning: str = ""
    choices: Optional[Tuple[str, ...]] = None
    min: Optional[float] = None
    max: Optional[float] = None

    @property
    def type_names(self) -> str:
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        return " or ".join("null" if t is NONE else t.__name__ for t in types)

    @property
    def range_text(self) -> str:
        """`>= 1`, `<= 1`, `0 to 1`, or '' when unbounded."""
        if self.max is None:
            return "" if self.min is None else f">= {self.min:g}"
        return f"<= {self.max:g}" if self.min is None else f"{self.min:g} to {self.max:g}"


# a check across the keys of a resolved config: (the key it is about, the problem) or None
Check = Callable[[Mapping[str, Any]], Optional[Tuple[str, str]]]


class Settings(Dict[str, Setting]):
    """A group of settings (name -> `Setting`), declared as
    `Settings(title=..., module=__name__, settings={...})`: the title and declaring module
    name its section of docs/config_keys.md. `@GROUP.check` adds a check across its keys,
    which a schema composed of the group runs on every resolved config; a schema
    (`compose`) keeps the groups it was made of in `groups`."""

    def __init__(self, settings: Mapping[str, Setting] = (), *, title: Optional[str] = None,
                 module: Optional[str] = None):
        super().__init__(settings)
        self.title = title
        self.module = module
        self.checks: List[Check] = []
        self.groups: List[Settings] = []

    def check(self, check: Check) -> Check:
        self.checks.append(check)
        return check


def unknown_key_problem(name: str, settings: Settings) -> str:
    close = difflib.get_close_matches(name, list(settings), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {name!r}{hint}"


def value_problem(name: str, value: Any, setting: Setting, *,
                  check_choices: bool = True) -> Optional[str]:
    """Why `value` does not fit `setting` (type, choice, range), or None."""
    types = setting.types if isinstance(setting.types, tuple) else (setting.types,)
    is_bool_for_number = isinstance(value, bool) and bool not in types
    if is_bool_for_number or not isinstance(value, types):
        return f"{name} must be {setting.type_names}, got {value!r}"
    if (check_choices and setting.choices is not None and isinstance(value, str)
            and value not in setting.choices):
        return f"{name} must be one of {', '.join(setting.choices)}, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes both bounds
        return f"{name} must be a finite number, got {value!r}"
    if isinstance(value, NUMBER) and not isinstance(value, bool):
        below = setting.min is not None and value < setting.min
        above = setting.max is not None and value > setting.max
        if below or above:
            return f"{name} must be {setting.range_text}, got {value!r}"
    return None


def missing_problem(names) -> str:
    keys = "key" if len(names) == 1 else "keys"
    return f"missing required {keys} " + ", ".join(map(repr, names))


def with_defaults(config: Mapping[str, Any], settings: Settings,
                  source: str = "config") -> Dict[str, Any]:
    """`config` with the defaults of `settings` filled in, after checking the keys of
    `settings` it sets (type and range; string choices are checked by the constructor
    that takes them) and that it sets the required ones. Other keys pass through, so a
    paper config that lacks project-only keys builds. Raises ConfigError naming `source`."""
    missing = [name for name, setting in settings.items()
               if setting.default is REQUIRED and name not in config]
    if missing:
        raise ConfigError(f"{source}: {missing_problem(missing)}")
    for name, setting in settings.items():
        if name in config:
            problem = value_problem(name, config[name], setting, check_choices=False)
            if problem:
                raise ConfigError(f"{source}: {problem}")
    return {**{name: s.default for name, s in settings.items() if name not in config}, **config}


def compose(*groups: Settings) -> Settings:
    """One schema from groups of settings, with their checks; a key declared in two
    groups is a bug."""
    schema = Settings()
    for group in groups:
        twice = set(schema) & set(group)
        if twice:
            raise ValueError(f"settings declared twice: {', '.join(sorted(twice))}")
        schema.update(group)
        group = group if isinstance(group, Settings) else Settings(group)  # untitled
        schema.checks += group.checks
        schema.groups += group.groups or [group]
    return schema


# keys the datasets and the models both read ------------------------------------------
FRAME_SETTINGS = {
    "image_size": Setting(int, meaning="frame side in pixels after the transforms (and the "
                          "video encoder's position grid)", min=1),
}
CAPTION_SETTINGS = Settings(title="Captions", module=__name__, settings={
    "max_words": Setting(int, meaning="words kept of a caption, and its tokens in the text "
                         "towers", min=1),
})
QUESTION_SETTINGS = Settings(title="Questions", module=__name__, settings={
    "max_question_len": Setting(int, 35, "words kept of a question, and its tokens", min=1),
})
