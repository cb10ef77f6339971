"""Video-language pre-training of TESTA (VTC + VTM + captioning) on WebVid-2M + CC3M.

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        pretrain.py --config configs/pretrain_from_blip.yaml --output_dir output/pretrain

The learning rate warms up linearly from `warmup_lr` to `init_lr` over `warmup_steps`
steps, then follows `lr_schedule` per epoch: `step` (x `lr_decay_rate` each epoch, the
released config) or `cosine` (the paper), never below `min_lr`. The distillation weight
ramps up over the first two epochs. Every epoch writes checkpoint_{epoch:02d}.pth (the
weights, for zero-shot evaluation or fine-tuning) and checkpoint_last.pth (for --resume).
"""
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import build_datasets, create_loader, summarize
from models import build_pretrain_model
from utils import (PRETRAIN_SCHEMA, Run, TrainState, append_jsonl, build_arg_parser,
                   build_optimizer, check_trainable, cosine_lr, initial_weights, load_weights,
                   log, parse_args, ramped_alpha, resume, save_last, save_weights,
                   script_errors, start_epoch, start_run, step_lr, train_one_epoch, warmup_lr,
                   wrap_ddp)

ALPHA_RAMP_EPOCHS = 2


def learning_rate(config: Mapping, epoch: int, global_step: int) -> float:
    """Linear warmup over the first `warmup_steps` steps, then the epoch's schedule."""
    if global_step < config["warmup_steps"]:
        return warmup_lr(global_step, config["warmup_steps"], config["warmup_lr"],
                         config["init_lr"])
    if config["lr_schedule"] == "cosine":
        return cosine_lr(epoch, config["max_epoch"], config["init_lr"], config["min_lr"])
    return step_lr(epoch, config["init_lr"], config["min_lr"], config["lr_decay_rate"])


def pretrain(run: Run, model: nn.Module, loader: DataLoader, resume_training: bool) -> TrainState:
    """Train for `max_epoch` epochs, checkpointing after each."""
    config = run.config
    optimizer = build_optimizer(model, config, decay_norms_and_biases=False)
    state = resume(run, model, optimizer) if resume_training else TrainState()
    train_model = wrap_ddp(model, run)
    steps_per_epoch = len(loader)

    def losses_of(batch, epoch: int, step: int) -> Dict[str, torch.Tensor]:
        video, caption = batch
        alpha = ramped_alpha(config["alpha"], epoch, step, steps_per_epoch, ALPHA_RAMP_EPOCHS)
        loss_vtc, loss_vtm, loss_cap = train_model(video.to(run.device, non_blocking=True),
                                                   caption, alpha)
        return {"loss_vtc": loss_vtc, "loss_vtm": loss_vtm, "loss_cap": loss_cap}

    for epoch in range(state.epoch, config["max_epoch"]):
        start_epoch(loader, config["seed"], epoch)
        train_stats = train_one_epoch(
            run, train_model, loader, optimizer, epoch, losses_of,
            lr_at_step=lambda step: learning_rate(config, epoch, epoch * steps_per_epoch + step))
        save_weights(run, model, f"checkpoint_{epoch:02d}.pth", epoch)
        state.epoch = epoch + 1
        save_last(run, model, optimizer, state)
        append_jsonl(run, {"kind": "epoch", "epoch": epoch,
                           **{f"train_{k}": v for k, v in train_stats.items()}})
        log(summarize(loader.dataset))
    return state


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(build_arg_parser(__doc__.splitlines()[0], evaluate=False), argv)
    with script_errors():
        run = start_run(args, PRETRAIN_SCHEMA)
        config = run.config
        train_set, _, _ = build_datasets(config)
        loader = create_loader(train_set, config["batch_size"], config["num_workers"], True,
                               run.world_size > 1, config["seed"])
        check_trainable(loader, "train set")
        model = build_pretrain_model(config)
        weights = initial_weights(args, config)
        if weights is not None and not args.resume:
            load_weights(model, weights, trust=config["trust_checkpoint"])
        pretrain(run, model.to(run.device), loader, args.resume)


if __name__ == "__main__":
    main()
