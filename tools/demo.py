"""CPU demos: train a small TESTA model for each task on the synthetic long-video set.

    make demo                                # = python tools/demo.py --task retrieval
    python tools/demo.py --task videoqa      # output/demo_videoqa
    python tools/demo.py --task pretrain     # output/demo_pretrain
    python tools/demo.py --task TASK --quick # seconds: a smoke run of every step

Each demo generates its synthetic dataset under data/ when absent (tools/make_synthetic.py;
the folder's settings.json records the generation settings, and a folder made with other
settings is not reused), trains its small config (configs/demo_*.yaml) from scratch, tests
on held-out videos and writes its figures to results.json in its output folder:

- retrieval: R@1/5/10 in both directions next to chance on 100 held-out videos, the video
  encoder's GMACs with and without aggregation, and a picture of one test video's merging;
- videoqa: answer accuracy on the held-out questions next to the majority-answer baseline;
- pretrain: the three losses of the first and last epoch, and zero-shot retrieval (the
  retrieval protocol on the 100 held-out videos, no fine-tuning) next to chance.
"""
import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Literal, Tuple

import torch
from ruamel.yaml import YAML

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the repository, run as a script
import pretrain  # noqa: E402
import train_retrieval  # noqa: E402
import train_videoqa  # noqa: E402
from datasets import DataError  # noqa: E402
from datasets.synthetic import (GenerationSettings, check_stamp, data_settings,  # noqa: E402
                                pretrain_list_path, write_pretrain_list)
from engine.config import format_opts  # noqa: E402
from engine.output_dir import OutputDir  # noqa: E402
from engine.run import RUN_OUTPUTS  # noqa: E402
from models import build_video_encoder  # noqa: E402
from models.cost import count, encoder_config  # noqa: E402
from models.encoder_weights import load_visual_encoder  # noqa: E402
from models.visualization import visualize_video  # noqa: E402
from tasks import TASKS as TASK_REGISTRY  # noqa: E402
from utils import ConfigError  # noqa: E402

Task = Literal["retrieval", "videoqa", "pretrain"]
TASKS: Tuple[str, ...] = ("retrieval", "videoqa", "pretrain")
TASK_OF_DEMO = {"retrieval": "retrieval", "videoqa": "videoqa", "pretrain": "pretraining"}
RESULTS_FILE = "results.json"
CONFIGS = {task: REPO_ROOT / "configs" / f"demo_{task}.yaml" for task in TASKS}
RECALL_KEYS = [f"{direction}_r{k}" for direction in ("t2v", "v2t") for k in (1, 5, 10)]
PRETRAIN_LOSSES = ("loss_vtc", "loss_vtm", "loss_cap")
# the quick runs: one epoch of 4 frames, aggregation 4 -> 2 frames and 16 -> 4 patches
QUICK_MODEL = ["max_epoch=1", "num_frames=4", "num_frm_train=4", "testa_r=[1,3,1,3,1,3,1,3]"]
QUICK_OVERRIDES = {
    "retrieval": [*QUICK_MODEL, "num_frm_test=4", "batch_size_train=8", "k_test=4"],
    "videoqa": [*QUICK_MODEL, "num_frm_test=4", "batch_size_train=8"],
    "pretrain": [*QUICK_MODEL, "batch_size=8"],
}


@dataclass(frozen=True)
class SyntheticSet:
    """A folder under data/ that tools/make_synthetic.py writes: `videos` 64-px videos, the
    last `held_out` of them held out (val.json; halved into the QA val and test splits)."""
    name: str
    videos: int
    held_out: int
    frames_per_event: Tuple[int, int] = (16, 32)

    @property
    def settings(self) -> GenerationSettings:
        return GenerationSettings(videos=self.videos, seed=0, frames_per_event=self.frames_per_event,
                                  size=64, val_fraction=self.held_out / self.videos)


# 2000 training videos; VideoQA, with 5 questions a video, trains on 300 (1500 questions)
FULL_SETS = {"retrieval": SyntheticSet("synthetic", 2100, 100),
             "videoqa": SyntheticSet("synthetic_qa", 400, 100),
             "pretrain": SyntheticSet("synthetic", 2100, 100)}
PRETRAIN_VIDEOS = 1000  # of the 2000 training videos: three epochs of 62 steps
QUICK_SET = SyntheticSet("synthetic_quick", 16, 8, frames_per_event=(4, 8))


def ensure_dataset(synthetic: SyntheticSet, folder: Path) -> None:
    """Generate the set in `folder`, or reuse it when its settings.json matches; a folder
    made with other (or unknown) settings stops the demo with a message saying so."""
    try:
        reuse = check_stamp(folder, synthetic.settings)
    except DataError as error:
        raise SystemExit(f"error: {error}; remove it or pass --data with another folder")
    if reuse:
        print(f"dataset: {folder} (already there, made with the demo's settings)")
        return
    print(f"dataset: generating {synthetic.videos} synthetic videos in {folder}")
    subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "make_synthetic.py"), "--out", str(folder),
                    *synthetic.settings.arguments()], check=True)


@dataclass(frozen=True)
class Demo:
    """One demo run: its task, dataset folder, output folder and config overrides."""
    task: str
    data: Path
    output: Path
    quick: bool

    @property
    def overrides(self) -> List[str]:
        data = data_settings(self.data)
        if self.task == "pretrain":
            data = {"video_root": data["video_root"], "train_file": str(pretrain_list_path(self.data))}
        return format_opts(data) + (QUICK_OVERRIDES[self.task] if self.quick else [])

    def config(self) -> dict:
        """The resolved config the run saved."""
        return YAML(typ="safe").load((self.output / "config.yaml").read_text())


# retrieval ---------------------------------------------------------------------------
def encoder_gmacs(config: dict) -> tuple:
    """GMACs of the video encoder for one test video, with and without aggregation."""
    return (count(encoder_config(config, None, True), decimals=4)["gmacs"],
            count(encoder_config(config, None, False), decimals=4)["gmacs"])


def draw_test_video(demo: Demo, config: dict) -> Path:
    """The trained encoder's merging of the first test video, after the last block."""
    with open(demo.data / "annotations" / "val.json") as f:
        video = demo.data / "videos" / json.load(f)[0]["video"]
    encoder = build_video_encoder(config).eval()
    load_visual_encoder(encoder, str(demo.output / "checkpoint_best.pth"))
    return visualize_video(encoder, str(video), demo.output / "aggregation.png")


def recall_results(metrics: dict, num_test: int) -> dict:
    results = {key: round(float(metrics[key]), 2) for key in RECALL_KEYS}
    return {**results, "chance": round(100 / num_test, 2)}


def print_recalls(results: dict, num_test: int, title: str) -> None:
    print(f"\n{title}: {num_test} held-out synthetic long videos, paragraph-to-video retrieval")
    print(f"{'':14}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
    for direction, name in (("t2v", "text->video"), ("v2t", "video->text")):
        print(f"{name:14}" + "".join(f"{results[f'{direction}_r{k}']:8.1f}" for k in (1, 5, 10)))
    print(f"{'chance':14}" + "".join(f"{100 * min(k, num_test) / num_test:8.1f}" for k in (1, 5, 10)))


def num_held_out_videos(demo: Demo) -> int:
    return len(json.loads((demo.data / "annotations" / "val.json").read_text()))


def run_retrieval(demo: Demo) -> dict:
    """Fine-tune from scratch, test checkpoint_best.pth, count GMACs, draw the merging."""
    train_retrieval.main(["--config", str(CONFIGS["retrieval"]), "--output_dir", str(demo.output),
                          "--opts", *demo.overrides])
    metrics = json.loads((demo.output / "test_metrics.json").read_text())["metrics"]
    config = demo.config()
    num_test = num_held_out_videos(demo)
    gmacs_agg, gmacs_noagg = encoder_gmacs(config)
    picture = draw_test_video(demo, config)
    results = {**recall_results(metrics, num_test), "gmacs_agg": gmacs_agg,
               "gmacs_noagg": gmacs_noagg}
    print_recalls(results, num_test, "test set")
    reduction = 100 * (1 - gmacs_agg / gmacs_noagg)
    print(f"\nvideo encoder: {gmacs_agg} GMACs with aggregation, {gmacs_noagg} without "
          f"({reduction:.0f}% fewer)")
    print(f"aggregation picture: {picture}")
    return results


# videoqa -----------------------------------------------------------------------------
def majority_baseline(demo: Demo) -> Tuple[str, float]:
    """The training set's most frequent answer and its accuracy on the test questions."""
    annotations = demo.data / "annotations"
    train = Counter(record["answer"] for record in json.loads((annotations / "train_a.json").read_text()))
    majority = train.most_common(1)[0][0]
    test = [record["answer"] for record in json.loads((annotations / "test_a.json").read_text())]
    return majority, round(100 * sum(answer == majority for answer in test) / len(test), 2)


def run_videoqa(demo: Demo) -> dict:
    """Fine-tune from scratch, answer the test questions with checkpoint_best.pth."""
    train_videoqa.main(["--config", str(CONFIGS["videoqa"]), "--output_dir", str(demo.output),
                        "--opts", *demo.overrides])
    metrics = json.loads((demo.output / "test_metrics.json").read_text())["metrics"]
    majority, baseline = majority_baseline(demo)
    results = {"accuracy": round(float(metrics["accuracy"]), 2), "majority_answer": majority,
               "majority_baseline": baseline, "num_test_questions": int(metrics["num_questions"])}
    print(f"\ntest set: {results['num_test_questions']} questions about held-out synthetic videos")
    print(f"accuracy {results['accuracy']:.1f}%, majority answer {majority!r} {baseline:.1f}%")
    return results


# pretrain ----------------------------------------------------------------------------
def epoch_losses(demo: Demo) -> List[dict]:
    """This run's epoch records (log.jsonl keeps those of earlier runs in the folder too)."""
    records = [json.loads(line) for line in (demo.output / "log.jsonl").read_text().splitlines()]
    epochs = [record for record in records if record.get("kind") == "epoch"]
    return epochs[-demo.config()["max_epoch"]:]


def run_pretrain(demo: Demo) -> dict:
    """Pre-train from scratch on the training videos' paragraphs, then evaluate the last
    checkpoint zero-shot with the retrieval protocol on the held-out videos."""
    write_pretrain_list(demo.data, limit=None if demo.quick else PRETRAIN_VIDEOS)
    pretrain.main(["--config", str(CONFIGS["pretrain"]), "--output_dir", str(demo.output),
                   "--opts", *demo.overrides])
    epochs = epoch_losses(demo)
    checkpoint = demo.output / f"checkpoint_{epochs[-1]['epoch']:02d}.pth"
    zero_shot = demo.output / "zero_shot"
    # the retrieval demo config shares the model settings; the quick model's too
    model_opts = [opt for opt in QUICK_OVERRIDES["retrieval"] if opt != "max_epoch=1"]
    opts = [*format_opts(data_settings(demo.data)), *(model_opts if demo.quick else [])]
    train_retrieval.main(["--config", str(CONFIGS["retrieval"]), "--output_dir", str(zero_shot),
                          "--evaluate", "--checkpoint", str(checkpoint), "--opts", *opts])
    metrics = json.loads((zero_shot / "eval_results.json").read_text())["metrics"]
    num_test = num_held_out_videos(demo)
    results = {"first_epoch": {name: round(epochs[0][f"train_{name}"], 4) for name in PRETRAIN_LOSSES},
               "last_epoch": {name: round(epochs[-1][f"train_{name}"], 4) for name in PRETRAIN_LOSSES},
               "epochs": len(epochs), "zero_shot": recall_results(metrics, num_test)}
    print(f"\npre-training losses, epoch 0 -> {len(epochs) - 1}: " + ", ".join(
        f"{name} {results['first_epoch'][name]:.3f} -> {results['last_epoch'][name]:.3f}"
        for name in PRETRAIN_LOSSES))
    print_recalls(results["zero_shot"], num_test, "zero-shot")
    return results


RUNNERS: Dict[str, Callable[[Demo], dict]] = {
    "retrieval": run_retrieval, "videoqa": run_videoqa, "pretrain": run_pretrain}


def default_output(task: str, quick: bool) -> str:
    name = "demo" if task == "retrieval" else f"demo_{task}"
    return name + ("_quick" if quick else "")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="retrieval", help="the demo to run")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every step, in seconds")
    parser.add_argument("--root", type=Path, default=Path("."),
                        help="where data/ and output/ are (default: the current directory)")
    parser.add_argument("--data", type=Path,
                        help="the synthetic dataset folder (default: ROOT/data/synthetic, "
                             "synthetic_qa for videoqa, synthetic_quick with --quick)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: ROOT/output/demo for retrieval, "
                             "ROOT/output/demo_TASK for the others; _quick appended with --quick)")
    args = parser.parse_args(argv)
    synthetic = QUICK_SET if args.quick else FULL_SETS[args.task]
    demo = Demo(args.task, args.data or args.root / "data" / synthetic.name,
                args.out or args.root / "output" / default_output(args.task, args.quick), args.quick)
    output = OutputDir(demo.output, RUN_OUTPUTS + TASK_REGISTRY[TASK_OF_DEMO[args.task]].outputs
                       + (RESULTS_FILE,), flag="--out",
                       hint="pass --out with another folder, or remove it")
    try:
        output.check()  # before the dataset is generated; the training script takes it
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    start = time.time()
    torch.manual_seed(0)
    ensure_dataset(synthetic, demo.data)
    results = RUNNERS[args.task](demo)
    results["minutes"] = round((time.time() - start) / 60, 2)
    (demo.output / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {demo.output / RESULTS_FILE} ({results['minutes']} minutes)")
    return results


if __name__ == "__main__":
    main()
