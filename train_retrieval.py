"""Fine-tune and evaluate TESTA for paragraph-to-video retrieval.

    torchrun --nproc_per_node 8 train_retrieval.py --config configs/retrieval_queryd_f32.yaml \
        --output_dir output/retrieval_queryd_f32
    python train_retrieval.py --config configs/retrieval_queryd_f32.yaml --output_dir out/zs \
        --evaluate --checkpoint checkpoints/testa_model_base_pretrain.pth

The losses and the evaluation protocol (top-k re-ranking, R@K) are in tasks/retrieval.py.
"""
from typing import List, Optional

from datasets import build_datasets
from engine.config import build_arg_parser, parse_args
from engine.run import script_errors, start_run
from engine.train import finetune_or_evaluate
from models import build_retrieval_model
from tasks.retrieval import RETRIEVAL_SCHEMA, TASK


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--k_test_batch_size", type=int,
                        help="candidate pairs re-scored per forward (overrides the config)")
    args = parse_args(parser, argv)
    overrides = ({} if args.k_test_batch_size is None
                 else {"k_test_batch_size": args.k_test_batch_size})
    with script_errors():
        run = start_run(args, RETRIEVAL_SCHEMA, overrides)
        datasets = build_datasets(run.config)
        finetune_or_evaluate(run, args, build_retrieval_model(run.config), TASK, datasets)


if __name__ == "__main__":
    main()
