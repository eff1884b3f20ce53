"""GPU gauges for Prometheus: NVML (``nvidia-ml-py``) on discrete GPUs, sysfs on a Jetson.

Registered by :class:`edge.ops.metrics.Metrics` (``gpu=True``) through
:meth:`NvmlCollector.create` (which is :func:`gpu_collector`): a Jetson's
sysfs where its GPU load file exists (:class:`edge.ops.jetson.JetsonGpuCollector`;
JetPack 6's NVML lists the GPU but supports none of these gauges), else
NVML where it lists a GPU, else ``None`` and no GPU series exist.

Gauges, each labelled ``gpu``:

=================================  ===============================================
``medge_gpu_utilization_ratio``    NVML ``utilization.gpu`` / 100 (Jetson: sysfs ``load`` / 1000)
``medge_gpu_memory_used_bytes``    NVML memory info ``used``
``medge_gpu_memory_total_bytes``   NVML memory info ``total``
``medge_gpu_temperature_celsius``  NVML GPU sensor (Jetson: the ``gpu`` thermal zone)
=================================  ===============================================

**Each metric is read on its own.** ``NVMLError_NotSupported`` (utilisation
on a MIG-enabled GPU, some integrated GPUs) leaves out that gauge for that
GPU from then on, logged once at INFO; any other ``NVMLError`` (a GPU fallen
off the bus) leaves it out of that scrape only, logged at DEBUG. The other
gauges of the same GPU are still reported.

**The ``gpu`` label is the CUDA ordinal**, the number ``[[models]] device_id``
means, so a gauge and the model running on that GPU line up. NVML numbers
GPUs by PCI bus id; CUDA by default orders them fastest first and
``CUDA_VISIBLE_DEVICES`` may hide or reorder them, so the two often differ.
The mapping (:func:`cuda_labels`), chosen once at start-up:

1. ``cuda``: cuda-python is installed and the CUDA runtime answers: each CUDA
   ordinal's ``cudaDeviceGetPCIBusId`` is matched with NVML's
   ``nvmlDeviceGetPciInfo(...).busId``. Exact, whatever the environment.
2. ``env``: no cuda-python, but CUDA's order is known: one GPU, or
   ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (then CUDA's order is NVML's): the
   ordinals follow ``CUDA_VISIBLE_DEVICES`` (indices or ``GPU-`` UUID
   prefixes).
3. ``nvml``: neither: the label is NVML's index, written ``nvml0``, ``nvml1``
   ..., so that it is never mistaken for a CUDA ordinal (one INFO line says so).

A GPU that CUDA cannot see (hidden by ``CUDA_VISIBLE_DEVICES``) is not
reported under 1 and 2: the daemon cannot run on it.

Examples
--------
>>> labels, how = cuda_labels(["00000000:3B:00.0", "00000000:86:00.0"], ["GPU-aa", "GPU-bb"],
...                           env={"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"},
...                           cudart=None)
>>> labels, how
([None, '0'], 'env')
"""

from __future__ import annotations

import logging
import os
import re
import threading
from types import ModuleType
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["NvmlCollector", "gpu_collector", "cuda_labels", "parse_bus_id", "GAUGES", "nvml_status"]

_log = logging.getLogger(__name__)

#: Every GPU gauge: name -> help (both collectors use these).
GAUGES: dict[str, str] = {
    "medge_gpu_utilization_ratio": "GPU utilisation (0-1).",
    "medge_gpu_memory_used_bytes": "GPU memory in use.",
    "medge_gpu_memory_total_bytes": "GPU memory in all.",
    "medge_gpu_temperature_celsius": "GPU temperature.",
}
_UTIL, _MEM_USED, _MEM_TOTAL, _TEMP = GAUGES
_BUS_ID = re.compile(r"^([0-9a-fA-F]{1,8}):([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")
_MAX_GPUS = 64  # NVML reports at most this many devices here (bounds the label tables)


# --------------------------------------------------------------------------- NVML import
def import_nvml() -> ModuleType | None:
    """``pynvml`` (nvidia-ml-py), or ``None`` where it is not installed."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    return pynvml


def _text(value: Any) -> str:
    """NVML strings come back as ``bytes`` or ``str`` depending on the nvidia-ml-py release."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip("\x00")
    return str(value)


# --------------------------------------------------------------------------- CUDA ordinals
def parse_bus_id(text: str | bytes) -> tuple[int, int, int, int] | None:
    """``"00000000:3B:00.0"`` (NVML) or ``"0000:3b:00.0"`` (CUDA) -> ``(domain, bus, device, function)``.

    >>> parse_bus_id("00000000:3B:00.0") == parse_bus_id(b"0000:3b:00.0")
    True
    >>> parse_bus_id("garbage") is None
    True
    """
    m = _BUS_ID.match(_text(text).strip())
    return tuple(int(g, 16) for g in m.groups()) if m else None  # type: ignore[return-value]


def _import_cudart() -> ModuleType | None:
    """cuda-python's runtime module, or None where it is not installed (one import rule: the backend's)."""
    from edge.errors import BackendUnavailableError
    from edge.inference.backends.cuda_runtime import import_cudart

    try:
        return import_cudart()
    except BackendUnavailableError:
        return None


def _cuda_bus_ids(cudart: Any) -> list[tuple[int, int, int, int] | None] | None:
    """Bus id of each CUDA ordinal, or ``None`` where the CUDA runtime does not answer.

    Device queries only (count, PCI bus id): no allocation, no kernel.
    """
    try:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess:
            return None
        out = []
        for ordinal in range(min(int(count), _MAX_GPUS)):
            err, bus = cudart.cudaDeviceGetPCIBusId(32, ordinal)
            out.append(parse_bus_id(bus) if err == cudart.cudaError_t.cudaSuccess else None)
        return out
    except (RuntimeError, AttributeError, TypeError, ValueError) as exc:
        # cuda-python raises (not returns) when the driver library is missing.
        _log.debug("CUDA runtime did not list devices: %s", exc)
        return None


def _visible_positions(visible: str, uuids: Sequence[str], n: int) -> list[int] | None:
    """Positions (in PCI order) named by ``CUDA_VISIBLE_DEVICES``, or ``None`` if they cannot be told."""
    out: list[int] = []
    for raw in visible.split(","):
        item = raw.strip()
        if item.isdigit():
            pos = int(item)
            if pos >= n:
                break  # CUDA stops at the first invalid entry
        elif item.startswith("GPU-"):
            hits = [i for i, u in enumerate(uuids) if u.startswith(item)]
            if len(hits) != 1:
                break
            pos = hits[0]
        elif item.startswith("MIG-"):
            return None  # a MIG instance: which GPU it lives on is not told here, no guess
        else:
            break  # empty or invalid: CUDA stops reading the list there
        if pos in out:
            break
        out.append(pos)
    return out


def cuda_labels(
    bus_ids: Sequence[str | bytes],
    uuids: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cudart: Any = "import",
) -> tuple[list[str | None], str]:
    """The ``gpu`` label of each NVML device (``None``: CUDA cannot see it) and how it was found.

    Parameters
    ----------
    bus_ids, uuids : sequences
        ``nvmlDeviceGetPciInfo(h).busId`` and ``nvmlDeviceGetUUID(h)`` in NVML index order.
    env : mapping, optional
        The environment (default ``os.environ``): ``CUDA_VISIBLE_DEVICES``, ``CUDA_DEVICE_ORDER``.
    cudart : module or None
        cuda-python's runtime bindings; ``"import"`` imports them, ``None`` means absent.

    Returns
    -------
    labels, method : list, str
        ``method`` is ``cuda``, ``env`` or ``nvml`` (see the module docstring).
    """
    environ = os.environ if env is None else env
    nvml_ids = [parse_bus_id(b) for b in bus_ids]
    rt = _import_cudart() if cudart == "import" else cudart
    cuda_ids = _cuda_bus_ids(rt) if rt is not None else None
    if cuda_ids is not None and all(i is not None for i in nvml_ids):
        first: dict[tuple[int, int, int, int], int] = {}
        for ordinal, bid in enumerate(cuda_ids):
            if bid is not None:
                first.setdefault(bid, ordinal)  # MIG: several ordinals on one GPU; the first names it
        return [str(first[b]) if b in first else None for b in nvml_ids], "cuda"  # type: ignore[index]
    n = len(nvml_ids)
    if n == 1 or environ.get("CUDA_DEVICE_ORDER", "").strip() == "PCI_BUS_ID":
        order = sorted(range(n), key=lambda i: (nvml_ids[i] is None, nvml_ids[i] or (0, 0, 0, 0), i))
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        positions = list(range(n)) if visible is None else _visible_positions(visible, [uuids[i] for i in order], n)
        if positions is not None:
            labels: list[str | None] = [None] * n
            for ordinal, pos in enumerate(positions):
                labels[order[pos]] = str(ordinal)
            return labels, "env"
    return [f"nvml{i}" for i in range(n)], "nvml"


# --------------------------------------------------------------------------- the collector
class NvmlCollector(Collector):
    """GPU utilisation, memory and temperature from NVML, each gauge read on its own.

    Parameters
    ----------
    nvml : module
        ``pynvml`` (a fake with the same names in tests).
    count : int
        NVML devices to read (indices ``0 .. count-1``).
    labels : sequence of str or None, optional
        The ``gpu`` label of each NVML index (:func:`cuda_labels`); ``None``
        leaves that device out. Default: the NVML index as a string.
    label_method : str
        How ``labels`` were found (shown by ``medge doctor``).
    """

    #: the gauges this collector yields, each labelled ``gpu`` (the CUDA ordinal)
    METRIC_NAMES = tuple(GAUGES)

    def __init__(self, nvml: Any, count: int, labels: Sequence[str | None] | None = None,
                 label_method: str = "nvml") -> None:
        self._nvml = nvml
        self._count = min(int(count), _MAX_GPUS)
        self._labels = list(labels) if labels is not None else [str(i) for i in range(self._count)]
        #: how the ``gpu`` labels were found: ``cuda``, ``env`` or ``nvml`` (:func:`cuda_labels`)
        self.label_method = label_method
        self._unsupported: set[tuple[int, str]] = set()
        self._lock = threading.Lock()  # scrapes may run on several HTTP threads at once
        self._not_supported = getattr(nvml, "NVMLError_NotSupported", None)

    @classmethod
    def create(cls) -> Collector | None:
        """The GPU collector for this machine (:func:`gpu_collector`); ``None`` where there is no GPU."""
        return gpu_collector()

    @classmethod
    def from_nvml(cls, nvml: Any, env: Mapping[str, str] | None = None, cudart: Any = "import") -> "NvmlCollector | None":
        """A collector on an initialised NVML with CUDA-ordinal labels, or ``None`` where NVML lists no GPU."""
        count = min(int(nvml.nvmlDeviceGetCount()), _MAX_GPUS)
        if not count:
            return None
        bus_ids: list[str] = []
        uuids: list[str] = []
        for i in range(count):
            try:
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                bus_ids.append(_text(nvml.nvmlDeviceGetPciInfo(h).busId))
                uuids.append(_text(nvml.nvmlDeviceGetUUID(h)))
            except nvml.NVMLError as exc:
                _log.info("NVML cannot tell the PCI bus id of GPU %d (%s); matching it to CUDA by order.", i, exc)
                bus_ids.append("")
                uuids.append("")
        labels, method = cuda_labels(bus_ids, uuids, env=env, cudart=cudart)
        if method == "nvml":
            _log.info("GPU metrics: the gpu label is NVML's index (nvml0, ...), not a CUDA ordinal: install "
                      "cuda-python, or set CUDA_DEVICE_ORDER=PCI_BUS_ID, to label GPUs as device_id counts them.")
        for i, label in enumerate(labels):
            if label is None:
                _log.info("GPU %d (NVML index) is not visible to CUDA (CUDA_VISIBLE_DEVICES); no gauges for it.", i)
        return cls(nvml, count, labels, method)

    @property
    def labels(self) -> list[str | None]:
        """The ``gpu`` label of each NVML index (``None``: not reported)."""
        return list(self._labels)

    def collect(self) -> Iterable[Metric]:
        """One sample per GPU of each gauge it supports."""
        families = {name: GaugeMetricFamily(name, help_text, labels=["gpu"]) for name, help_text in GAUGES.items()}
        for i in range(self._count):
            label = self._labels[i] if i < len(self._labels) else None
            if label is None:
                continue
            try:
                h = self._nvml.nvmlDeviceGetHandleByIndex(i)
            except self._nvml.NVMLError as exc:
                _log.debug("NVML cannot reach GPU %s: %s", label, exc)
                continue
            for name, value in self._read(i, label, h):
                families[name].add_metric([label], value)
        yield from _nonempty(families.values())

    def supported(self) -> dict[str, list[str]]:
        """Per ``gpu`` label, the gauges it reports now (reads NVML once; for ``medge doctor``)."""
        out: dict[str, list[str]] = {}
        for fam in self.collect():
            for s in fam.samples:
                out.setdefault(s.labels["gpu"], []).append(fam.name)
        return out

    def _read(self, index: int, label: str, handle: Any) -> Iterator[tuple[str, float]]:
        nv = self._nvml
        temp_sensor = getattr(nv, "NVML_TEMPERATURE_GPU", 0)
        util = self._one(index, label, "utilization", lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        if util is not None:
            yield _UTIL, util
        mem = self._one(index, label, "memory", lambda: nv.nvmlDeviceGetMemoryInfo(handle))
        if mem is not None:
            yield _MEM_USED, float(mem.used)
            yield _MEM_TOTAL, float(mem.total)
        temp = self._one(index, label, "temperature", lambda: float(nv.nvmlDeviceGetTemperature(handle, temp_sensor)))
        if temp is not None:
            yield _TEMP, temp

    def _one(self, index: int, label: str, what: str, read: Callable[[], Any]) -> Any:
        """``read()``, or ``None`` when NVML cannot answer it (remembered when it is not supported)."""
        key = (index, what)
        if key in self._unsupported:
            return None
        try:
            return read()
        except self._nvml.NVMLError as exc:
            if self._not_supported is not None and isinstance(exc, self._not_supported):
                with self._lock:
                    first = key not in self._unsupported
                    self._unsupported.add(key)
                if first:
                    _log.info("GPU %s: NVML does not support %s here (MIG or an integrated GPU); "
                              "that gauge is left out, the others are reported.", label, what)
            else:
                _log.debug("NVML read of %s on GPU %s failed: %s", what, label, exc)
            return None


def _nonempty(families: Iterable[GaugeMetricFamily]) -> Iterator[GaugeMetricFamily]:
    for f in families:
        if f.samples:
            yield f


# --------------------------------------------------------------------------- choosing one
def nvml_status(nvml: Any = "import") -> tuple[Any, str]:
    """An initialised ``pynvml`` and ``""``, or ``None`` and why NVML cannot be used here."""
    nv = import_nvml() if nvml == "import" else nvml
    if nv is None:
        return None, "nvidia-ml-py (pynvml) is not installed"
    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        return None, f"NVML present but unusable ({exc})"
    return nv, ""


def gpu_collector(nvml: Any = "import", sysfs_root: str = "/") -> Collector | None:
    """A Jetson's sysfs collector where its GPU load file exists, else NVML's where it lists a GPU, else ``None``.

    A Jetson's sysfs comes first: JetPack 6's NVML lists the Orin GPU but
    answers "not supported" for every gauge. One log line says why there
    are no GPU metrics where a GPU is expected (NVML installed but
    unusable; a Jetson with neither a load file nor an NVML GPU).
    """
    from edge.ops.jetson import JetsonGpuCollector, is_jetson

    jetson = JetsonGpuCollector.create(sysfs_root)
    if jetson is not None:
        return jetson
    nv, why = nvml_status(nvml)
    if nv is not None:
        try:
            collector = NvmlCollector.from_nvml(nv)
        except nv.NVMLError as exc:
            collector, why = None, f"NVML lists no GPU ({exc})"
        if collector is not None:
            return collector
        why = why or "NVML lists no GPU"
    if is_jetson(sysfs_root):
        _log.warning("This is a Jetson but neither a GPU load file in sysfs (/sys/class/devfreq/*/device/load, "
                     "/sys/devices/gpu.0/load) nor an NVML GPU was found (%s): GPU load is absent from /metrics.",
                     why)
    elif why and "not installed" not in why:
        _log.info("No GPU metrics: %s.", why)
    return None
