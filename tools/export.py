"""Export a TESTA checkpoint as a folder with no pickle in it: model.safetensors, its
config.yaml and a short model card (README.md), which `testa.load`, `--checkpoint` and
`pretrained` read (a local folder, a URL to it ending in /, or hf://<owner>/<repo>).

    python tools/export.py output/demo/checkpoint_best.pth exported/demo
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the repository, run as a script

from models.checkpoint_reading import CheckpointError, read_checkpoint  # noqa: E402
from models.exported import model_card, write_export  # noqa: E402

# the result files of a run, next to its checkpoints, whose metrics go into the card
RESULT_FILES = ("test_metrics.json", "eval_results.json")


def run_metrics(checkpoint: Path) -> Optional[dict]:
    """The test metrics of the run that wrote `checkpoint`, when its folder has them for
    this file."""
    for name in RESULT_FILES:
        path = checkpoint.parent / name
        if path.is_file():
            result = json.loads(path.read_text())
            if Path(str(result.get("checkpoint", ""))).name == checkpoint.name:
                return result.get("metrics")
    return None


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="a .pth checkpoint (path, URL or hf:// id)")
    parser.add_argument("out", help="the folder to write (created; existing files in it are "
                                    "replaced)")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="allow a checkpoint that needs full unpickling (runs code from the "
                             "file; only for files from a trusted source)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        checkpoint, _ = read_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    if not isinstance(checkpoint.get("config"), dict):
        raise SystemExit(f"error: {args.checkpoint}: holds no config; an export needs one")
    metrics = run_metrics(Path(args.checkpoint)) if Path(args.checkpoint).is_file() else None
    write_export(out, checkpoint, model_card(out.name, checkpoint, metrics))
    print(f"wrote {out}: {len(checkpoint['model'])} tensors, config, model card")


if __name__ == "__main__":
    main()
