"""The download cache (models/hub.py) against a server on 127.0.0.1: entries are told
apart by the whole URL, only whole checkpoints enter the cache, a cached file is used only
as it was downloaded, clean-up stays inside the cache, bad URLs end in one line."""
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import train_retrieval
from engine.saving import model_checkpoint, save_checkpoint
from helpers import BodyServer, read_metrics, run_script, tiny_config
from models import CheckpointError, build_retrieval_model, hub
from models.checkpoint_reading import read_checkpoint


def tiny_model_config() -> dict:
    return tiny_config(testa_r=[1, 2], embed_dim=16, queue_size=8, max_words=32)


@pytest.fixture(scope="module")
def two_weights(tmp_path_factory) -> list:
    """Two tiny retrieval checkpoints with different weights, as bytes."""
    folder = tmp_path_factory.mktemp("weights")
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = folder / f"seed{seed}.pth"
        save_checkpoint(str(path), model_checkpoint(build_retrieval_model(tiny_model_config()),
                                                    {}, epoch=0))
        files.append(path.read_bytes())
    return files


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTA_CACHE", str(tmp_path / "cache"))
    served = BodyServer()
    yield served
    served.close()


def cache_files(tmp_path: Path) -> list:
    cache = tmp_path / "cache"
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def weights_of(location: str) -> torch.Tensor:
    return read_checkpoint(location)[0]["model"]["text_proj.weight"]


# entries -------------------------------------------------------------------------------
def test_urls_differing_in_the_query_are_separate_entries(server, two_weights):
    server.bodies["/get?file=a"], server.bodies["/get?file=b"] = two_weights
    a, b = f"{server.url}/get?file=a", f"{server.url}/get?file=b"
    assert hub.resolve(a) != hub.resolve(b)
    assert Path(hub.resolve(a)).read_bytes() == two_weights[0]
    assert Path(hub.resolve(b)).read_bytes() == two_weights[1]
    assert not torch.equal(weights_of(a), weights_of(b))
    assert server.requests == ["/get?file=a", "/get?file=b"]  # each fetched once


@pytest.mark.parametrize("spellings", [("/dir/x.pth", "/dir//x.pth"),
                                       ("/dir/x.pth", "/dir/./x.pth"),
                                       ("/dir/x.pth", "/dir%2Fx.pth"),
                                       ("/a/x.pth", "/b/x.pth"),
                                       ("/x.pth", "/X.pth")])
def test_path_spellings_never_collapse(server, two_weights, spellings):
    first, second = spellings
    server.bodies[first], server.bodies[second] = two_weights
    assert Path(hub.resolve(server.url + first)).read_bytes() == two_weights[0]
    assert Path(hub.resolve(server.url + second)).read_bytes() == two_weights[1]
    assert server.requests == [first, second]


def test_spellings_of_one_url_share_an_entry(server, two_weights):
    """Scheme and host case, a default port and the fragment do not tell files apart."""
    assert hub.entry_dir("HTTP://Example.COM:80/x.pth#top") == hub.entry_dir("http://example.com/x.pth")
    assert hub.entry_dir("https://example.com:443/x.pth") == hub.entry_dir("https://example.com/x.pth")
    assert hub.entry_dir("https://example.com/x.pth") != hub.entry_dir("http://example.com/x.pth")
    server.bodies["/x.pth"] = two_weights[0]
    port = server.url.rsplit(":", 1)[1]
    hub.resolve(f"{server.url}/x.pth")
    hub.resolve(f"HTTP://127.0.0.1:{port}/x.pth#part")
    assert server.requests == ["/x.pth"]


def test_entry_records_url_size_and_sha256(server, two_weights, tmp_path):
    import hashlib
    url = f"{server.url}/w/tiny.pth?rev=3"
    server.bodies["/w/tiny.pth?rev=3"] = two_weights[0]
    path = Path(hub.resolve(url))
    assert path.name == "tiny.pth" and path.parent.parent == tmp_path / "cache"
    record = json.loads((path.parent / "entry.json").read_text())
    assert record["url"] == url
    assert record["size"] == len(two_weights[0])
    assert record["sha256"] == hashlib.sha256(two_weights[0]).hexdigest()
    assert sorted(p.name for p in path.parent.iterdir()) == ["entry.json", "tiny.pth"]


def test_second_url_evaluates_its_own_weights(server, two_weights, retrieval_config, tmp_path):
    """Through the script: the second of two URLs with one file name loads its own file,
    and its results are those of that file used locally."""
    server.bodies["/one/w.pth"], server.bodies["/two/w.pth"] = two_weights
    local = tmp_path / "local.pth"
    local.write_bytes(two_weights[1])
    for name, location in (("one", f"{server.url}/one/w.pth"), ("two", f"{server.url}/two/w.pth"),
                           ("local", str(local))):
        run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir",
                   tmp_path / name, "--evaluate", "--checkpoint", location)
    assert (read_metrics(tmp_path / "two" / "eval_results.json")
            == read_metrics(tmp_path / "local" / "eval_results.json"))
    assert (read_metrics(tmp_path / "one" / "eval_results.json")
            != read_metrics(tmp_path / "two" / "eval_results.json"))


# what enters the cache --------------------------------------------------------------
@pytest.mark.parametrize("mode, body, expected", [
    ("html", b"<!DOCTYPE html><html><body>Sign in</body></html>", "a page, not a checkpoint"),
    ("ok", b"<html><body>Rate limited</body></html>", "a page, not a checkpoint"),
    ("ok", b"", "an empty body"),
    ("ok", b"not a checkpoint at all", "23 bytes that are not a PyTorch or safetensors"),
])
def test_a_body_that_is_not_a_checkpoint_is_refused(server, mode, body, expected, tmp_path):
    url = f"{server.url}/w.pth"
    server.bodies["/w.pth"], server.modes["/w.pth"] = body, mode
    with pytest.raises(hub.DownloadError) as refused:
        hub.resolve(url)
    assert str(refused.value).startswith(f"{url}: the server sent {expected}")
    assert "\n" not in str(refused.value)
    assert all(not p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_a_body_cut_short_without_a_length_is_refused(server, two_weights, tmp_path):
    url = f"{server.url}/w.pth"
    server.bodies["/w.pth"], server.modes["/w.pth"] = two_weights[0], "cut"
    with pytest.raises(hub.DownloadError, match="a zip archive cut short"):
        hub.resolve(url)
    assert all(not p.is_file() for p in (tmp_path / "cache").rglob("*"))
    server.modes["/w.pth"] = "nolength"  # the whole body, still without a length: accepted
    assert Path(hub.resolve(url)).read_bytes() == two_weights[0]


def test_refused_download_then_good_one(server, two_weights, retrieval_config, tmp_path):
    """Through the script: an error page is one line and not cached, so the next run,
    once the server sends the file, downloads and uses it."""
    url = f"{server.url}/w.pth"
    server.bodies["/w.pth"], server.modes["/w.pth"] = b"<html>Service unavailable</html>", "html"
    with pytest.raises(SystemExit) as ended:
        run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir",
                   tmp_path / "first", "--evaluate", "--checkpoint", url)
    assert str(ended.value.code).startswith(f"error: {url}: the server sent a page")
    server.bodies["/w.pth"], server.modes["/w.pth"] = two_weights[0], "ok"
    printed = run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir",
                         tmp_path / "second", "--evaluate", "--checkpoint", url)
    assert "loaded w.pth:" in printed


def test_safetensors_completeness(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(100, dtype=torch.float32)}, str(path))
    assert hub.not_a_checkpoint(path) is None
    path.write_bytes(path.read_bytes()[:-10])
    assert hub.not_a_checkpoint(path).startswith("a safetensors file cut short")


def test_a_legacy_pickle_needs_its_length(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"model": {"a": torch.zeros(2)}}, path, _use_new_zipfile_serialization=False)
    assert hub.not_a_checkpoint(path, length_announced=True) is None
    assert "without a Content-Length" in hub.not_a_checkpoint(path, length_announced=False)


# verified on use ---------------------------------------------------------------------
def test_a_changed_cached_file_is_fetched_again_when_online(server, two_weights):
    url = f"{server.url}/w.pth"
    server.bodies["/w.pth"] = two_weights[0]
    path = Path(hub.resolve(url))
    path.write_bytes(two_weights[1])  # same size, other bytes
    assert Path(hub.resolve(url)).read_bytes() == two_weights[0]
    assert server.requests == ["/w.pth", "/w.pth"]
    path.write_bytes(b"x")
    assert Path(hub.resolve(url)).read_bytes() == two_weights[0]
    assert len(server.requests) == 3


def test_a_changed_cached_file_is_refused_offline(server, two_weights, retrieval_config, tmp_path):
    url = f"{server.url}/w.pth"
    server.bodies["/w.pth"] = two_weights[0]
    path = Path(hub.resolve(url))
    server.close()
    path.write_bytes(two_weights[1])
    with pytest.raises(SystemExit) as ended:
        run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir",
                   tmp_path / "out", "--evaluate", "--checkpoint", url)
    message = str(ended.value.code)
    assert message.startswith(f"error: {url}: the cached copy {path} changed since its download")
    assert "fetching it again failed" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert path.read_bytes() == two_weights[1]  # left for the user to look at


def test_a_damaged_record_is_fetched_again(server, two_weights):
    url = f"{server.url}/w.pth"
    server.bodies["/w.pth"] = two_weights[0]
    path = Path(hub.resolve(url))
    (path.parent / "entry.json").write_text("{not json")
    assert Path(hub.resolve(url)).read_bytes() == two_weights[0]
    assert len(server.requests) == 2
    assert hub.cache_problem(url, path) is None


def test_a_cached_file_without_its_record_is_fetched_again(server, two_weights):
    url = f"{server.url}/w.pth"
    server.bodies["/w.pth"] = two_weights[0]
    path = Path(hub.resolve(url))
    (path.parent / "entry.json").unlink()
    hub.resolve(url)
    assert len(server.requests) == 2


# clean-up stays inside the cache ------------------------------------------------------
def test_clean_up_touches_only_old_temporaries_inside_the_cache(server, two_weights, tmp_path):
    url = f"{server.url}/w.pth"
    server.bodies["/w.pth"] = two_weights[0]
    entry = hub.entry_dir(url)
    entry.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / ".victim.part"
    victim.write_bytes(b"not the cache's")
    old = time.time() - 10 * hub.TIMEOUT_S
    (entry / ".killed.1234.part").write_bytes(b"half")
    (entry / ".link.part").symlink_to(victim)
    (entry / ".fresh.5678.part").write_bytes(b"live")
    for name in (".killed.1234.part",):
        os.utime(entry / name, (old, old))
    os.utime(victim, (old, old))
    hub.resolve(url)
    assert victim.read_bytes() == b"not the cache's"
    names = sorted(p.name for p in entry.iterdir())
    assert names == [".fresh.5678.part", ".link.part", "entry.json", "w.pth"]


def test_an_entry_linked_outside_the_cache_is_refused(server, two_weights, tmp_path):
    url = f"{server.url}/w.pth"
    server.bodies["/w.pth"] = two_weights[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "cache").mkdir()
    hub.entry_dir(url).symlink_to(outside)
    with pytest.raises(hub.DownloadError, match="resolves outside the cache"):
        hub.resolve(url)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("host", ["..", ".", "%2e%2e"])
def test_hosts_that_look_like_paths_stay_in_the_cache(host, tmp_path, monkeypatch):
    monkeypatch.setenv("TESTA_CACHE", str(tmp_path / "cache"))
    entry = hub.entry_dir(f"http://{host}/x.pth")
    assert entry.parent == tmp_path / "cache"


# bad URLs end in one line -------------------------------------------------------------
@pytest.mark.parametrize("url, expected", [
    ("http://no-such-host.invalid/w.pth", "download failed ("),
    ("http://a..b/w.pth", "download failed ("),
    ("http://127.0.0.1:notaport/w.pth", "not a valid URL"),
    ("http://[::1/w.pth", "not a valid URL"),
    ("http:///w.pth", "not a valid URL"),
    ("https://127.0.0.1:1/w.pth", "download failed ("),
])
def test_bad_urls_are_one_line(url, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("TESTA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(url)
    message = str(refused.value)
    assert message.startswith(f"{url}: {expected}") and "\n" not in message


def test_mistyped_host_through_the_script(retrieval_config, tmp_path, monkeypatch):
    monkeypatch.setenv("TESTA_CACHE", str(tmp_path / "cache"))
    url = "https://huggingface.cp.invalid/ShuhuaiRen/w.pth"
    with pytest.raises(SystemExit) as ended:
        run_script(train_retrieval.main, "--config", retrieval_config, "--output_dir",
                   tmp_path / "out", "--evaluate", "--checkpoint", url)
    assert str(ended.value.code).startswith(f"error: {url}: download failed (")
    assert not (tmp_path / "out").exists()


def test_bad_cache_and_endpoint_variables_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "huggingface.co")
    with pytest.raises(CheckpointError, match="HF_ENDPOINT='huggingface.co': expected an http"):
        read_checkpoint("hf://owner/repo/w.pth")
    monkeypatch.delenv("HF_ENDPOINT")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TESTA_CACHE", str(blocker))
    with pytest.raises(CheckpointError, match="cannot create the cache folder"):
        read_checkpoint("http://127.0.0.1:1/w.pth")
