"""Write webdataset tar shards and their manifest from a pre-training list or a retrieval split.

    python tools/make_shards.py --train_file data/webvid/pretrain.json --video_root data \
        --out data/webvid/shards --samples-per-shard 1000
    python tools/make_shards.py --config configs/retrieval_didemo.yaml --split train \
        --out data/didemo/shards

Each sample is `KEY.<ext>`, the stored video or image bytes as they are, and `KEY.json`,
`{"captions": [...], "path": original path}` (a retrieval video keeps all of its texts). A
shard closes at `--samples-per-shard` samples or `--max-shard-bytes`, whichever comes first.
`OUT/manifest.json` lists every shard's name, sample count, size and sha256, and the total;
a pre-training config then sets `train_shards: OUT/train-{000000..NNNNNN}.tar` (the command
prints it). Records whose file is missing are skipped and counted; captions are cleaned
when training reads them.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import webdataset as wds  # noqa: E402

from datasets.annotations import first_existing  # noqa: E402
from datasets.issues import DataIssues  # noqa: E402
from datasets.pretrain import read_pretrain_lists  # noqa: E402
from datasets.retrieval import READERS  # noqa: E402
from datasets.shards import MANIFEST  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.output_dir import OutputDir, taken  # noqa: E402
from models.hub import file_sha256  # noqa: E402
from utils import ConfigError  # noqa: E402

Source = tuple[str, list[str]]  # (file, captions)


def pretrain_sources(train_files: Sequence[str], video_root: str,
                     issues: DataIssues) -> Iterator[Source]:
    for _, path, caption in read_pretrain_lists(train_files, video_root, issues):
        yield path, [caption]


def retrieval_sources(config_path: str, split: str, issues: DataIssues) -> Iterator[Source]:
    """Every video of the split once, with all the texts that name it."""
    config = load_config(config_path)
    pairs = READERS[config["dataset"]](config["ann_root"], config["video_root"], split, issues)
    captions: dict[str, list[str]] = {}
    for pair in pairs:
        path = first_existing(pair.videos)
        captions.setdefault(path or pair.videos[0], []).append(pair.text)
    yield from captions.items()


class ShardWriter:
    """Tar shards `OUT/PREFIX-%06d.tar` that close at a sample count or a size; the entries
    of the manifest of those closed."""

    def __init__(self, out: Path, prefix: str, max_samples: int, max_bytes: int):
        self.out, self.prefix = out, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict] = []
        self.writer, self.path, self.samples, self.bytes = None, None, 0, 0

    def write(self, sample: dict) -> None:
        if self.writer is not None and (self.samples >= self.max_samples
                                        or self.bytes >= self.max_bytes):
            self.close()
        if self.writer is None:
            self.path = self.out / f"{self.prefix}-{len(self.shards):06d}.tar"
            self.writer = wds.TarWriter(str(self.path), mtime=0)  # same bytes, same sha256
            self.samples = self.bytes = 0
        self.bytes += self.writer.write(sample)
        self.samples += 1

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.shards.append({"name": self.path.name, "samples": self.samples,
                            "bytes": self.path.stat().st_size, "sha256": file_sha256(self.path)})
        self.writer = None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_file", nargs="+", help="pre-training JSON list(s) of {path, caption}")
    source.add_argument("--config", help="a retrieval config (its dataset, ann_root, video_root)")
    parser.add_argument("--video_root", default="", help="prefix of the paths of --train_file")
    parser.add_argument("--split", default="train", help="the split of --config (default: train)")
    parser.add_argument("--out", type=Path, required=True, help="folder of the shards")
    parser.add_argument("--prefix", default="train", help="shard names PREFIX-000000.tar ...")
    parser.add_argument("--samples-per-shard", type=int, default=1000,
                        help="clips per shard at most")
    parser.add_argument("--max-shard-bytes", type=float, default=1e9,
                        help="bytes per shard at most")
    args = parser.parse_args(argv)
    if args.samples_per_shard < 1 or args.max_shard_bytes < 1:
        parser.error("--samples-per-shard and --max-shard-bytes must be positive")
    output = OutputDir(args.out, (MANIFEST, f"{args.prefix}-*.tar"), flag="--out",
                       hint="write the shards to a new folder")
    try:
        with taken(output):
            return write_shards(args)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


def write_shards(args: argparse.Namespace) -> dict:
    issues = DataIssues("shards")
    sources = (pretrain_sources(args.train_file, args.video_root, issues) if args.train_file
               else retrieval_sources(args.config, args.split, issues))
    writer = ShardWriter(args.out, args.prefix, args.samples_per_shard, int(args.max_shard_bytes))
    written = 0
    for path, captions in sources:
        if not os.path.isfile(path):
            issues.skip("missing file", path)
            continue
        suffix = os.path.splitext(path)[1].lower().lstrip(".") or "bin"
        with open(path, "rb") as f:
            media = f.read()
        writer.write({"__key__": f"{written:09d}", suffix: media,
                      "json": json.dumps({"captions": captions, "path": path})})
        written += 1
    writer.close()
    manifest = {"samples": sum(shard["samples"] for shard in writer.shards), "shards": writer.shards}
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    skipped = f"; {issues.num_skipped} skipped ({issues.skip_reasons()})" if issues.num_skipped else ""
    print(f"{manifest['samples']} samples in {len(writer.shards)} shards{skipped}")
    if writer.shards:
        print(f"train_shards: {args.out}/{args.prefix}-{{000000..{len(writer.shards) - 1:06d}}}.tar")
    return manifest


if __name__ == "__main__":
    main()
