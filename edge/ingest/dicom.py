"""The DICOM C-STORE SCP (pynetdicom): durable receive, then hand-off.

What happens on the network (association) thread, and nothing more:

1. :func:`edge.routing.scan_encoded` walks the encoded data set as received
   (tag and length only; no pydicom decode) to check it is structurally
   whole and to read Modality, SOP class, BodyPartExamined and the UIDs.
   A truncated or corrupt data set is answered ``0xC210`` (cannot
   understand).
2. Routing: an instance no rule routes to a served model is accepted and
   logged by SOP class (``unrouted = "accept"``, not stored) or refused with
   ``0x0122`` (``unrouted = "reject"``).
3. The encoded bytes (file meta + data set, exactly as received) are written
   to the spool: temp file, fsync, rename, fsync of the folder. Only then is
   success (``0x0000``) returned. A full spool (``[dicom] spool_max_mb``
   over the received instances plus the outbox, or less free disk than
   ``spool_min_free_mb`` after the write) or an unwritable one answers
   ``0xA700`` (out of resources), never success; nothing is left behind.
4. The spooled instance is queued for :class:`~edge.ingest.dicom_pipeline.DicomPipeline`,
   whose worker threads decode and call the inference service.

Associations: calling-AE allow-list (others are rejected at A-ASSOCIATE),
``max_associations``, ACSE/DIMSE/network timeouts, and optional TLS. On a
network timeout the SCP releases the association rather than aborting it
(some PACS treat a release as "study sent").

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
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from pydicom.filewriter import write_file_meta_info
from pydicom.filebase import DicomBytesIO
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

from edge.egress.dicom_results import ModelInfo
from edge.egress.outbox import Outbox, get_or_create_metric
from edge.errors import DataError, MedgeError
from edge.ingest.dicom_pipeline import DicomPipeline, WorkItem
from edge.routing import Router, scan_encoded
from edge.spool import Spool, SpoolError, SpoolFullError
from edge.types import InferenceService

__all__ = [
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
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

_PREAMBLE = b"\x00" * 128 + b"DICM"


def _encode_meta(file_meta: Any) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    write_file_meta_info(buf, file_meta, enforce_standard=True)
    return buf.getvalue()


def _ssl_context(tls: Any) -> ssl.SSLContext | None:
    if not getattr(tls, "cert", "") or not getattr(tls, "key", ""):
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    if getattr(tls, "ca", ""):
        ctx.load_verify_locations(cafile=tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the modality must present a certificate
    return ctx


def _model_info_from_config(config: Any) -> Any:
    """``model_info(name) -> ModelInfo`` backed by the served models' manifests."""
    from edge.errors import ConfigError, ModelError
    from edge.manifest import Manifest

    cache: dict[str, ModelInfo] = {}
    lock = threading.Lock()

    def model_info(name: str) -> ModelInfo:
        with lock:
            if name not in cache:
                try:
                    m = Manifest.load(config.model_dir(config.model(name)))
                    cache[name] = ModelInfo(m.name, m.version, m.task, tuple(m.labels), bool(m.research_only))
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
        self._received = get_or_create_metric(
            registry,
            Counter,
            "medge_dicom_instances_received_total",
            "DICOM instances stored durably and answered success, by calling AE title (allow-listed names, else other).",
            ["calling_ae"],
        )
        self._refused = get_or_create_metric(
            registry,
            Counter,
            "medge_dicom_store_failures_total",
            "C-STORE requests answered with a failure status, by status.",
            ["status"],
        )
        self._unrouted = get_or_create_metric(
            registry,
            Counter,
            "medge_dicom_unrouted_total",
            "Instances no routing rule matched, by SOP class UID and action.",
            ["sop_class_uid", "action"],
        )
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
            )
        self.ae = self._make_ae()
        self._server: Any = None

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
        ae.maximum_pdu_size = 0  # unlimited: fewer, larger P-DATA PDUs from the sender
        ae.require_called_aet = True  # a peer calling another AE title is misconfigured: reject, don't guess
        if self.allowed:
            ae.require_calling_aet = list(self.allowed)
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for uid in STORAGE_SOP_CLASSES.values():
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
        try:
            self._server = self.ae.start_server(
                (self.settings.host, self.settings.port),
                block=False,
                evt_handlers=handlers,
                ssl_context=_ssl_context(self.settings.tls),
            )
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise MedgeError(
                f"DICOM SCP cannot listen on {self.settings.host}:{self.settings.port}: {exc}."
            ) from exc
        _log.info(
            "DICOM SCP %s listening on %s:%d (%s).",
            self.settings.ae_title, self.settings.host, self.port,
            "TLS" if self.settings.tls.enabled else "no TLS",
        )
        return self

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

    def _on_rejected(self, event: Any) -> None:
        _log.warning(
            "Association from %s rejected (calling AE not allowed or too many associations).",
            event.assoc.requestor.address,
        )

    def _calling_label(self, calling: str) -> str:
        calling = calling.strip()
        return calling if calling in self.allowed else "other"

    def _on_store(self, event: Any) -> int:
        try:
            return self._store(event)
        except Exception:  # noqa: BLE001 - the SCP's one error boundary: log, count, answer failure, keep serving
            _log.exception("Unexpected error while storing a C-STORE request.")
            self._refused.labels(status=f"0x{STATUS_INTERNAL:04X}").inc()
            return STATUS_INTERNAL

    def _store(self, event: Any) -> int:
        ts = str(event.context.transfer_syntax)
        data = event.encoded_dataset(include_meta=False)
        try:
            info = scan_encoded(data, ts)
        except DataError as exc:
            _log.warning("C-STORE data set refused: %s", exc)
            self._refused.labels(status=f"0x{STATUS_CANNOT_UNDERSTAND:04X}").inc()
            return STATUS_CANNOT_UNDERSTAND
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
            path = self.spool.store_instance(info.sop_instance_uid, [_PREAMBLE, _encode_meta(event.file_meta), data])
        except SpoolFullError as exc:
            _log.error(
                "Spool full ([dicom] spool_max_mb / spool_min_free_mb), answering out of resources: %s", exc
            )
            self._refused.labels(status=f"0x{STATUS_OUT_OF_RESOURCES:04X}").inc()
            return STATUS_OUT_OF_RESOURCES
        except SpoolError as exc:
            _log.error("Spool not writable, answering out of resources: %s", exc)
            self._refused.labels(status=f"0x{STATUS_OUT_OF_RESOURCES:04X}").inc()
            return STATUS_OUT_OF_RESOURCES
        self._received.labels(calling_ae=self._calling_label(event.assoc.requestor.ae_title)).inc()
        if self.pipeline is not None:
            self.pipeline.enqueue(WorkItem(path, info, model))
        return STATUS_SUCCESS


def start_dicom(config: Any, service: InferenceService, registry: CollectorRegistry, spool_dir: Path | str) -> DicomIngest:
    """Start the DICOM side of the daemon (called by ``medge serve`` when ``[dicom] enabled``).

    Returns the running :class:`DicomIngest`; call ``close()`` to stop it.
    """
    return DicomIngest(config, service, registry, spool_dir).start()
