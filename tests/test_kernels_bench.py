"""benchmarks/kernels_gpu.py at --tiny on a CPU writes the issue-19 record: every kernel row, every
end-to-end path (the CUDA-only ones skipped with a line), the goals. Structure only: no time is
asserted, as none means anything on this machine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalith.bench import kernels_bench
from megalith.bench.kernels_bench import KernelCase, path_config, peak_tflops, run_benchmark, time_kernel

ROOT = Path(__file__).resolve().parents[1]
OPS = ["rms_norm", "layer_norm", "flash_attention", "rope", "bias_gelu", "swiglu", "cross_entropy"]
TIMES = {"ours", "torch", "speedup"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels_bench") / "record.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done


def test_the_record_has_the_issues_keys(tiny_run):
    record, _ = tiny_run
    assert record["schema"] == kernels_bench.SCHEMA and record["tiny"] is True and record["dtype"] == "bf16"
    assert record["device"] == {"type": "cpu", "name": None, "peak_bf16_tflops": None}
    assert record["kernel_backend"] == "torch"
    assert record["goals"] == {"kernel_speedup": 1.0, "flash_attention_speedup": 0.9, "mfu": 0.4}
    assert any("CUDA-event timing of the Triton kernels is skipped" in line for line in record["notes"])


def test_every_kernel_has_forward_and_backward_rows(tiny_run):
    rows = tiny_run[0]["kernels"]
    assert [row["op"] for row in rows] == OPS
    for row in rows:
        assert row["error"] is None, row
        assert set(row["forward_ms"]) == TIMES and set(row["forward_backward_ms"]) == TIMES
        assert row["met"] is None  # goals are judged on a GPU only
        assert row["goal"] == (0.9 if row["op"] == "flash_attention" else 1.0)
    assert rows[2]["torch_impl"] == "SDPA (flash backend)" and rows[0]["torch_impl"] == "F.rms_norm"


def test_end_to_end_local_runs_and_cuda_paths_say_why_not(tiny_run):
    record, done = tiny_run
    local, triton, te = record["end_to_end"]
    assert (local["path"], triton["path"], te["path"]) == ("local", "triton", "te")
    assert local["skipped"] is None and local["error"] is None
    expected = {"parameters", "micro_batch_size", "seq_length", "step_ms", "tokens_per_s", "tflops_per_s", "mfu",
                "losses", "kernel_choice"}
    assert expected <= set(local)
    assert local["mfu"] is None and local["micro_batch_size"] == 2 and local["seq_length"] == 32
    assert len(local["losses"]) == record["warmup"] + record["repeats"]
    assert "needs CUDA" in triton["skipped"] and "needs CUDA" in te["skipped"]
    assert "local" in done.stdout and "skipped: the triton path needs CUDA" in done.stdout


def test_the_full_run_refuses_a_cpu_in_one_line():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU; on a CPU run it with --tiny"):
        run_benchmark(torch.device("cpu"))


def test_the_driver_names_an_unknown_path():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--tiny", "--paths", "tritonn"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "unknown path(s) tritonn" in done.stderr


def test_peaks_come_from_the_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None and peak_tflops(None) is None


def test_a_path_whose_fields_are_missing_is_one_line(monkeypatch):
    monkeypatch.setattr(kernels_bench, "TRITON_PATH", {"no_such_field": True})
    with pytest.raises(RuntimeError, match="the triton path needs ModelConfig field.s. no_such_field"):
        path_config(kernels_bench.TINY_GPT, "triton", "bf16")
    assert path_config(kernels_bench.TINY_GPT, "local", "bf16").params_dtype == "bf16"


def test_a_kernel_that_cannot_run_is_a_row_that_says_why():
    x = torch.ones(3, requires_grad=True)

    def refuse(backend):
        raise RuntimeError(f"no {backend} kernel here\nsecond line")

    row = time_kernel(KernelCase("rms_norm", "x [3]", "F.rms_norm", refuse, lambda: x * 2, (x,)), "triton",
                      torch.device("cpu"), warmup=0, repeats=1)
    assert row["error"] == "RuntimeError: no triton kernel here" and row["met"] is None


def test_gpu_check_runs_its_steps_and_names_the_failed_one(tmp_path):
    """scripts/gpu_check.sh with a stand-in Python: the checks, then the tests and the benchmark,
    each under a limit, TRITON_INTERPRET unset, a failing step named and the exit status 1."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "ran $1 $2 interpret=${TRITON_INTERPRET-unset}"\n'
                    '[[ "$1" == benchmarks/kernels_gpu.py ]] && exit 3\nexit 0\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "TRITON_INTERPRET": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ran -m pytest interpret=unset" in done.stdout and "== kernel tests on CUDA: ok" in done.stdout
    assert "== benchmark: FAILED (exit 3)" in done.stdout and "failed: benchmark" in done.stderr
    assert (tmp_path / "out" / "pytest.txt").is_file() and (tmp_path / "out" / "benchmark.txt").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script would run for real (and run this test)")
def test_gpu_check_without_cuda_says_how_to_set_up(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 1 and "sees no CUDA device" in done.stderr and "pip install -e" in done.stderr


def test_the_local_path_names_sdpa():
    assert path_config(kernels_bench.TINY_GPT, "local", "bf16").attention_backend == "sdpa"


def test_a_path_config_refuses_is_a_row_not_a_crash(monkeypatch):
    monkeypatch.setattr(kernels_bench, "TRITON_PATH", {"rotary_percent": 2.0})  # not a share of the head
    row = kernels_bench.time_model("triton", kernels_bench.TINY_GPT, None, 2, 0, 1, "bf16", None)
    assert row["error"].startswith("--rotary-percent 2.0 is not a share") and row["skipped"] is None
