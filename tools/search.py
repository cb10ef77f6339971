"""Index a folder of videos with a retrieval checkpoint, and search the index with
paragraphs (top k, re-ranked as the evaluation ranks).

    python tools/search.py index output/demo/checkpoint_best.pth data/synthetic/videos index.pt
    python tools/search.py query index.pt "a red circle moves left." --k 5

Videos that do not decode are skipped and reported. `--features-only` keeps one feature
per video (no re-ranking), for large collections.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the repository, run as a script
import testa  # noqa: E402
from models.checkpoint_reading import CheckpointError  # noqa: E402

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def videos_in(folder: Path) -> List[Path]:
    """The video files of `folder` (by suffix, not recursive), sorted by name."""
    if not folder.is_dir():
        raise SystemExit(f"error: {folder}: no such folder")
    videos = sorted(path for path in folder.iterdir() if path.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise SystemExit(f"error: {folder}: holds no video file ({', '.join(VIDEO_SUFFIXES)})")
    return videos


def index(args: argparse.Namespace) -> None:
    model = testa.load(args.checkpoint, trust=args.trust_checkpoint)
    videos = videos_in(Path(args.videos))
    built = model.index(videos, batch_size=args.batch_size, keep_tokens=not args.features_only,
                        progress=True)
    built.save(args.out)
    kind = "features only" if args.features_only else "features and tokens"
    print(f"indexed {len(built.videos.ids)} of {len(videos)} videos of {args.videos} into "
          f"{args.out} ({kind})")
    for video_id, reason in built.videos.skipped:
        print(f"skipped {reason}")


def query(args: argparse.Namespace) -> None:
    built = testa.VideoIndex.load(args.index)
    model = testa.load(args.checkpoint or built.checkpoint, trust=args.trust_checkpoint)
    for paragraph, results in zip(args.paragraphs, model.search(built, args.paragraphs, k=args.k)):
        print(paragraph)
        for rank, (video_id, score) in enumerate(results, 1):
            print(f"  {rank}. {score:8.3f}  {video_id}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, help="what to do")
    make = commands.add_parser("index", help="embed a folder's videos and save the index",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    make.add_argument("checkpoint", help="retrieval checkpoint: .pth, exported folder, URL or hf://")
    make.add_argument("videos", help="folder of video files")
    make.add_argument("out", help="index file to write")
    make.add_argument("--features-only", action="store_true",
                      help="keep one feature per video, not its tokens (no re-ranking)")
    make.add_argument("--batch-size", type=int, default=8, help="videos per forward")
    search = commands.add_parser("query", help="search a saved index with paragraphs",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    search.add_argument("index", help="index file written by `index`")
    search.add_argument("paragraphs", nargs="+", help="the paragraphs to search for")
    search.add_argument("--k", type=int, default=5, help="results per paragraph")
    search.add_argument("--checkpoint", help="the model to search with (default: the index's)")
    for command in (make, search):
        command.add_argument("--trust_checkpoint", action="store_true",
                             help="allow a checkpoint that needs full unpickling (runs code "
                                  "from the file; only for files from a trusted source)")
    args = parser.parse_args(argv)
    try:
        (index if args.command == "index" else query)(args)
    except (CheckpointError, ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
