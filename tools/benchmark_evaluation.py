"""Peak memory and time of a retrieval evaluation as the number of videos grows, and of
`testa.VideoText.rerank`, on random tensors (no files decoded) with small models.

    python tools/benchmark_evaluation.py --videos 500 1000 2000 4000
    python tools/benchmark_evaluation.py --api --videos 150 --tokens 1041 --width 768 --k-test 8

Default: `tasks.retrieval.evaluate` (encode every text and video, similarities, top
`--k-test` candidates re-scored in chunks of `--k-test-batch-size`) of a synthetic split
with as many one-paragraph videos as given, with a 2-block, width-64 video encoder and a
2-layer, width-64 text tower (random weights). With `--api`: `testa.VideoText.rerank` of
random video embeddings (`--tokens` x `--width` per video) and as many paragraphs, the text
tower of `configs/med_config.json` (BERT-base; `--tiny-text`: the 2-layer width-64 one)
cross-attending to width `--width`.

Each size runs in a fresh process; `peak_mb` is how far its resident set grows beyond the
model and the inputs (the peak resident set, reset once they are built, minus what they
hold; large allocations go back to the system as soon as they are freed), `seconds` the
wall time. `kept_tokens_mb` is the evaluation's formula for its largest growing part, the
video tokens it keeps for re-ranking: videos x tokens x width x bytes of the autocast
dtype; `matrices_mb` the similarity and score matrices (videos x texts x 4 bytes, four of
them, and two boolean masks).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a script
import testa  # noqa: E402
from engine.precision import build_precision  # noqa: E402
from engine.run import Run  # noqa: E402
from models import build_retrieval_model  # noqa: E402
from models.timing import current_rss_mb, in_fresh_process, rss_peak_mb  # noqa: E402
from tasks.retrieval import evaluate  # noqa: E402

# the small model: the video encoder keeps 1 + frames x 16 tokens of 64x64 frames
SMALL_MODEL = dict(image_size=64, patch_size=16, num_frames=8, num_frm_test=8, vision_width=64,
                   num_heads=2, depth=2, token_merging=False, embed_dim=16, queue_size=8,
                   max_words=32, text_config=dict(hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=128))
WORDS = ("a man woman dog cat car ball red blue green runs jumps sits walks under over near "
         "the park street kitchen stage river night morning slowly quickly").split()


class RandomClips(Dataset):
    """`videos` random clips `[3, T, H, W]` (seeded by index) with one random paragraph
    each, laid out as the retrieval evaluation datasets are (`text`, `video`, `__getitem__`
    -> (clip, video index))."""

    def __init__(self, videos: int, config: dict):
        self.shape = (3, config["num_frames"], config["image_size"], config["image_size"])
        generator = torch.Generator().manual_seed(0)
        self.video = [f"video{index}" for index in range(videos)]
        self.text = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=generator))
                     for _ in range(videos)]

    def __len__(self) -> int:
        return len(self.video)

    def __getitem__(self, index: int):
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(index)), index


def reset_peak_rss() -> None:
    """Start the peak resident set (VmHWM) from the current one (Linux 4.0 and later)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def evaluation_child(videos: int, k_test: int, batch_size: int, amp: str, threads: int,
                     queue) -> None:
    torch.set_num_threads(threads)
    config = dict(SMALL_MODEL, k_test=k_test, k_test_batch_size=batch_size)
    torch.manual_seed(0)
    model = build_retrieval_model(config).eval()
    loader = DataLoader(RandomClips(videos, config), batch_size=32)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as output_dir:
        run = Run(config, Path(output_dir), device, build_precision(amp, device))
        baseline = current_rss_mb()
        reset_peak_rss()
        start = time.perf_counter()
        scores_v2t, scores_t2v = evaluate(model, loader, run)
        seconds = time.perf_counter() - start
        peak = rss_peak_mb() - baseline
    pairs = int(((scores_v2t != -100) | (scores_t2v.t() != -100)).sum())
    tokens = 1 + config["num_frames"] * (config["image_size"] // config["patch_size"]) ** 2
    width, texts = config["vision_width"], len(loader.dataset.text)
    bytes_per_value = 2 if run.precision.dtype is not None else 4
    queue.put(dict(videos=videos, texts=texts, pairs=pairs, tokens=tokens, width=width,
                   dtype=str(run.precision), seconds=round(seconds, 2), peak_mb=round(peak, 1),
                   kept_tokens_mb=round(videos * tokens * width * bytes_per_value / 2**20, 1),
                   matrices_mb=round(videos * texts * (4 * 4 + 2) / 2**20, 1)))


def api_child(videos: int, tokens: int, width: int, k_test: int, batch_size: int,
              tiny_text: bool, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    config = dict(SMALL_MODEL, vision_width=width, num_heads=max(1, width // 64), depth=1,
                  k_test=k_test, k_test_batch_size=batch_size)
    if not tiny_text:
        config["text_config"] = None  # configs/med_config.json: BERT-base
    torch.manual_seed(0)
    model = build_retrieval_model(config).eval()
    api = testa.VideoText(model, config, None, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    features = torch.nn.functional.normalize(torch.randn(videos, config["embed_dim"],
                                                         generator=generator), dim=1)
    embeddings = testa.VideoEmbeddings(features, torch.randn(videos, tokens, width,
                                                             generator=generator))
    texts = api.embed_paragraphs(RandomClips(videos, config).text)
    baseline = current_rss_mb()
    reset_peak_rss()
    start = time.perf_counter()
    v2t, t2v = api.rerank(embeddings, texts)
    seconds = time.perf_counter() - start
    peak = rss_peak_mb() - baseline
    pairs = int(((v2t != -100) | (t2v.t() != -100)).sum())
    queue.put(dict(videos=videos, texts=videos, pairs=pairs, tokens=tokens, width=width,
                   text_width=model.text_encoder.config.hidden_size,
                   text_layers=model.text_encoder.config.num_hidden_layers,
                   inputs_mb=round(embeddings.tokens.numel() * 4 / 2**20, 1),
                   seconds=round(seconds, 2), peak_mb=round(peak, 1)))


def print_row(row: Dict[str, float], header: bool) -> None:
    if header:
        print("  ".join(f"{name:>14}" for name in row))
    print("  ".join(f"{value:>14}" for value in row.values()), flush=True)


def main(argv=None) -> List[Dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--videos", type=int, nargs="+", default=[500, 1000, 2000, 4000],
                        help="number of videos (one paragraph each), one measurement per number")
    parser.add_argument("--k-test", type=int, default=16, help="candidates per video and text")
    parser.add_argument("--k-test-batch-size", type=int, default=64,
                        help="candidate pairs per matching forward")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"),
                        help="the evaluation's autocast (bf16: on CPUs with native bfloat16)")
    parser.add_argument("--api", action="store_true", help="measure testa.VideoText.rerank")
    parser.add_argument("--tokens", type=int, default=1041, help="--api: tokens per video")
    parser.add_argument("--width", type=int, default=768, help="--api: width of the tokens")
    parser.add_argument("--tiny-text", action="store_true",
                        help="--api: a 2-layer width-64 text tower instead of BERT-base")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the measuring process (default: this one's)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    if min(args.videos + [args.k_test, args.k_test_batch_size, args.threads]) < 1:
        raise SystemExit("benchmark_evaluation: --videos, --k-test, --k-test-batch-size and "
                         "--threads must be 1 or more")
    threads = args.threads
    rows = []
    for videos in args.videos:
        try:
            if args.api:
                rows.append(in_fresh_process(api_child, videos, args.tokens, args.width,
                                             args.k_test, args.k_test_batch_size, args.tiny_text,
                                             threads))
            else:
                rows.append(in_fresh_process(evaluation_child, videos, args.k_test,
                                             args.k_test_batch_size, args.amp, threads))
        except RuntimeError as err:
            raise SystemExit(f"benchmark_evaluation: {err}") from None
        print_row(rows[-1], header=len(rows) == 1)
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
