"""Write a pre-training list from a synthetic set: one `{"path", "caption"}` record per video.

The list is the JSON format `train_file` of a pre-training config names (configs/pretrain_*.yaml):
`path` relative to the config's `video_root` (here the set's videos/ folder), `caption` the
video's paragraph (its sentences joined).

    python tools/make_pretrain_list.py --data data/synthetic
        # reads data/synthetic/annotations/train.json, writes .../annotations/pretrain.json
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a script
from datasets import DataError  # noqa: E402
from datasets.synthetic import write_pretrain_list  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="a folder tools/make_synthetic.py wrote (annotations/ and videos/ inside)")
    parser.add_argument("--split", choices=("train", "val"), default="train",
                        help="which captions file to read (default: train)")
    parser.add_argument("--limit", type=int, help="only the first LIMIT videos (default: all)")
    parser.add_argument("--out", type=Path, help="default: DATA/annotations/pretrain.json")
    args = parser.parse_args(argv)
    try:
        return write_pretrain_list(args.data, args.split, args.limit, args.out)
    except DataError as error:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main()
