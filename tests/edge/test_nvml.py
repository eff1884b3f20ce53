"""GPU gauges from NVML: a fake NVML module on CPU, the real one where a GPU is present."""

from __future__ import annotations

import subprocess
import types

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge.ops.nvml import NvmlCollector
from tests.conftest import require_peer


class _FakeNvmlError(Exception):
    pass


def _fake_nvml(fail_gpu: int | None = None) -> types.SimpleNamespace:
    def handle(i: int) -> int:
        if i == fail_gpu:
            raise _FakeNvmlError("GPU is lost")
        return i

    return types.SimpleNamespace(
        NVMLError=_FakeNvmlError,
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=40 + 10 * h),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) * 2**30),
        nvmlDeviceGetTemperature=lambda h, sensor: 50 + h,
    )


def test_nvml_gauges_in_base_units_and_promtool_clean(tmp_path):
    reg = CollectorRegistry()
    reg.register(NvmlCollector(_fake_nvml(), 2))
    text = generate_latest(reg).decode()
    assert 'medge_gpu_utilization_ratio{gpu="0"} 0.4' in text
    assert 'medge_gpu_utilization_ratio{gpu="1"} 0.5' in text
    assert 'medge_gpu_memory_used_bytes{gpu="1"} 2.147483648e+09' in text
    assert 'medge_gpu_temperature_celsius{gpu="0"} 50.0' in text
    promtool = require_peer("promtool")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_failing_gpu_is_left_out_not_fatal():
    reg = CollectorRegistry()
    reg.register(NvmlCollector(_fake_nvml(fail_gpu=0), 2))
    text = generate_latest(reg).decode()
    assert 'gpu="0"' not in text and 'medge_gpu_utilization_ratio{gpu="1"} 0.5' in text


@pytest.mark.gpu
def test_real_nvml_reports_every_gpu():
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py not installed (the tensorrt extra)")
    collector = NvmlCollector.create()
    if collector is None:
        pytest.skip("no NVIDIA GPU / NVML driver on this machine")
    reg = CollectorRegistry()
    reg.register(collector)
    text = generate_latest(reg).decode()
    assert text.count("medge_gpu_memory_used_bytes{") == int(pynvml.nvmlDeviceGetCount())
