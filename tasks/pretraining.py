"""Video-language pre-training (VTC + VTM + captioning): its settings and training
losses. There is no evaluation during pre-training; every epoch keeps its weights.

The learning rate warms up linearly from `warmup_lr` to `init_lr` over `warmup_steps`
steps, then follows `lr_schedule` per epoch: `step` (x `lr_decay_rate` each epoch, the
released config) or `cosine` (the paper), never below `min_lr`. The distillation weight
ramps up over the first two epochs.
"""
from typing import Dict

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasets import build_pretrain_splits
from datasets.pretrain import PRETRAIN_DATA_SETTINGS
from engine.logs import LOG_SETTINGS
from engine.optim import OPTIM_SETTINGS, WARMUP_SETTINGS, ramped_alpha, warmup_schedule
from engine.precision import PRECISION_SETTINGS
from engine.run import RUN_SETTINGS, Run
from engine.task import LossFn, Task
from engine.train import TRAIN_SETTINGS
from models.blip_base import MOMENTUM_SETTINGS
from models.pretrain import build_pretrain_model
from models.text import TEXT_SETTINGS
from models.video_encoder import VIDEO_ENCODER_SETTINGS
from utils import CAPTION_SETTINGS, Setting, Settings, compose

ALPHA_RAMP_EPOCHS = 2
DATASETS = {"pretrain_video": build_pretrain_splits}
PRETRAINING_SETTINGS = Settings(title="Pre-training task", module=__name__, settings={
    "dataset": Setting(str, "pretrain_video", "the pre-training data reader",
                       choices=tuple(DATASETS)),
    "batch_size": Setting(int, meaning="clips per process and step", min=1),
})
PRETRAIN_SCHEMA: Settings = compose(
    RUN_SETTINGS, LOG_SETTINGS, PRECISION_SETTINGS, TRAIN_SETTINGS, OPTIM_SETTINGS,
    WARMUP_SETTINGS, VIDEO_ENCODER_SETTINGS, TEXT_SETTINGS, MOMENTUM_SETTINGS, CAPTION_SETTINGS,
    PRETRAIN_DATA_SETTINGS, PRETRAINING_SETTINGS)


def make_losses(train_model: nn.Module, run: Run, train_loader: DataLoader) -> LossFn:
    """VTC + VTM + CAP of a batch; the distillation weight ramps up over two epochs."""
    steps_per_epoch = len(train_loader)

    def losses_of(batch, epoch: int, step: int) -> Dict[str, torch.Tensor]:
        video, caption = batch
        alpha = ramped_alpha(run.config["alpha"], epoch, step, steps_per_epoch, ALPHA_RAMP_EPOCHS)
        loss_vtc, loss_vtm, loss_cap = train_model(video.to(run.device, non_blocking=True),
                                                   caption, alpha)
        return {"loss_vtc": loss_vtc, "loss_vtm": loss_vtm, "loss_cap": loss_cap}
    return losses_of


TASK = Task("pretraining", "pretrain.py", PRETRAIN_SCHEMA, build_pretrain_model, make_losses,
            warmup_schedule, DATASETS, served_as="video_text", decay_norms_and_biases=False,
            epoch_checkpoint="checkpoint_{epoch:02d}.pth")
