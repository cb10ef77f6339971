"""Draw which frames and patches TESTA merged (the paper's Figure 3) for one video.

    python tools/visualize_aggregation.py VIDEO --out output/aggregation.png
    python tools/visualize_aggregation.py VIDEO --checkpoint model.pth --frames 32 --block 6
    python tools/visualize_aggregation.py STILL.mp4 --compare BUSY.mp4 \
        --config configs/retrieval_queryd_f32_adaptive.yaml --out static_vs_busy.png

The encoder runs with source tracking up to `--block` (default: the last). Every
original (frame, patch) is coloured by the token it ended in: patches of one colour,
outlined in white, were merged into one token; a coloured rectangle encloses frames
merged into one frame token (a merged token spans all frames of its rectangle, so its
colour appears in each of them). `--compare` draws a second video beside the first with
the same weights: with adaptive aggregation (testa_threshold) a static clip keeps fewer
tokens than a busy one. Without `--checkpoint` the weights are random and the
merging follows pixel similarity (the patch embedding is a random projection of pixels).

The drawing lives in models/visualization.py.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a script
from engine.config import load_config  # noqa: E402
from engine.output_dir import check_output_file  # noqa: E402
from models import build_video_encoder  # noqa: E402
from models.encoder_weights import load_visual_encoder  # noqa: E402
from models.video_encoder import VIDEO_ENCODER_SETTINGS  # noqa: E402
from models.visualization import side_by_side, visualize_video  # noqa: E402
from utils import ConfigError, with_defaults  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("video", help="the video to draw")
    parser.add_argument("--config", default="configs/retrieval_queryd_f32.yaml",
                        help="YAML config of the video encoder")
    parser.add_argument("--compare", help="a second video, drawn beside the first")
    parser.add_argument("--checkpoint", help="BLIP/TESTA checkpoint (default: random weights)")
    parser.add_argument("--frames", type=int, help="frames to sample (default: the config's)")
    parser.add_argument("--block", type=int, help="draw after this block, 1-based (default: the last)")
    parser.add_argument("--columns", type=int, default=8, help="frames per row")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--out", default="output/aggregation.png", help="the image to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out image")
    args = parser.parse_args(argv)
    try:
        check_output_file(Path(args.out), "--out", args.overwrite)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None

    config = load_config(args.config)
    if args.frames:
        config["num_frames"] = args.frames
    config = with_defaults(config, VIDEO_ENCODER_SETTINGS)
    depth = config["depth"]
    if args.block is not None and not 1 <= args.block <= depth:
        raise SystemExit(f"--block must be between 1 and {depth}, got {args.block}")
    torch.manual_seed(args.seed)
    encoder = build_video_encoder(config).float().eval()
    if args.checkpoint:
        load_visual_encoder(encoder, args.checkpoint)
    out_png = Path(args.out)
    if args.compare is None:
        visualize_video(encoder, args.video, out_png, config["num_frames"], args.block, args.columns)
    else:
        halves = [out_png.with_name(f"{out_png.stem}.{side}{out_png.suffix}") for side in ("left", "right")]
        for video, half in zip((args.video, args.compare), halves):
            visualize_video(encoder, video, half, config["num_frames"], args.block, args.columns)
        side_by_side(*halves, out_png)
        for half in halves:
            half.unlink()
    print(f"wrote {out_png}")
    return out_png


if __name__ == "__main__":
    main()
