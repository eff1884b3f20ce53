"""GPU gauges from NVML (``nvidia-ml-py``), one Prometheus collector.

Registered by :class:`edge.ops.metrics.Metrics` (``gpu=True``) where NVML and
a GPU are present; elsewhere :meth:`NvmlCollector.create` returns ``None`` and
no GPU series exist.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["NvmlCollector"]

_log = logging.getLogger(__name__)


class NvmlCollector(Collector):
    """GPU utilisation, memory and temperature from NVML (``nvidia-ml-py``)."""

    #: the gauges this collector yields, each labelled ``gpu`` (the NVML index)
    METRIC_NAMES = ("medge_gpu_utilization_ratio", "medge_gpu_memory_used_bytes", "medge_gpu_temperature_celsius")

    def __init__(self, nvml: object, count: int) -> None:
        self._nvml = nvml
        self._count = count

    @classmethod
    def create(cls) -> "NvmlCollector | None":
        """A collector, or ``None`` where NVML or a GPU is absent."""
        try:
            import pynvml  # type: ignore[import-not-found]
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            _log.info("NVML present but unusable (%s); no GPU metrics.", exc)
            return None
        return cls(pynvml, count) if count else None

    def collect(self) -> Iterable[Metric]:
        """One sample per GPU of each gauge."""
        nv = self._nvml
        util_name, mem_name, temp_name = self.METRIC_NAMES
        util = GaugeMetricFamily(util_name, "GPU utilisation (0-1).", labels=["gpu"])
        mem = GaugeMetricFamily(mem_name, "GPU memory in use.", labels=["gpu"])
        temp = GaugeMetricFamily(temp_name, "GPU temperature.", labels=["gpu"])
        for i in range(self._count):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)  # type: ignore[attr-defined]
                util.add_metric([str(i)], nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)  # type: ignore[attr-defined]
                mem.add_metric([str(i)], float(nv.nvmlDeviceGetMemoryInfo(h).used))  # type: ignore[attr-defined]
                temp.add_metric([str(i)], float(nv.nvmlDeviceGetTemperature(h, 0)))  # type: ignore[attr-defined]
            except nv.NVMLError as exc:  # type: ignore[attr-defined]
                _log.debug("NVML read of GPU %d failed: %s", i, exc)
        yield from _nonempty((util, mem, temp))


def _nonempty(families: Iterable[GaugeMetricFamily]) -> Iterator[GaugeMetricFamily]:
    for f in families:
        if f.samples:
            yield f
