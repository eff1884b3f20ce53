"""benchmarks/gpu_check.py: on a machine without a GPU every GPU section says why it skipped, and the file is written.

The GPU measurements themselves run only on a GPU box (``benchmarks/gpu_check.sh``);
here the parts that do not need one are checked: the run, the results file,
the comparisons (Dice, box agreement, max abs difference) and the TensorRT
child job's plumbing with an ONNX Runtime model standing in for TensorRT.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.types import Box

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load_jobs():
    """benchmarks/gpu_check_jobs.py is a script, not a package module: load it from its file."""
    spec = importlib.util.spec_from_file_location("gpu_check_jobs", BENCH / "gpu_check_jobs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


jobs = _load_jobs()


def _gpu_stack() -> str:
    """Why the GPU sections would run here instead of skipping ("" on a plain CPU machine)."""
    from edge.tools.gpu_probe import package_version

    if shutil.which("nvidia-smi"):
        return "this machine has an NVIDIA driver"
    if package_version("onnxruntime-gpu"):
        return "onnxruntime-gpu lists the CUDA provider (ort_parity then runs and reports whether it came up)"
    return ""


def test_quick_run_on_cpu_skips_every_gpu_section_with_a_reason(tmp_path: Path) -> None:
    if _gpu_stack():
        pytest.skip(_gpu_stack())
    res = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--quick", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 2 and written[0].startswith("gpu-check-") and written[0].endswith(".json")
    assert written[1] == written[0].replace(".json", ".md")
    doc = json.loads((tmp_path / written[0]).read_text())
    sections = doc["sections"]
    assert list(sections) == ["versions", "nvml", "cuda_roundtrip", "ort_parity", "tensorrt", "tensorrt_race",
                              "bench_engine", "doctor"]
    gpu = {name: s for name, s in sections.items() if s["gpu"]}
    assert len(gpu) == 6
    for name, s in gpu.items():
        assert s["status"].startswith("skipped: "), (name, s["status"])
        assert len(s["status"]) > len("skipped: ") + 10, (name, s["status"])  # a reason, not just the word
    assert sections["versions"]["status"] == "ok" and sections["versions"]["machine"]["cpu_count"] >= 1
    checks = {c["name"]: c for c in sections["doctor"]["checks"]}
    assert {"gpu driver", "gpu metrics", "cuda runtime", "tensorrt", "onnxruntime gpu"} <= set(checks)
    assert all(c["status"] != "fail" for c in checks.values())  # backend auto on a CPU box: warn, never fail
    assert "not present" in checks["tensorrt"]["detail"]
    md = (tmp_path / written[1]).read_text()
    assert "| tensorrt | skipped: " in md and "| versions | ok |" in md


def test_dice_and_box_agreement() -> None:
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    assert jobs.dice(a, b) == 1.0  # both empty
    a[:2] = 1
    b[:1] = 1
    assert jobs.dice(a, b) == pytest.approx(2 * 4 / (8 + 4))
    box = Box("nodule", 0.9, 10, 10, 30, 30)
    moved = Box("nodule", 0.8, 12, 12, 32, 32)  # IoU 324 / 476 = 0.68
    far = Box("nodule", 0.8, 100, 100, 120, 120)
    other = Box("mass", 0.9, 10, 10, 30, 30)
    assert jobs.box_agreement([], []) == 1.0
    assert jobs.box_agreement([box], [moved]) == 1.0
    assert jobs.box_agreement([box], [far]) == 0.0
    assert jobs.box_agreement([box], [other]) == 0.0  # a label must match
    assert jobs.box_agreement([box, far], [moved]) == 0.5
    assert jobs.max_abs_diff({"x": np.array([1.0, 2.0])}, {"x": np.array([1.5, 2.0], np.float16)}) == {"x": 0.5}


def test_tensorrt_job_plumbing_with_onnxruntime_standing_in(fixture_engines: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    """Build/cached-load timing, parity with ONNX Runtime fp32 and batch 1 vs 4, without TensorRT."""
    from edge.inference.model import load_model

    monkeypatch.setenv("MEDGE_ENGINES_DIR", str(fixture_engines))
    calls: list[tuple[str, str, Path]] = []

    def stand_in(model: str, precision: str, cache_dir: Path):
        calls.append((model, precision, cache_dir))
        return load_model(model, backend="onnxruntime", precision="fp32", max_batch=jobs.MAX_BATCH)

    monkeypatch.setattr(jobs, "_load_trt", stand_in)
    doc = jobs.trt_job("tiny-seg", "fp16", tmp_path / "cache", frames_n=5)
    assert calls == [("tiny-seg", "fp16", tmp_path / "cache")] * 2  # the build, then the cached load
    assert doc["build_s"] >= 0 and doc["cached_load_s"] >= 0 and doc["frames"]["n"] == 5
    assert doc["raw_max_abs_diff_vs_ort_fp32"] == {"logits": 0.0}
    assert doc["agreement_vs_ort_fp32"] == {"metric": "dice", "min": 1.0, "mean": 1.0, "frames": 5}
    assert doc["batch1_vs_batch4_max_abs_diff"]["logits"] < 1e-5


def test_race_job_waits_for_the_start_signal(tmp_path: Path, monkeypatch) -> None:
    class Loaded:
        closed = False

        def close(self) -> None:
            Loaded.closed = True

    monkeypatch.setattr(jobs, "_load_trt", lambda *a: Loaded())
    with pytest.raises(TimeoutError):
        jobs.race_job("m", "fp16", tmp_path, tmp_path / "go", deadline_s=0.05)
    (tmp_path / "go").touch()
    doc = jobs.race_job("m", "fp16", tmp_path, tmp_path / "go", deadline_s=5, ready=tmp_path / "ready")
    assert doc["plan_existed_at_start"] is False and doc["load_s"] >= 0 and Loaded.closed
    assert (tmp_path / "ready").exists()


def test_shell_wrapper_is_bash_clean_and_runs_the_script() -> None:
    sh = BENCH / "gpu_check.sh"
    assert sh.stat().st_mode & 0o111, "gpu_check.sh must be executable"
    res = subprocess.run(["bash", "-n", str(sh)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "gpu_check.py" in sh.read_text()


class FakeCudaRuntime:
    """cuda-python's runtime on host memory: ``(err, value)`` tuples, copies done with ctypes.memmove."""

    cudaError_t = type("cudaError_t", (), {"cudaSuccess": 0})
    cudaMemcpyKind = type("cudaMemcpyKind", (), {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2})
    cudaStreamNonBlocking = 1

    def __init__(self) -> None:
        import ctypes

        self._ctypes = ctypes
        self.buffers: dict[int, object] = {}
        self.freed: list[int] = []
        self.kinds: list[int] = []

    def _alloc(self, n: int):
        buf = (self._ctypes.c_uint8 * n)()
        ptr = self._ctypes.addressof(buf)
        self.buffers[ptr] = buf
        return (0, ptr)

    cudaMallocHost = cudaMalloc = _alloc

    def cudaSetDevice(self, i):
        return (0,)

    def cudaStreamCreateWithFlags(self, flags):
        assert flags == self.cudaStreamNonBlocking
        return (0, "stream")

    def cudaEventCreate(self):
        return (0, object())

    def cudaEventRecord(self, ev, stream):
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        self.kinds.append(kind)
        self._ctypes.memmove(dst, src, n)
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaEventElapsedTime(self, a, b):
        return (0, 0.25)

    def cudaFreeHost(self, ptr):
        self.freed.append(ptr)
        return (0,)

    cudaFree = cudaFreeHost

    def cudaEventDestroy(self, ev):
        return (0,)

    def cudaStreamDestroy(self, s):
        return (0,)


def test_cuda_roundtrip_plumbing_on_a_fake_runtime(tmp_path: Path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    fake = FakeCudaRuntime()
    monkeypatch.setattr(gc, "_cudart", lambda: fake)
    monkeypatch.setattr(gc, "cuda_versions", lambda: {"devices": 1, "error": ""})
    run = gc.Run(gc.argparse.Namespace(quick=True, budget_s=60, frames=4, engines_dir=None, models=None), tmp_path)
    doc = gc.run_section(run, "cuda_roundtrip", gc.cuda_roundtrip, True)
    assert doc["status"] == "ok" and doc["data_intact"] is True, doc
    assert doc["bytes"] == 4 << 20 and doc["h2d_gb_per_s"] == pytest.approx((4 << 20) / 0.25e-3 / 1e9, rel=0.01)
    assert fake.kinds[:2] == [1, 2] and sorted(fake.freed) == sorted(fake.buffers)  # every buffer freed
    monkeypatch.setattr(gc, "cuda_versions", lambda: {"devices": 0, "error": "cudaErrorNoDevice"})
    assert gc.run_section(run, "cuda_roundtrip", gc.cuda_roundtrip, True)["status"] == \
        "skipped: no CUDA device (cudaErrorNoDevice)"
