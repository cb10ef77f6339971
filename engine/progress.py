"""Where a rank stands in an epoch (`EpochProgress`) and the global RNG states, which a
mid-epoch checkpoint saves so that `--resume` continues at that step exactly."""
import random
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch


@dataclass
class EpochProgress:
    """How far this rank got in an epoch: the next batch `step`, the losses summed over the
    steps before it (float64), the steps run and clips consumed; with the RNG states at
    that point (`rng_states`) when it was read from a checkpoint."""
    step: int = 0
    loss_sums: Dict[str, float] = field(default_factory=dict)
    steps_run: int = 0
    samples_seen: int = 0
    rng: Optional[Dict[str, Any]] = None


def rng_states(device: torch.device) -> Dict[str, Any]:
    """torch's (and the device's), numpy's and Python's global RNG states, as tensors and
    plain values (so a checkpoint holding them loads with weights_only)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": random.getstate()}


def set_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
