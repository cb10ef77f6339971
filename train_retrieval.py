"""Fine-tune and evaluate TESTA for paragraph-to-video retrieval.

    torchrun --nproc_per_node 8 train_retrieval.py --config configs/retrieval_queryd_f32.yaml \
        --output_dir output/retrieval_queryd_f32
    python train_retrieval.py --config configs/retrieval_queryd_f32.yaml --output_dir out/zs \
        --evaluate --checkpoint checkpoints/testa_model_base_pretrain.pth

The losses and the evaluation protocol (top-k re-ranking, R@K) are in tasks/retrieval.py.
"""
from typing import List, Optional

from engine.config import build_arg_parser, parse_args
from engine.run import script_errors, start_run
from engine.train import finetune_or_evaluate
from tasks import TASKS

TASK = TASKS["retrieval"]


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--k_test_batch_size", type=int,
                        help="candidate pairs re-scored per forward (overrides the config)")
    args = parse_args(parser, argv)
    overrides = ({} if args.k_test_batch_size is None
                 else {"k_test_batch_size": args.k_test_batch_size})
    with script_errors():
        run = start_run(args, TASK, overrides)
        finetune_or_evaluate(run, args, TASK)


if __name__ == "__main__":
    main()
