"""Tiny model configs, inputs, test videos and script runs shared by several test modules
(mostly through the fixtures of conftest.py) and by the torchrun worker script, which
runs outside pytest."""
import hashlib
import io
import json
import socket
import threading
from contextlib import redirect_stderr, redirect_stdout
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import torch
from ruamel.yaml import YAML

from models import build_video_encoder

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's store),
    so that two test runs side by side never meet on one port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CAPTIONS = ["a man is cooking pasta in a kitchen", "a dog runs across the park",
            "two people dance on a stage", "a cat sleeps on the sofa"]


def tiny_config(**overrides) -> dict:
    """A 2-block, width-64 video encoder and a 2-layer, width-64 text tower (the default
    tokenizer: bert-base-uncased's shipped vocabulary)."""
    config = dict(
        image_size=32, patch_size=16, num_frames=4, vision_width=64, num_heads=2, depth=2,
        token_merging=True, testa_r=[1, 1], merging_type="frame&patch",
        med_config=str(REPO_ROOT / "configs" / "med_config.json"),
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128),
        embed_dim=16, queue_size=8, momentum=0.995, alpha=0.4, negative_all_rank=False,
        max_words=16, max_question_len=12)
    config.update(overrides)
    return config


def tiny_video(batch: int, seed: int = 0) -> torch.Tensor:
    """Random clips `[batch, 3, 4, 32, 32]` that fit `tiny_config`."""
    return torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


# tiny training runs: a shipped config with the tiny model ------------------------------
# amp none: float32 on every CPU, so that the results of these runs do not depend on
# whether the machine has native bfloat16 (bf16 autocast has its own tests)
TINY = dict(
    pretrained=None, amp="none", image_size=32, vision_width=64, num_heads=2, depth=2, num_frames=4,
    num_frm_train=4, testa_r=[1, 2], num_workers=0, print_freq=1, init_lr=1e-3,
    text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128))


def write_config(path: Path, shipped: str, **overrides) -> str:
    """A shipped config with the tiny model and `overrides`, written to `path`."""
    config = YAML(typ="safe").load((REPO_ROOT / "configs" / shipped).read_text())
    config.update(TINY, **overrides)
    YAML(typ="safe").dump(config, path)
    return str(path)


def run_script(main, *argv) -> str:
    """Run a script's main in this process; what it printed to stdout and stderr (not a
    terminal)."""
    printed = io.StringIO()
    with redirect_stdout(printed), redirect_stderr(printed):
        main([str(arg) for arg in argv])
    return printed.getvalue()


def read_metrics(path: Path) -> dict:
    """The metrics of a script's eval_results.json or test_metrics.json."""
    return json.loads(path.read_text())["metrics"]


# test videos -------------------------------------------------------------------------
FPS = 8
GRAY_STEP = 6  # frame i of a test video is uniformly gray at 5 + 6 * i


def write_gray_video(path: str, num_frames: int, size: int = 32) -> None:
    """A near-lossless H.264 video whose frame i has the gray level 5 + 6 * i, so indices can be read back."""
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "preset": "ultrafast"}
        for i in range(num_frames):
            frame = np.full((size, size, 3), 5 + GRAY_STEP * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_tiny_encoder_config(path: Path, *, image_size: int, testa_r: list) -> None:
    """A 2-block, width-32, 4-frame TESTA encoder config (frame&patch merging) at `path`,
    for the tools that read only the encoder's keys."""
    path.write_text(f"image_size: {image_size}\npatch_size: 16\nvision_width: 32\nnum_heads: 2\n"
                    f"depth: 2\nnum_frames: 4\ntoken_merging: True\ntesta_r: {testa_r}\n"
                    f"merging_type: 'frame&patch'\n")


# float64 encoder tests -----------------------------------------------------------------
# a 12-block, width-64 encoder at 8 frames of 64 px, float64 with every weight random
TINY_ENCODER = dict(image_size=64, patch_size=16, num_frames=8, vision_width=64, num_heads=4,
                    depth=12, attention_type="divided_space_time", learnable_temporal_scaling=False,
                    token_merging=True, merging_type="frame&patch", testa_r=0, vit_grad_ckpt=False)


def tiny_encoder(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    encoder = build_video_encoder(dict(TINY_ENCODER, **overrides)).double().eval()
    with torch.no_grad():  # every weight random, so no block is an identity
        for name, param in encoder.named_parameters():
            param.normal_(0, 0.15)
            if "norm" in name and name.endswith("weight"):
                param.add_(1.0)
    return encoder


def random_video(batch: int, frames: int, seed: int = 1, size: int = 64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, frames, size, size, generator=generator, dtype=torch.float64)


# local HTTP servers on 127.0.0.1 (a free port each) -----------------------------------
class Quiet:
    """A request handler mixin that logs nothing."""

    def log_message(self, *args):
        pass


def serve(handler) -> tuple:
    """(server, its URL) of `handler` on 127.0.0.1, serving in a daemon thread."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def stop(httpd) -> None:
    httpd.shutdown()
    httpd.server_close()


class BodyServer:
    """`bodies[raw request path]` on http://127.0.0.1:PORT (a free port), each with a
    `mode`: `ok` (with its length), `nolength` (no Content-Length, connection closed after
    the body), `cut` (no Content-Length, half the body), `short` (the full length announced,
    half the body sent), `html` (the body as text/html); `requests` lists the paths asked."""

    def __init__(self):
        self.bodies, self.modes, self.requests = {}, {}, []
        server = self

        class Handler(Quiet, BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                server.requests.append(self.path)
                body = server.bodies.get(self.path)
                if body is None:
                    self.send_error(404, "File not found")
                    return
                mode = server.modes.get(self.path, "ok")
                self.send_response(200)
                self.send_header("Content-Type", "text/html" if mode == "html"
                                 else "application/octet-stream")
                if mode in ("ok", "html", "short"):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if mode in ("cut", "short") else body)

        self.httpd, self.url = serve(Handler)

    def close(self):
        stop(self.httpd)


class Server:
    """Files of `root` on http://127.0.0.1:PORT/, counting the GET requests of each path;
    `truncate` paths announce their full length but send half. Files carry the headers of
    a Hugging Face hub (a commit and an ETag), so that huggingface_hub fetches hf:// ids
    from it."""

    commit = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, root: Path):
        self.requests, self.truncate = [], set()
        server = self

        class Handler(Quiet, SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                server.requests.append(self.path)
                if self.path not in server.truncate:
                    return super().do_GET()
                body = (root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2])

            def end_headers(self):
                served = root / self.path.lstrip("/")
                if served.is_file():
                    self.send_header("X-Repo-Commit", server.commit)
                    self.send_header("ETag", f'"{hashlib.sha256(served.read_bytes()).hexdigest()}"')
                super().end_headers()

        self.httpd, self.url = serve(Handler)

    def close(self):
        stop(self.httpd)

