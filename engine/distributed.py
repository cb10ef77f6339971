"""Ranks, gathers and DistributedDataParallel; every helper falls back to the identity
in a single process, so models and the loop call them unconditionally. All ranks must
pass tensors of the same shape."""
import datetime
import inspect
import os
from contextlib import nullcontext
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from utils import NUMBER, ConfigError, Setting, Settings

DISTRIBUTED_SETTINGS: Settings = {
    "dist_timeout_minutes": Setting(NUMBER, 30, "how long a rank waits for the others in process-"
                                    "group setup and every collective before the run ends "
                                    "with an error", min=0.01),
}


def is_distributed() -> bool:
    """True when a process group is initialised (and has more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


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


# collectives -------------------------------------------------------------------------
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (the identity in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def gather_objects(obj: Any) -> List[Any]:
    """`obj` of every rank, in rank order."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """`[M, ...]` on every rank -> `[world*M, ...]` in rank order, without gradient."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss may have used this rank's slice
        return grad.chunk(dist.get_world_size(), dim=0)[dist.get_rank()]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """`[M, ...]` on every rank -> `[world*M, ...]` in rank order; gradients flow back."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


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
