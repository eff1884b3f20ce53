"""The daemon's Prometheus metrics, on a registry that is passed in.

Names, types and labels are the contract's (``medge_`` prefix, base units).
Histograms resolve sub-millisecond stages (buckets from 25 µs). Label
values are bounded: model names, stage names, error codes, configured
destination names and allow-listed AE titles; never a patient, study,
stream or frame identifier.

Examples
--------
>>> from prometheus_client import CollectorRegistry, generate_latest
>>> reg = CollectorRegistry()
>>> m = Metrics(reg, process=False)
>>> m.frames_received.labels(source="zmq", model="us-lesion-seg").inc()
>>> b"medge_frames_received_total" in generate_latest(reg)
True
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["get_or_create_metric", "Metrics", "STAGES", "LATENCY_BUCKETS_S", "BATCH_BUCKETS", "REPLY_LOST_REASONS", "NvmlCollector"]

_log = logging.getLogger(__name__)

STAGES = ("queue", "preprocess", "infer", "postprocess", "egress")

#: why a reply was not sent (``medge_replies_lost_total{reason}``):
#: ``encode``: it could not be encoded (an ``internal`` error reply went instead);
#: ``hwm``: the client's send high-water mark was reached (it is not reading);
#: ``disconnected``: the client had gone before its reply was ready;
#: ``closed``: the daemon's sockets had closed (shutdown, or a failed I/O loop);
#: ``internal``: an unexpected exception on the reply path (counted in
#: ``medge_internal_errors_total`` as well).
REPLY_LOST_REASONS = ("encode", "hwm", "disconnected", "closed", "internal")

#: seconds; fine below 1 ms (ZeroMQ hops, pre/post-processing), coarse up to 10 s (DICOM series)
LATENCY_BUCKETS_S = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.033,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def get_or_create_metric(
    registry: CollectorRegistry,
    kind: type,
    name: str,
    doc: str,
    labels: Sequence[str] = (),
    *,
    zero: Iterable[str] = (),
) -> Any:
    """Register a metric on ``registry`` or return the one already there under that name.

    Lets components (the DICOM side, the error boundaries) and this module
    share a metric without either owning the other. ``zero``: values of a
    one-label counter to create at 0 now, so the first increment is visible
    to ``rate()``/``increase()``.
    """
    try:
        metric = kind(name, doc, labelnames=tuple(labels), registry=registry)
    except ValueError:
        key = name[: -len("_total")] if kind is Counter and name.endswith("_total") else name
        metric = registry._names_to_collectors.get(key) or registry._names_to_collectors.get(name)  # noqa: SLF001
        if metric is None:
            raise
    for value in zero:
        metric.labels(value).inc(0)
    return metric


class Metrics:
    """Every metric of the daemon, registered on ``registry``.

    Parameters
    ----------
    registry : CollectorRegistry
        Where to register (each test passes a fresh one; never the global default).
    process : bool
        Also register process metrics (CPU, RSS, open fds, start time) and
        Python GC/platform metrics.
    gpu : bool
        Also register NVML GPU metrics where NVML is present.

    Attributes
    ----------
    frames_received : Counter
        ``medge_frames_received_total{source, model}``: frames accepted for inference.
    frames_dropped : Counter
        ``medge_frames_dropped_total{model, reason}``: frames shed (reason
        ``stream_backlog``) or abandoned at shutdown (``shutdown``).
    requests_failed : Counter
        ``medge_requests_failed_total{source, code}``: error replies by code.
    stage_seconds : Histogram
        ``medge_stage_seconds{model, stage}``.
    end_to_end_seconds : Histogram
        ``medge_end_to_end_seconds{source, model}``: receipt to reply sent.
    batch_size : Histogram
        ``medge_batch_size{model}``.
    queue_depth : Gauge
        ``medge_queue_depth{model}``.
    model_info : Gauge
        ``medge_model_info{model, version, backend, precision}`` = 1.
    dicom_instances_received : Counter
        ``medge_dicom_instances_received_total{calling_ae}`` (allow-listed names only).
    outbox_pending : Gauge
        ``medge_outbox_pending{destination}``.
    outbox_sent, outbox_failures, outbox_dead_letters : Counter
        ``medge_outbox_sent_total``, ``medge_outbox_failures_total``,
        ``medge_outbox_dead_letter_total``, by ``destination``.
    replies_lost : Counter
        ``medge_replies_lost_total{reason}``: replies the daemon owed a
        client and did not send (reasons: :data:`REPLY_LOST_REASONS`, all
        present at 0 from the start). A lost reply is counted here *as well
        as* by its outcome: every accepted frame is counted once as ok
        (``medge_end_to_end_seconds_count``), dropped or failed.
    """

    def __init__(self, registry: CollectorRegistry, *, process: bool = True, gpu: bool = True) -> None:
        self.registry = registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = registry
        self.frames_received = Counter(
            "medge_frames_received", "Frames accepted for inference.", ["source", "model"], registry=r
        )
        self.frames_dropped = Counter(
            "medge_frames_dropped", "Frames shed without inference (overload, shutdown).", ["model", "reason"], registry=r
        )
        self.requests_failed = Counter(
            "medge_requests_failed", "Requests answered with an error, by error code.", ["source", "code"], registry=r
        )
        self.stage_seconds = Histogram(
            "medge_stage_seconds",
            "Time spent per pipeline stage and frame.",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "medge_end_to_end_seconds",
            "Time from receipt of a frame to its reply.",
            ["source", "model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "medge_batch_size", "Frames per inference batch.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("medge_queue_depth", "Frames waiting in a model's queue.", ["model"], registry=r)
        self.model_info = Gauge(
            "medge_model_info",
            "Served models (value 1): version, backend and precision actually in use.",
            ["model", "version", "backend", "precision"],
            registry=r,
        )
        self.dicom_instances_received = Counter(
            "medge_dicom_instances_received",
            "DICOM instances received (stored to the spool), by calling AE title.",
            ["calling_ae"],
            registry=r,
        )
        self.outbox_pending = Gauge(
            "medge_outbox_pending", "Results waiting in the outbox, by destination.", ["destination"], registry=r
        )
        self.outbox_sent = Counter(
            "medge_outbox_sent", "Results delivered by C-STORE, by destination.", ["destination"], registry=r
        )
        self.outbox_failures = Counter(
            "medge_outbox_failures", "Failed delivery attempts, by destination.", ["destination"], registry=r
        )
        self.outbox_dead_letters = Counter(
            "medge_outbox_dead_letter",
            "Results moved to the dead-letter folder, by destination.",
            ["destination"],
            registry=r,
        )
        self.replies_lost = Counter(
            "medge_replies_lost",
            "Replies owed to a client that were not sent, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REPLY_LOST_REASONS:
            self.replies_lost.labels(reason=reason)
        if process:
            from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        if gpu:
            collector = NvmlCollector.create()
            if collector is not None:
                r.register(collector)

    def child(self, metric: Any, *label_values: str) -> Any:
        """``metric.labels(*label_values)``, cached: the per-frame hot path skips label validation.

        ``label_values`` are positional, in the metric's label order.
        """
        key = (id(metric), label_values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*label_values)
        return found

    def observe_stages(self, model: str, timing_us: dict[str, int]) -> None:
        """Record the stage timings of one frame (``timing_us`` keys that are stages)."""
        for stage in STAGES:
            if stage in timing_us:
                self.child(self.stage_seconds, model, stage).observe(timing_us[stage] / 1e6)


class NvmlCollector(Collector):
    """GPU utilisation, memory and temperature from NVML (``nvidia-ml-py``)."""

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
        util = GaugeMetricFamily("medge_gpu_utilization_ratio", "GPU utilisation (0-1).", labels=["gpu"])
        mem = GaugeMetricFamily("medge_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        temp = GaugeMetricFamily("medge_gpu_temperature_celsius", "GPU temperature.", labels=["gpu"])
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
