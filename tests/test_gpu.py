"""The CUDA paths, run wherever a GPU is (`make test-gpu`; marker `gpu`, skipped with the
reason on a machine without CUDA): each task trained and evaluated on CUDA in bf16 and in
fp16 with loss scaling, against the same run on the CPU in float32; a checkpoint moved
from the GPU to the CPU and back; a one-process NCCL run; the attention kernel that ran;
the peak memory the log reports; text-guided selection choosing as on the CPU.

Tolerances: the first step's losses are computed from the same weights and the same
batch on both devices (no dropout in these towers), so they differ only by the autocast
dtype's rounding: 2% for bf16 (8 bits of mantissa), 0.5% for fp16 (11 bits). The
matching loss draws its hard negatives at random, with the device's own generator, so
it is only checked to be finite there.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import pretrain
import train_retrieval
import train_videoqa
from helpers import CAPTIONS, REPO_ROOT, free_port, read_metrics, run_script, tiny_config, write_config
from models import build_retrieval_model

pytestmark = pytest.mark.gpu

AMP_TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3}
NO_DROPOUT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
# loss names each task logs, the first of which is compared across devices
TASK_LOSSES = {"retrieval": ("loss_vtc", "loss_vtm"), "videoqa": ("loss",),
               "pretrain": ("loss_vtc", "loss_cap", "loss_vtm")}
SCRIPTS = {"retrieval": train_retrieval.main, "videoqa": train_videoqa.main,
           "pretrain": pretrain.main}


def read_log(output_dir: Path, kind: str) -> list:
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == kind]


@pytest.fixture(scope="module")
def task_configs(synthetic, tmp_path_factory) -> dict:
    """One tiny config per task on the synthetic set: one epoch, no dropout."""
    folder = tmp_path_factory.mktemp("gpu_configs")
    data = dict(video_root=str(synthetic / "videos"), ann_root=str(synthetic / "annotations"),
                num_frm_test=4, max_epoch=1, text_config=NO_DROPOUT)
    records = [{"path": str(synthetic / "videos" / f"v_synth{i:05d}.mp4"), "caption": f"clip {i}"}
               for i in range(6)]
    (folder / "pretrain.json").write_text(json.dumps(records))
    return {
        "retrieval": write_config(folder / "retrieval.yaml", "retrieval_activitynet_f32.yaml",
                                  max_words=32, batch_size_train=2, batch_size_test=4,
                                  embed_dim=16, queue_size=8, k_test=4, k_test_batch_size=3,
                                  **data),
        "videoqa": write_config(folder / "videoqa.yaml", "vqa_activitynet_f32.yaml",
                                max_question_len=12, batch_size_train=4, batch_size_test=8,
                                k_test=4, **data),
        "pretrain": write_config(folder / "pretrain.yaml", "pretrain_from_blip.yaml",
                                 train_file=[str(folder / "pretrain.json")], video_resize=40,
                                 batch_size=2, embed_dim=16, queue_size=8, max_words=16,
                                 warmup_steps=2, max_epoch=1, text_config=NO_DROPOUT),
    }


@pytest.fixture(scope="module")
def cpu_runs(task_configs, tmp_path_factory) -> dict:
    """Each task's run on the CPU in float32: task -> output folder."""
    runs = {}
    for task, config in task_configs.items():
        runs[task] = tmp_path_factory.mktemp(f"cpu_{task}")
        run_script(SCRIPTS[task], "--config", config, "--output_dir", runs[task], "--device", "cpu",
                   "--opts", "amp=none")
    return runs


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("task", ["retrieval", "videoqa", "pretrain"])
def test_task_trains_and_evaluates_on_cuda_like_the_cpu(task, amp, task_configs, cpu_runs, tmp_path):
    printed = run_script(SCRIPTS[task], "--config", task_configs[task], "--output_dir", tmp_path,
                         "--device", "cuda", "--opts", f"amp={amp}")
    assert "bf16" in printed if amp == "bf16" else "fp16 (loss scaling)" in printed
    gpu_steps, cpu_steps = read_log(tmp_path, "step"), read_log(cpu_runs[task], "step")
    assert len(gpu_steps) == len(cpu_steps)
    for step in gpu_steps:
        assert all(torch.isfinite(torch.tensor(step[name])) for name in TASK_LOSSES[task])
    compared = TASK_LOSSES[task][0]
    assert gpu_steps[0][compared] == pytest.approx(cpu_steps[0][compared], rel=AMP_TOLERANCE[amp])
    if task == "pretrain":
        assert gpu_steps[0]["loss_cap"] == pytest.approx(cpu_steps[0]["loss_cap"],
                                                        rel=AMP_TOLERANCE[amp])
    epoch = read_log(tmp_path, "epoch")[-1]
    assert 0 < epoch["max_memory_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    if task != "pretrain":  # pre-training has no test split
        metrics = read_metrics(tmp_path / "test_metrics.json")
        assert set(metrics) == set(read_metrics(cpu_runs[task] / "test_metrics.json"))
        assert all(torch.isfinite(torch.tensor(float(value))) for value in metrics.values())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_retrieval_scores_under_autocast_match_float32(amp):
    """Features and matching logits of the same model and input, CUDA autocast against CPU
    float32 (bf16/fp16 rounding only: the tolerances are a few of its units)."""
    torch.manual_seed(0)
    model = build_retrieval_model(tiny_config()).eval()
    video = torch.randn(4, 3, 4, 32, 32)
    with torch.no_grad():
        cpu_video, cpu_tokens, _ = model.encode_video(video)
        cpu_text, ids, mask = model.encode_text(CAPTIONS)
        cpu_itm = model.itm_logits(cpu_tokens, ids, mask)
        model.cuda()
        with torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp]):
            gpu_video, gpu_tokens, _ = model.encode_video(video.cuda())
            gpu_text, gpu_ids, gpu_mask = model.encode_text(CAPTIONS)
            gpu_itm = model.itm_logits(gpu_tokens, gpu_ids, gpu_mask)
    atol = {"bf16": 3e-2, "fp16": 4e-3}[amp]
    assert torch.equal(gpu_ids.cpu(), ids) and torch.equal(gpu_mask.cpu(), mask)
    torch.testing.assert_close(gpu_video.float().cpu(), cpu_video, atol=atol, rtol=0)
    torch.testing.assert_close(gpu_text.float().cpu(), cpu_text, atol=atol, rtol=0)
    torch.testing.assert_close(gpu_itm.float().cpu(), cpu_itm, atol=5 * atol, rtol=0)


def test_float32_on_cuda_merges_the_same_tokens_as_the_cpu():
    """In float32 (TF32 off) the merge metric is the same up to float32 rounding, so the
    same tokens merge: the encoder outputs agree to float32 precision."""
    torch.manual_seed(0)
    model = build_retrieval_model(tiny_config(testa_r=[1, 2])).eval()
    video = torch.randn(2, 3, 4, 32, 32)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            cpu_tokens = model.visual_encoder(video)
            gpu_tokens = model.cuda().visual_encoder(video.cuda()).cpu()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert gpu_tokens.shape == cpu_tokens.shape
    torch.testing.assert_close(gpu_tokens, cpu_tokens, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rule", ["text", "similarity"])
def test_text_guided_matching_on_cuda_selects_as_the_cpu(rule):
    """Text-guided selection (`text_guided_k`) in float32 with TF32 off: one video against
    its texts (keys and values merged per text) and every pair alone give the CPU's
    matching logits on CUDA, so the same tokens were kept and merged."""
    torch.manual_seed(0)
    model = build_retrieval_model(tiny_config(text_guided_k=4, text_guided_rule=rule)).eval()
    video = torch.randn(2, 3, 4, 32, 32)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            logits = []
            for device in ("cpu", "cuda"):
                model.to(device)
                _, tokens, _ = model.encode_video(video.to(device))
                _, ids, mask = model.encode_text(CAPTIONS)
                one_video = model.itm_logits(tokens[:1], ids, mask)  # [K, 2]
                per_pair = model.itm_logits(tokens[:1].expand(len(ids), -1, -1), ids, mask)
                logits.append(torch.cat([one_video, per_pair]).cpu())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


def test_checkpoint_moves_from_gpu_to_cpu_and_back(task_configs, tmp_path):
    config = task_configs["retrieval"]
    run_script(train_retrieval.main, "--config", config, "--output_dir", tmp_path,
               "--device", "cuda", "--opts", "amp=bf16", "max_epoch=1")
    on_cpu = run_script(train_retrieval.main, "--config", config, "--output_dir", tmp_path,
                        "--device", "cpu", "--resume", "--opts", "amp=none", "max_epoch=2")
    assert "resumed from" in on_cpu and "epoch 0 done" in on_cpu  # the last finished epoch
    back = run_script(train_retrieval.main, "--config", config, "--output_dir", tmp_path,
                      "--device", "cuda", "--resume", "--opts", "amp=bf16", "max_epoch=3")
    assert "resumed from" in back and "epoch 1 done" in back
    state = torch.load(tmp_path / "checkpoint_last.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    assert all(tensor.device.type == "cpu" for tensor in state["model"].values())


def test_one_process_nccl_run(task_configs, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
               "--master_port", str(free_port()), str(REPO_ROOT / "train_retrieval.py"),
               "--config", task_configs["retrieval"], "--output_dir", str(tmp_path),
               "--device", "cuda", "--opts", "amp=bf16"]
    env = dict(os.environ, TORCH_DISTRIBUTED_DEBUG="INFO")
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "test_metrics.json").is_file()
    assert "nccl" in (done.stdout + done.stderr).lower()


SDPA_KERNELS = {"_scaled_dot_product_flash_attention": "flash",
                "_scaled_dot_product_efficient_attention": "mem-efficient",
                "_scaled_dot_product_cudnn_attention": "cudnn",
                "_scaled_dot_product_fused_attention_overrideable": "fused"}


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_a_fused_attention_kernel_runs(mode):
    """Under bf16 autocast the encoder's attention runs in a fused kernel, not in the
    math fallback (which materialises every attention matrix)."""
    settings = dict(testa_r=[1, 2]) if mode == "fixed" else dict(testa_r=[1, 2], testa_threshold=0.5)
    torch.manual_seed(0)
    model = build_retrieval_model(tiny_config(**settings)).cuda().eval()
    video = torch.randn(2, 3, 4, 32, 32, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.visual_encoder(video)  # warm-up
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.visual_encoder(video)
    ran = {event.key.removeprefix("aten::") for event in prof.key_averages()}
    kernels = {kernel for op, kernel in SDPA_KERNELS.items() if op in ran}
    print(f"{mode}: SDPA kernels {sorted(kernels)}")
    assert kernels, f"{mode}: only the math attention ran ({sorted(op for op in ran if 'attention' in op)})"
