"""One retrieval training step on 2 gloo processes; launched by test_distributed_models.py
under torchrun. Every rank saves what the test checks to `<out_dir>/rank<r>.pt`.

Both pairs of a rank share one video index, so every hard negative must come from the
other rank (in-process mining would find none).
"""
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models import build_retrieval_model
from models.collectives import all_gather_with_grad
from helpers import CAPTIONS, tiny_config, tiny_video


def gather_gradient(rank: int) -> torch.Tensor:
    """Gradient reaching rank's `[2, 3]` input when every rank weights the gathered `[4, 3]`."""
    local = torch.full((2, 3), float(rank + 1), requires_grad=True)
    weights = torch.arange(12.0).view(4, 3) * (rank + 1)
    (all_gather_with_grad(local) * weights).sum().backward()
    return local.grad


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_retrieval_model(tiny_config(negative_all_rank=True, queue_size=8)).eval()
    ddp_model = DistributedDataParallel(model)

    video, captions = tiny_video(2, seed=rank + 1), CAPTIONS[2 * rank:2 * rank + 2]
    idx = torch.full((2,), 10 + rank)
    torch.manual_seed(100 + rank)
    loss_vtc, loss_vtm = ddp_model(video, captions, 0.4, idx)
    (loss_vtc + loss_vtm).backward()

    input_ids, attention_mask = model.tokenize(captions)
    video_feat_m, text_feat_m = model.momentum_features(video, input_ids, attention_mask)
    torch.save({
        "losses": torch.stack([loss_vtc.detach(), loss_vtm.detach()]),
        "video_feat_m": video_feat_m, "text_feat_m": text_feat_m,
        "image_queue": model.image_queue, "text_queue": model.text_queue,
        "idx_queue": model.idx_queue, "ptr_queue": model.ptr_queue,
        "itm_head_grad": model.itm_head.weight.grad,
        "vision_grad": model.visual_encoder.blocks[0].attn.qkv.weight.grad,
        "gather_grad": gather_gradient(rank),
    }, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
