"""Video-language pre-training of TESTA (VTC + VTM + captioning) on WebVid-2M + CC3M.

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        pretrain.py --config configs/pretrain_from_blip.yaml --output_dir output/pretrain

Every epoch writes checkpoint_{epoch:02d}.pth (the weights, for zero-shot evaluation or
fine-tuning) and checkpoint_last.pth (for --resume). The losses and the learning-rate
schedule are in tasks/pretraining.py.
"""
from typing import List, Optional

from engine.config import build_arg_parser, parse_args
from engine.run import script_errors, start_run
from engine.checkpoints import initial_weights, load_weights
from engine.train import build_loaders, check_trainable, fit
from tasks import TASKS

TASK = TASKS["pretraining"]


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(build_arg_parser(__doc__.splitlines()[0], evaluate=False), argv)
    with script_errors():
        run = start_run(args, TASK)
        config = run.config
        train_set, _, _ = TASK.build_datasets(config)
        loaders = build_loaders(run, {"train": train_set}, {"train": config["batch_size"]})
        check_trainable(loaders["train"], "train set")
        model = TASK.build_model(config)
        weights = initial_weights(args, config)
        if weights is not None and not args.resume:
            load_weights(model, weights, trust=config["trust_checkpoint"])
        fit(run, model.to(run.device), TASK, loaders, args.resume, (train_set,))
        run.records.finish()


if __name__ == "__main__":
    main()
