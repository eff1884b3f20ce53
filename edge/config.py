"""Daemon configuration: one frozen, typed object, read once at start-up.

Sources, later ones winning:

1. the defaults written in the dataclasses below (the contract's defaults);
2. a TOML file (``medge serve --config FILE``; ``/etc/medge/medge.toml``
   under systemd);
3. ``MEDGE_*`` environment variables: ``MEDGE_<SECTION>__<KEY>`` for a key
   in a section (``MEDGE_ZMQ__INGEST=tcp://0.0.0.0:5555``,
   ``MEDGE_METRICS__PORT=9200``, ``MEDGE_DICOM__TLS__CERT=/etc/medge/tls.pem``)
   and ``MEDGE_<KEY>`` for a top-level key (``MEDGE_SPOOL_DIR``,
   ``MEDGE_ENGINES_DIR``). For ``spool_dir`` only, when neither the file
   nor ``MEDGE_SPOOL_DIR`` sets it, systemd's ``$STATE_DIRECTORY`` is used
   (before the ``.medge`` default), and where the spool came from is logged. Values are parsed as TOML values when they parse
   (``9200``, ``true``, ``["A", "B"]``) and taken as strings otherwise;
   lists may also be written comma-separated (``MEDGE_DICOM__ALLOWED_CALLING_AES=A,B``).
   Arrays of tables (``[[models]]``, ``[[dicom.routes]]``,
   ``[[dicom.destinations]]``, ``[[capture]]``) are file-only.

Validation happens once, in :func:`load_config`: an unknown key, a value of
the wrong type or out of range raises :class:`~edge.errors.ConfigError`
whose message names the key (``zmq.ingest``, ``models[1].precision``,
``MEDGE_METRICS__PORT``) and the problem. Nothing is silently replaced by a
default.

Relative paths written in the file (``engines_dir``, ``spool_dir``,
``[[models]] path``, TLS and key files) are relative to the file's folder,
not the working directory (:func:`_resolve_file_paths`); paths from
``MEDGE_*`` variables are relative to the working directory.

With no file and no environment, the daemon serves every model found in
the engines folder (the bundled ``engines/``) on the contract's defaults.

Examples
--------
>>> cfg = load_config(None, env={}, check_models=False)
>>> cfg.zmq.ingest, cfg.metrics.port, str(cfg.spool_dir)
('tcp://127.0.0.1:5555', 9108, '.medge')
>>> cfg = load_config(None, env={"MEDGE_METRICS__PORT": "9200"}, check_models=False)
>>> cfg.metrics.port
9200
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from edge.errors import ConfigError
from edge.types import valid_stream

__all__ = [
    "PRECISION_CHOICES",
    "BACKEND_CHOICES",
    "PROVIDER_CHOICES",
    "ZmqConfig",
    "MetricsConfig",
    "SchedulerConfig",
    "ModelConfig",
    "DicomTlsConfig",
    "DicomRoute",
    "DicomDestination",
    "DicomConfig",
    "OutboxConfig",
    "CaptureConfig",
    "CAPTURE_COLORS",
    "CAPTURE_MAX_FPS",
    "CAPTURE_MIN_FPS",
    "valid_capture_fps",
    "SPOOL_SOURCES",
    "load_config_and_spool_source",
    "MedgeConfig",
    "load_config",
    "default_config",
    "ENV_PREFIX",
]

_log = logging.getLogger(__name__)

ENV_PREFIX = "MEDGE_"
PRECISION_CHOICES = ("fp32", "int8", "fp16", "auto")
BACKEND_CHOICES = ("onnxruntime", "tensorrt", "auto")
PROVIDER_CHOICES = ("cpu", "cuda", "tensorrt")
_UNROUTED = ("accept", "reject")
_ZMQ_SCHEMES = ("tcp://", "ipc://", "inproc://")


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class ZmqConfig:
    """``[zmq]``: the ZeroMQ ingest (ROUTER) and results (PUB) sockets.

    ``default_model`` answers requests whose header has no ``model`` (empty:
    the first served model). ``max_frame_bytes`` bounds one pixels frame:
    it is the ROUTER's ``ZMQ_MAXMSGSIZE`` (at least 64 KiB, the header
    bound), so a larger frame never reaches memory (ZeroMQ disconnects the
    peer). ``max_pixels`` bounds ``H*W`` of a declared shape (larger is
    ``bad_shape``). ``hwm`` is the ROUTER's high-water mark, in messages.
    ``reply_buffer_mib`` bounds the bytes of large replies (1 MiB of maps
    or more) the daemon holds for one client that has not taken them yet:
    a reply that would exceed it is lost (``reason="hwm"``), unless nothing
    is held for that client (one always goes).
    ``publish_hwm`` is the PUB socket's high-water mark per subscriber, in
    messages: a subscriber that stops reading makes the daemon hold at most
    this many of its messages (about ``publish_hwm`` x one reply with its
    mask, plus the kernel's socket buffer); newer ones are dropped for it.
    ``publish_topic``: ``"exact"`` (the PUB topic frame is the stream name
    and a NUL byte, so a subscription can match one stream exactly) or
    ``"bare"`` (the name alone, as before; for subscribers that compare the
    topic frame to the name). ``curve_server_key``: a ZeroMQ certificate file holding the
    server's CURVE key pair (``medge keys``); when set, both sockets require
    CURVE and only the client public keys in the certificate files of
    ``curve_client_keys_dir`` may connect (ZAP).
    """

    enabled: bool = True
    ingest: str = "tcp://127.0.0.1:5555"
    publish: str = "tcp://127.0.0.1:5556"
    default_model: str = ""
    default_stream: str = "default"
    max_frame_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    hwm: int = 1000
    reply_buffer_mib: int = 256
    publish_hwm: int = 32
    publish_topic: str = "exact"
    curve_server_key: str = ""
    curve_client_keys_dir: str = ""

    @property
    def curve_enabled(self) -> bool:
        """Whether CURVE authentication and encryption are configured."""
        return bool(self.curve_server_key)


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``.

    In the style of the Prometheus exporters' web configuration: HTTPS when
    ``tls_cert`` and ``tls_key`` are set (``tls_client_ca``: also require a
    client certificate signed by it), and HTTP basic auth when
    ``basic_auth_file`` names an htpasswd file of bcrypt hashes
    (``htpasswd -nbB user password``). ``idle_timeout_s``: a request (TLS
    handshake, request line and headers) must arrive complete within this
    many seconds of the connection or of the previous response, else the
    connection is closed (a slow drip does not extend it).
    ``max_connections`` bounds the connections served at once; when all are
    taken, the one that has waited longest for its request is closed to let
    the newcomer in. ``stall_s``: a serving loop that has work and makes no
    progress for this long counts as wedged (``/readyz`` 503, no systemd
    watchdog ping); raise it for a model whose one batch takes longer.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9108
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    basic_auth_file: str = ""
    idle_timeout_s: float = 10.0
    max_connections: int = 32
    stall_s: float = 60.0


@dataclass(frozen=True)
class SchedulerConfig:
    """``[scheduler]``: queues, micro-batching and the overload policy.

    ``queue_size`` bounds each model's queue (a frame that finds it full is
    answered ``overloaded``). ``max_batch`` caps a micro-batch;
    ``max_delay_us`` is how long a worker waits for more frames once one is
    queued (0: batch only what is already waiting, the lowest latency).
    ``stream_backlog`` bounds the frames of one live stream waiting in a
    queue: when a new frame would exceed it, the stream's oldest waiting
    frame is shed and answered ``dropped``. ``workers`` is the number of
    inference threads per model. ``queue_max_mb`` bounds the pixel bytes
    waiting in each model's queue (0: no byte bound); a frame that would
    exceed it is answered ``overloaded`` (live) or waits (DICOM).
    """

    queue_size: int = 64
    queue_max_mb: int = 256
    max_batch: int = 4
    max_delay_us: int = 0
    stream_backlog: int = 4
    workers: int = 1


@dataclass(frozen=True)
class ModelConfig:
    """``[[models]]``: one served model.

    ``name`` is the manifest's name; ``path`` its folder (default
    ``<engines_dir>/<name>``). ``precision``: ``fp32``, ``int8``, ``fp16`` or
    ``auto`` (int8 where the manifest has it on CPU, fp16 then fp32 on a GPU).
    ``backend``: ``onnxruntime``, ``tensorrt`` or ``auto`` (TensorRT where
    present, else ONNX Runtime; the fallback is logged and shown in
    ``medge_model_info``). ``provider`` is the ONNX Runtime execution
    provider (``cpu``, ``cuda``, ``tensorrt``); a provider that is not
    installed is an error, not a fallback. ``intra_op_threads`` 0 means one
    per core. ``spin_us``: how long ONNX Runtime's intra-op threads keep
    spinning for more work after a parallel section before they sleep (0:
    never spin). A short bounded spin keeps the cores awake through the
    end of a run and the reply, which saves a wake-up per hand-off, and
    costs little CPU: see docs/configuration.md. ``max_batch``, ``max_delay_us`` and ``queue_size`` override
    ``[scheduler]`` for this model when non-zero. ``threshold`` overrides the
    manifest's score/probability threshold when set (>= 0).
    """

    name: str
    path: str = ""
    precision: str = "auto"
    backend: str = "onnxruntime"
    provider: str = "cpu"
    device_id: int = 0
    intra_op_threads: int = 0
    spin_us: int = 1000
    warmup_iterations: int = 3
    max_batch: int = 0
    max_delay_us: int = -1
    queue_size: int = 0
    threshold: float = -1.0


@dataclass(frozen=True)
class DicomTlsConfig:
    """``[dicom.tls]``: optional TLS on the SCP (enabled when cert and key are set)."""

    cert: str = ""
    key: str = ""
    ca: str = ""

    @property
    def enabled(self) -> bool:
        """Whether TLS is configured."""
        return bool(self.cert and self.key)


@dataclass(frozen=True)
class DicomRoute:
    """``[[dicom.routes]]``: instances matching these attributes go to ``model``.

    ``sop_class_uid`` and ``body_part`` (BodyPartExamined) are optional
    filters; empty matches any.
    """

    modality: str
    model: str
    sop_class_uid: str = ""
    body_part: str = ""


@dataclass(frozen=True)
class DicomDestination:
    """``[[dicom.destinations]]``: a C-STORE peer (a PACS) that receives results.

    ``tls``: send over TLS (DICOM TLS, PS3.15 B.1), verifying the peer's
    certificate against ``tls_ca`` (empty: the system's CA store) and its
    name against ``tls_server_name`` (empty: ``host``); ``tls_cert`` and
    ``tls_key`` present a client certificate when the PACS asks for one.
    """

    name: str
    host: str
    port: int
    ae_title: str
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""


@dataclass(frozen=True)
class DicomConfig:
    """``[dicom]``: the DICOM C-STORE SCP, its routing and its results.

    ``allowed_calling_aes`` empty accepts any calling AE title. Timeouts are
    in seconds. ``series_idle_s``: a series is complete after this long with
    no new instance. ``unrouted``: ``accept`` (store and log by SOP class) or
    ``reject``. ``frame_stride``: run every n-th frame of a multi-frame cine.
    ``secondary_capture``: also write an overlay secondary-capture image.
    ``spool_min_free_mb``: a C-STORE is refused (``0xA700``) when it would
    leave less than this many MiB free on the spool's file system (0: no
    reserve). ``spool_max_mb``: a C-STORE is refused when the received but
    not yet processed instances plus the outbox would exceed this many MiB
    (0: no cap). With no ``[[dicom.routes]]`` the defaults route US to
    ``us-lesion-seg`` and CR/DX to ``xray-nodule-det`` (those that are served).

    Input bounds (checked on the encoded data before anything is decoded):
    ``max_inflated_mb`` caps a deflated data set's inflated size (it is
    inflated in a stream and refused past the cap, or past its declared
    image size plus 32 MiB for its other elements, whichever is smaller); ``max_frames`` caps NumberOfFrames and ``max_pixels`` caps
    Rows x Columns of one frame. ``connect_timeout_s`` is how long a new
    connection may take to finish the TLS handshake and send its
    A-ASSOCIATE-RQ; ``max_associations_per_peer`` bounds the connections
    (associated or not) from one IP address; ``max_pending_connections``
    bounds connections that have not associated yet. ``max_attempts``:
    a spooled instance whose processing was started this many times
    without finishing (a crash, an OOM kill) is quarantined.
    ``device_serial_number``: this appliance's serial, written as
    DeviceSerialNumber into every result and used for the SR observer
    device UID (empty: 16 hex digits derived from a hash of the machine id).
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "MEDGE"
    allowed_calling_aes: tuple[str, ...] = ()
    max_associations: int = 4
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0
    tls: DicomTlsConfig = field(default_factory=DicomTlsConfig)
    series_idle_s: float = 10.0
    unrouted: str = "accept"
    frame_stride: int = 1
    secondary_capture: bool = False
    spool_min_free_mb: int = 64
    spool_max_mb: int = 0
    max_inflated_mb: int = 512
    max_frames: int = 1000
    max_pixels: int = 4096 * 4096
    connect_timeout_s: float = 5.0
    max_associations_per_peer: int = 2
    max_pending_connections: int = 16
    max_attempts: int = 3
    device_serial_number: str = ""
    routes: tuple[DicomRoute, ...] = ()
    destinations: tuple[DicomDestination, ...] = ()


@dataclass(frozen=True)
class OutboxConfig:
    """``[outbox]``: durable delivery of results to ``[[dicom.destinations]]``.

    A destination that cannot be reached is retried after
    ``retry_base_s * 2**(n-1)`` seconds, capped at ``retry_max_s``, for as
    long as it takes (nothing is lost). A result the destination refuses
    with a transient status ``max_attempts`` times within
    ``attempt_window_s``, or refuses permanently, moves to the dead-letter
    folder with the reason (see :mod:`edge.egress.dicom.outbox`).
    """

    retry_base_s: float = 1.0
    retry_max_s: float = 300.0
    max_attempts: int = 10
    attempt_window_s: float = 3600.0


# --------------------------------------------------------------------------- capture ([[capture]])
#: ``[[capture]] color``: what a captured frame becomes before it is submitted.
CAPTURE_COLORS = ("gray", "rgb")
#: ``[[capture]] fps``: the slowest positive rate (one frame every 10 s) and the fastest; -1 and 0 mean
#: "the source's own rate" and "as fast as decoded"
CAPTURE_MIN_FPS = 0.1
CAPTURE_MAX_FPS = 1000.0


def valid_capture_fps(fps: float) -> bool:
    """Whether ``fps`` is -1, 0 or a rate from :data:`CAPTURE_MIN_FPS` to :data:`CAPTURE_MAX_FPS` (NaN is not).

    >>> [valid_capture_fps(v) for v in (-1, 0, 0.1, 30, 1000)]
    [True, True, True, True, True]
    >>> [valid_capture_fps(v) for v in (-2, 1e-300, 0.05, 1001, float("nan"), float("inf"))]
    [False, False, False, False, False, False]
    """
    return fps in (-1.0, 0.0) or CAPTURE_MIN_FPS <= fps <= CAPTURE_MAX_FPS


@dataclass(frozen=True)
class CaptureConfig:
    """``[[capture]]``: a video source the daemon reads as a live stream (:mod:`edge.ingest.capture`).

    ``name`` names the source in logs, ``/healthz``, its thread
    (``medge-capture-<name>``) and the ``capture`` label of its metrics.
    ``source``: a V4L2 device (``/dev/video0``), an absolute path of a video
    file, or a stream URL (``rtsp://...``), read through PyAV (the
    ``capture`` extra). ``model``: the served model (empty: the default
    model). ``stream``: the stream name of its results on the PUB socket
    (empty: ``name``). ``crop``: ``[x, y, w, h]`` in source pixels, the image
    area of the scanner's screen (empty: the whole frame). ``color``:
    ``gray`` (uint8 ``[H, W]``) or ``rgb`` (uint8 ``[H, W, 3]``). ``fps``:
    -1 paces a file or stream at its own frame rate (a device delivers at
    its own), 0 reads a file as fast as it decodes, a positive value (0.1
    to 1000) paces a file at that rate and thins a faster device to it. ``loop``: start a
    file again at its end (demos); otherwise the source stops there.
    ``max_pixels``: a frame with more pixels (width x height, before the
    crop) is skipped before it is converted. ``video_size`` and
    ``input_format`` are passed to FFmpeg's V4L2 input for a device
    (``"1920x1080"``, ``"mjpeg"``; empty: the device's current mode).
    """

    name: str
    source: str
    model: str = ""
    stream: str = ""
    crop: tuple[int, ...] = ()
    color: str = "gray"
    fps: float = -1.0
    loop: bool = False
    max_pixels: int = 3840 * 2160
    video_size: str = ""
    input_format: str = ""

    @property
    def stream_name(self) -> str:
        """The stream its frames are submitted and published as."""
        return self.stream or self.name


def _validate_capture_entry(c: CaptureConfig, k: str) -> None:
    """One ``[[capture]]`` table's own keys."""
    _check(
        _DESTINATION_NAME.fullmatch(c.name) is not None,
        f"{k}.name",
        f"{c.name[:80]!r} is not a plain name: letters, digits, '.', '_' and '-', at most 64, starting with a "
        "letter or digit (it names the capture's thread and its metric label).",
    )
    src = c.source
    _check(  # the value is not quoted: a URL may hold credentials, a file name a patient's name
        src.startswith("/") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", src) is not None,
        f"{k}.source",
        "is not a device (/dev/videoN), an absolute file path or a URL (scheme://...).",
    )
    _check(
        not c.stream or valid_stream(c.stream),
        f"{k}.stream",
        "must be a stream name: 1 to 128 characters, no control character or line separator (docs/protocol.md).",
    )
    _check(len(c.crop) in (0, 4), f"{k}.crop", f"must be [x, y, w, h] (4 integers) or empty, got {list(c.crop)}.")
    if c.crop:
        x, y, w, h = c.crop
        _check(x >= 0 and y >= 0, f"{k}.crop", f"x and y must be >= 0, got {list(c.crop)}.")
        _check(w >= 1 and h >= 1, f"{k}.crop", f"w and h must be >= 1, got {list(c.crop)}.")
    _check(c.color in CAPTURE_COLORS, f"{k}.color", f"{c.color!r} is not one of {CAPTURE_COLORS}.")
    _check(
        valid_capture_fps(c.fps),
        f"{k}.fps",
        f"{c.fps} must be -1 (the source's rate), 0 (as fast as decoded) or a rate from {CAPTURE_MIN_FPS:g} "
        f"to {CAPTURE_MAX_FPS:g}.",
    )
    _check(c.max_pixels >= 1, f"{k}.max_pixels", "must be >= 1.")
    if c.crop:
        _check(c.crop[2] * c.crop[3] <= c.max_pixels, f"{k}.crop", "holds more pixels than max_pixels.")
    _check(
        not c.video_size or re.fullmatch(r"[1-9][0-9]{0,4}x[1-9][0-9]{0,4}", c.video_size) is not None,
        f"{k}.video_size",
        f"{c.video_size[:40]!r} is not WIDTHxHEIGHT (e.g. \"1920x1080\").",
    )
    _check(
        re.fullmatch(r"[A-Za-z0-9_]{0,32}", c.input_format) is not None,
        f"{k}.input_format",
        f"{c.input_format[:40]!r} is not a pixel or codec format name (e.g. \"mjpeg\", \"yuyv422\").",
    )


def _validate_captures(
    captures: tuple[CaptureConfig, ...], served: set[str], default_model: str, check_models: bool
) -> tuple[CaptureConfig, ...]:
    """Check every ``[[capture]]``; return them with ``model`` and ``stream`` filled in."""
    out: list[CaptureConfig] = []
    names: set[str] = set()
    for i, c in enumerate(captures):
        k = f"capture[{i}]"
        _validate_capture_entry(c, k)
        _check(c.name not in names, f"{k}.name", f"capture {c.name!r} is listed twice.")
        names.add(c.name)
        model = c.model or default_model
        if check_models:
            _check(model in served, f"{k}.model", f"{model!r} is not a served model ({', '.join(sorted(served))}).")
        out.append(dataclasses.replace(c, model=model, stream=c.stream_name))
    return tuple(out)


@dataclass(frozen=True)
class MedgeConfig:
    """The whole configuration (top-level keys plus one attribute per section).

    ``engines_dir``: where model folders live (default: the bundled
    ``engines/``). ``spool_dir``: received DICOM, outbox, dead letters.
    ``cache_dir``: built TensorRT engines (default ``<spool_dir>/engine-cache``).
    ``models`` empty in the file means every model in ``engines_dir``.
    ``capture``: video sources read as live streams (``[[capture]]``, none by default).
    """

    engines_dir: Path = field(default_factory=lambda: _default_engines_dir())
    spool_dir: Path = Path(".medge")
    cache_dir: Path = Path("")
    shutdown_timeout_s: float = 4.0
    zmq: ZmqConfig = field(default_factory=ZmqConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    models: tuple[ModelConfig, ...] = ()
    dicom: DicomConfig = field(default_factory=DicomConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    capture: tuple[CaptureConfig, ...] = ()

    def model(self, name: str) -> ModelConfig:
        """The served model called ``name``.

        Raises
        ------
        ConfigError
            If no served model has that name.
        """
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"Model {name!r} is not served (served: {', '.join(self.model_names)}).")

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names of the served models, in configuration order."""
        return tuple(m.name for m in self.models)

    def model_dir(self, model: ModelConfig) -> Path:
        """Folder of a served model: its ``path`` or ``<engines_dir>/<name>``."""
        return Path(model.path) if model.path else self.engines_dir / model.name

    @property
    def engine_cache_dir(self) -> Path:
        """Where built TensorRT engines are cached."""
        return self.cache_dir if str(self.cache_dir) not in ("", ".") else self.spool_dir / "engine-cache"

    @property
    def default_model(self) -> str:
        """The model used when a request names none."""
        if self.zmq.default_model:
            return self.zmq.default_model
        return self.models[0].name if self.models else ""


def _default_engines_dir() -> Path:
    # Imported lazily so that this module stays importable on its own.
    from edge.inference.manifest import default_engines_dir

    return default_engines_dir()


# --------------------------------------------------------------------------- typed loading
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a TOML/env value to the annotated type, or raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"Config key {key}: expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"Config key {key}: expected an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"Config key {key}: expected a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"Config key {key}: expected a string, got {value!r}.")
    if tp is Path:
        if isinstance(value, str):
            return Path(value)
        raise ConfigError(f"Config key {key}: expected a path string, got {value!r}.")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"Config key {key}: expected an array, got {value!r}.")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"Config key {key}: expected a table, got {value!r}.")
        return _build(typing.cast(type, tp), value, key)
    raise ConfigError(f"Config key {key}: unsupported type {_type_name(tp)}.")  # pragma: no cover


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a table, rejecting unknown keys."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(
                f"Unknown config key {key} (known keys here: {', '.join(sorted(names))})."
            )
        kwargs[k] = _coerce(v, hints[k], key)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        where = prefix or "the top level"
        raise ConfigError(f"Config table {where} is missing required key(s): {', '.join(missing)}.")
    return cls(**kwargs)


# --------------------------------------------------------------------------- environment
def _parse_env_value(raw: str, tp: Any) -> Any:
    """An environment string as the value TOML would have given."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    if tp in (str, Path):
        return raw
    if origin is tuple:
        stripped = raw.strip()
        if stripped.startswith("["):
            try:
                return tomllib.loads(f"v = {stripped}")["v"]
            except tomllib.TOMLDecodeError:
                return raw
        return [p.strip() for p in stripped.split(",") if p.strip()]
    try:
        return tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """Merge ``MEDGE_*`` overrides into the raw table ``data`` (in place)."""
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        parts = var[len(ENV_PREFIX) :].lower().split("__")
        cls: Any = MedgeConfig
        table = data
        for depth, part in enumerate(parts):
            hints = _hints(cls)
            if part not in hints:
                if len(parts) == 1:
                    # A MEDGE_* variable that is not a top-level key (MEDGE_LOG, ...): not ours.
                    _log.debug("Ignoring environment variable %s: not a config key.", var)
                    break
                raise ConfigError(f"Environment variable {var} names no config key ({part!r} is unknown).")
            tp = hints[part]
            last = depth == len(parts) - 1
            if last:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"Environment variable {var} names a table, not a key.")
                if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                    raise ConfigError(
                        f"Environment variable {var} names an array of tables; set it in the config file."
                    )
                dotted = ".".join(parts)
                value = _parse_env_value(env[var], tp)
                _coerce(value, tp, f"{dotted} (from environment variable {var})")
                table[part] = value
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"Environment variable {var}: {part!r} is a key, not a table.")
                sub = table.setdefault(part, {})
                if not isinstance(sub, dict):
                    raise ConfigError(f"Environment variable {var}: {part!r} is not a table in the file.")
                table, cls = sub, tp


#: Where ``spool_dir`` came from (:func:`load_config_and_spool_source`).
SPOOL_SOURCES = ("env", "file", "state_directory", "default")


def _settle_spool_dir(data: dict[str, Any], file_spool: Any, env: Mapping[str, str], path: Any) -> str:
    """Choose ``spool_dir``, say where it came from (the spool must never move silently), return that source.

    Precedence: ``MEDGE_SPOOL_DIR`` (explicit; already merged by
    :func:`_apply_env`), then ``spool_dir`` in the file, then
    ``$STATE_DIRECTORY`` (set by systemd's ``StateDirectory=``: the unit's own
    ``/var/lib/medge`` or ``/var/lib/medge/<instance>``), then ``.medge``.
    An environment value that overrides a different file value is logged as
    a warning; the source is logged at info level otherwise.
    """
    where = f"the config file {path}" if path is not None else "the config file"
    env_spool = env.get(ENV_PREFIX + "SPOOL_DIR")
    if env_spool is not None:
        if file_spool is not None and str(file_spool) != str(data.get("spool_dir")):
            _log.warning(
                "Spool folder %s from environment variable %sSPOOL_DIR overrides spool_dir = %s in %s.",
                data.get("spool_dir"), ENV_PREFIX, file_spool, where,
            )
        else:
            _log.debug("Spool folder %s (from environment variable %sSPOOL_DIR).", data.get("spool_dir"), ENV_PREFIX)
        return "env"
    if file_spool is not None:
        _log.debug("Spool folder %s (from spool_dir in %s).", file_spool, where)
        return "file"
    if env.get("STATE_DIRECTORY"):
        # systemd sets it (colon-separated when the unit lists several); the first is the spool.
        data["spool_dir"] = env["STATE_DIRECTORY"].split(":")[0]
        _log.debug("Spool folder %s (from $STATE_DIRECTORY, systemd's StateDirectory=).", data["spool_dir"])
        return "state_directory"
    return "default"


# --------------------------------------------------------------------------- file-relative paths
#: Keys that name a file or folder: (table path, key). ``*`` marks an array of tables.
_PATH_KEYS: tuple[tuple[tuple[str, ...], str], ...] = (
    ((), "engines_dir"),
    ((), "spool_dir"),
    ((), "cache_dir"),
    (("zmq",), "curve_server_key"),
    (("zmq",), "curve_client_keys_dir"),
    (("metrics",), "tls_cert"),
    (("metrics",), "tls_key"),
    (("metrics",), "tls_client_ca"),
    (("metrics",), "basic_auth_file"),
    (("models", "*"), "path"),
    (("dicom", "tls"), "cert"),
    (("dicom", "tls"), "key"),
    (("dicom", "tls"), "ca"),
    (("dicom", "destinations", "*"), "tls_ca"),
    (("dicom", "destinations", "*"), "tls_cert"),
    (("dicom", "destinations", "*"), "tls_key"),
)


def _path_slots(data: Mapping[str, Any]) -> list[tuple[dict[str, Any], str, str]]:
    """``(table, key, dotted name)`` for every path-valued key present in the raw file ``data``."""
    out: list[tuple[dict[str, Any], str, str]] = []
    for where, key in _PATH_KEYS:
        tables: list[tuple[Any, str]] = [(data, "")]
        for part in where:
            nxt: list[tuple[Any, str]] = []
            for t, name in tables:
                if part == "*":
                    if isinstance(t, list):
                        nxt.extend((item, f"{name}[{i}]") for i, item in enumerate(t))
                elif isinstance(t, dict) and part in t:
                    nxt.append((t[part], f"{name}.{part}" if name else part))
            tables = nxt
        for t, name in tables:
            if isinstance(t, dict) and key in t:
                out.append((t, key, f"{name}.{key}" if name else key))
    return out


def _resolve_file_paths(data: dict[str, Any], config_file: Path) -> None:
    """Make the relative paths written in ``config_file`` relative to its folder (in place).

    A config file is read by a daemon whose working directory is whatever
    its launcher chose (systemd: ``/``), so a relative path means "next to
    this file". Absolute paths, empty values ("unset") and values of the
    wrong type (reported later by the type check) are left alone, and so
    are paths from ``MEDGE_*`` variables (merged afterwards: they are
    relative to the working directory, like any path given on a command
    line). The folder is the file's as named, symlinks not followed.

    Raises
    ------
    ConfigError
        If a relative path names nothing next to the config file but does
        name something relative to the working directory (the rule before
        paths became file-relative): rather than silently serving other
        models or moving the spool, the operator is told to write it out.
    """
    base = Path(os.path.abspath(config_file)).parent
    try:
        cwd: Path | None = Path.cwd()
    except OSError:  # the working directory was removed: there is no old meaning to compare with
        cwd = None
    for table, key, dotted in _path_slots(data):
        raw = table[key]
        if not isinstance(raw, str) or not raw or Path(raw).is_absolute():
            continue
        resolved = base / raw
        old = cwd / raw if cwd is not None else resolved
        if base != cwd and not resolved.exists() and old.exists():
            raise ConfigError(
                f"Config key {dotted}: the relative path {raw!r} resolves against the config file's "
                f"folder {base}, giving {resolved}, which does not exist; relative to the working "
                f"directory it names {old} (the rule before relative paths followed the config file). "
                "Write the path you mean as an absolute path, or move it next to the config file."
            )
        table[key] = str(resolved)


# --------------------------------------------------------------------------- validation
#: A destination's name: it names folders under the outbox and is a metric label value.
_DESTINATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check(cond: bool, key: str, problem: str) -> None:
    if not cond:
        raise ConfigError(f"Config key {key}: {problem}")


def _check_port(port: int, key: str) -> None:
    _check(0 <= port <= 65535, key, f"port {port} is not in 0..65535.")


def _check_endpoint(ep: str, key: str) -> None:
    _check(ep.startswith(_ZMQ_SCHEMES), key, f"endpoint {ep!r} does not start with one of {_ZMQ_SCHEMES}.")


def _validate_zmq(z: ZmqConfig) -> None:
    _check_endpoint(z.ingest, "zmq.ingest")
    _check_endpoint(z.publish, "zmq.publish")
    _check(z.ingest != z.publish or z.ingest.endswith(":*"), "zmq.publish", "must differ from zmq.ingest.")
    _check(z.max_frame_bytes > 0, "zmq.max_frame_bytes", "must be > 0.")
    _check(z.max_pixels > 0, "zmq.max_pixels", "must be > 0.")
    _check(z.max_frame_bytes <= 2**31 - 1, "zmq.max_frame_bytes", "must be < 2 GiB.")
    _check(z.hwm >= 1, "zmq.hwm", "must be >= 1 (0 would mean no limit).")
    _check(z.publish_hwm >= 1, "zmq.publish_hwm", "must be >= 1 (0 would mean no limit).")
    _check(1 <= z.reply_buffer_mib <= 1 << 20, "zmq.reply_buffer_mib", "must be 1 .. 1048576 (MiB).")
    _check(z.publish_topic in ("exact", "bare"), "zmq.publish_topic", 'must be "exact" or "bare".')
    _check(
        valid_stream(z.default_stream),
        "zmq.default_stream",
        "must be a stream name: 1 to 128 characters, no control character or line separator (docs/protocol.md).",
    )
    _check(not z.curve_client_keys_dir or bool(z.curve_server_key), "zmq.curve_client_keys_dir",
           "is set but zmq.curve_server_key is not (CURVE needs the server's key pair).")
    if z.curve_server_key:
        _check(Path(z.curve_server_key).is_file(), "zmq.curve_server_key", f"file {z.curve_server_key} does not exist.")
        _check(bool(z.curve_client_keys_dir) and Path(z.curve_client_keys_dir).is_dir(), "zmq.curve_client_keys_dir",
               "must name an existing folder of allowed client public keys when zmq.curve_server_key is set.")
    _check(bool(z.default_stream), "zmq.default_stream", "must not be empty.")


def _validate_metrics(mc: MetricsConfig) -> None:
    _check_port(mc.port, "metrics.port")
    if bool(mc.tls_cert) != bool(mc.tls_key):
        raise ConfigError("Config key metrics.tls_cert: tls_cert and tls_key must be set together.")
    _check(not mc.tls_client_ca or bool(mc.tls_cert), "metrics.tls_client_ca", "needs metrics.tls_cert and tls_key.")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "basic_auth_file"):
        p = getattr(mc, name)
        _check(not p or Path(p).is_file(), f"metrics.{name}", f"file {p} does not exist.")
    _check(0 < mc.idle_timeout_s <= 86400, "metrics.idle_timeout_s", "must be > 0 and at most 86400 (a day).")
    _check(mc.max_connections >= 1, "metrics.max_connections", "must be >= 1.")
    _check(mc.stall_s > 0, "metrics.stall_s", "must be > 0 (seconds).")


def _validate_scheduler(s: SchedulerConfig) -> None:
    _check(s.queue_size >= 1, "scheduler.queue_size", f"{s.queue_size} must be >= 1.")
    _check(s.queue_max_mb >= 0, "scheduler.queue_max_mb", f"{s.queue_max_mb} must be >= 0 (0: no byte bound).")
    _check(s.max_batch >= 1, "scheduler.max_batch", f"{s.max_batch} must be >= 1.")
    _check(s.max_delay_us >= 0, "scheduler.max_delay_us", f"{s.max_delay_us} must be >= 0.")
    _check(s.stream_backlog >= 1, "scheduler.stream_backlog", f"{s.stream_backlog} must be >= 1.")
    _check(s.workers >= 1, "scheduler.workers", f"{s.workers} must be >= 1.")


def _discover_models(cfg: MedgeConfig) -> tuple[ModelConfig, ...]:
    """The served models: ``[[models]]``, or every model in ``engines_dir``; each must have a manifest."""
    from edge.errors import ModelError
    from edge.inference.manifest import discover

    models = cfg.models
    if not models:
        try:
            found = discover(cfg.engines_dir)
        except ModelError as exc:
            raise ConfigError(f"Config key engines_dir: {exc}") from exc
        _check(
            bool(found),
            "engines_dir",
            f"{cfg.engines_dir} holds no model (no <name>/manifest.json); "
            "list models under [[models]] or point engines_dir at the engines.",
        )
        models = tuple(ModelConfig(name=n) for n in found)
    for i, m in enumerate(models):
        mdir = Path(m.path) if m.path else cfg.engines_dir / m.name
        _check(
            (mdir / "manifest.json").is_file(),
            f"models[{i}].name" if not m.path else f"models[{i}].path",
            f"no manifest.json for model {m.name!r} in {mdir}.",
        )
    return models


def _validate_models(models: tuple[ModelConfig, ...]) -> set[str]:
    """Check each ``[[models]]`` entry; return the served names."""
    seen: set[str] = set()
    for i, m in enumerate(models):
        k = f"models[{i}]"
        _check(bool(m.name), f"{k}.name", "must not be empty.")
        _check(m.name not in seen, f"{k}.name", f"model {m.name!r} is listed twice.")
        seen.add(m.name)
        _check(m.precision in PRECISION_CHOICES, f"{k}.precision", f"{m.precision!r} is not one of {PRECISION_CHOICES}.")
        _check(m.backend in BACKEND_CHOICES, f"{k}.backend", f"{m.backend!r} is not one of {BACKEND_CHOICES}.")
        _check(m.provider in PROVIDER_CHOICES, f"{k}.provider", f"{m.provider!r} is not one of {PROVIDER_CHOICES}.")
        _check(m.device_id >= 0, f"{k}.device_id", "must be >= 0.")
        _check(m.intra_op_threads >= 0, f"{k}.intra_op_threads", "must be >= 0 (0: one per core).")
        _check(0 <= m.spin_us <= 1_000_000, f"{k}.spin_us", "must be between 0 (no spinning) and 1000000.")
        _check(m.warmup_iterations >= 0, f"{k}.warmup_iterations", "must be >= 0.")
        _check(m.max_batch >= 0, f"{k}.max_batch", "must be >= 0 (0: the [scheduler] value).")
        _check(m.queue_size >= 0, f"{k}.queue_size", "must be >= 0 (0: the [scheduler] value).")
        _check(m.max_delay_us >= -1, f"{k}.max_delay_us", "must be >= 0 (or -1: the [scheduler] value).")
        _check(m.threshold <= 1.0, f"{k}.threshold", f"{m.threshold} is above 1.")
    return seen


def _validate_dicom(d: DicomConfig) -> None:
    """The ``[dicom]`` table's own keys (routes and destinations are checked apart)."""
    _check_port(d.port, "dicom.port")
    _check(1 <= len(d.ae_title) <= 16, "dicom.ae_title", f"{d.ae_title!r} must be 1 to 16 characters.")
    for i, ae in enumerate(d.allowed_calling_aes):
        _check(1 <= len(ae) <= 16, f"dicom.allowed_calling_aes[{i}]", f"{ae!r} must be 1 to 16 characters.")
    _check(d.max_associations >= 1, "dicom.max_associations", "must be >= 1.")
    for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s", "series_idle_s"):
        _check(getattr(d, name) > 0, f"dicom.{name}", "must be > 0.")
    _check(d.unrouted in _UNROUTED, "dicom.unrouted", f"{d.unrouted!r} is not one of {_UNROUTED}.")
    _check(d.frame_stride >= 1, "dicom.frame_stride", "must be >= 1.")
    _check(d.spool_min_free_mb >= 0, "dicom.spool_min_free_mb", f"{d.spool_min_free_mb} must be >= 0 (0: no reserve).")
    _check(d.spool_max_mb >= 0, "dicom.spool_max_mb", f"{d.spool_max_mb} must be >= 0 (0: no cap).")
    _check(d.max_inflated_mb >= 1, "dicom.max_inflated_mb", "must be >= 1.")
    _check(d.max_frames >= 1, "dicom.max_frames", "must be >= 1.")
    _check(d.max_pixels >= 1, "dicom.max_pixels", "must be >= 1.")
    _check(d.connect_timeout_s > 0, "dicom.connect_timeout_s", "must be > 0.")
    _check(d.max_associations_per_peer >= 1, "dicom.max_associations_per_peer", "must be >= 1.")
    _check(d.max_pending_connections >= 1, "dicom.max_pending_connections", "must be >= 1.")
    _check(d.max_attempts >= 1, "dicom.max_attempts", "must be >= 1.")
    _check(
        len(d.device_serial_number) <= 64
        and not any(c == "\\" or ord(c) < 32 or ord(c) == 127 for c in d.device_serial_number),
        "dicom.device_serial_number",
        "must be at most 64 characters, without backslashes or control characters.",
    )
    if bool(d.tls.cert) != bool(d.tls.key):
        raise ConfigError("Config key dicom.tls: cert and key must be set together.")
    for name in ("cert", "key", "ca"):
        p = getattr(d.tls, name)
        _check(not p or Path(p).is_file(), f"dicom.tls.{name}", f"file {p} does not exist.")


def _dicom_routes(d: DicomConfig, seen: set[str], check_models: bool) -> tuple[DicomRoute, ...]:
    """The routes: ``[[dicom.routes]]``, or the default ones for the served bundled models."""
    routes = d.routes
    if not routes:
        defaults = (("US", "us-lesion-seg"), ("CR", "xray-nodule-det"), ("DX", "xray-nodule-det"))
        routes = tuple(DicomRoute(modality=mod, model=mdl) for mod, mdl in defaults if mdl in seen)
    for i, r in enumerate(routes):
        _check(bool(r.modality), f"dicom.routes[{i}].modality", "must not be empty.")
        if check_models:
            _check(r.model in seen, f"dicom.routes[{i}].model", f"{r.model!r} is not a served model.")
    return routes


def _validate_destinations(destinations: tuple[DicomDestination, ...]) -> None:
    names: set[str] = set()
    for i, dest in enumerate(destinations):
        k = f"dicom.destinations[{i}]"
        _check(bool(dest.name) and dest.name not in names, f"{k}.name", f"{dest.name!r} is empty or repeated.")
        _check(
            _DESTINATION_NAME.fullmatch(dest.name) is not None,
            f"{k}.name",
            f"{dest.name[:80]!r} is not a plain name: letters, digits, '.', '_' and '-', at most 64, starting with a "
            "letter or digit (it names the destination's outbox folders and its metric label).",
        )
        names.add(dest.name)
        _check(bool(dest.host), f"{k}.host", "must not be empty.")
        _check(1 <= dest.port <= 65535, f"{k}.port", f"port {dest.port} is not in 1..65535.")
        _check(1 <= len(dest.ae_title) <= 16, f"{k}.ae_title", f"{dest.ae_title!r} must be 1 to 16 characters.")
        if bool(dest.tls_cert) != bool(dest.tls_key):
            raise ConfigError(f"Config key {k}.tls_cert: tls_cert and tls_key must be set together.")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            p = getattr(dest, name)
            _check(not p or Path(p).is_file(), f"{k}.{name}", f"file {p} does not exist.")
            _check(not p or dest.tls, f"{k}.{name}", f"is set but {k}.tls is false.")


def _validate_outbox(o: OutboxConfig) -> None:
    _check(o.retry_base_s > 0, "outbox.retry_base_s", "must be > 0.")
    _check(o.retry_max_s >= o.retry_base_s, "outbox.retry_max_s", "must be >= outbox.retry_base_s.")
    _check(o.max_attempts >= 1, "outbox.max_attempts", "must be >= 1.")
    _check(o.attempt_window_s > 0, "outbox.attempt_window_s", "must be > 0.")


def _validate(cfg: MedgeConfig, check_models: bool) -> MedgeConfig:
    """Check every key (in file order, so the first problem reported is the first in the file's tables)."""
    z = cfg.zmq
    _validate_zmq(z)
    _validate_metrics(cfg.metrics)
    _validate_scheduler(cfg.scheduler)
    _check(cfg.shutdown_timeout_s > 0, "shutdown_timeout_s", "must be > 0.")
    models = _discover_models(cfg) if check_models else cfg.models
    seen = _validate_models(models)
    if check_models and models:
        _check(
            not z.default_model or z.default_model in seen,
            "zmq.default_model",
            f"{z.default_model!r} is not a served model ({', '.join(sorted(seen))}).",
        )
    d = cfg.dicom
    _validate_dicom(d)
    routes = _dicom_routes(d, seen, check_models)
    _validate_destinations(d.destinations)
    _validate_outbox(cfg.outbox)
    default_model = z.default_model or (models[0].name if models else "")
    captures = _validate_captures(cfg.capture, seen, default_model, check_models)
    return dataclasses.replace(cfg, models=models, dicom=dataclasses.replace(d, routes=routes), capture=captures)
# --------------------------------------------------------------------------- public API
def load_config(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    check_models: bool = True,
) -> MedgeConfig:
    """Read, override and validate the configuration (see :func:`load_config_and_spool_source`)."""
    return load_config_and_spool_source(path, env, check_models)[0]


def load_config_and_spool_source(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    check_models: bool = True,
) -> tuple[MedgeConfig, str]:
    """Read, override and validate the configuration; also say where ``spool_dir`` came from.

    The source is one of :data:`SPOOL_SOURCES` (``MEDGE_SPOOL_DIR``, the
    file, systemd's ``$STATE_DIRECTORY``, or the ``.medge`` default): a tool
    that works on the daemon's spool from an operator's shell needs to know
    whether the configuration named it at all.

    Parameters
    ----------
    path : path-like, optional
        A TOML file. ``None``: defaults only.
    env : mapping, optional
        Environment to take ``MEDGE_*`` overrides from (default ``os.environ``).
    check_models : bool
        Resolve ``models`` against the engines folder (an empty list becomes
        every model found there) and check that each has a manifest. Off for
        tools that must work without engines (``medge doctor``).

    Returns
    -------
    (MedgeConfig, str)
        Frozen; ``models`` and ``dicom.routes`` filled in. And the spool's source.

    Raises
    ------
    ConfigError
        Naming the key and the problem.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            with open(p, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"Config file {p} does not exist.") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {p} is not valid TOML: {exc}.") from exc
        _resolve_file_paths(data, p)
    environ = os.environ if env is None else env
    file_spool = data.get("spool_dir")
    _apply_env(data, environ)
    source = _settle_spool_dir(data, file_spool, environ, path)
    cfg = _build(MedgeConfig, data, "")
    return _validate(cfg, check_models), source


def default_config(check_models: bool = True) -> MedgeConfig:
    """The configuration with no file and no environment overrides."""
    return load_config(None, env={}, check_models=check_models)
