"""Write a pre-training list from a synthetic set: one `{"path", "caption"}` record per video.

The list is the JSON format `train_file` of a pre-training config names (configs/pretrain_*.yaml):
`path` relative to the config's `video_root` (here the set's videos/ folder), `caption` the
video's paragraph (its sentences joined).

    python tools/make_pretrain_list.py --data data/synthetic
        # reads data/synthetic/annotations/train.json, writes .../annotations/pretrain.json
"""
import argparse
import json
from pathlib import Path


def pretrain_records(captions: list) -> list:
    """ActivityNet Captions records `{"video", "caption": [sentences]}` -> `{"path", "caption"}`."""
    return [{"path": record["video"], "caption": " ".join(record["caption"])} for record in captions]


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
    source = args.data / "annotations" / f"{args.split}.json"
    if not source.is_file():
        raise SystemExit(f"error: {source}: not found (write the set with tools/make_synthetic.py)")
    records = pretrain_records(json.loads(source.read_text())[:args.limit])
    out = args.out or args.data / "annotations" / "pretrain.json"
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {len(records)} videos with their paragraphs to {out}")
    return out


if __name__ == "__main__":
    main()
