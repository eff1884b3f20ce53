"""What this machine's GPU stack is, as ``medge doctor`` checks: driver, CUDA, TensorRT, ONNX Runtime, plans.

Used by :mod:`edge.commands.doctor` (the GPU checks) and by
``benchmarks/gpu_check.py`` (its versions section). Every check is
:class:`Check` ``ok``, ``warn`` or ``fail`` with a one-line reason, and
never raises for a missing library or GPU.

How absence is judged (:class:`GpuNeeds`): on a machine whose configuration
asks for nothing GPU (every model ``backend = "onnxruntime"``, ``provider =
"cpu"``), a missing GPU library is ``ok`` with the detail ``not present``;
with ``backend = "auto"`` it is a ``warn`` (the model falls back and says
so); where a model names it (``backend = "tensorrt"``, ``provider = "cuda"``
or ``"tensorrt"``) it is a ``fail``: the daemon will not start.

The checks, in order:

``gpu driver``
    NVML (``nvidia-ml-py``): driver and CUDA driver versions, each GPU's
    name, memory, compute capability, PCI bus id and ``gpu`` label; falls
    back to ``nvidia-smi`` where nvidia-ml-py is missing (``warn``: no GPU
    metrics then).
``gpu metrics``
    What ``/metrics`` will show: the gauges each GPU supports (MIG drops
    utilisation), how the ``gpu`` label was found (``cuda``, ``env``,
    ``nvml``), or a Jetson's sysfs files, or that GPU load is absent.
``cuda runtime``
    cuda-python: its version, the CUDA runtime and driver versions, the
    device count. ``warn`` for cuda-python before 12.9.1 (holds the GIL in
    ``cudaStreamSynchronize``) or a cuda-python major above the driver's
    CUDA major (cuda-python 13 needs a CUDA 13 driver).
``tensorrt``
    ``import tensorrt``: its version, and whether a CUDA device is usable.
``onnxruntime gpu``
    The execution providers ONNX Runtime lists, and whether a session on
    the CUDA provider can really be created (``get_available_providers()``
    lists CUDA even where its libraries are missing: the session then falls
    back to the CPU, which is what this check catches).
``engine plan <model>``
    For each model that may run on TensorRT: the TensorRT plans the daemon
    would try (in ``auto`` order), each present or absent in the engine
    cache under the key the daemon computes, and the plans there under
    other keys (stale: another GPU, TensorRT or artifact).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from edge.config import MedgeConfig, ModelConfig
from edge.errors import BackendUnavailableError, MedgeError

__all__ = ["Check", "GpuNeeds", "gpu_checks", "package_version", "cuda_versions", "NOT_PRESENT"]

_log = logging.getLogger(__name__)

NOT_PRESENT = "not present"
_GIL_FIXED = (12, 9, 1)  # cuda-python releases before this hold the GIL in cudaStreamSynchronize


@dataclass(frozen=True)
class Check:
    """One doctor finding: ``status`` is ``ok``, ``warn`` or ``fail``."""

    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class GpuNeeds:
    """What the configuration asks of the GPU stack: the status a missing piece gets."""

    tensorrt: str = "ok"
    cuda: str = "ok"

    @classmethod
    def from_config(cls, cfg: MedgeConfig | None) -> "GpuNeeds":
        """``fail`` where a model names TensorRT or a GPU provider, ``warn`` for ``auto``, else ``ok``."""
        models: Sequence[ModelConfig] = cfg.models if cfg is not None else ()
        trt = "fail" if any(m.backend == "tensorrt" or m.provider == "tensorrt" for m in models) else (
            "warn" if any(m.backend == "auto" for m in models) else "ok")
        cuda = "fail" if any(m.backend == "tensorrt" or m.provider in ("cuda", "tensorrt") for m in models) else (
            "warn" if any(m.backend == "auto" for m in models) else "ok")
        return cls(tensorrt=trt, cuda=cuda)


def package_version(*dists: str) -> str | None:
    """The installed version of the first of ``dists`` that is installed, else ``None``."""
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _cuda_text(v: int) -> str:
    """CUDA's integer version (``12040``) as ``12.4``."""
    return f"{v // 1000}.{(v % 1000) // 10}"


# --------------------------------------------------------------------------- driver / NVML
def _nvidia_smi() -> list[str] | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        res = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [g.strip() for g in res.stdout.splitlines() if g.strip()][:64]


def _nvml_devices(nv: Any, labels: Sequence[str | None]) -> list[str]:
    """One line per GPU; what NVML does not support here (a Jetson's memory, its PCI info) shows as ``?``."""

    def ask(read: Any) -> Any:
        try:
            value = read()
        except nv.NVMLError:
            return "?"
        return value.decode() if isinstance(value, bytes) else value

    out = []
    for i, label in enumerate(labels):
        try:
            h = nv.nvmlDeviceGetHandleByIndex(i)
        except nv.NVMLError as exc:
            out.append(f"NVML index {i}: {exc}")
            continue
        mem = ask(lambda: f"{nv.nvmlDeviceGetMemoryInfo(h).total / 2**30:.0f} GiB")
        cc = ask(lambda: "sm {}.{}".format(*nv.nvmlDeviceGetCudaComputeCapability(h)))
        gpu = "not visible to CUDA" if label is None else f"gpu={label}"
        out.append(f"{ask(lambda: nv.nvmlDeviceGetName(h))} ({mem}, {cc}, "
                   f"{ask(lambda: nv.nvmlDeviceGetPciInfo(h).busId)}, {gpu})")
    return out


def driver_check(needs: GpuNeeds) -> Check:
    """``gpu driver``: NVML's view of the driver and GPUs (``nvidia-smi`` where nvidia-ml-py is missing)."""
    from edge.ops.nvml import NvmlCollector, nvml_status

    miss = needs.cuda
    nv, why = nvml_status()
    if nv is None:
        smi = _nvidia_smi()
        if smi:
            return Check("gpu driver", "warn", f"{why}: no GPU metrics (pip install nvidia-ml-py); "
                                               f"nvidia-smi: {'; '.join(smi)}")
        return Check("gpu driver", miss, f"{NOT_PRESENT}: no NVIDIA driver ({why}); inference runs on the CPU")
    try:
        driver = nv.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        cuda = _cuda_text(int(nv.nvmlSystemGetCudaDriverVersion()))
        collector = NvmlCollector.from_nvml(nv)
    except nv.NVMLError as exc:
        return Check("gpu driver", miss, f"NVML answers but fails: {exc}")
    if collector is None:
        return Check("gpu driver", miss, f"driver {driver} (CUDA {cuda}) but NVML lists no GPU")
    devices = _nvml_devices(nv, collector.labels)
    return Check("gpu driver", "ok", f"driver {driver}, CUDA driver {cuda}; " + "; ".join(devices))


def metrics_check(sysfs_root: str = "/") -> Check:
    """``gpu metrics``: which GPU gauges ``/metrics`` will carry here, and why some are absent."""
    from edge.ops.jetson import JetsonGpuCollector, is_jetson
    from edge.ops.nvml import NvmlCollector, gpu_collector

    collector = gpu_collector(sysfs_root=sysfs_root)
    if isinstance(collector, NvmlCollector):
        supported = collector.supported()
        parts = [f"gpu={label}: {', '.join(n.removeprefix('medge_gpu_') for n in names)}"
                 for label, names in supported.items()]
        status = "ok" if supported else "warn"
        return Check("gpu metrics", status, f"NVML, gpu label by {collector.label_method}; "
                     + ("; ".join(parts) if parts else "no gauge readable"))
    if isinstance(collector, JetsonGpuCollector):
        f = collector.files
        return Check("gpu metrics", "ok", f"Jetson sysfs: load {f.load}, temperature {f.temperature or 'absent'}; "
                                          "no memory gauges (shared system RAM)")
    if is_jetson(sysfs_root):
        return Check("gpu metrics", "warn", "Jetson without a GPU load file in sysfs: GPU load is absent")
    return Check("gpu metrics", "ok", f"{NOT_PRESENT}: no GPU gauges (no NVML GPU, no Jetson sysfs)")


# --------------------------------------------------------------------------- CUDA runtime
def _import_cudart() -> ModuleType | None:
    """cuda-python's runtime module, or None where it is not installed (one import rule: the backend's)."""
    from edge.errors import BackendUnavailableError
    from edge.inference.backends.cuda_runtime import import_cudart

    try:
        return import_cudart()
    except BackendUnavailableError:
        return None


def cuda_versions() -> dict[str, Any]:
    """cuda-python's version, the CUDA runtime and driver versions and the device count (``None`` where unknown)."""
    out: dict[str, Any] = {"cuda_python": package_version("cuda-python", "cuda-bindings"),
                           "runtime": None, "driver": None, "devices": None, "error": ""}
    cudart = _import_cudart()
    if cudart is None:
        out["error"] = "cuda-python is not installed"
        return out
    ok = cudart.cudaError_t.cudaSuccess
    try:
        err, rt = cudart.cudaRuntimeGetVersion()
        out["runtime"] = _cuda_text(rt) if err == ok else None
        err, drv = cudart.cudaDriverGetVersion()
        out["driver"] = _cuda_text(drv) if err == ok and drv else None
        err, count = cudart.cudaGetDeviceCount()
        out["devices"] = int(count) if err == ok else 0
        if err != ok:
            out["error"] = getattr(err, "name", str(err))
    except RuntimeError as exc:  # cuda-python raises when the driver library cannot be loaded
        out["error"] = str(exc).splitlines()[0][:200]
    return out


def cuda_check(needs: GpuNeeds) -> Check:
    """``cuda runtime``: cuda-python and what it can see; warns on the releases that misbehave here."""
    v = cuda_versions()
    if v["cuda_python"] is None and v["error"]:
        return Check("cuda runtime", needs.tensorrt, f"{NOT_PRESENT}: {v['error']} (needed by the tensorrt backend)")
    detail = (f"cuda-python {v['cuda_python']}, CUDA runtime {v['runtime'] or '?'}, driver supports CUDA "
              f"{v['driver'] or 'none'}, {v['devices'] or 0} device(s)")
    if not v["devices"]:
        return Check("cuda runtime", needs.tensorrt, f"{detail}: no usable CUDA device ({v['error'] or 'none'})")
    mine = _version_tuple(v["cuda_python"] or "0")
    if mine < _GIL_FIXED:
        return Check("cuda runtime", "warn", f"{detail}; cuda-python before 12.9.1 holds the GIL in "
                                             "cudaStreamSynchronize: install 'cuda-python>=12.9.1'")
    driver_major = _version_tuple(v["driver"] or "0")[0]
    if driver_major and mine[0] > driver_major:
        floor = "12.9.1" if driver_major == 12 else f"{driver_major}.0"
        return Check("cuda runtime", "warn", f"{detail}; cuda-python {mine[0]} needs a CUDA {mine[0]} driver: "
                                             f"install 'cuda-python>={floor},<{driver_major + 1}'")
    return Check("cuda runtime", "ok", detail)


# --------------------------------------------------------------------------- TensorRT
def tensorrt_check(needs: GpuNeeds) -> Check:
    """``tensorrt``: importable, its version, and whether it can run here."""
    from edge.inference.backends.tensorrt import tensorrt_available

    version = package_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_lean")
    ok, why = tensorrt_available()
    if ok:
        return Check("tensorrt", "ok", why)
    try:
        import tensorrt  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return Check("tensorrt", needs.tensorrt, f"{NOT_PRESENT}: {why}")
    return Check("tensorrt", needs.tensorrt, f"TensorRT {version or '?'} installed but cannot run: {why}")


# --------------------------------------------------------------------------- ONNX Runtime
def _probe_artifact(cfg: MedgeConfig | None) -> Path | None:
    """An fp32 ONNX file to open a test session on: the first configured model's."""
    from edge.inference.manifest import Manifest

    if cfg is None:
        return None
    for mc in cfg.models:
        try:
            return Manifest.load(cfg.model_dir(mc)).artifact_path("fp32", verify=False)
        except MedgeError:
            continue
    return None


def _ort_errors() -> tuple[type[BaseException], ...]:
    """What creating a session may raise: ONNX Runtime's own classes derive from ``Exception`` directly."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError:
        return (RuntimeError, ValueError)
    own = (t for t in vars(state).values() if isinstance(t, type) and issubclass(t, Exception))
    return (RuntimeError, ValueError, *own)


def ort_check(cfg: MedgeConfig | None, needs: GpuNeeds) -> Check:
    """``onnxruntime gpu``: the listed providers, and whether a CUDA session really comes up."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return Check("onnxruntime gpu", "fail", f"onnxruntime does not import: {exc}")
    listed = list(ort.get_available_providers())
    gpu_listed = [p for p in listed if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    if not gpu_listed:
        return Check("onnxruntime gpu", needs.cuda,
                     f"{NOT_PRESENT}: providers {', '.join(listed)} (install onnxruntime-gpu for CUDA)")
    if "CUDAExecutionProvider" not in listed:
        return Check("onnxruntime gpu", "warn", f"providers {', '.join(listed)}; no CUDA provider")
    path = _probe_artifact(cfg)
    if path is None:
        return Check("onnxruntime gpu", "warn", f"providers {', '.join(listed)}; no model to open a CUDA session with")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # its own error lines would repeat what this check says
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CUDAExecutionProvider"])
        active = sess.get_providers()
    except _ort_errors() as exc:
        return Check("onnxruntime gpu", needs.cuda, f"CUDA session failed: {str(exc).splitlines()[0][:200]}")
    if active[:1] != ["CUDAExecutionProvider"]:
        return Check("onnxruntime gpu", needs.cuda,
                     f"providers {', '.join(listed)}, but a CUDA session fell back to {', '.join(active)} "
                     "(CUDA or cuDNN libraries missing or of another major version)")
    return Check("onnxruntime gpu", "ok", f"providers {', '.join(listed)}; a CUDA session on {path.name} starts")


# --------------------------------------------------------------------------- engine plans
def _plan_path(cfg: MedgeConfig, mc: ModelConfig, manifest: Any, precision: str, artifact: str) -> Path:
    """The plan the daemon would load: the backend's own key function (:func:`engine_key`), no second one.

    Raises
    ------
    BackendUnavailableError
        TensorRT or cuda-python is missing, or the CUDA device cannot be read.
    """
    from edge.inference.backends.tensorrt import engine_cache_path, engine_key

    key = engine_key(mc.device_id, precision=precision, onnx_sha256=manifest.artifacts[artifact].sha256,
                     max_batch=mc.max_batch or cfg.scheduler.max_batch,
                     input_chw=(manifest.input.channels, *manifest.input.size))
    return engine_cache_path(cfg.engine_cache_dir, manifest.name, key)


def plan_checks(cfg: MedgeConfig) -> list[Check]:
    """``engine plan <model>`` for each model that may run on TensorRT (needs TensorRT and a CUDA device)."""
    from edge.inference.backends.tensorrt import tensorrt_available
    from edge.inference.chain import plan
    from edge.inference.manifest import Manifest

    models = [m for m in cfg.models if m.backend in ("tensorrt", "auto")]
    if not models:
        return []
    ok, why = tensorrt_available()
    if not ok:
        return [Check(f"engine plan {m.name}", "ok", f"{NOT_PRESENT}: {why}") for m in models]

    out = []
    for mc in models:
        name = f"engine plan {mc.name}"
        try:
            manifest = Manifest.load(cfg.model_dir(mc))
            steps = [s for s in plan(manifest, mc.backend, mc.provider, mc.precision) if s.kind == "tensorrt"]
        except MedgeError as exc:
            out.append(Check(name, "warn", f"no TensorRT step: {exc}"))
            continue
        if not steps:
            out.append(Check(name, "warn", "no TensorRT step for this model's artifacts"))
            continue
        try:
            paths = [(s.precision, _plan_path(cfg, mc, manifest, s.precision, s.artifact)) for s in steps]
        except BackendUnavailableError as exc:
            out.append(Check(name, "warn", f"CUDA device {mc.device_id} not readable: {exc}"))
            continue
        out.append(_plans_found(name, cfg.engine_cache_dir, manifest.name, paths))
    return out


def _plans_found(name: str, cache_dir: Path, model: str, paths: list[tuple[str, Path]]) -> Check:
    present = [p for _, p in paths if p.is_file()]
    listing = ", ".join(f"{prec} {'present' if p.is_file() else 'absent'}" for prec, p in paths)
    pattern = re.compile(rf"{re.escape(model)}-(fp32|fp16|int8)-sm\d+-[0-9a-f]{{16}}\.plan")
    try:
        others = [p for p in cache_dir.iterdir() if pattern.fullmatch(p.name) and p not in present][:1000]
    except OSError:
        others = []
    stale = f"; {len(others)} plan(s) under other keys (another GPU, TensorRT or artifact)" if others else ""
    first_precision, first_path = paths[0]
    if first_path.is_file():
        return Check(name, "ok", f"{listing} in {cache_dir}{stale}")
    return Check(name, "warn", f"{listing} in {cache_dir}{stale}; the daemon builds the {first_precision} plan at "
                               "start (minutes): run 'medge build --config <the daemon's TOML>' first")


# --------------------------------------------------------------------------- all of them
def gpu_checks(cfg: MedgeConfig | None) -> list[Check]:
    """Every GPU check, in the order of the module docstring (never raises for a missing piece)."""
    needs = GpuNeeds.from_config(cfg)
    checks = [driver_check(needs), metrics_check(), cuda_check(needs), tensorrt_check(needs), ort_check(cfg, needs)]
    if cfg is not None:
        checks.extend(plan_checks(cfg))
    return checks
