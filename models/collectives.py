"""The collectives the models and the training loop use: ranks, sums, maxima and
gathers over the process group. Each falls back to the identity in a single process,
so callers use them unconditionally. All ranks must pass tensors of the same shape.

As in open_clip (src/open_clip/loss.py holds its feature gathering), the library holds
the gathers its losses need; engine/distributed.py sets up the process group.
"""
from typing import Any, List

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is initialised (and has more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (the identity in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum of `tensor` over the ranks in place (the identity in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
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
