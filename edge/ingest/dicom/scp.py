"""The DICOM C-STORE SCP (pynetdicom): durable receive, then hand-off.

What happens on the network (association) thread, and nothing more:

1. :func:`edge.ingest.dicom.scan.scan_encoded` walks the encoded data set as received
   (tag and length only; no pydicom decode) to check it is structurally
   whole and within the input bounds, and to read Modality, SOP class,
   BodyPartExamined and the UIDs. A truncated or corrupt data set (or
   deflate stream), an image medge could never decode (Rows or Columns 0,
   Bits Allocated not 1/8/16/32, Samples per Pixel not 1/3), or a
   compressed frame whose codestream header declares more than Rows x
   Columns (or cannot be read) is answered ``0xC210`` (cannot
   understand); one over a
   bound — inflated size (``[dicom] max_inflated_mb``, checked while
   inflating, so a deflate bomb is refused before it is in memory),
   Number of Frames (``max_frames``) or Rows x Columns (``max_pixels``) —
   is answered ``0xA700`` (out of resources). Both carry an Error Comment
   naming the reason (no patient data), and nothing is written.
2. Routing: an instance no rule routes to a served model is accepted and
   logged by SOP class (``unrouted = "accept"``, not stored) or refused with
   ``0x0122`` (``unrouted = "reject"``). A routed instance without Pixel
   Data (nothing a model could run), or whose Study, Series or SOP
   Instance UID is missing, empty, longer than 64 characters or not a
   valid UID (results could not reference it), is answered ``0xC210``.
3. The encoded bytes (file meta + data set, exactly as received) are written
   to the spool: temp file, fsync, rename, fsync of the folder. Only then is
   success (``0x0000``) returned. An instance whose SOP Instance UID is
   already pending for another object (another study, series, SOP class,
   modality or patient) is answered ``0x0111`` (duplicate SOP instance) and
   not written; the same object sent again replaces its pending copy and
   gets success (idempotent). A full spool (``[dicom] spool_max_mb``
   over the received instances plus the outbox, or less free disk than
   ``spool_min_free_mb`` after the write) or an unwritable one answers
   ``0xA700`` (out of resources), never success; nothing is left behind.
4. The spooled instance is queued for :class:`~edge.ingest.dicom.pipeline.DicomPipeline`,
   whose worker threads decode and call the inference service.

Associations: calling-AE allow-list (others are rejected at A-ASSOCIATE),
``max_associations``, ACSE/DIMSE/network timeouts, and optional TLS. On a
network timeout the SCP releases the association rather than aborting it
(some PACS treat a release as "study sent").

**Admission** (before pynetdicom sees a connection): per-peer and
pending-connection limits, the ``connect_timeout_s`` deadline on the TLS
handshake and the A-ASSOCIATE-RQ, and per-PDU deadline and size bounds
after association live in :mod:`edge.ingest.dicom.admission`; this module
configures it (:class:`~edge.ingest.dicom.admission.Admission`), runs its
accept loop on the ``medge-dicom-accept`` thread, and counts and logs what
it closes (``medge_dicom_connections_refused_total{reason}``) or ends
(``medge_dicom_associations_aborted_total{reason}``).

Examples
--------
>>> from edge.config import default_config
>>> cfg = default_config(check_models=False)  # doctest: +SKIP
>>> scp = start_dicom(cfg, service, registry, cfg.spool_dir)  # doctest: +SKIP
>>> scp.port  # doctest: +SKIP
11112
>>> scp.close()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt

from edge.egress.dicom.outbox import Outbox
from edge.egress.dicom.common import ModelInfo
from edge.errors import DataError, MedgeError
from edge.ingest.dicom.admission import (
    ASSOCIATION_ABORT_REASONS,
    CONNECTION_REFUSAL_REASONS,
    MAX_PDU_BYTES,
    PDU_LIMIT_BYTES,
    POLL_S,
    Admission,
    AdmittingRequestHandler,
    AdmittingServer,
    server_ssl_context,
)
from edge.ingest.dicom.part10 import part10_chunks
from edge.ingest.dicom.pipeline import DicomPipeline, WorkItem
from edge.ingest.dicom.routing import Router
from edge.ingest.dicom.scan import KeyUidError, ScanLimits, SizeLimitError, check_key_uids, scan_encoded
from edge.ingest.dicom.spool import Spool, SpoolConflictError, SpoolError, SpoolFullError
from edge.ops.boundary import ErrorBoundary, LogThrottle
from edge.ops.metrics import metrics_for, zeroed
from edge.types import InferenceService

__all__ = [
    "STORAGE_SOP_CLASSES",
    "RETIRED_STORAGE_SOP_CLASSES",
    "accepted_sop_classes",
    "TRANSFER_SYNTAXES",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "STATUS_DUPLICATE_SOP_INSTANCE",
    "DicomIngest",
    "start_dicom",
]

_log = logging.getLogger(__name__)

#: Storage SOP classes the SCP accepts (name -> UID).
STORAGE_SOP_CLASSES: dict[str, str] = {
    "UltrasoundImageStorage": "1.2.840.10008.5.1.4.1.1.6.1",
    "UltrasoundMultiFrameImageStorage": "1.2.840.10008.5.1.4.1.1.3.1",
    "ComputedRadiographyImageStorage": "1.2.840.10008.5.1.4.1.1.1",
    "DigitalXRayImageStorageForPresentation": "1.2.840.10008.5.1.4.1.1.1.1",
    "DigitalXRayImageStorageForProcessing": "1.2.840.10008.5.1.4.1.1.1.1.1",
    "CTImageStorage": "1.2.840.10008.5.1.4.1.1.2",
    "MRImageStorage": "1.2.840.10008.5.1.4.1.1.4",
    "SecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.2",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.3",
    "MultiFrameTrueColorSecondaryCaptureImageStorage": "1.2.840.10008.5.1.4.1.1.7.4",
}

#: Retired storage classes old ultrasound equipment and archives still send (not in pynetdicom's list).
RETIRED_STORAGE_SOP_CLASSES: dict[str, str] = {
    "UltrasoundImageStorageRetired": "1.2.840.10008.5.1.4.1.1.6",
    "UltrasoundMultiFrameImageStorageRetired": "1.2.840.10008.5.1.4.1.1.3",
    "NuclearMedicineImageStorageRetired": "1.2.840.10008.5.1.4.1.1.5",
}


def _register_retired_classes() -> None:
    """Make pynetdicom's Storage service handle the retired classes (it refuses unknown UIDs otherwise)."""
    import pynetdicom.sop_class as sop_class
    from pynetdicom.service_class import StorageServiceClass

    for keyword, uid in RETIRED_STORAGE_SOP_CLASSES.items():
        if not hasattr(sop_class, keyword):
            sop_class.register_uid(uid, keyword, StorageServiceClass)


def accepted_sop_classes(unrouted: str) -> list[str]:
    """The storage SOP classes that get a presentation context.

    With ``unrouted = "accept"``, every storage class pynetdicom knows plus
    the retired ones above: forwarding a whole study (with SEG, SR, KOS or
    medge's own results in it) must not fail for want of a context; what no
    route matches is answered success and dropped (counted in
    ``medge_dicom_unrouted_total{sop_class_uid, action="accept"}``, a label
    bounded by this list). With ``"reject"``, the image classes of
    :data:`STORAGE_SOP_CLASSES` only (others are refused at association).
    """
    uids = list(STORAGE_SOP_CLASSES.values())
    _register_retired_classes()
    if unrouted == "accept":
        from pynetdicom import AllStoragePresentationContexts

        known = set(uids)
        for uid in [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts] + list(
            RETIRED_STORAGE_SOP_CLASSES.values()
        ):
            if uid not in known:
                known.add(uid)
                uids.append(uid)
    return uids


#: Transfer syntaxes accepted for every storage SOP class, in order of preference.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_INTERNAL = 0xC211
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111

_MAX_COMMENT = 64  # Error Comment (0000,0902) is LO


def _status(code: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (at most 64 characters, no patient data)."""
    ds = Dataset()
    ds.Status = code
    text = comment.encode("ascii", "replace").decode("ascii")
    ds.ErrorComment = text if len(text) <= _MAX_COMMENT else text[: _MAX_COMMENT - 3] + "..."
    return ds


def _model_info_from_config(config: Any) -> Any:
    """``model_info(name) -> ModelInfo`` backed by the served models' manifests."""
    from edge.egress.dicom.classification import ClassifierInfo
    from edge.errors import ConfigError, ModelError
    from edge.inference.manifest import Manifest

    cache: dict[str, ModelInfo] = {}
    lock = threading.Lock()

    def model_info(name: str) -> ModelInfo:
        with lock:
            if name not in cache:
                try:
                    mc = config.model(name)
                    m = Manifest.load(config.model_dir(mc))
                    args = (m.name, m.version, m.task, tuple(m.labels), bool(m.research_only))
                    if m.task == "classification":  # the SR states the decision threshold the model served with
                        t = mc.threshold if mc.threshold >= 0 else m.postprocessing.threshold
                        cache[name] = ClassifierInfo(*args, threshold=float(t))
                    else:
                        cache[name] = ModelInfo(*args)
                except (ModelError, ConfigError) as exc:
                    _log.warning("No manifest for model %s (%s); results name it without labels.", name, exc)
                    cache[name] = ModelInfo(name, "", "segmentation", ("finding",), True)
            return cache[name]

    return model_info


class DicomIngest:
    """The running DICOM side: SCP server, spool, pipeline and outbox.

    Parameters
    ----------
    config : edge.config.MedgeConfig
        Uses ``config.dicom`` (SCP, routes, destinations), ``config.outbox``
        and the served models' manifests.
    service : InferenceService or None
        ``None`` runs receive-and-spool only (the ingest benchmark).
    registry : prometheus_client.CollectorRegistry
    spool_dir : path-like
        Received instances go to ``<spool_dir>/dicom``, results to ``<spool_dir>/outbox``.
    spool_max_bytes : int, optional
        Cap on received-but-unprocessed instances plus the outbox, in bytes
        (default: ``[dicom] spool_max_mb``; 0 there means no cap).
    model_info : callable, optional
        Overrides how result objects learn a model's name, version and labels.
    workers : int
        Inference worker threads.
    min_free_bytes : int, optional
        Free space the spool's file system must keep after a store
        (default: ``[dicom] spool_min_free_mb``).
    """

    def __init__(
        self,
        config: Any,
        service: InferenceService | None,
        registry: CollectorRegistry,
        spool_dir: Path | str,
        spool_max_bytes: int | None = None,
        model_info: Any = None,
        workers: int = 1,
        min_free_bytes: int | None = None,
    ) -> None:
        self.config = config
        dcfg = config.dicom
        self.settings = dcfg
        if spool_max_bytes is None:
            spool_max_bytes = int(getattr(dcfg, "spool_max_mb", 0)) << 20 or None
        if min_free_bytes is None:
            min_free_bytes = int(getattr(dcfg, "spool_min_free_mb", 64)) << 20
        self.spool = Spool(
            Path(spool_dir) / "dicom",
            max_bytes=spool_max_bytes,
            min_free_bytes=min_free_bytes,
            extra_bytes=self._outbox_bytes,  # the cap covers the results waiting in the outbox too
        )
        served = set(service.models()) if service is not None else set()
        routes = [r for r in dcfg.routes if service is None or r.model in served]
        for r in dcfg.routes:
            if service is not None and r.model not in served:
                _log.warning("DICOM route %s -> %s ignored: the model is not served.", r.modality, r.model)
        self.router = Router(routes)
        self.allowed = tuple(dcfg.allowed_calling_aes)
        self.limits = ScanLimits.from_config(dcfg)
        self._boundary = ErrorBoundary("dicom_scp", _log, registry)
        self._throttle = LogThrottle(_log)
        families = metrics_for(registry).dicom
        self._connections_refused = zeroed(families.connections_refused, CONNECTION_REFUSAL_REASONS)
        self._associations_aborted = zeroed(families.associations_aborted, ASSOCIATION_ABORT_REASONS)
        self._received = zeroed(families.instances_received, (*self.allowed, "other"))
        self._refused = families.store_failures
        self._unrouted = families.unrouted
        self.outbox: Outbox | None = None
        self.pipeline: DicomPipeline | None = None
        if service is not None:
            self.outbox = Outbox(
                Path(spool_dir) / "outbox",
                dcfg.destinations,
                registry,
                policy=config.outbox,
                calling_ae=dcfg.ae_title,
                dimse_timeout_s=dcfg.dimse_timeout_s,
                network_timeout_s=dcfg.network_timeout_s,
            )
            self.pipeline = DicomPipeline(
                self.spool,
                service,
                self.router,
                self.outbox,
                model_info or _model_info_from_config(config),
                registry,
                frame_stride=dcfg.frame_stride,
                series_idle_s=dcfg.series_idle_s,
                overlay=bool(getattr(dcfg, "secondary_capture", False)),
                workers=workers,
                limits=self.limits,
                max_attempts=int(dcfg.max_attempts),
                device_serial_number=str(getattr(dcfg, "device_serial_number", "") or ""),
            )
        self.ae = self._make_ae()
        self._server: AdmittingServer | None = None
        self._accept_thread: threading.Thread | None = None

    def _outbox_bytes(self, recount: bool) -> int:
        outbox = getattr(self, "outbox", None)
        return outbox.stored_bytes(recount) if outbox is not None else 0

    def _make_ae(self) -> AE:
        d = self.settings
        ae = AE(ae_title=d.ae_title)
        ae.maximum_associations = d.max_associations
        ae.acse_timeout = d.acse_timeout_s
        ae.dimse_timeout = d.dimse_timeout_s
        ae.network_timeout = d.network_timeout_s
        # Large but finite: fewer, larger P-DATA PDUs from the sender, and a bound on what one PDU holds
        # (a PDU over PDU_LIMIT_BYTES ends the association before it is read).
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.require_called_aet = True  # a peer calling another AE title is misconfigured: reject, don't guess
        if self.allowed:
            ae.require_calling_aet = list(self.allowed)
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for uid in accepted_sop_classes(self.settings.unrouted):
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        return ae

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "DicomIngest":
        """Recover spooled work, then start the pipeline and the SCP server (non-blocking)."""
        if self.pipeline is not None:
            self.pipeline.recover()
            self.pipeline.start()
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        d = self.settings
        try:
            admission = Admission(
                connect_timeout_s=float(d.connect_timeout_s),
                max_per_peer=int(d.max_associations_per_peer),
                max_pending=int(d.max_pending_connections),
                tls=server_ssl_context(d.tls),
                on_refused=self._connection_refused,
                boundary=self._boundary,
                pdu_timeout_s=float(d.network_timeout_s) if d.network_timeout_s else None,
                max_pdu_bytes=PDU_LIMIT_BYTES,
                on_aborted=self._association_aborted,
            )
            # AE.make_server is pynetdicom's public way to use another server class (extra keyword
            # arguments go to its constructor); the accept loop runs on our own thread.
            self._server = cast(
                AdmittingServer,
                self.ae.make_server(
                    (d.host, d.port),
                    evt_handlers=handlers,
                    server_class=AdmittingServer,
                    request_handler=AdmittingRequestHandler,
                    admission=admission,
                ),
            )
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise MedgeError(
                f"DICOM SCP cannot listen on {self.settings.host}:{self.settings.port}: {exc}."
            ) from exc
        self._accept_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": POLL_S}, name="medge-dicom-accept", daemon=True
        )
        self._accept_thread.start()
        _log.info(
            "DICOM SCP %s listening on %s:%d (%s).",
            self.settings.ae_title, self.settings.host, self.port,
            "TLS" if self.settings.tls.enabled else "no TLS",
        )
        return self

    def healthy(self, stall_s: float = 60.0) -> bool:
        """Whether the SCP's accept loop runs and has turned within ``stall_s`` (for ``/readyz``).

        The loop turns every few tenths of a second even when no scanner
        connects, so an older turn means it is stuck. Only the SCP: the
        pipeline and the outbox answer for themselves
        (``self.pipeline.healthy``, ``self.outbox.healthy``).
        """
        thread, server = self._accept_thread, self._server
        if thread is None or server is None:
            return False
        return thread.is_alive() and time.monotonic() - server.last_turn <= stall_s

    @property
    def pending_connections(self) -> int:
        """Connections accepted that have not associated yet (0 when not running)."""
        server = self._server
        return server.pending_count if server is not None else 0

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        if self._server is None:
            return int(self.settings.port)
        return int(self._server.server_address[1])

    def close(self, timeout_s: float = 3.0) -> None:
        """Stop accepting, give open associations ``timeout_s`` to finish, stop the workers and the outbox.

        An association still open after that keeps its thread; whatever it
        stores still goes to the spool and is processed at the next start.
        """
        if self._server is not None:
            open_assocs = list(self._server.active_associations)
            self._server.shutdown()
            self._server = None
            if self._accept_thread is not None:
                self._accept_thread.join(timeout_s)
                self._accept_thread = None
            deadline = time.monotonic() + timeout_s
            for assoc in open_assocs:
                assoc.join(max(0.0, deadline - time.monotonic()))
        if self.pipeline is not None:
            self.pipeline.close()
        if self.outbox is not None:
            self.outbox.close()

    def __enter__(self) -> "DicomIngest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ handlers
    def _on_requested(self, event: Any) -> None:
        # Release, not abort, when the peer goes quiet: some PACS mark a study complete on release.
        event.assoc.network_timeout_response = "A-RELEASE"

    def _connection_refused(self, ip: str, reason: str, message: str) -> None:
        self._connections_refused.labels(reason=reason).inc()
        self._throttle.warning(
            f"conn:{reason}", "DICOM connection from %s closed before it associated (%s): %s.", ip, reason, message
        )

    def _association_aborted(self, ip: str, reason: str, message: str) -> None:
        self._associations_aborted.labels(reason=reason).inc()
        self._throttle.warning(f"abort:{reason}", "DICOM association from %s ended (%s): %s.", ip, reason, message)

    def _on_rejected(self, event: Any) -> None:
        _log.warning(
            "Association from %s rejected (calling AE not allowed or too many associations).",
            event.assoc.requestor.address,
        )

    def _calling_label(self, calling: str) -> str:
        calling = calling.strip()
        return calling if calling in self.allowed else "other"

    def _on_store(self, event: Any) -> int | Dataset:
        try:
            return self._store(event)
        except Exception as exc:  # noqa: BLE001 - the SCP's one error boundary: log, count, answer failure, keep serving
            self._boundary.report(exc, "storing a C-STORE request")
            self._refused.labels(status=f"0x{STATUS_INTERNAL:04X}").inc()
            return _status(STATUS_INTERNAL, "Unexpected internal error (logged by the receiver)")

    def _store(self, event: Any) -> int | Dataset:
        ts = str(event.context.transfer_syntax)
        data = event.encoded_dataset(include_meta=False)
        try:
            info = scan_encoded(data, ts, self.limits)
        except SizeLimitError as exc:
            self._throttle.warning(f"limit:{exc.key}", "C-STORE refused (out of resources): %s", exc)
            self._refused.labels(status=f"0x{STATUS_OUT_OF_RESOURCES:04X}").inc()
            return _status(STATUS_OUT_OF_RESOURCES, exc.comment)
        except DataError as exc:
            self._throttle.warning("cannot_understand", "C-STORE data set refused: %s", exc)
            self._refused.labels(status=f"0x{STATUS_CANNOT_UNDERSTAND:04X}").inc()
            return _status(STATUS_CANNOT_UNDERSTAND, getattr(exc, "comment", "") or str(exc))
        model = self.router.match(info)
        if model is None:
            # Label by the negotiated SOP class (one of ours, so a bounded set), not the peer's data;
            # Modality is logged only when it is a short code.
            sop = str(event.context.abstract_syntax)
            modality = info.modality if info.modality.isalnum() and len(info.modality) <= 16 else "?"
            if self.settings.unrouted == "reject":
                _log.info("Refused an instance of SOP class %s (modality %s): no route.", sop, modality)
                self._unrouted.labels(sop_class_uid=sop, action="reject").inc()
                self._refused.labels(status=f"0x{STATUS_SOP_CLASS_NOT_SUPPORTED:04X}").inc()
                return STATUS_SOP_CLASS_NOT_SUPPORTED
            _log.info("Accepted an instance of SOP class %s (modality %s): no route, not stored.", sop, modality)
            self._unrouted.labels(sop_class_uid=sop, action="accept").inc()
            self._received.labels(calling_ae=self._calling_label(event.assoc.requestor.ae_title)).inc()
            return STATUS_SUCCESS
        try:
            check_key_uids(info)  # results reference it by these: refuse it now, not after success
        except KeyUidError as exc:
            self._throttle.warning("key_uid", "C-STORE refused: %s", exc)
            self._refused.labels(status=f"0x{STATUS_CANNOT_UNDERSTAND:04X}").inc()
            return _status(STATUS_CANNOT_UNDERSTAND, exc.comment)
        if not info.has_pixels:
            # A routed image without Pixel Data can never be run: refuse it now (the sender learns
            # why) rather than answer success and quarantine it later.
            self._throttle.warning("no_pixels", "C-STORE refused: a routed instance holds no Pixel Data.")
            self._refused.labels(status=f"0x{STATUS_CANNOT_UNDERSTAND:04X}").inc()
            return _status(STATUS_CANNOT_UNDERSTAND, "Routed instance holds no Pixel Data")
        try:
            path = self.spool.store_instance(
                info.sop_instance_uid, part10_chunks(event.file_meta, data), identity=info.identity
            )
        except SpoolConflictError:
            # Same SOP Instance UID, another object (study, series, SOP class, modality or patient) still
            # pending: refuse it rather than overwrite, or be overwritten by, the one acknowledged first.
            self._throttle.warning(
                "duplicate_sop", "C-STORE refused: another object with the same SOP Instance UID is pending."
            )
            self._refused.labels(status=f"0x{STATUS_DUPLICATE_SOP_INSTANCE:04X}").inc()
            return _status(STATUS_DUPLICATE_SOP_INSTANCE, "SOP Instance UID already pending for another object")
        except SpoolFullError as exc:
            _log.error("Spool full, answering out of resources: %s", exc)
            self._refused.labels(status=f"0x{STATUS_OUT_OF_RESOURCES:04X}").inc()
            return _status(STATUS_OUT_OF_RESOURCES, "Spool full (disk, spool_max_mb or spool_min_free_mb)")
        except SpoolError as exc:
            _log.error("Spool not writable, answering out of resources: %s", exc)
            self._refused.labels(status=f"0x{STATUS_OUT_OF_RESOURCES:04X}").inc()
            return _status(STATUS_OUT_OF_RESOURCES, "Spool not writable")
        self._received.labels(calling_ae=self._calling_label(event.assoc.requestor.ae_title)).inc()
        if self.pipeline is not None:
            self.pipeline.enqueue(WorkItem(path, info, model, source=str(event.assoc.requestor.address)))
        return STATUS_SUCCESS


def start_dicom(config: Any, service: InferenceService, registry: CollectorRegistry, spool_dir: Path | str) -> DicomIngest:
    """Start the DICOM side of the daemon (called by ``medge serve`` when ``[dicom] enabled``).

    Returns the running :class:`DicomIngest`; call ``close()`` to stop it.
    """
    return DicomIngest(config, service, registry, spool_dir).start()
