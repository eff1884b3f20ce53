"""The daemon's Prometheus metrics, on a registry that is passed in.

Names, types and labels are the contract's (``medge_`` prefix, base units).
Latency histograms resolve sub-millisecond stages (buckets from 25 µs) and
1–100 ms in steps of at most 1.5x (:data:`LATENCY_BUCKETS_S`); the DICOM
store-to-result histogram runs to an hour (:data:`DICOM_BUCKETS_S`). Label
values are bounded: model names, stage names, error codes, configured
destination names and allow-listed AE titles; never a patient, study,
stream or frame identifier.

Every ``medge_*`` metric is defined here, once; :mod:`edge.ops.nvml`'s
collector adds the ``medge_gpu_*`` gauges at scrape time. The frame path's
families (scheduler, ZeroMQ, per-source counts) are :class:`Metrics`, made
by the daemon and passed down. The other components' families come in
small groups (:class:`BoundaryMetrics`, :class:`DaemonMetrics`,
:class:`DicomMetrics`, :class:`OutboxMetrics`, :class:`CaptureMetrics`) from :func:`metrics_for`,
which registers each group once per registry: components handed the same
registry share its families, and each test's fresh registry gets its own.

Every counter whose label values are known at start-up exists at 0 from
the start (:meth:`Metrics.declare_models`, :meth:`Metrics.declare_source`,
:meth:`OutboxMetrics.declare_destinations`, :func:`zeroed`), so ``rate()``
and ``increase()`` see the very first event: Prometheus cannot compute an
increase for a series whose first sample already holds it.

Examples
--------
>>> from prometheus_client import CollectorRegistry, generate_latest
>>> reg = CollectorRegistry()
>>> m = Metrics(reg, process=False)
>>> m.frames_received.labels(source="zmq", model="us-lesion-seg").inc()
>>> b"medge_frames_received_total" in generate_latest(reg)
True
>>> metrics_for(reg).outbox.sent is metrics_for(reg).outbox.sent
True
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import threading
import weakref
from typing import Any, Iterable, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge.ops.nvml import NvmlCollector

__all__ = [
    "metrics_for",
    "zeroed",
    "build_info_labels",
    "Metrics",
    "ComponentMetrics",
    "BoundaryMetrics",
    "DaemonMetrics",
    "DicomMetrics",
    "OutboxMetrics",
    "CaptureMetrics",
    "STAGES",
    "DROP_REASONS",
    "MODEL_FAILURE_CODES",
    "LATENCY_BUCKETS_S",
    "DICOM_BUCKETS_S",
    "BATCH_BUCKETS",
    "REPLY_LOST_REASONS",
]

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

#: why a reply was not handed to the PUB socket (``medge_publish_dropped_total{reason}``).
PUBLISH_DROPPED_REASONS = ("error", "closed")

#: why a frame was shed without inference (``medge_frames_dropped_total{reason}``):
#: ``stream_backlog``: a newer frame of the same live stream replaced it (newest wins);
#: ``shutdown``: still queued when the shutdown budget ran out.
DROP_REASONS = ("stream_backlog", "shutdown")

#: the error codes the scheduler itself counts for a frame (``medge_requests_failed_total{code}``):
#: what a model's results carry (``bad_shape``) and ``internal``; a source that validates its own
#: input and handles refusals itself (DICOM) can fail with no other code
MODEL_FAILURE_CODES = ("bad_shape", "internal")

#: seconds. Fine below 1 ms (ZeroMQ hops, pre/post-processing); from 1 ms to 100 ms,
#: where frame latencies fall, each bucket at most 1.5x the one below, so
#: ``histogram_quantile`` is off by less than a third of the value there; coarse up to 10 s.
LATENCY_BUCKETS_S = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.006,
    0.0075,
    0.01,
    0.0125,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.06,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: seconds, for ``medge_dicom_store_to_result_seconds``: a series waits ``series_idle_s``
#: (10 s by default) after its last instance, and a PACS that is down delays delivery for hours
DICOM_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 12.5, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
                   300.0, 600.0, 1800.0, 3600.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def zeroed(metric: Any, values: Iterable[str]) -> Any:
    """Create the children ``values`` of a one-label ``metric`` (a counter or histogram starts at 0); return it.

    For label values known at start-up (reasons, destinations, allow-listed
    AE titles), so the first increment is visible to ``rate()``/``increase()``.
    Creating a child that exists already leaves its value alone.
    """
    for value in values:
        metric.labels(value)
    return metric


class BoundaryMetrics:
    """The error boundaries' family (:mod:`edge.ops.boundary`), shared by every component on a registry.

    Attributes
    ----------
    internal_errors : Counter
        ``medge_internal_errors_total{component}``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.internal_errors = Counter(
            "medge_internal_errors_total",
            "Unexpected exceptions caught by a loop's error boundary (the loop kept serving), by component.",
            ["component"],
            registry=registry,
        )


class DaemonMetrics:
    """The serve lifecycle's family (:mod:`edge.daemon`).

    Attributes
    ----------
    ready : Gauge
        ``medge_ready``: 1 while ``/readyz`` answers 200 (the daemon sets a function on it).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ready = Gauge(
            "medge_ready",
            "1 while /readyz answers 200: models warm, sockets bound, every serving loop alive and making progress.",
            registry=registry,
        )


class DicomMetrics:
    """The DICOM ingest's families: the SCP (:mod:`edge.ingest.dicom.scp`) and its pipeline.

    Label vocabularies stay with the code that counts them
    (``CONNECTION_REFUSAL_REASONS`` in :mod:`edge.ingest.dicom.admission`, ``FAILURE_REASONS`` in the
    pipeline, ...), which creates them at 0 with :func:`zeroed`.

    Attributes
    ----------
    instances_received : Counter
        ``medge_dicom_instances_received_total{calling_ae}`` (allow-listed names, else ``other``).
    connections_refused : Counter
        ``medge_dicom_connections_refused_total{reason}``.
    associations_aborted : Counter
        ``medge_dicom_associations_aborted_total{reason}``.
    store_failures : Counter
        ``medge_dicom_store_failures_total{status}``.
    unrouted : Counter
        ``medge_dicom_unrouted_total{sop_class_uid, action}``.
    processing_failures : Counter
        ``medge_dicom_processing_failures_total{reason}``.
    results : Counter
        ``medge_dicom_results_total{kind}``.
    transient_retries : Counter
        ``medge_dicom_transient_retries_total{stage}``.
    spool_instances : Gauge
        ``medge_dicom_spool_instances``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.instances_received = Counter(
            "medge_dicom_instances_received_total",
            "DICOM instances received (stored to the spool), by calling AE title.",
            ["calling_ae"],
            registry=r,
        )
        self.connections_refused = Counter(
            "medge_dicom_connections_refused_total",
            "DICOM connections closed before they associated (admission limits, timeouts, TLS), by reason.",
            ["reason"],
            registry=r,
        )
        self.associations_aborted = Counter(
            "medge_dicom_associations_aborted_total",
            "DICOM associations the SCP ended because of a PDU (not whole within the network timeout, or too long), "
            "by reason.",
            ["reason"],
            registry=r,
        )
        self.store_failures = Counter(
            "medge_dicom_store_failures_total",
            "C-STORE requests answered with a failure status, by status.",
            ["status"],
            registry=r,
        )
        self.unrouted = Counter(
            "medge_dicom_unrouted_total",
            "Instances no routing rule matched, by SOP class UID and action.",
            ["sop_class_uid", "action"],
            registry=r,
        )
        self.processing_failures = Counter(
            "medge_dicom_processing_failures_total",
            "Accepted DICOM instances that could not be processed (moved to the spool's failed/ folder).",
            ["reason"],
            registry=r,
        )
        self.results = Counter(
            "medge_dicom_results_total", "DICOM result objects written to the outbox.", ["kind"], registry=r
        )
        self.transient_retries = Counter(
            "medge_dicom_transient_retries_total",
            "Times DICOM processing met a transient error (service overloaded, full or failing disk) and will "
            "try again; nothing is failed for these.",
            ["stage"],
            registry=r,
        )
        self.spool_instances = Gauge(
            "medge_dicom_spool_instances", "Spooled DICOM instances without a result in the outbox.", registry=r
        )


class OutboxMetrics:
    """The outbox's families (:mod:`edge.egress.dicom.outbox`), by ``destination``.

    Attributes
    ----------
    pending : Gauge
        ``medge_outbox_pending{destination}``.
    oldest_age : Gauge
        ``medge_outbox_oldest_age_seconds{destination}``.
    sent, failures, dead_letter : Counter
        ``medge_outbox_sent_total``, ``medge_outbox_failures_total``,
        ``medge_outbox_dead_letter_total``.
    store_to_result : Histogram
        ``medge_dicom_store_to_result_seconds{destination}``, observed when a
        destination accepts a result object: seconds from the moment its
        earliest source instance was stored in the spool (just before the
        SCP answered the C-STORE with success) to the destination's success
        status for the result. It includes decoding, the queue, inference,
        the series wait (``series_idle_s``), making the result, the outbox
        wait with every retry, and the C-STORE itself.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.pending = Gauge(
            "medge_outbox_pending", "Results waiting in the outbox, by destination.", ["destination"], registry=r
        )
        self.oldest_age = Gauge(
            "medge_outbox_oldest_age_seconds",
            "Age of the oldest result object waiting for a destination (since it was queued for it); 0 when none is.",
            ["destination"],
            registry=r,
        )
        self.sent = Counter(
            "medge_outbox_sent_total", "Results delivered by C-STORE, by destination.", ["destination"], registry=r
        )
        self.failures = Counter(
            "medge_outbox_failures_total", "Failed delivery attempts, by destination.", ["destination"], registry=r
        )
        self.dead_letter = Counter(
            "medge_outbox_dead_letter_total",
            "Results moved to the dead-letter folder, by destination.",
            ["destination"],
            registry=r,
        )
        self.store_to_result = Histogram(
            "medge_dicom_store_to_result_seconds",
            "DICOM: source instance stored in the spool -> result accepted by the destination "
            "(series wait, inference, outbox wait and retries, C-STORE).",
            ["destination"],
            buckets=DICOM_BUCKETS_S,
            registry=r,
        )

    def declare_destinations(self, names: Iterable[str]) -> None:
        """Create each destination's counters and store-to-result histogram at 0."""
        names = tuple(names)
        for metric in (self.sent, self.failures, self.dead_letter, self.store_to_result):
            zeroed(metric, names)


class CaptureMetrics:
    """The capture sources' families (:mod:`edge.ingest.capture`), by ``capture`` (a configured name).

    Frames a source submits are counted like every other frame, with
    ``source="capture"`` (:class:`Metrics`); these families say what
    happened before that. Reason vocabularies stay with the code that
    counts them (``SKIP_REASONS`` and ``ERROR_REASONS`` in
    :mod:`edge.ingest.capture_frames`), which creates them at 0.

    Attributes
    ----------
    up : Gauge
        ``medge_capture_up{capture}``: 1 while the source is open and a
        frame arrived within the last few seconds.
    frames : Counter
        ``medge_capture_frames_total{capture}``: frames decoded from the source.
    skipped : Counter
        ``medge_capture_frames_skipped_total{capture, reason}``: decoded
        frames not submitted (too large, outside the crop, thinned to ``fps``).
    errors : Counter
        ``medge_capture_errors_total{capture, reason}``: failures to open,
        read or decode the source (each open or read failure is followed by
        a reopen after a backoff).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.up = Gauge(
            "medge_capture_up",
            "1 while a capture source is open and delivering usable frames, else 0 (absent, failing, silent, or "
            "every frame skipped), by capture.",
            ["capture"],
            registry=r,
        )
        self.frames = Counter(
            "medge_capture_frames", "Frames decoded from a capture source, by capture.", ["capture"], registry=r
        )
        self.skipped = Counter(
            "medge_capture_frames_skipped",
            "Decoded capture frames not submitted for inference (over max_pixels, crop outside the frame, "
            "thinned to fps), by capture and reason.",
            ["capture", "reason"],
            registry=r,
        )
        self.errors = Counter(
            "medge_capture_errors",
            "Capture source failures (open, read, decode), by capture and reason; open and read failures are "
            "retried with backoff.",
            ["capture", "reason"],
            registry=r,
        )


_G = TypeVar("_G")


class ComponentMetrics:
    """The families of the daemon's components on one registry, each group registered on first use.

    Obtained with :func:`metrics_for`, never constructed elsewhere: two
    components handed the same registry get the same families (one
    registration each), and a fresh registry gets fresh ones.
    """

    def __init__(self, registry: CollectorRegistry, groups: dict[type, Any]) -> None:
        self._registry = registry
        self._groups = groups  # shared by every ComponentMetrics of this registry

    def _group(self, kind: type[_G]) -> _G:
        with _LOCK:
            group = self._groups.get(kind)
            if group is None:
                group = self._groups[kind] = kind(self._registry)
            return group

    @property
    def boundary(self) -> BoundaryMetrics:
        """The error boundaries' family."""
        return self._group(BoundaryMetrics)

    @property
    def daemon(self) -> DaemonMetrics:
        """``medge_ready``."""
        return self._group(DaemonMetrics)

    @property
    def dicom(self) -> DicomMetrics:
        """The DICOM SCP's and pipeline's families."""
        return self._group(DicomMetrics)

    @property
    def outbox(self) -> OutboxMetrics:
        """The outbox's families."""
        return self._group(OutboxMetrics)

    @property
    def capture(self) -> CaptureMetrics:
        """The capture sources' families."""
        return self._group(CaptureMetrics)


# The groups registered on each live registry. prometheus_client offers no public lookup of a
# registered metric, so we remember what we registered. Keyed weakly (the groups never refer to
# their registry) so that a test's fresh registry and its families can be collected.
_GROUPS: "weakref.WeakKeyDictionary[CollectorRegistry, dict[type, Any]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def metrics_for(registry: CollectorRegistry) -> ComponentMetrics:
    """The component metric families on ``registry``, registered there once.

    Examples
    --------
    >>> reg = CollectorRegistry()
    >>> metrics_for(reg).outbox is metrics_for(reg).outbox
    True
    >>> metrics_for(reg).outbox is metrics_for(CollectorRegistry()).outbox
    False
    """
    with _LOCK:
        groups = _GROUPS.get(registry)
        if groups is None:
            groups = _GROUPS[registry] = {}
    return ComponentMetrics(registry, groups)


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def build_info_labels() -> dict[str, str]:
    """The labels of ``medge_build_info``: software versions only, nothing about the host or its data."""
    from edge import __version__

    ort = _package_version("onnxruntime")
    return {
        "version": __version__,
        "python": platform.python_version(),
        "onnxruntime": ort if ort != "none" else _package_version("onnxruntime-gpu"),
        "tensorrt": _package_version("tensorrt"),
        "pyzmq": _package_version("pyzmq"),
        "pydicom": _package_version("pydicom"),
        "pynetdicom": _package_version("pynetdicom"),
    }


class Metrics:
    """The frame path's metrics (scheduler, ZeroMQ, per-source counts) and build info, registered on ``registry``.

    The DICOM and outbox families are :class:`DicomMetrics` and
    :class:`OutboxMetrics` (see :func:`metrics_for`).

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
        ``medge_stage_seconds{model, stage}``: ``queue`` (queued until its
        batch started), ``preprocess``, ``infer`` (the whole batch's backend
        call), ``postprocess``, ``egress`` (ZeroMQ: result ready until the
        reply was handed to the socket and published).
    end_to_end_seconds : Histogram
        ``medge_end_to_end_seconds{source, model}``: ``zmq``: the request
        read from the socket until its reply was handed to the socket and
        published;
        ``dicom``: one frame handed to the scheduler until its result was
        ready (no series wait, no delivery: see :attr:`OutboxMetrics.store_to_result`);
        ``capture``: one captured frame handed to the scheduler until its
        result was published (or ready, when ZeroMQ is off).
    build_info : Gauge
        ``medge_build_info{version, python, onnxruntime, tensorrt, pyzmq,
        pydicom, pynetdicom}`` = 1 (:func:`build_info_labels`).
    batch_size : Histogram
        ``medge_batch_size{model}``.
    queue_depth : Gauge
        ``medge_queue_depth{model}``.
    model_info : Gauge
        ``medge_model_info{model, version, backend, precision, fallback}`` = 1
        (``fallback``: the ``auto`` steps that did not start before it, comma-separated; empty when the
        first choice runs).
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
            "Served models (value 1): version, backend and precision actually in use, and the auto-chain "
            "steps that did not start before it (empty when the first choice runs).",
            ["model", "version", "backend", "precision", "fallback"],
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
        self.published = Counter(
            "medge_published",
            "Replies handed to the PUB socket (a subscriber that keeps up receives each once).",
            registry=r,
        )
        self.publish_dropped = Counter(
            "medge_publish_dropped",
            "Replies the daemon could not hand to the PUB socket, by reason (error: the socket refused or "
            "failed; closed: shutting down). Drops at one slow subscriber's publish_hwm happen inside "
            "libzmq and are not counted here: compare medge_published_total with what the subscriber received.",
            ["reason"],
            registry=r,
        )
        for reason in PUBLISH_DROPPED_REASONS:
            self.publish_dropped.labels(reason=reason)
        self.build_info = Gauge(
            "medge_build_info",
            "Software versions of this daemon (value 1).",
            list(build_info_labels()),
            registry=r,
        )
        self.build_info.labels(**build_info_labels()).set(1)
        if process:
            from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        if gpu:
            collector = NvmlCollector.create()
            if collector is not None:
                r.register(collector)

    def declare_models(self, models: Iterable[str]) -> None:
        """Create the per-model series at 0: drops by reason, stages, batch size, queue depth.

        Called by the scheduler for the models it serves.
        """
        for model in models:
            for reason in DROP_REASONS:
                self.child(self.frames_dropped, model, reason)
            for stage in STAGES:
                self.child(self.stage_seconds, model, stage)
            self.child(self.batch_size, model)
            self.child(self.queue_depth, model)

    def declare_source(self, source: str, models: Iterable[str], codes: Iterable[str]) -> None:
        """Create the series of one ingest source at 0: frames and latency per model, failures per code.

        Called by each ingest (``zmq``; ``dicom``) for the models it can
        reach and the error codes it can count.
        """
        for model in models:
            self.child(self.frames_received, source, model)
            self.child(self.end_to_end_seconds, source, model)
        for code in codes:
            self.child(self.requests_failed, source, code)

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
