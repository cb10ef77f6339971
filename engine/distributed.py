"""The process group (device, setup, timeouts, barrier) and DistributedDataParallel;
every helper falls back to the identity in a single process. The collectives are in
models/collectives.py."""
import datetime
import inspect
import os
from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from models.collectives import is_distributed
from utils import NUMBER, ConfigError, Setting, Settings

DISTRIBUTED_SETTINGS: Settings = {
    "dist_timeout_minutes": Setting(NUMBER, 30, "how long a rank waits for the others in process-"
                                    "group setup and every collective before the run ends "
                                    "with an error", min=0.01),
}


# process group -----------------------------------------------------------------------
def select_device(name: Optional[str]) -> torch.device:
    """`--device`, else cuda when available; under torchrun the process's local GPU."""
    device_type = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device, timeout_minutes: float) -> None:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo
    on CPU); a plain `python script.py` runs as a single process. Setup and every
    collective give up after `timeout_minutes` (a stalled peer ends the run)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    if dist.get_rank() == 0:
        print(f"process group: {dist.get_backend()}, {dist.get_world_size()} processes", flush=True)


def is_collective_timeout(err: BaseException) -> bool:
    """True for torch's errors of a collective whose peers did not answer in time (gloo
    and NCCL), or whose peer gave up first and closed the connection."""
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        mark in text for mark in ("Timed out", "timed out", "Timeout", "Connection closed by peer"))


def finish_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# data parallel -----------------------------------------------------------------------
# torch >= 2.14 renames broadcast_buffers to forward_sync_buffers
_NO_BUFFER_SYNC_PER_STEP = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False})


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` when there are several ranks. Buffers are
    not broadcast every step: the queues are updated with gathered features, identically
    on every rank."""
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               **_NO_BUFFER_SYNC_PER_STEP)


def gradient_sync(model: nn.Module, sync: bool):
    """DDP's `no_sync()` on accumulation steps that do not update the weights: the
    gradients are all-reduced only on the step that applies them."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return model.no_sync()
