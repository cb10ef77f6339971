"""Fine-tune and evaluate TESTA for long-form VideoQA (ActivityNet-QA).

    torchrun --nproc_per_node 8 train_videoqa.py --config configs/vqa_activitynet_f32.yaml \
        --output_dir output/vqa_activitynet_f32
    python train_videoqa.py --config configs/vqa_activitynet_f32.yaml --output_dir out/vqa \
        --evaluate --checkpoint output/vqa_activitynet_f32/checkpoint_best.pth

The loss and the evaluation protocol (answer ranking or generation, accuracy) are in
tasks/videoqa.py.
"""
from typing import List, Optional

from engine.config import build_arg_parser, parse_args
from engine.run import script_errors, start_run
from engine.train import finetune_or_evaluate
from tasks import TASKS

TASK = TASKS["videoqa"]


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(build_arg_parser(__doc__.splitlines()[0]), argv)
    with script_errors():
        run = start_run(args, TASK)
        finetune_or_evaluate(run, args, TASK)


if __name__ == "__main__":
    main()
