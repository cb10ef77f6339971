"""Mixed precision: the autocast dtype of a run and its loss scaler (fp16 only)."""
from dataclasses import dataclass
from typing import Optional

import torch

from engine.logs import log
from utils import Setting, Settings

PRECISION_SETTINGS: Settings = {
    "amp": Setting(str, "bf16", "mixed precision on GPU (CPU runs stay float32)",
                   choices=("bf16", "fp16", "none")),
}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


@dataclass
class Precision:
    """Autocast dtype (None: full precision) and the loss scaler (active for fp16 only)."""
    device_type: str
    dtype: Optional[torch.dtype]
    scaler: torch.amp.GradScaler

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def __str__(self) -> str:
        names = {torch.bfloat16: "bf16", torch.float16: "fp16 (loss scaling)", None: "fp32"}
        return names[self.dtype]


def build_precision(amp: str, device: torch.device) -> Precision:
    """Mixed precision from the config's `amp` on GPU; CPU runs stay in float32."""
    dtype = AMP_DTYPES[amp] if device.type == "cuda" else None
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log("amp bf16: this GPU has no bfloat16; using fp16 with loss scaling")
        dtype = torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return Precision(device.type, dtype, scaler)
