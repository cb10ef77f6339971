"""The one rule for output folders (engine/output_dir.py) and the tools that follow it:
checks change nothing, a folder is taken only after them, earlier results are never
replaced silently, a folder another live run holds is refused, the lock goes at the end."""
import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.output_dir import LOCK_FILE, OutputDir, check_output_file, taken
from helpers import write_gray_video
from utils import ConfigError

from tools import make_shards, make_synthetic


def content(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def finished_pid() -> int:
    """The pid of a process that has ended (a stale lock's owner)."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(ended.stdout)


# the rule ------------------------------------------------------------------------------
def test_check_changes_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    OutputDir(target, ("result.json",)).check()
    assert not (tmp_path / "a").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "result.json").write_text("earlier")
    with pytest.raises(ConfigError, match="holds a previous run \\(result.json\\)"):
        OutputDir(tmp_path / "used", ("result.json",)).check()
    OutputDir(tmp_path / "used", ("result.json",), overwrite=True).check()
    assert content(tmp_path / "used") == {"result.json": b"earlier"}


def test_take_locks_overwrites_and_release_unlocks(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "result.json").write_text("earlier")
    (folder / "notes.txt").write_text("mine")
    output = OutputDir(folder, ("result.json",), overwrite=True)
    with taken(output):
        lock = json.loads((folder / LOCK_FILE).read_text())
        assert (lock["pid"], lock["host"]) == (os.getpid(), socket.gethostname())
        assert content(folder) == {LOCK_FILE: (folder / LOCK_FILE).read_bytes(), "notes.txt": b"mine"}
        with pytest.raises(ConfigError, match="in use by another run"):
            # the same folder, seen from another process: a live pid on this host
            other = OutputDir(folder, ("result.json",), overwrite=True)
            (folder / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(),
                                                        "host": socket.gethostname()}))
            other.check()
        (folder / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(),
                                                    "host": socket.gethostname()}))
    assert not (folder / LOCK_FILE).exists()


def test_a_lock_of_another_host_is_refused_with_its_path(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "other-node"}))
    with pytest.raises(ConfigError) as refused:
        OutputDir(folder, ()).take()
    assert str(refused.value) == (f"--output_dir: {folder}: in use by another run (pid 1 on "
                                  f"other-node, {folder / LOCK_FILE}); if no run is using the "
                                  f"folder, delete that file")


def test_a_stale_lock_is_replaced(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": finished_pid(),
                                                "host": socket.gethostname()}))
    with taken(OutputDir(folder, ())):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert list(folder.iterdir()) == []


def test_a_release_leaves_another_runs_lock(tmp_path):
    folder = tmp_path / "out"
    output = OutputDir(folder, ())
    output.take()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "other-node"}))
    output.release()
    assert (folder / LOCK_FILE).exists()


# the tools -----------------------------------------------------------------------------
SYNTHETIC = ["--videos", "2", "--size", "32", "--frames-per-event", "2", "3", "--workers", "1"]


def test_make_synthetic_refuses_a_folder_with_a_set(tmp_path):
    out = tmp_path / "set"
    make_synthetic.main(["--out", str(out), "--seed", "1", *SYNTHETIC])
    before = content(out)
    assert not (out / LOCK_FILE).exists()
    with pytest.raises(SystemExit) as refused:
        make_synthetic.main(["--out", str(out), "--seed", "2", *SYNTHETIC])
    assert str(refused.value.code) == (
        f"error: --out: {out}: holds a previous run (annotations, settings.json, videos); "
        f"pass --overwrite to replace it, or another --out")
    assert content(out) == before  # nothing replaced
    make_synthetic.main(["--out", str(out), "--seed", "2", *SYNTHETIC, "--overwrite"])
    assert json.loads((out / "settings.json").read_text())["seed"] == 2


def test_make_synthetic_refuses_a_folder_in_use(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(SystemExit, match="in use by another run"):
            make_synthetic.main(["--out", str(out), *SYNTHETIC])
        assert sorted(os.listdir(out)) == [LOCK_FILE]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_make_shards_never_writes_over_shards(tmp_path):
    clip = tmp_path / "clip.mp4"
    write_gray_video(str(clip), 4)
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([{"path": str(clip), "caption": "a gray clip."}]))
    out = tmp_path / "shards"
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"shards of a killed run")  # no manifest
    with pytest.raises(SystemExit) as refused:
        make_shards.main(["--train_file", str(listing), "--out", str(out)])
    assert str(refused.value.code) == (f"error: --out: {out}: holds a previous run "
                                       f"(train-000000.tar); write the shards to a new folder")
    assert (out / "train-000000.tar").read_bytes() == b"shards of a killed run"
    make_shards.main(["--train_file", str(listing), "--out", str(out), "--prefix", "other"])
    assert sorted(os.listdir(out)) == ["manifest.json", "other-000000.tar", "train-000000.tar"]


# single output files ------------------------------------------------------------------------
def test_an_output_file_is_checked_without_changing_anything(tmp_path):
    check_output_file(tmp_path / "new" / "deeper" / "table.csv", "--out", overwrite=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "table.csv").write_text("earlier")
    with pytest.raises(ConfigError, match=r"^--out: .*table.csv: exists; pass --overwrite to "
                                          r"replace it, or another --out$"):
        check_output_file(tmp_path / "table.csv", "--out", overwrite=False)
    check_output_file(tmp_path / "table.csv", "--out", overwrite=True)
    assert (tmp_path / "table.csv").read_text() == "earlier"
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(ConfigError, match="a folder is in the way, not a file"):
        check_output_file(tmp_path / "a_folder", "--out", overwrite=True)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="a_file: a file is in the way, not a folder"):
        check_output_file(tmp_path / "a_file" / "table.csv", "--out", overwrite=False)


@pytest.mark.parametrize("tool, argv", [
    ("scaling", ["--config", "no/such/config.yaml", "--out-csv", "{file}"]),
    ("scaling", ["--config", "no/such/config.yaml", "--out-csv", "{folder}/new.csv",
                 "--out-png", "{file}"]),
    ("visualize_aggregation", ["no/such/video.mp4", "--config", "no/such/config.yaml",
                               "--out", "{file}"]),
    ("make_pretrain_list", ["--data", "no/such/set", "--out", "{file}"]),
])
def test_tools_refuse_to_write_over_a_file_before_any_work(tmp_path, tool, argv):
    earlier = tmp_path / "earlier.out"
    earlier.write_text("earlier")
    argv = [arg.format(file=earlier, folder=tmp_path) for arg in argv]
    main = importlib.import_module(f"tools.{tool}").main
    with pytest.raises(SystemExit) as refused:
        main(argv)  # the config, video or set named would fail later: the check comes first
    assert str(refused.value.code) == (f"error: {argv[argv.index(str(earlier)) - 1]}: {earlier}: "
                                       f"exists; pass --overwrite to replace it, or another "
                                       f"{argv[argv.index(str(earlier)) - 1]}")
    assert earlier.read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier.out"]
