"""GPU load and temperature of a Jetson's integrated GPU, from sysfs.

A Jetson (Nano, TX2, Xavier, Orin; JetPack 4 to 6) has no discrete-GPU
NVML: ``nvmlInit`` fails (JetPack 4, 5), or NVML lists the GPU and supports
none of the gauges (JetPack 6). Its GPU driver publishes the load instead, in per mille (0-1000, what ``tegrastats`` prints as ``GR3D_FREQ``
percent), at one of these places (the first that exists is used):

* ``/sys/class/devfreq/<node>/device/load`` where ``<node>/device/of_node/name``
  is ``gpu``, ``ga10b``, ``gv11b`` or ``gp10b`` (Orin ``17000000.gpu`` or
  ``17000000.ga10b``, Xavier ``17000000.gv11b``, TX2);
* ``/sys/devices/gpu.0/load`` and ``/sys/devices/platform/gpu.0/load`` (Nano, TX1, older releases);
* ``/sys/devices/platform/*gpu*/load``, ``/sys/devices/platform/bus@0/*gpu*/load``,
  ``/sys/devices/*.ga10b/load``, ``/sys/devices/*.gv11b/load``.

The temperature is the thermal zone whose ``type`` starts with ``gpu``
(``gpu-thermal`` on Orin, ``GPU-therm`` on Xavier and Nano), in
millidegrees. On Orin that zone refuses reads while the GPU is rail-gated
(idle): the sample is then left out of that scrape.

Memory gauges are absent: the GPU shares the system RAM (see
``node_memory_*`` of a node exporter). The ``gpu`` label is ``0``: the
integrated GPU is CUDA device 0.

Only a Jetson is searched (``/etc/nv_tegra_release``, or a device tree
that is ``nvidia,tegra``): other ARM boards also call their GPU ``gpu``.
On a Jetson these files win over NVML: JetPack 6 has an NVML that lists
the Orin GPU but answers "not supported" for its utilisation, memory and
temperature. JetPack 7 (Thor) has no such load file; NVML serves it. Where
neither gives anything on a Jetson, one log line says that GPU load is
absent, and ``medge doctor`` says so too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.ops.nvml import GAUGES

__all__ = ["JetsonGpuCollector", "JetsonGpuFiles", "find_jetson_gpu", "is_jetson"]

_log = logging.getLogger(__name__)

_GPU_NODE_NAMES = ("gpu", "ga10b", "gv11b", "gp10b")
_LOAD_GLOBS = (
    "sys/devices/gpu.0/load",
    "sys/devices/platform/gpu.0/load",
    "sys/devices/platform/*gpu*/load",
    "sys/devices/platform/bus@0/*gpu*/load",
    "sys/devices/*.ga10b/load",
    "sys/devices/*.gv11b/load",
)
_MAX_READ = 64  # a sysfs number is a few bytes; never read more
_MAX_ZONES = 256


@dataclass(frozen=True)
class JetsonGpuFiles:
    """Where a Jetson's GPU load (per mille) and temperature (millidegrees C) are read."""

    load: Path | None
    temperature: Path | None


def _read_small(path: Path) -> str:
    with open(path, "rb") as fh:
        return fh.read(_MAX_READ).decode("ascii", "replace").strip()


def is_jetson(root: Path | str = "/") -> bool:
    """Whether this machine is a Jetson (L4T release file or a ``nvidia,tegra`` device tree)."""
    base = Path(root)
    if (base / "etc/nv_tegra_release").is_file():
        return True
    try:
        with open(base / "proc/device-tree/compatible", "rb") as fh:
            return b"nvidia,tegra" in fh.read(4096)
    except OSError:
        return False


def _devfreq_load(base: Path) -> Path | None:
    devfreq = base / "sys/class/devfreq"
    try:
        nodes = sorted(devfreq.iterdir())
    except OSError:
        return None
    for node in nodes[:_MAX_ZONES]:
        try:
            name = _read_small(node / "device/of_node/name").rstrip("\x00")
        except OSError:
            continue
        load = node / "device/load"
        if name in _GPU_NODE_NAMES and load.is_file():
            return load
    return None


def _gpu_thermal_zone(base: Path) -> Path | None:
    zones = sorted((base / "sys/class/thermal").glob("thermal_zone*"))
    for zone in zones[:_MAX_ZONES]:
        try:
            kind = _read_small(zone / "type").lower()
        except OSError:
            continue
        if kind.startswith("gpu") and (zone / "temp").is_file():
            return zone / "temp"
    return None


def find_jetson_gpu(root: Path | str = "/") -> JetsonGpuFiles:
    """The load and temperature files of an integrated GPU under ``root`` (``None`` where absent)."""
    base = Path(root)
    load = _devfreq_load(base)
    if load is None:
        for pattern in _LOAD_GLOBS:
            hits = sorted(p for p in base.glob(pattern) if p.is_file())
            if hits:
                load = hits[0]
                break
    return JetsonGpuFiles(load=load, temperature=_gpu_thermal_zone(base) if load is not None else None)


class JetsonGpuCollector(Collector):
    """``medge_gpu_utilization_ratio`` and ``medge_gpu_temperature_celsius`` of a Jetson, ``gpu="0"``.

    Parameters
    ----------
    files : JetsonGpuFiles
        From :func:`find_jetson_gpu`; ``load`` must be set.
    """

    def __init__(self, files: JetsonGpuFiles) -> None:
        if files.load is None:
            raise ValueError("A Jetson GPU collector needs a load file.")
        self.files = files

    @classmethod
    def create(cls, root: Path | str = "/") -> "JetsonGpuCollector | None":
        """A collector on a Jetson whose GPU load file exists under ``root``, else ``None``.

        Only a Jetson is searched (other ARM boards name their GPU ``gpu``
        too). Silent when there is none: :func:`edge.ops.nvml.gpu_collector`
        says why a Jetson has no GPU gauges, once it has asked NVML too.
        """
        if not is_jetson(root):
            return None
        files = find_jetson_gpu(root)
        if files.load is None:
            return None
        _log.info("GPU metrics from sysfs: load %s, temperature %s.", files.load, files.temperature or "absent")
        return cls(files)

    def collect(self) -> Iterable[Metric]:
        """The load and, where readable now, the temperature."""
        load = self._number(self.files.load)
        if load is not None:
            util = GaugeMetricFamily("medge_gpu_utilization_ratio", GAUGES["medge_gpu_utilization_ratio"],
                                     labels=["gpu"])
            util.add_metric(["0"], min(max(load / 1000.0, 0.0), 1.0))
            yield util
        temp = self._number(self.files.temperature)
        if temp is not None:
            fam = GaugeMetricFamily("medge_gpu_temperature_celsius", GAUGES["medge_gpu_temperature_celsius"],
                                    labels=["gpu"])
            fam.add_metric(["0"], temp / 1000.0)
            yield fam

    @staticmethod
    def _number(path: Path | None) -> float | None:
        if path is None:
            return None
        try:
            return float(_read_small(path))
        except (OSError, ValueError) as exc:
            # Orin's GPU thermal zone refuses reads while the GPU is rail-gated.
            _log.debug("Cannot read %s: %s", os.fspath(path), exc)
            return None
