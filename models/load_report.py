"""What loading a checkpoint did (`LoadReport`), in one line or in full, telling the keys
that are missing or unexpected for a known reason (parts another task's model has, video
layers an image checkpoint lacks) from the others.

What a part is for comes from the models' own declarations: `part_roles` (a model's
top-level parts) and `optional_parameters` (parameters only some configs create), class
attributes read from every `nn.Module` class that declares them.
"""
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from torch import nn

# missing keys that image (BLIP) checkpoints cannot provide: new layers keep their init
EXPECTED_MISSING = re.compile(r"\.(temporal_fc\.(weight|bias)|temporal_scaling|time_embed)$")
DDP_PREFIX = "module."
UNDECLARED_ROLE = "part of another task's model"  # a part no model class declares


def part_of(key: str) -> str:
    """The top-level module a state-dict key belongs to (`visual_encoder`, `itm_head`, ...)."""
    return key.split(".")[0]


def declared(attribute: str) -> Dict[str, str]:
    """name -> role, from the `attribute` mapping of every `nn.Module` class that declares
    one itself (a name two classes give different roles gets both, joined by ' or ')."""
    roles: Dict[str, List[str]] = {}
    seen, pending = set(), [nn.Module]
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        pending += cls.__subclasses__()
        for name, role in vars(cls).get(attribute, {}).items():
            if role not in roles.setdefault(name, []):
                roles[name].append(role)
    return {name: " or ".join(sorted(found)) for name, found in roles.items()}


@dataclass
class LoadReport:
    """What `load_checkpoint` did.

    loaded: tensors copied from the file into the model; missing / unexpected: model
    keys the file did not fill / file keys the model has no place for; temporal_copied:
    temporal keys made from spatial ones; interpolated: `"key old->new"` resizes;
    dropped: queue entries left out; momentum_copied: momentum keys filled from their
    main towers; ignored: `position_ids` buffers; notes: anything else worth knowing;
    model_kind / model_parts: what the model calls itself (its `kind`) and its top-level
    modules, which tell unexpected keys of parts this model does not have (expected,
    unused) from others.
    """
    path: str
    loaded: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    temporal_copied: List[str] = field(default_factory=list)
    interpolated: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    momentum_copied: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    model_kind: str = "model"
    model_parts: List[str] = field(default_factory=list)
    ddp_prefix_removed: int = 0

    @property
    def expected_missing(self) -> List[str]:
        return [key for key in self.missing if EXPECTED_MISSING.search(key)]

    @property
    def other_missing(self) -> List[str]:
        return [key for key in self.missing if not EXPECTED_MISSING.search(key)]

    def _unused_as(self, key: str, optional: Dict[str, str]) -> Optional[str]:
        """What an unexpected key is, when it is expected to go unused: a part this model
        does not have, or one of the `optional` parameters its config does not create."""
        if part_of(key) not in self.model_parts:
            return part_of(key)
        name = key.rsplit(".", 1)[-1]
        return name if name in optional else None

    @property
    def unused_parts(self) -> Dict[str, int]:
        """Parts of the file's model that this model does not use -> their tensor count."""
        optional = declared("optional_parameters")
        return dict(Counter(filter(None, (self._unused_as(key, optional)
                                          for key in self.unexpected))))

    @property
    def other_unexpected(self) -> List[str]:
        optional = declared("optional_parameters")
        return [key for key in self.unexpected if self._unused_as(key, optional) is None]

    def needs_attention(self) -> bool:
        """Keys missing or unexpected for no known reason."""
        return bool(self.other_missing or self.other_unexpected)

    def summary(self) -> str:
        """One line, e.g. `loaded ckpt.pth: 512 tensors, 0 missing, 71 unexpected (71
        expected: text_decoder unused by retrieval), 4 queues dropped`."""
        missing = f"{len(self.missing)} missing"
        if self.expected_missing:
            missing += f" ({len(self.expected_missing)} expected)"
        unexpected = f"{len(self.unexpected)} unexpected"
        if self.unused_parts:
            names = [part for part in self.unused_parts if not part.endswith("_m")]
            if len(names) < len(self.unused_parts):
                names.append("momentum towers")
            unexpected += (f" ({sum(self.unused_parts.values())} expected: "
                           f"{', '.join(names)} unused by {self.model_kind})")
        parts = [f"{self.loaded} tensors", missing, unexpected]
        if self.ddp_prefix_removed:
            parts.append(f"{DDP_PREFIX!r} prefix removed")
        if self.temporal_copied:
            parts.append(f"{len(self.temporal_copied)} temporal copied")
        resizes = dict.fromkeys(entry.split(".")[-1] for entry in self.interpolated)
        parts += [f"{resize} interpolated" for resize in resizes]
        if self.dropped:
            parts.append(f"{len(self.dropped)} queues dropped")
        if self.momentum_copied:
            parts.append(f"{len(self.momentum_copied)} momentum copied")
        return f"loaded {os.path.basename(self.path)}: " + ", ".join(parts)

    def __str__(self) -> str:
        lines = [self.summary(), f"  file: {self.path}"]
        sections = [
            ("missing, not in the file (left at their initial values)", self.other_missing),
            ("missing, expected: video-only parts an image checkpoint lacks (temporal_fc "
             "starts at its initial values, time_embed too)", self.expected_missing),
            ("unexpected, in the file but not in the model (not used)", self.other_unexpected),
            ("temporal attention initialised from spatial attention (the image checkpoint "
             "has none)", self.temporal_copied),
            ("interpolated to the model's frames or patch grid", self.interpolated),
            ("queues dropped (the model starts its own; sizes differ between configs)",
             self.dropped),
            ("momentum towers copied from their main towers", self.momentum_copied),
            ("ignored (position_ids buffers of older transformers)", self.ignored),
        ]
        for title, keys in sections:
            if keys:
                lines.append(f"  {title}:")
                lines += [f"    {entry}" for entry in _group_keys(keys)]
        if self.unused_parts:
            roles = {**declared("part_roles"), **declared("optional_parameters")}
            lines.append(f"  unexpected, expected: parts a {self.model_kind} model does not use:")
            lines += [f"    {part} ({count} tensor{'s' * (count != 1)}): "
                      f"{roles.get(part, UNDECLARED_ROLE)}"
                      for part, count in self.unused_parts.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _group_keys(keys: List[str], max_lines_per_module: int = 8) -> List[str]:
    """Readable lines for many keys: numbered layers collapsed (`a.blocks.*.b (x12)`),
    and a top-level module with more than `max_lines_per_module` lines as one line."""
    by_module: Dict[str, Counter] = {}
    for key in keys:
        module = key.split(".")[0]
        by_module.setdefault(module, Counter())[re.sub(r"\.\d+\.", ".*.", key)] += 1
    lines = []
    for module, names in by_module.items():
        if len(names) > max_lines_per_module:
            lines.append(f"{module}.* ({sum(names.values())} tensors)")
        else:
            lines += [name if count == 1 else f"{name} (x{count})" for name, count in names.items()]
    return lines
