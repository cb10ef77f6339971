"""Text-guided token selection (text_guided_k) against its text-agnostic control and off.

    python tools/text_guided_study.py --base output/demo/checkpoint_best.pth   # output/text_guided_study
    python tools/text_guided_study.py --base output/demo/checkpoint_best.pth --out docs --overwrite
    python tools/text_guided_study.py --base output/demo/checkpoint_best.pth --train  # + trained runs

`--base` is a retrieval checkpoint of configs/demo_retrieval.yaml (e.g. from `make demo`).
For every setting of `SETTINGS` (off; the control `similarity` and the rule `text`, at two k):
- re-ranking: the setting applied to `--base` at test (testa.VideoText.rerank): R@1/5/10
  both ways with standard errors over the queries and paired differences, the
  cross-attention MACs per pair (models.text_guided.cross_attention_macs) and the
  re-ranking seconds;
- which tokens each rule keeps when the text is one sentence of a test paragraph (one
  event): the share of the kept tokens' frames that show the named event, against all
  tokens'; and a picture of the kept tokens for a few pairs;
- with `--train`, per seed of `--seeds`: retrieval fine-tuned from `--base` for
  `--epochs` with the setting on (train_retrieval.py), VideoQA trained from scratch with
  it (configs/demo_videoqa.yaml, train_videoqa.py, `--qa-epochs`, `--qa-settings`); test
  metrics with standard errors over the seeds and the paired differences. Runs in
  `--runs` are reused when finished with the same settings and continued when stopped, so
  separate invocations (e.g. `--epochs 0` for VideoQA alone) can share the work.
Writes `<out>/text_guided_study.json`, `<out>/text_guided_study.png` and
`<out>/text_guided_kept.png`.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the repository, run as a script
import testa  # noqa: E402
import train_retrieval  # noqa: E402
import train_videoqa  # noqa: E402
from datasets import pre_caption  # noqa: E402
from datasets.base import video_batch  # noqa: E402
from datasets.synthetic import data_settings, first_event_keys, make_spec  # noqa: E402
from datasets.video import TEST_STRATEGY, read_test_frames, sample_frame_indices  # noqa: E402
from engine.output_dir import OutputDir, taken  # noqa: E402
from engine.study import mean_and_se, paired_difference, summarise_seeds, train_or_reuse  # noqa: E402
from models.text import with_first_token  # noqa: E402
from models.text_guided import (TokenSelection, choose_tokens, cross_attention_macs,  # noqa: E402
                                relevance_of)
from utils import ConfigError  # noqa: E402

CONFIGS = {"retrieval": REPO_ROOT / "configs" / "demo_retrieval.yaml",
           "videoqa": REPO_ROOT / "configs" / "demo_videoqa.yaml"}
# the demo's videos keep 17 tokens (class token + 4 frame tokens x 4 patch tokens)
SETTINGS = {
    "off": {"text_guided_k": None},
    "similarity_k5": {"text_guided_k": 5, "text_guided_rule": "similarity"},
    "text_k5": {"text_guided_k": 5, "text_guided_rule": "text"},
    "similarity_k9": {"text_guided_k": 9, "text_guided_rule": "similarity"},
    "text_k9": {"text_guided_k": 9, "text_guided_rule": "text"},
}
RECALLS = [f"{d}_r{k}" for d in ("t2v", "v2t") for k in (1, 5, 10)]
FILES = ("text_guided_study.json", "text_guided_study.png", "text_guided_kept.png")


def selection_of(name: str):
    overrides = SETTINGS[name]
    if overrides["text_guided_k"] is None:
        return None
    return TokenSelection(overrides["text_guided_k"], overrides["text_guided_rule"])


def run_metrics(args, task: str, name: str, seed: int) -> Dict[str, float]:
    """The test metrics of `task` trained with setting `name` and `seed`: retrieval
    fine-tuned from --base for --epochs, VideoQA from scratch for --qa-epochs."""
    data = args.data if task == "retrieval" else args.qa_data
    overrides = {**data_settings(data), **SETTINGS[name], "seed": seed}
    if task == "retrieval":
        overrides.update(pretrained=str(args.base), max_epoch=args.epochs, init_lr=args.lr,
                         min_lr=args.lr / 2)
    else:
        overrides["max_epoch"] = args.qa_epochs
    main = train_retrieval.main if task == "retrieval" else train_videoqa.main
    metrics = train_or_reuse(main, CONFIGS[task], overrides, args.runs / task / f"{name}_seed{seed}")
    return {key: float(metrics[key]) for key in (RECALLS if task == "retrieval" else ["accuracy"])}


# tokens kept for one sentence ------------------------------------------------------------
def events_of_frames(data: Path, video: str, num_frm: int) -> np.ndarray:
    """The event index of each of the `num_frm` test frames of the synthetic `video`."""
    stamp = json.loads((data / "settings.json").read_text())
    spec = make_spec(int(video.removeprefix("v_synth").removesuffix(".mp4")), stamp["seed"],
                     first_event_keys(stamp["seed"]), tuple(stamp["frames_per_event"]))
    ends = np.cumsum([event.num_frames for event in spec.events])
    frames = sample_frame_indices(int(ends[-1]), num_frm, TEST_STRATEGY)
    return np.searchsorted(ends, frames, side="right")


def kept_frames(api: testa.VideoText, clip: torch.Tensor, sentences: List[str],
                selection: TokenSelection) -> torch.Tensor:
    """For each sentence as the text: how many kept patch tokens cover each test frame
    `[len(sentences), T0]` (a token of a merged frame token covers all its frames)."""
    model = api.model
    tokens, state = model.visual_encoder.forward_with_state(clip, track_source=True)
    frame_source = state.frame_source[0].float()  # [T', T0]
    input_ids, mask = model.tokenize([pre_caption(s, model.max_words) for s in sentences])
    input_ids = with_first_token(input_ids, model.tokenizer.enc_token_id)
    relevance = relevance_of(selection, model.text_encoder, input_ids, mask, tokens)
    merge = choose_tokens(selection, tokens, relevance, len(sentences))
    every = torch.arange(tokens.shape[1]).expand(len(sentences), -1)[..., None]  # k = all
    kept = (every if merge is None else merge.keep_idx)[:, 1:, 0]  # [K, k-1], no class token
    frame_token = (kept - 1) % frame_source.shape[0]  # tokens are laid out (patch, frame)
    return frame_source[frame_token].sum(dim=1)  # [K, T0]


@torch.no_grad()
def event_shares(api: testa.VideoText, data: Path, names: Sequence[str], videos: int
                 ) -> Dict[str, dict]:
    """Over (test video, sentence) pairs: the share of the kept tokens' frame cover on the
    frames of the event the sentence names, per setting; `all_tokens`: the same share of
    every patch token (what a choice blind to the event gets on average)."""
    records = json.loads((data / "annotations" / "val.json").read_text())[:videos]
    config = api.config
    shares = {name: [] for name in (*names, "all_tokens")}
    for record in records:
        frames = read_test_frames(str(data / "videos" / record["video"]),
                                  config["num_frm_test"], config["image_size"])
        clip = video_batch([frames])
        events = torch.as_tensor(events_of_frames(data, record["video"], len(frames)))
        named = events[None] == torch.arange(len(record["caption"]))[:, None]  # [K, T0]
        every = TokenSelection(17, "similarity")  # all tokens kept
        for name in (*names, "all_tokens"):
            cover = kept_frames(api, clip, record["caption"],
                                every if name == "all_tokens" else selection_of(name))
            shares[name] += ((cover * named).sum(dim=1) / cover.sum(dim=1)).tolist()
    return {name: mean_and_se(values) for name, values in shares.items()}


def trained_event_shares(args, names: Sequence[str]) -> Dict[str, dict]:
    """`event_shares` of each seed's retrieval model fine-tuned with setting `name` (its
    best checkpoint, float32), the per-model means averaged over the seeds with their
    standard error; `all_tokens` over the same models."""
    per_seed = {name: [] for name in (*names, "all_tokens")}
    for name in names:
        for seed in args.seeds:
            api = testa.load(args.runs / "retrieval" / f"{name}_seed{seed}" / "checkpoint_best.pth",
                             amp="none")
            shares = event_shares(api, args.data, [name], args.event_videos)
            per_seed[name].append(shares[name]["mean"])
            per_seed["all_tokens"].append(shares["all_tokens"]["mean"])
    return {name: mean_and_se(values) for name, values in per_seed.items()}


@torch.no_grad()
def draw_kept(api: testa.VideoText, data: Path, pairs: Sequence[tuple], names: Sequence[str],
              out_png: Path) -> None:
    """For each (test video index, sentence index): the test frames, the named event's
    frames outlined, and under them the kept tokens covering each frame per setting."""
    records = json.loads((data / "annotations" / "val.json").read_text())
    config = api.config
    figure, axes = plt.subplots(2 * len(pairs), 1, figsize=(9, 2.6 * len(pairs)),
                                gridspec_kw={"height_ratios": [1.3, 1] * len(pairs)})
    for row, (video_index, sentence) in enumerate(pairs):
        record = records[video_index]
        frames = read_test_frames(str(data / "videos" / record["video"]),
                                  config["num_frm_test"], config["image_size"])
        events = events_of_frames(data, record["video"], len(frames))
        strip = np.concatenate([f.permute(1, 2, 0).numpy() for f in frames], axis=1)
        image_axis, bar_axis = axes[2 * row], axes[2 * row + 1]
        image_axis.imshow(strip)
        size = frames.shape[-1]
        for t in np.flatnonzero(events == sentence):
            image_axis.add_patch(plt.Rectangle((t * size, 0), size - 1, size - 1, fill=False,
                                               edgecolor="#e41a1c", linewidth=2.5))
        image_axis.set_axis_off()
        image_axis.set_title(f"{record['video']}: \"{record['caption'][sentence]}\" "
                             f"(event {sentence + 1} of {len(record['caption'])}, red frames)",
                             fontsize=9)
        clip = video_batch([frames])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            cover = kept_frames(api, clip, record["caption"], selection_of(name))[sentence]
            bar_axis.bar(np.arange(len(frames)) + i * width, cover.numpy(), width, label=name)
        bar_axis.set_xlim(-0.5, len(frames) - 0.5)
        bar_axis.set_xticks(range(len(frames)), [f"frame {t + 1}" for t in range(len(frames))],
                            fontsize=7)
        bar_axis.set_ylabel("kept tokens", fontsize=8)
        bar_axis.legend(fontsize=7, ncol=len(names))
    figure.tight_layout()
    figure.savefig(out_png, dpi=100)
    plt.close(figure)


# re-ranking with each setting ------------------------------------------------------------
def query_hits(v2t: torch.Tensor, t2v: torch.Tensor, k: int) -> Dict[str, torch.Tensor]:
    """Per query, whether its match is in the top k (one paragraph per video, same order)."""
    rank_t2v = (t2v > t2v.diagonal()[:, None]).sum(dim=1)  # [T] videos scored above the match
    rank_v2t = (v2t > v2t.diagonal()[:, None]).sum(dim=1)
    return {f"t2v_r{k}": (rank_t2v < k).double(), f"v2t_r{k}": (rank_v2t < k).double()}


@torch.no_grad()
def rerank_study(api: testa.VideoText, data: Path, names: Sequence[str], repeats: int
                 ) -> Dict[str, dict]:
    """Per setting, applied at re-ranking to one model: R@1/5/10 of the test protocol with
    their standard errors over the queries, each recall's paired difference to `off`
    (query by query), the re-ranking seconds (median of `repeats`), and the cross-attention
    MACs per pair, alone and with the key/value projections shared by a video's candidates."""
    records = json.loads((data / "annotations" / "val.json").read_text())
    videos = api.embed_videos([str(data / "videos" / r["video"]) for r in records])
    texts = api.embed_paragraphs([" ".join(r["caption"]) for r in records])
    text_config = api.model.text_encoder.config
    words = float(texts.attention_mask.sum(dim=1).double().mean())
    num_tokens = videos.tokens.shape[1]
    results, hits = {}, {}
    for name in names:
        selection = selection_of(name)
        options = {} if selection is None else {"text_guided_k": selection.k,
                                                "text_guided_rule": selection.rule}
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            v2t, t2v = api.rerank(videos, texts, **options)
            seconds.append(time.perf_counter() - start)
        candidates = int(((v2t > -100) | (t2v.t() > -100)).sum())
        hits[name] = {key: value for k in (1, 5, 10) for key, value in query_hits(v2t, t2v, k).items()}
        macs = [cross_attention_macs(round(words), num_tokens, text_config.hidden_size,
                                     text_config.encoder_hidden_size,
                                     text_config.num_hidden_layers, selection, per_video)
                for per_video in (1, candidates / len(records))]
        results[name] = {
            **{key: per_query(100 * h) for key, h in hits[name].items()},
            "rerank_seconds": round(statistics.median(seconds), 4),
            "attention_mmacs_per_pair": round(macs[0][0] / 1e6, 4),
            "projection_mmacs_per_pair": round(macs[0][1] / 1e6, 4),
            "projection_mmacs_per_pair_reranking": round(macs[1][1] / 1e6, 4)}
        if name != "off" and "off" in hits:
            results[name]["minus_off"] = {key: per_query(100 * (h - hits["off"][key]))
                                          for key, h in hits[name].items() if key.endswith("r1")}
        control = name.replace("text_", "similarity_")
        if name.startswith("text_") and control in hits:
            results[name]["minus_" + control] = {
                key: per_query(100 * (h - hits[control][key]))
                for key, h in hits[name].items() if key.endswith("r1")}
    results["protocol"] = {"pairs": candidates, "videos": len(records), "tokens": num_tokens,
                           "mean_words": round(words, 2), "k_test": api.config["k_test"]}
    return results


def per_query(values: torch.Tensor) -> Dict[str, float]:
    """Mean and standard error of per-query values (the test set's sampling error)."""
    return {"mean": round(float(values.mean()), 3),
            "se": round(float(values.std() / len(values) ** 0.5), 3), "n": len(values)}


def draw(summary: dict, out_png: Path) -> None:
    """R@1 per setting at re-ranking of --base, the trained runs' R@1 and VideoQA accuracy
    (with --train), and the event shares."""
    panels = [("rerank", "t2v_r1", "text-to-video R@1 (%), --base re-ranked")]
    panels += [(task, metric, label) for task, metric, label in (
        ("retrieval", "t2v_r1", "text-to-video R@1 (%), fine-tuned"),
        ("videoqa", "accuracy", "VideoQA accuracy (%), trained")) if task in summary.get("trained", {})]
    figure, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4.2))
    for axis, (group, metric, label) in zip(axes, panels):
        results = summary["rerank"] if group == "rerank" else summary["trained"][group]
        names = [n for n in results if n != "protocol"]
        stats = [results[name][metric] for name in names]
        axis.bar(np.arange(len(names)), [s["mean"] for s in stats], yerr=[s["se"] for s in stats],
                 capsize=4, color=["#999999" if n == "off" else "#377eb8" if n.startswith("sim")
                                   else "#e41a1c" for n in names])
        axis.set_xticks(np.arange(len(names)), names, rotation=15, fontsize=8)
        axis.set_ylabel(label, fontsize=9)
        axis.set_ylim(max(0, min(s["mean"] - 2 * s["se"] for s in stats) - 5), None)
        what = "queries" if group == "rerank" else "seeds"
        axis.set_title(f"mean and standard error over {stats[0]['n']} {what}", fontsize=10)
    shares = summary["event_share"]
    names = list(shares)
    axes[-1].bar(np.arange(len(names)), [shares[n]["mean"] for n in names],
                 yerr=[shares[n]["se"] for n in names], capsize=4)
    axes[-1].set_xticks(np.arange(len(names)), names, rotation=15, fontsize=8)
    axes[-1].set_ylabel("kept tokens' frames on the named event", fontsize=9)
    axes[-1].set_title(f"one sentence as the text ({shares[names[0]]['n']} pairs)", fontsize=10)
    figure.tight_layout()
    figure.savefig(out_png, dpi=110)
    plt.close(figure)


def train_runs(args) -> dict:
    """Every setting and seed trained (retrieval with --settings, VideoQA with
    --qa-settings): test metrics per run, their means with standard errors over the seeds,
    and the text rule's paired differences (seed by seed) to off and to the control."""
    settings = {"retrieval": args.settings if args.epochs else [],
                "videoqa": args.qa_settings if args.qa_epochs else []}
    runs = {task: {name: {} for name in names} for task, names in settings.items() if names}
    for seed in args.seeds:  # seed by seed: a study stopped early has whole seeds
        for task, by_name in runs.items():
            for name, by_seed in by_name.items():
                by_seed[seed] = run_metrics(args, task, name, seed)
                print(task, name, "seed", seed, json.dumps(by_seed[seed]), flush=True)
    trained = {task: {name: summarise_seeds(by_seed) for name, by_seed in task_runs.items()}
               for task, task_runs in runs.items()}
    differences = {}
    for name in dict.fromkeys([*args.settings, *args.qa_settings]):
        control = name.replace("text_", "similarity_")
        for other in ("off", control) if name.startswith("text_") else ():
            pairs = {f"{task}_{metric}": paired_difference(runs[task][name], runs[task][other],
                                                           metric)
                     for task, task_runs in runs.items() if {name, other} <= task_runs.keys()
                     for metric in (["t2v_r1", "v2t_r1"] if task == "retrieval" else ["accuracy"])}
            if pairs:
                differences[f"{name} - {other}"] = pairs
    return {**trained, "differences": differences, "runs": runs}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base", type=Path, required=True,
                        help="retrieval checkpoint of configs/demo_retrieval.yaml")
    parser.add_argument("--data", type=Path, default=Path("data/synthetic"),
                        help="the demo's retrieval set (tools/make_synthetic.py)")
    parser.add_argument("--out", type=Path, default=Path("output/text_guided_study"),
                        help="folder of the JSON and the plots")
    parser.add_argument("--overwrite", action="store_true", help="replace the files in --out")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="settings compared: at re-ranking, and in training with --train")
    parser.add_argument("--event-videos", type=int, default=100,
                        help="test videos whose sentences measure the kept tokens")
    training = parser.add_argument_group("training every setting (--train)")
    training.add_argument("--train", action="store_true",
                          help="also train every setting and seed (minutes per run)")
    training.add_argument("--runs", type=Path, default=Path("output/text_guided_study/runs"),
                          help="where the runs go (and are reused from)")
    training.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                          help="training seeds (standard errors over them)")
    training.add_argument("--epochs", type=int, default=1,
                          help="retrieval fine-tuning epochs (0: no retrieval runs)")
    training.add_argument("--lr", type=float, default=2e-4, help="retrieval fine-tuning init_lr")
    training.add_argument("--qa-data", type=Path, default=Path("data/synthetic_qa"),
                          help="the VideoQA demo's set (configs/demo_videoqa.yaml says how to make it)")
    training.add_argument("--qa-settings", nargs="+", choices=list(SETTINGS),
                          help="the settings of the VideoQA runs (none given: those of --settings)")
    training.add_argument("--qa-epochs", type=int, default=4,
                          help="VideoQA training epochs (0: no VideoQA runs)")
    args = parser.parse_args(argv)
    args.qa_settings = args.qa_settings or args.settings
    output = OutputDir(args.out, FILES, overwrite=args.overwrite, flag="--out",
                       hint="pass --overwrite to replace them, or another --out")
    try:
        output.check()
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    needed = [args.base, args.data / "annotations" / "val.json"]
    if args.train and args.qa_epochs:
        needed.append(args.qa_data / "annotations" / "test_q.json")
    for path in needed:
        if not path.is_file():
            raise SystemExit(f"{path}: not found")

    summary = {"command": "python tools/text_guided_study.py " + " ".join(
        sys.argv[1:] if argv is None else argv)}
    timed = testa.load(args.base)  # bf16 where native, as the demo evaluates
    summary["rerank"] = rerank_study(timed, args.data, args.settings, repeats=3)
    print("re-ranking", json.dumps(summary["rerank"]), flush=True)
    guided = [n for n in args.settings if n != "off"]
    api = testa.load(args.base, amp="none")
    summary["event_share"] = event_shares(api, args.data, guided, args.event_videos)
    print("event share", json.dumps(summary["event_share"]), flush=True)
    if args.train:
        summary["trained"] = train_runs(args)
        print("trained", json.dumps({k: v for k, v in summary["trained"].items() if k != "runs"}),
              flush=True)
        if args.epochs:
            summary["trained"]["event_share"] = trained_event_shares(
                args, [n for n in args.settings if n != "off"])
            print("event share, fine-tuned", json.dumps(summary["trained"]["event_share"]),
                  flush=True)

    try:
        with taken(output):
            (args.out / "text_guided_study.json").write_text(json.dumps(summary, indent=1) + "\n")
            draw(summary, args.out / "text_guided_study.png")
            draw_kept(api, args.data, [(0, 1), (1, 2), (2, 0)],
                      [n for n in guided if n.endswith("_k5")] or guided,
                      args.out / "text_guided_kept.png")
            print(f"wrote {', '.join(str(args.out / f) for f in FILES)}")
    except ConfigError as err:  # the folder was taken by another run meanwhile
        raise SystemExit(f"error: {err}") from None
    return summary


if __name__ == "__main__":
    main()
