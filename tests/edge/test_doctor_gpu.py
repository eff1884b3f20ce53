"""``medge doctor`` on a GPU box (:mod:`edge.tools.gpu_probe`), with fakes of NVML, cuda-python, ONNX Runtime, TensorRT.

The real libraries are not on this machine; each fake has the names and
return shapes of the real API (``(err, value)`` tuples of cuda-python,
``get_providers()`` of an ONNX Runtime session, NVML's exception classes
from :mod:`tests.edge.test_nvml`). On a CPU-only machine the real run
must say "not present", never fail, unless the configuration asks for a GPU.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

import edge.inference.backends.tensorrt as trt_backend
import edge.ops.nvml as nvml_mod
from edge.config import load_config
from edge.tools import gpu_probe
from edge.tools.gpu_probe import GpuNeeds, cuda_check, driver_check, metrics_check, ort_check, plan_checks

from .test_nvml import BUS, FakeNvml, _jetson_tree


def _config(tmp_path: Path, engines: Path, *models: dict[str, str]):
    lines = [f"engines_dir = {json.dumps(str(engines))}", f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}"]
    for m in models:
        lines.append("[[models]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in m.items()]
    path = tmp_path / "medge.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


def test_what_a_missing_gpu_piece_costs_depends_on_the_configuration(tmp_path: Path, fixture_engines: Path) -> None:
    cpu = _config(tmp_path, fixture_engines, {"name": "tiny-seg"})
    assert GpuNeeds.from_config(cpu) == GpuNeeds("ok", "ok")
    auto = _config(tmp_path, fixture_engines, {"name": "tiny-seg", "backend": "auto"})
    assert GpuNeeds.from_config(auto) == GpuNeeds("warn", "warn")
    trt = _config(tmp_path, fixture_engines, {"name": "tiny-seg", "backend": "tensorrt"})
    assert GpuNeeds.from_config(trt) == GpuNeeds("fail", "fail")
    assert GpuNeeds.from_config(None) == GpuNeeds("ok", "ok")


def test_cpu_only_machine_says_not_present_and_never_fails(tmp_path: Path, fixture_engines: Path) -> None:
    if gpu_probe.package_version("nvidia-ml-py", "cuda-python", "tensorrt", "onnxruntime-gpu"):
        pytest.skip("GPU libraries are installed here")
    cfg = _config(tmp_path, fixture_engines, {"name": "tiny-seg"})
    checks = {c.name: c for c in gpu_probe.gpu_checks(cfg)}
    for name in ("gpu driver", "gpu metrics", "cuda runtime", "tensorrt", "onnxruntime gpu"):
        assert checks[name].status == "ok" and checks[name].detail.startswith("not present"), checks[name]
    strict = _config(tmp_path, fixture_engines, {"name": "tiny-seg", "backend": "tensorrt"})
    failed = {c.name for c in gpu_probe.gpu_checks(strict) if c.status == "fail"}
    assert {"gpu driver", "cuda runtime", "tensorrt"} <= failed


class DoctorNvml(FakeNvml):
    """FakeNvml plus the system and identity calls doctor makes."""

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"580.65.06"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000

    def nvmlDeviceGetName(self, h: int) -> str:
        return "NVIDIA H200"

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return (9, 0)


def test_driver_and_metrics_checks_from_nvml(monkeypatch) -> None:
    fake = DoctorNvml(BUS[:1], unsupported={(0, "util")})  # a MIG-enabled GPU
    monkeypatch.setattr(nvml_mod, "import_nvml", lambda: fake)
    drv = driver_check(GpuNeeds())
    assert drv.status == "ok" and "driver 580.65.06, CUDA driver 13.0" in drv.detail
    assert "NVIDIA H200 (16 GiB, sm 9.0, 00000000:3B:00.0, gpu=0)" in drv.detail
    met = metrics_check()
    assert met.status == "ok" and "gpu label by env" in met.detail
    assert "gpu=0: memory_used_bytes, memory_total_bytes, temperature_celsius" in met.detail  # no utilization


def test_metrics_check_on_a_jetson(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(nvml_mod, "import_nvml", lambda: None)
    _jetson_tree(tmp_path)
    ok = metrics_check(str(tmp_path))
    assert ok.status == "ok" and "Jetson sysfs: load" in ok.detail and "no memory gauges" in ok.detail
    bare = tmp_path / "bare"
    _jetson_tree(bare, load=None)
    absent = metrics_check(str(bare))
    assert absent.status == "warn" and "GPU load is absent" in absent.detail


class FakeRuntime:
    """cuda-python's runtime: versions and device count as ``(err, value)``."""

    cudaError_t = types.SimpleNamespace(cudaSuccess=0, cudaErrorInsufficientDriver=35)

    def __init__(self, runtime: int, driver: int, devices: int) -> None:
        self.runtime, self.driver, self.devices = runtime, driver, devices

    def cudaRuntimeGetVersion(self):
        return (0, self.runtime)

    def cudaDriverGetVersion(self):
        return (0, self.driver)

    def cudaGetDeviceCount(self):
        return (0, self.devices) if self.devices else (35, 0)


@pytest.mark.parametrize(("cuda_python", "driver", "devices", "status", "words"), [
    ("12.9.1", 12060, 1, "ok", "cuda-python 12.9.1, CUDA runtime 12.9, driver supports CUDA 12.6, 1 device(s)"),
    ("12.6.2", 12060, 1, "warn", "holds the GIL in cudaStreamSynchronize"),
    ("13.0.1", 12060, 1, "warn", "cuda-python 13 needs a CUDA 13 driver: install 'cuda-python>=12.9.1,<13'"),
    ("12.9.1", 0, 0, "fail", "no usable CUDA device"),
])
def test_cuda_check(monkeypatch, cuda_python: str, driver: int, devices: int, status: str, words: str) -> None:
    monkeypatch.setattr(gpu_probe, "_import_cudart", lambda: FakeRuntime(12090, driver, devices))
    monkeypatch.setattr(gpu_probe, "package_version", lambda *d: cuda_python)
    check = cuda_check(GpuNeeds(tensorrt="fail", cuda="fail"))
    assert check.status == status and words in check.detail, check


def _fake_ort(listed: list[str], active: list[str]) -> types.ModuleType:
    mod = types.ModuleType("onnxruntime")

    class SessionOptions:
        log_severity_level = 2

    class InferenceSession:
        def __init__(self, path: str, opts: SessionOptions, providers: list[str]) -> None:
            assert providers == ["CUDAExecutionProvider"] and Path(path).is_file()

        def get_providers(self) -> list[str]:
            return active

    mod.SessionOptions = SessionOptions  # type: ignore[attr-defined]
    mod.InferenceSession = InferenceSession  # type: ignore[attr-defined]
    mod.get_available_providers = lambda: listed  # type: ignore[attr-defined]
    return mod


def test_ort_check_catches_a_cuda_provider_that_is_listed_but_falls_back(tmp_path: Path, fixture_engines: Path,
                                                                       monkeypatch) -> None:
    cfg = _config(tmp_path, fixture_engines, {"name": "tiny-seg", "provider": "cuda"})
    listed = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setitem(sys.modules, "onnxruntime", _fake_ort(listed, ["CPUExecutionProvider"]))
    bad = ort_check(cfg, GpuNeeds.from_config(cfg))
    assert bad.status == "fail" and "fell back to CPUExecutionProvider" in bad.detail
    monkeypatch.setitem(sys.modules, "onnxruntime", _fake_ort(listed, listed))
    good = ort_check(cfg, GpuNeeds.from_config(cfg))
    assert good.status == "ok" and "a CUDA session on model.onnx starts" in good.detail
    monkeypatch.setitem(sys.modules, "onnxruntime", _fake_ort(["CPUExecutionProvider"], []))
    assert ort_check(cfg, GpuNeeds()).detail.startswith("not present")


def test_plan_check_finds_the_plans_the_daemon_would_load(tmp_path: Path, fixture_engines: Path,
                                                          monkeypatch) -> None:
    cfg = _config(tmp_path, fixture_engines, {"name": "tiny-seg", "backend": "auto", "precision": "auto"})
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: (True, "TensorRT 10.16.1, 1 CUDA device(s)"))
    props = types.SimpleNamespace(name=b"NVIDIA H200\x00", major=9, minor=0)
    cudart = types.SimpleNamespace(cudaError_t=types.SimpleNamespace(cudaSuccess=0),
                                   cudaGetDeviceProperties=lambda device: (0, props))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.16.1"))
    monkeypatch.setattr(trt_backend, "import_cudart", lambda: cudart)
    (first,) = plan_checks(cfg)
    assert first.status == "warn" and "int8 absent, fp32 absent" in first.detail and "medge build" in first.detail
    # the daemon's key, written out field by field here (what the backend keys a plan by)
    from edge.inference.manifest import Manifest

    m = Manifest.load(fixture_engines / "tiny-seg")
    key = trt_backend.EngineKey(gpu_name="NVIDIA H200", compute_capability=(9, 0), trt_version="10.16.1",
                                precision="int8", onnx_sha256=m.artifacts["int8"].sha256,
                                max_batch=cfg.scheduler.max_batch, input_chw=(1, 64, 64), device_id=0)
    plan = trt_backend.engine_cache_path(cfg.engine_cache_dir, "tiny-seg", key)
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"plan")
    (plan.parent / "tiny-seg-fp16-sm86-0123456789abcdef.plan").write_bytes(b"old")
    (again,) = plan_checks(cfg)
    assert again.status == "ok" and "int8 present, fp32 absent" in again.detail
    assert "1 plan(s) under other keys" in again.detail
    assert plan_checks(_config(tmp_path, fixture_engines, {"name": "tiny-seg"})) == []  # onnxruntime only


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_ort_check_turns_onnxruntimes_own_errors_into_a_reason(tmp_path: Path, fixture_engines: Path,
                                                               monkeypatch) -> None:
    """ONNX Runtime's exception classes derive from Exception, not RuntimeError: the real ones must be caught."""
    import shutil

    import onnxruntime as ort

    engines = tmp_path / "engines"
    shutil.copytree(fixture_engines, engines)
    (engines / "tiny-seg" / "model.onnx").write_bytes(b"not an onnx file")
    cfg = _config(tmp_path, engines, {"name": "tiny-seg", "provider": "cuda"})
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check = ort_check(cfg, GpuNeeds.from_config(cfg))
    assert check.status == "fail" and check.detail.startswith("CUDA session failed: ")


# ---------------------------------------------------------------------------- the real APIs, where installed
#: Every pynvml name edge/ops/nvml.py, edge/tools/gpu_probe.py and benchmarks/gpu_check.py call.
NVML_NAMES = ("nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetPciInfo",
              "nvmlDeviceGetUUID", "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo",
              "nvmlDeviceGetTemperature", "NVML_TEMPERATURE_GPU", "NVMLError", "NVMLError_NotSupported",
              "nvmlSystemGetDriverVersion", "nvmlSystemGetCudaDriverVersion", "nvmlDeviceGetName",
              "nvmlDeviceGetCudaComputeCapability")
#: Every cuda-python runtime name the same modules call.
CUDART_NAMES = ("cudaGetDeviceCount", "cudaDeviceGetPCIBusId", "cudaRuntimeGetVersion", "cudaDriverGetVersion",
                "cudaGetDeviceProperties", "cudaSetDevice", "cudaStreamCreateWithFlags", "cudaStreamNonBlocking",
                "cudaEventCreate", "cudaMallocHost", "cudaMalloc", "cudaEventRecord", "cudaMemcpyAsync",
                "cudaStreamSynchronize", "cudaEventElapsedTime", "cudaFreeHost", "cudaFree", "cudaEventDestroy",
                "cudaStreamDestroy")


def test_nvidia_ml_py_has_every_name_we_call() -> None:
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py not installed (the tensorrt extra)")
    assert [n for n in NVML_NAMES if not hasattr(pynvml, n)] == []
    assert issubclass(pynvml.NVMLError_NotSupported, pynvml.NVMLError)
    assert isinstance(pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED), pynvml.NVMLError_NotSupported)
    fields = {name for name, _ in pynvml.nvmlPciInfo_t._fields_}
    assert "busId" in fields
    assert {"used", "total"} <= {name for name, _ in pynvml.c_nvmlMemory_t._fields_}
    assert "gpu" in {name for name, _ in pynvml.c_nvmlUtilization_t._fields_}


def test_cuda_python_has_every_name_we_call() -> None:
    pytest.importorskip("cuda", reason="cuda-python not installed (the tensorrt extra)")
    cudart = gpu_probe._import_cudart()
    assert cudart is not None
    assert [n for n in CUDART_NAMES if not hasattr(cudart, n)] == []
    assert hasattr(cudart.cudaError_t, "cudaSuccess")
    assert {"cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost"} <= set(dir(cudart.cudaMemcpyKind))
    props = cudart.cudaDeviceProp()
    assert all(hasattr(props, f) for f in ("name", "major", "minor"))
    # without a driver the runtime answers with an error code (or raises RuntimeError): never anything else
    try:
        err, _ = cudart.cudaGetDeviceCount()
    except RuntimeError:
        return
    assert isinstance(err, cudart.cudaError_t)


def test_driver_check_on_jetpack_6_names_the_gpu_despite_not_supported(monkeypatch) -> None:
    class Orin(DoctorNvml):
        def nvmlDeviceGetMemoryInfo(self, h: int):
            raise FakeNvml.NVMLError_NotSupported()

        def nvmlDeviceGetPciInfo(self, h: int):
            raise FakeNvml.NVMLError_NotSupported()

        def nvmlDeviceGetName(self, h: int) -> str:
            return "Orin (nvgpu)"

    monkeypatch.setattr(nvml_mod, "import_nvml", lambda: Orin([""]))
    check = driver_check(GpuNeeds())
    assert check.status == "ok" and "Orin (nvgpu) (?, sm 9.0, ?, gpu=0)" in check.detail, check.detail
