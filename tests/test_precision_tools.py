"""bfloat16 on CPU (detection, precision choice, float32 merge metric), the benchmark's
dtype comparison and roofline keys, and tools/gpu_check.py without a GPU."""
import json

import pytest
import torch

from engine import precision
from engine.config import load_config
from helpers import write_tiny_encoder_config
from models import timing
from models.aggregation import adaptive_matching, bipartite_matching, importance_matching
from models.cost import count, encoder_config
from models.timing import encoder_attention, op_class, peak_tflops
from tools import benchmark, gpu_check



# CPU bfloat16 detection and the precision it selects ----------------------------------
@pytest.mark.parametrize("flags, native", [
    ("fpu sse avx2 fma avx512f avx512_bf16 avx512_vnni", True),
    ("fpu sse avx2 amx_bf16 amx_tile amx_int8", True),
    ("fpu sse avx2 fma f16c", False),
])
def test_bf16_detection_reads_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    problem = precision.cpu_bf16_problem(str(cpuinfo))
    assert (problem is None) == native
    if not native:
        assert "no AMX-BF16 or AVX512-BF16" in problem


def test_bf16_detection_without_cpuinfo_names_the_file(tmp_path):
    missing = tmp_path / "cpuinfo"
    assert str(missing) in precision.cpu_bf16_problem(str(missing))


def test_cpu_bf16_autocast_where_native(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_bf16_problem", lambda: None)
    selected = precision.build_precision("bf16", torch.device("cpu"))
    assert selected.dtype is torch.bfloat16 and not selected.scaler.is_enabled()
    linear = torch.nn.Linear(4, 4)
    with selected.autocast():
        out = linear(torch.randn(2, 4))
    assert out.dtype is torch.bfloat16 and linear.weight.dtype is torch.float32  # fp32 master
    assert capsys.readouterr().out == ""


def test_cpu_falls_back_to_float32_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_bf16_problem", lambda: "this CPU has no AMX-BF16")
    assert precision.build_precision("bf16", torch.device("cpu")).dtype is None
    assert capsys.readouterr().out == "amp bf16: float32 on this CPU: this CPU has no AMX-BF16\n"
    assert precision.build_precision("fp16", torch.device("cpu")).dtype is None
    assert "float16 autocast is for GPUs" in capsys.readouterr().out
    assert precision.build_precision("none", torch.device("cpu")).dtype is None
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("frames", [False, True])
def test_merge_metric_stays_float32_under_bf16_autocast(frames):
    """The choice under bf16 autocast from a bf16 metric equals the float32 computation
    on the same (bf16-rounded) metric."""
    generator = torch.Generator().manual_seed(0)
    shape = (2, 6, 8, 16) if frames else (3, 17, 16)
    metric = torch.randn(shape, generator=generator).to(torch.bfloat16)
    importance = torch.rand(shape[:-1], generator=generator)
    size = torch.ones(*shape[:-1], 1)
    for match in (lambda m: bipartite_matching(m, 3, reserved=1, protect_first=not frames,
                                                 vote_frames=frames),
                  lambda m: importance_matching(m, importance, 3, reserved=1,
                                                protect_first=not frames,
                                                share_over_patches=frames),
                  # r large enough that the threshold decides; thresholds among the scores
                  *[lambda m, threshold=threshold: adaptive_matching(
                      m, size, 8, threshold, reserved=1, protect_first=not frames,
                      frames=frames)
                    for threshold in torch.linspace(0.0, 0.6, 121).tolist()]):
        expected = match(metric.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = match(metric)
        for name in vars(expected):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name


# tools/benchmark.py ---------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("aten::addmm", "GEMM"), ("aten::bmm", "GEMM"), ("aten::_softmax", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::native_layer_norm", "norms/elementwise"), ("aten::gelu", "norms/elementwise"),
    ("aten::linalg_vector_norm", "merging"), ("aten::argsort", "merging"),
    ("aten::scatter_add_", "merging"), ("aten::copy_", "copies"), ("aten::cat", "copies"),
])
def test_profile_op_classes(name, expected):
    assert op_class(name) == expected


def test_bf16_on_a_cpu_without_it_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(benchmark, "cpu_bf16_problem", lambda: "this CPU has no AMX-BF16")
    with pytest.raises(SystemExit, match="bf16 on CPU: this CPU has no AMX-BF16; pass --allow-slow-bf16"):
        benchmark.main(["--config", "no/such/config.yaml", "--compare-dtype", "--runs", "1"])
    with pytest.raises(SystemExit, match="fp16 is for CUDA"):
        benchmark.main(["--config", "no/such/config.yaml", "--dtype", "fp16", "--device", "cpu"])


def test_a_device_name_torch_does_not_know_is_refused_in_one_line():
    with pytest.raises(SystemExit, match="--device 'gpu0': not a device"):
        benchmark.main(["--config", "no/such/config.yaml", "--device", "gpu0"])


def test_compare_dtype_reports_both_dtypes_and_the_roofline(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    write_tiny_encoder_config(config, image_size=32, testa_r=[1, 1, 1, 1])
    benchmark.main(["--config", str(config), "--compare-dtype", "--runs", "1", "--device", "cpu",
                    "--allow-slow-bf16", "--profile", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["dtype"] == "fp32,bf16"
    assert report["seconds"] == {"fp32": report["seconds_fp32"], "bf16": report["seconds_bf16"]}
    assert report["dtype_speedup"] == round(report["seconds_fp32"] / report["seconds_bf16"], 3)
    gemm_ratio = report["gemm_gflops"]["bf16"] / report["gemm_gflops"]["fp32"]
    assert report["gemm_ratio"] == round(gemm_ratio, 3)
    assert report["speedup_of_gemm_ratio"] == round(
        report["seconds_fp32"] / report["seconds_bf16"] / gemm_ratio, 3)
    flops = 2e9 * count(encoder_config(
        load_config(str(config)), None, True), decimals=None)["gmacs"]
    for dtype in ("fp32", "bf16"):
        # reported: seconds to 4 decimals, both rates and their ratio to 3; the intervals
        # below are what that rounding allows, so no tolerance depends on the machine's speed
        seconds = report["seconds"][dtype]
        achieved = report["achieved_gflops"][dtype]
        assert flops / (seconds + 5e-5) / 1e9 - 5e-4 <= achieved
        assert achieved <= flops / max(seconds - 5e-5, 1e-9) / 1e9 + 5e-4
        gemm = report["gemm_gflops"][dtype]
        low = (achieved - 5e-4) / (gemm + 5e-4) - 5e-4
        high = (achieved + 5e-4) / max(gemm - 5e-4, 1e-9) + 5e-4
        assert low <= report["peak_fraction"][dtype] <= high
        profile = report["profile"][dtype]
        assert set(profile) == {"GEMM", "attention", "merging", "norms/elementwise", "copies", "other"}
        assert profile["GEMM"] > 0 and profile["merging"] > 0
        # timed (its FLOPs: the next test); at this size the rate, to 3 decimals of a
        # GFLOP/s, rounds to 0 on a loaded machine
        assert report["attention_gflops"][dtype] >= 0


def test_the_attention_reference_runs_the_first_blocks_shapes(monkeypatch):
    config = {"num_heads": 2, "vision_width": 16, "num_frames": 3, "image_size": 32,
              "patch_size": 16}
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(q, k, v, **options):
        calls.append(tuple(q.shape))
        return sdpa(q, k, v, **options)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded)
    run, flops = encoder_attention(config, "cpu", torch.float32, batch=2)
    run()
    # 4 patches of 8 channels (2 heads x 8); temporal: 2 x 4 tracks of 3 frames,
    # spatial: 2 x 3 frames of 4 patches + the class token; 4 x queries x keys x head width
    assert flops == 4 * (2 * 4) * 2 * 3 * 3 * 8 + 4 * (2 * 3) * 2 * 5 * 5 * 8  # 14208
    assert calls == [(8, 2, 3, 8), (6, 2, 5, 8)]  # [sequences, heads, length, head width]


def test_batch_reports_videos_per_second_and_per_video_cost(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    write_tiny_encoder_config(config, image_size=32, testa_r=[1, 1, 1, 1])
    benchmark.main(["--config", str(config), "--batch", "3", "--runs", "1", "--device", "cpu",
                    "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    per_video = count(encoder_config(load_config(str(config)), None, True), decimals=None)["gmacs"]
    assert report["batch"] == 3 and report["gmacs"] == round(per_video, 1)
    seconds = report["seconds"]  # to 4 decimals: the intervals its rounding allows
    assert 3 / (seconds + 5e-5) - 5e-4 <= report["videos_per_second"] <= 3 / (seconds - 5e-5) + 5e-4
    assert 3 * 2 * per_video / (seconds + 5e-5) - 5e-4 <= report["achieved_gflops"]
    assert report["achieved_gflops"] <= 3 * 2 * per_video / (seconds - 5e-5) + 5e-4
    with pytest.raises(SystemExit, match="--batch must be 1 or more, got 0"):
        benchmark.main(["--config", str(config), "--batch", "0"])


def test_gemm_reference_counts_the_encoders_linear_layers():
    run, flops = timing.encoder_gemms({"vision_width": 8}, "cpu", torch.float32, tokens=(10, 2))
    # qkv 8->24, projection 8->8, MLP 8->32 and 32->8, at 10 and at 2 tokens
    assert flops == 2 * (10 + 2) * (8 * 24 + 8 * 8 + 8 * 32 + 32 * 8)
    run()
    assert timing.encoder_gemms({"vision_width": 8}, "cpu", torch.float32, tokens=(10,),
                                train=True)[1] == 3 * 2 * 10 * 768


# tools/gpu_check.py -----------------------------------------------------------------------
def test_gpu_check_without_cuda_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.startswith("gpu_check: no CUDA device here")


def test_gpu_check_dry_run_fills_every_row(capsys):
    assert gpu_check.main(["--cpu-dry-run", "--frames", "4", "8", "--batch", "1", "--runs", "1",
                           "--eval-videos", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| what | frames |") and lines[0].endswith("| TFLOP/s | MFU |")
    rows = [line.split(" | ") for line in lines[1:]]
    # (2 forwards + 1 training step + 2 evaluations) x with/without aggregation x bf16/fp16
    assert [(r[0], r[1], r[2], r[3]) for r in rows[:4]] == [
        ("| forward", "4", "yes", "bf16"), ("| forward", "4", "yes", "fp16"),
        ("| forward", "4", "no", "bf16"), ("| forward", "4", "no", "fp16")]
    assert len(rows) == 20 and {r[0] for r in rows[8:12]} == {"| train step"}
    assert {(r[0], r[1], r[4]) for r in rows[12:]} == {("| evaluation", "4", "3"),
                                                       ("| evaluation", "8", "3")}
    assert all(float(r[5]) > 0 and r[6] == "-" and float(r[8]) >= 0 for r in rows)
    assert all(r[9] == "- |" for r in rows)  # no MFU without a GPU's peak


def test_gpu_peak_rates_are_matched_by_the_most_specific_name():
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA L40S") == 362.1
    assert peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None
