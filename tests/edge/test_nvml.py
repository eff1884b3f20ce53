"""GPU gauges: NVML per metric (a fake NVML with pynvml's exceptions), CUDA-ordinal labels, Jetson sysfs.

Where nvidia-ml-py is installed, the fake raises pynvml's own exception
classes (``NVMLError_NotSupported`` is what NVML gives for utilisation under
MIG), so the collector is tested against the real class hierarchy; the real
NVML is read where a GPU is present.
"""

from __future__ import annotations

import logging
import subprocess
import types
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge.ops.jetson import JetsonGpuCollector, find_jetson_gpu, is_jetson
from edge.ops.nvml import NvmlCollector, cuda_labels, gpu_collector, nvml_status, parse_bus_id
from tests.conftest import require_peer

try:  # the real exception classes where nvidia-ml-py is installed
    import pynvml as _real  # type: ignore[import-not-found]

    NVMLError = _real.NVMLError
    NotSupported = _real.NVMLError_NotSupported

    def _lost() -> Exception:
        return _real.NVMLError(_real.NVML_ERROR_GPU_IS_LOST)

    def _not_loaded() -> Exception:
        return _real.NVMLError(_real.NVML_ERROR_DRIVER_NOT_LOADED)

except ImportError:
    _real = None

    class NVMLError(Exception):  # type: ignore[no-redef]
        """Stands in for pynvml.NVMLError."""

    class NotSupported(NVMLError):  # type: ignore[no-redef]
        """Stands in for pynvml.NVMLError_NotSupported."""

    def _lost() -> Exception:
        return NVMLError("GPU is lost")

    def _not_loaded() -> Exception:
        return NVMLError("Driver Not Loaded")


class FakeNvml:
    """The pynvml functions the collector calls, with per-GPU faults and call counts."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NotSupported
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, bus_ids: list[str], *, unsupported: set[tuple[int, str]] = frozenset(),
                 lost: set[int] = frozenset(), init_error: Exception | None = None) -> None:
        self.bus_ids = bus_ids
        self.unsupported = set(unsupported)
        self.lost = set(lost)
        self.transient: set[tuple[int, str]] = set()
        self.init_error = init_error
        self.calls: dict[str, int] = {}

    def _call(self, h: int, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1
        if (h, what) in self.unsupported:
            raise NotSupported() if _real is None else _real.NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
        if (h, what) in self.transient:
            self.transient.discard((h, what))
            raise _lost()

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    def nvmlDeviceGetCount(self) -> int:
        return len(self.bus_ids)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if i in self.lost:
            raise _lost()
        return i

    def nvmlDeviceGetPciInfo(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(busId=self.bus_ids[h].encode())  # older releases return bytes

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h:08x}-fake"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> types.SimpleNamespace:
        self._call(h, "util")
        return types.SimpleNamespace(gpu=40 + 10 * h, memory=5)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        self._call(h, "mem")
        return types.SimpleNamespace(used=(h + 1) * 2**30, total=16 * 2**30, free=0)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        self._call(h, "temp")
        return 50 + h


class FakeCudart:
    """cuda-python's runtime: device count and PCI bus id per CUDA ordinal."""

    cudaError_t = types.SimpleNamespace(cudaSuccess=0, cudaErrorInsufficientDriver=35)

    def __init__(self, bus_ids: list[str] | None, raises: bool = False) -> None:
        self.bus_ids = bus_ids
        self.raises = raises

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        if self.raises:  # cuda-python raises when the driver library cannot be found
            raise RuntimeError('"cuda" is an NVIDIA driver library and can only be found via system search.')
        if self.bus_ids is None:
            return (35, 0)
        return (0, len(self.bus_ids))

    def cudaDeviceGetPCIBusId(self, length: int, ordinal: int) -> tuple[int, bytes]:
        assert length >= 13
        return (0, self.bus_ids[ordinal].encode())  # type: ignore[index]


def scrape(collector) -> str:
    reg = CollectorRegistry()
    reg.register(collector)
    return generate_latest(reg).decode()


BUS = ["00000000:3B:00.0", "00000000:86:00.0"]


# ---------------------------------------------------------------------------- NVML, per metric
def test_nvml_gauges_in_base_units_and_promtool_clean() -> None:
    text = scrape(NvmlCollector(FakeNvml(BUS), 2))
    assert 'medge_gpu_utilization_ratio{gpu="0"} 0.4' in text
    assert 'medge_gpu_utilization_ratio{gpu="1"} 0.5' in text
    assert 'medge_gpu_memory_used_bytes{gpu="1"} 2.147483648e+09' in text
    assert 'medge_gpu_memory_total_bytes{gpu="0"} 1.7179869184e+10' in text
    assert 'medge_gpu_temperature_celsius{gpu="0"} 50.0' in text
    promtool = require_peer("promtool")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_failing_gpu_is_left_out_not_fatal() -> None:
    text = scrape(NvmlCollector(FakeNvml(BUS, lost={0}), 2))
    assert 'gpu="0"' not in text and 'medge_gpu_utilization_ratio{gpu="1"} 0.5' in text


def test_mig_utilization_not_supported_drops_only_that_gauge_and_logs_once(caplog) -> None:
    nv = FakeNvml(BUS, unsupported={(0, "util")})
    collector = NvmlCollector(nv, 2)
    with caplog.at_level(logging.INFO, logger="edge.ops.nvml"):
        first, second = scrape(collector), scrape(collector)
    for text in (first, second):
        assert 'medge_gpu_utilization_ratio{gpu="0"}' not in text
        assert 'medge_gpu_utilization_ratio{gpu="1"} 0.5' in text
        assert 'medge_gpu_memory_used_bytes{gpu="0"}' in text and 'medge_gpu_temperature_celsius{gpu="0"}' in text
    said = [r for r in caplog.records if "does not support utilization" in r.getMessage()]
    assert len(said) == 1
    assert nv.calls["util"] == 3  # GPU 0 asked once, GPU 1 on each scrape: not supported is remembered
    assert collector.supported()["0"] == ["medge_gpu_memory_used_bytes", "medge_gpu_memory_total_bytes",
                                          "medge_gpu_temperature_celsius"]


def test_every_gauge_unsupported_leaves_no_family() -> None:
    nv = FakeNvml(BUS[:1], unsupported={(0, "util"), (0, "mem"), (0, "temp")})
    assert "medge_gpu" not in scrape(NvmlCollector(nv, 1))


def test_another_nvml_error_skips_that_scrape_only() -> None:
    nv = FakeNvml(BUS)
    nv.transient.add((1, "temp"))
    collector = NvmlCollector(nv, 2)
    text = scrape(collector)
    assert 'medge_gpu_temperature_celsius{gpu="1"}' not in text and 'medge_gpu_memory_used_bytes{gpu="1"}' in text
    assert 'medge_gpu_temperature_celsius{gpu="1"} 51.0' in scrape(collector)


# ---------------------------------------------------------------------------- the gpu label
def test_bus_ids_of_nvml_and_cuda_compare_equal() -> None:
    assert parse_bus_id("00000000:3B:00.0") == parse_bus_id("0000:3b:00.0") == (0, 0x3B, 0, 0)
    assert parse_bus_id(b"0001:af:1f.7") == (1, 0xAF, 0x1F, 7)
    assert parse_bus_id("") is None and parse_bus_id("3b:00") is None


def test_labels_from_cuda_python_follow_cuda_order_not_nvml_order() -> None:
    # CUDA puts the faster GPU (NVML index 1) first: device_id 0 is NVML's GPU 1.
    labels, how = cuda_labels(BUS, ["GPU-a", "GPU-b"], env={}, cudart=FakeCudart(["0000:86:00.0", "0000:3b:00.0"]))
    assert (labels, how) == (["1", "0"], "cuda")
    hidden, _ = cuda_labels(BUS, ["GPU-a", "GPU-b"], env={}, cudart=FakeCudart(["0000:86:00.0"]))
    assert hidden == [None, "0"]
    mig, _ = cuda_labels(BUS[:1], ["GPU-a"], env={}, cudart=FakeCudart(["0000:3b:00.0", "0000:3b:00.0"]))
    assert mig == ["0"]


def test_labels_without_cuda_python() -> None:
    uuids = ["GPU-aaaa1111", "GPU-bbbb2222"]
    # one GPU: CUDA's order cannot differ
    assert cuda_labels(BUS[:1], uuids[:1], env={}, cudart=None) == (["0"], "env")
    assert cuda_labels(BUS[:1], uuids[:1], env={"CUDA_VISIBLE_DEVICES": ""}, cudart=None) == ([None], "env")
    # PCI_BUS_ID order: CUDA_VISIBLE_DEVICES indices and UUID prefixes count in NVML's order
    pci = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert cuda_labels(BUS, uuids, env={**pci, "CUDA_VISIBLE_DEVICES": "1,0"}, cudart=None) == (["1", "0"], "env")
    assert cuda_labels(BUS, uuids, env={**pci, "CUDA_VISIBLE_DEVICES": "GPU-bbbb"}, cudart=None) == ([None, "0"], "env")
    assert cuda_labels(BUS, uuids, env={**pci, "CUDA_VISIBLE_DEVICES": "0,7,1"}, cudart=None) == (["0", None], "env")
    # CUDA's default (fastest first) with two GPUs, or a MIG device: unknowable; said in the label
    assert cuda_labels(BUS, uuids, env={}, cudart=None) == (["nvml0", "nvml1"], "nvml")
    mig = {**pci, "CUDA_VISIBLE_DEVICES": "MIG-0c4f1a2b"}
    assert cuda_labels(BUS, uuids, env=mig, cudart=None)[1] == "nvml"
    # cuda-python installed but no driver library: it raises; the environment rule applies
    assert cuda_labels(BUS[:1], uuids[:1], env={}, cudart=FakeCudart(None, raises=True)) == (["0"], "env")
    assert cuda_labels(BUS, uuids, env={}, cudart=FakeCudart(None)) == (["nvml0", "nvml1"], "nvml")


def test_collector_labels_gauges_with_the_cuda_ordinal() -> None:
    nv = FakeNvml(BUS)
    collector = NvmlCollector.from_nvml(nv, env={}, cudart=FakeCudart(["0000:86:00.0", "0000:3b:00.0"]))
    assert collector is not None and collector.labels == ["1", "0"]
    text = scrape(collector)
    assert 'medge_gpu_temperature_celsius{gpu="0"} 51.0' in text  # NVML's GPU 1 is device_id 0
    assert 'medge_gpu_temperature_celsius{gpu="1"} 50.0' in text


def test_hidden_gpu_is_not_reported_and_nvml_fallback_says_so(caplog) -> None:
    hidden = NvmlCollector.from_nvml(FakeNvml(BUS), env={}, cudart=FakeCudart(["0000:86:00.0"]))
    text = scrape(hidden)
    assert 'gpu="0"' in text and 'gpu="1"' not in text and text.count("medge_gpu_temperature_celsius{") == 1
    with caplog.at_level(logging.INFO, logger="edge.ops.nvml"):
        guessed = NvmlCollector.from_nvml(FakeNvml(BUS), env={}, cudart=None)
    assert 'medge_gpu_memory_used_bytes{gpu="nvml1"}' in scrape(guessed)
    assert any("NVML's index" in r.getMessage() for r in caplog.records)


def test_nvml_unusable_is_a_reason_not_a_crash() -> None:
    nv, why = nvml_status(FakeNvml(BUS, init_error=_not_loaded()))
    assert nv is None and "unusable" in why
    assert nvml_status(None) == (None, "nvidia-ml-py (pynvml) is not installed")


# ---------------------------------------------------------------------------- Jetson sysfs
def _jetson_tree(root: Path, *, load: str | None = "345", temp: str | None = "45500", devfreq: bool = True) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    zone0 = root / "sys/class/thermal/thermal_zone0"
    zone0.mkdir(parents=True)
    (zone0 / "type").write_text("cpu-thermal\n")
    (zone0 / "temp").write_text("41000\n")
    zone1 = root / "sys/class/thermal/thermal_zone1"
    zone1.mkdir()
    (zone1 / "type").write_text("gpu-thermal\n")
    if temp is not None:
        (zone1 / "temp").write_text(temp + "\n")
    if load is None:
        return
    if devfreq:  # Orin, JetPack 6: the devfreq node links to the GPU's platform device
        dev = root / "sys/devices/platform/bus@0/17000000.gpu"
        (dev / "of_node").mkdir(parents=True)
        (dev / "of_node/name").write_bytes(b"gpu\x00")
        (dev / "load").write_text(load + "\n")
        node = root / "sys/class/devfreq/17000000.gpu"
        node.mkdir(parents=True)
        (node / "device").symlink_to(dev)
        other = root / "sys/class/devfreq/15340000.vic"
        (other / "device/of_node").mkdir(parents=True)
        (other / "device/of_node/name").write_bytes(b"vic\x00")
        (other / "device/load").write_text("999\n")
    else:  # Nano / JetPack 4
        (root / "sys/devices/gpu.0").mkdir(parents=True)
        (root / "sys/devices/gpu.0/load").write_text(load + "\n")


def test_jetson_orin_load_and_temperature_from_sysfs(tmp_path: Path) -> None:
    _jetson_tree(tmp_path)
    collector = gpu_collector(nvml=None, sysfs_root=str(tmp_path))
    assert isinstance(collector, JetsonGpuCollector)
    text = scrape(collector)
    assert 'medge_gpu_utilization_ratio{gpu="0"} 0.345' in text
    assert 'medge_gpu_temperature_celsius{gpu="0"} 45.5' in text
    assert "medge_gpu_memory" not in text  # shared system RAM: no GPU memory gauge
    promtool = require_peer("promtool")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_jetson_nano_path_and_a_railgated_thermal_zone(tmp_path: Path) -> None:
    _jetson_tree(tmp_path, load="1000", devfreq=False)
    files = find_jetson_gpu(tmp_path)
    assert files.load == tmp_path / "sys/devices/gpu.0/load"
    (tmp_path / "sys/class/thermal/thermal_zone1/temp").write_text("")  # Orin refuses reads when idle
    text = scrape(JetsonGpuCollector(files))
    assert 'medge_gpu_utilization_ratio{gpu="0"} 1.0' in text and "temperature" not in text


def test_on_a_jetson_sysfs_wins_over_an_nvml_that_supports_nothing(tmp_path: Path) -> None:
    # JetPack 6: NVML lists "Orin (nvgpu)" and answers not supported for every gauge (and the PCI info)
    _jetson_tree(tmp_path)
    jp6 = FakeNvml([""], unsupported={(0, "util"), (0, "mem"), (0, "temp")})
    assert isinstance(gpu_collector(nvml=jp6, sysfs_root=str(tmp_path)), JetsonGpuCollector)
    assert isinstance(gpu_collector(nvml=FakeNvml([]), sysfs_root=str(tmp_path)), JetsonGpuCollector)


def test_a_jetson_without_a_load_file_uses_nvml(tmp_path: Path) -> None:
    # JetPack 7 (Thor): no sysfs load file; NVML lists the GPU and reports what it supports
    _jetson_tree(tmp_path, load=None)
    thor = FakeNvml(["not-a-bus-id"], unsupported={(0, "mem")})
    collector = gpu_collector(nvml=thor, sysfs_root=str(tmp_path))
    assert isinstance(collector, NvmlCollector) and collector.labels == ["0"]
    text = scrape(collector)
    assert 'medge_gpu_utilization_ratio{gpu="0"} 0.4' in text and "memory" not in text


def test_jetson_without_a_load_file_or_nvml_says_gpu_load_is_absent(tmp_path: Path, caplog) -> None:
    _jetson_tree(tmp_path, load=None)
    assert is_jetson(tmp_path)
    with caplog.at_level(logging.INFO, logger="edge.ops"):
        assert gpu_collector(nvml=None, sysfs_root=str(tmp_path)) is None
    assert sum("GPU load is absent" in r.getMessage() for r in caplog.records) == 1


def test_plain_cpu_box_has_no_gpu_collector_and_says_nothing(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="edge.ops"):
        assert gpu_collector(nvml=None, sysfs_root=str(tmp_path)) is None
    assert not is_jetson(tmp_path) and not caplog.records


def test_another_arm_board_with_a_gpu_load_file_is_not_taken_for_a_jetson(tmp_path: Path) -> None:
    _jetson_tree(tmp_path)
    (tmp_path / "etc/nv_tegra_release").unlink()
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/compatible").write_bytes(b"rockchip,rk3588\x00")
    assert find_jetson_gpu(tmp_path).load is not None and gpu_collector(nvml=None, sysfs_root=str(tmp_path)) is None
    (tmp_path / "proc/device-tree/compatible").write_bytes(b"nvidia,p3737-0000+p3701-0000\x00nvidia,tegra234\x00")
    assert isinstance(gpu_collector(nvml=None, sysfs_root=str(tmp_path)), JetsonGpuCollector)


# ---------------------------------------------------------------------------- the real NVML
@pytest.mark.gpu
def test_real_nvml_reports_every_gpu_cuda_can_see() -> None:
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py not installed (the tensorrt extra)")
    collector = NvmlCollector.create()
    if not isinstance(collector, NvmlCollector):
        pytest.skip("no NVIDIA GPU / NVML driver on this machine")
    text = scrape(collector)
    visible = [label for label in collector.labels if label is not None]
    assert text.count("medge_gpu_memory_used_bytes{") == len(visible) <= int(pynvml.nvmlDeviceGetCount())
