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
from datasets.synthetic import pretrain_list_path, write_pretrain_list  # noqa: E402
from engine.output_dir import check_output_file  # noqa: E402
from utils import ConfigError  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="a folder tools/make_synthetic.py wrote (annotations/ and videos/ inside)")
    parser.add_argument("--split", choices=("train", "val"), default="train",
                        help="which captions file to read (default: train)")
    parser.add_argument("--limit", type=int, help="only the first LIMIT videos (default: all)")
    parser.add_argument("--out", type=Path, help="default: DATA/annotations/pretrain.json")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing list")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"error: --limit must be 1 or more, got {args.limit}")
    out = args.out or pretrain_list_path(args.data)
    try:
        check_output_file(out, "--out", args.overwrite)
        return write_pretrain_list(args.data, args.split, args.limit, out)
    except (ConfigError, DataError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
