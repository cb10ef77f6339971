"""Mixed precision: the autocast dtype of a run and its loss scaler (fp16 only)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from engine.logs import log
from utils import Setting, Settings

PRECISION_SETTINGS = Settings(title="Precision", module=__name__, settings={
    "amp": Setting(str, "bf16", "mixed precision: on GPU, and bf16 on CPUs with native bfloat16 (else float32)",
                   choices=("bf16", "fp16", "none")),
})
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


def cpu_bf16_problem(cpuinfo_path: str = "/proc/cpuinfo") -> Optional[str]:
    """Why bfloat16 would not be fast on this CPU; None when its flags show native
    bfloat16 matrix instructions (x86 AMX-BF16 or AVX512-BF16, Arm BF16)."""
    try:
        cpuinfo = Path(cpuinfo_path).read_text()
    except OSError:
        return f"no {cpuinfo_path} to read the CPU's bfloat16 support from"
    flags = {flag for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))
             for flag in line.split(":", 1)[-1].split()}
    if flags & {"amx_bf16", "avx512_bf16", "bf16"}:
        return None
    return (f"this CPU has no AMX-BF16 or AVX512-BF16 (torch kernels: "
            f"{torch.backends.cpu.get_cpu_capability()}), so bfloat16 would be slower than float32")


def build_precision(amp: str, device: torch.device) -> Precision:
    """Mixed precision from the config's `amp`: bf16 or fp16 on GPU; bf16 on a CPU with
    native bfloat16, float32 on any other CPU (one log line says why)."""
    dtype = AMP_DTYPES[amp]
    if device.type != "cuda" and dtype is not None:
        problem = "float16 autocast is for GPUs" if dtype is torch.float16 else cpu_bf16_problem()
        if problem is not None:
            log(f"amp {amp}: float32 on this CPU: {problem}")
            dtype = None
    elif dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log("amp bf16: this GPU has no bfloat16; using fp16 with loss scaling")
        dtype = torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return Precision(device.type, dtype, scaler)
