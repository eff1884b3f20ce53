"""Building a strongly typed TensorRT plan from an ONNX artifact (TensorRT 10.3 .. 10.16 and 11.x).

* **Strongly typed.** ``create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))``
  and no precision flag: every tensor's type comes from the ONNX file, so
  the precision is the artifact's (fp32 ``model.onnx``, fp16
  ``model.fp16.onnx``, int8 ``model.int8-tensorrt.onnx`` with Q/DQ nodes).
  TensorRT 10 offers the flag (``EXPLICIT_BATCH`` is ignored there);
  TensorRT 11 makes every network strongly typed, keeps ``STRONGLY_TYPED``
  as a deprecated, ignored alias and removes ``EXPLICIT_BATCH`` and the
  weak-typing ``BuilderFlag.FP16``/``INT8``/``BF16``/``FP8``/``INT4``/``FP4``
  (deprecated since 10.12): :func:`network_flags`. The parsed network is
  checked against the precision asked for (:func:`check_precision`), so an
  fp32 file is never served under an fp16 or int8 label.
* **Profile.** One optimisation profile on the batch axis, 1..``max_batch``
  with ``opt = max_batch`` (kernels are tuned for a full micro-batch, the
  case under load; see :mod:`edge.inference.backends.tensorrt`).
* **Errors** are one line each: the parser's first :data:`MAX_PARSER_ERRORS`
  errors (node, operator, description; an ONNX model holds no patient
  data), or the reason TensorRT could not start (no GPU: ``Builder()``
  raises ``TypeError`` "factory function returned nullptr").

Importing this module never needs TensorRT.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType
from typing import Any

from edge.errors import BackendUnavailableError, EngineBuildError, ModelError

__all__ = [
    "MAX_ONNX_BYTES",
    "MAX_PARSER_ERRORS",
    "WORKSPACE_BYTES",
    "build_engine",
    "check_precision",
    "import_tensorrt",
    "network_flags",
    "one_line",
    "parser_errors",
    "trt_major",
]

#: Builder workspace (capped by the caller at a quarter of the device's memory).
WORKSPACE_BYTES = 1 << 30
#: Parser errors quoted in an EngineBuildError (one line each).
MAX_PARSER_ERRORS = 5
#: Largest ONNX file read for a build (protobuf's own limit is 2 GiB).
MAX_ONNX_BYTES = 2 << 30
_START_ERRORS = (TypeError, RuntimeError, AttributeError)


def one_line(text: object, limit: int = 300) -> str:
    """``text`` as one line of at most ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def trt_major(version: str) -> int:
    """The major version of a TensorRT version string (0 if unreadable)."""
    head = str(version).split(".")[0]
    return int(head) if head.isdigit() else 0


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, 10.x or later.

    Raises
    ------
    BackendUnavailableError
        Not installed, its libraries cannot load, or older than 10.
    """
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except (ImportError, OSError) as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed or cannot load ({one_line(exc)}); pip install 'medge[tensorrt]' "
            "on a machine with an NVIDIA GPU, or on JetPack use the system TensorRT."
        ) from exc
    if trt_major(getattr(trt, "__version__", "0")) < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old (10.x or 11.x is needed).")
    return trt


def network_flags(trt: ModuleType) -> int:
    """``create_network`` flags for a strongly typed network on this TensorRT.

    Raises
    ------
    BackendUnavailableError
        A TensorRT 10 without ``STRONGLY_TYPED`` (not a release this supports).
    """
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if flag is not None:
        return 1 << int(flag)
    if trt_major(trt.__version__) >= 11:
        return 0  # strongly typed is the only mode
    raise BackendUnavailableError(f"TensorRT {trt.__version__} has no strongly typed networks.")


def parser_errors(parser: Any, limit: int = MAX_PARSER_ERRORS) -> list[str]:
    """The ONNX parser's first ``limit`` errors, one line each (node, operator, description)."""
    total = int(parser.num_errors)
    lines = []
    for i in range(min(total, limit)):
        err = parser.get_error(i)
        node = err.node_name() or f"#{err.node()}"
        lines.append(one_line(f"node {node} ({err.node_operator() or '?'}): {err.desc()}", 200))
    if total > limit:
        lines.append(f"... and {total - limit} more")
    return lines


def check_precision(trt: ModuleType, network: Any, precision: str, onnx_name: str) -> None:
    """Refuse a parsed network that does not hold what ``precision`` promises.

    int8 needs a Quantize or Dequantize layer, fp16 a tensor of type HALF;
    fp32 is always accepted.

    Raises
    ------
    ModelError
        Naming the file and what it lacks.
    """
    if precision == "fp32":
        return
    q_types = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    for i in range(int(network.num_layers)):
        layer = network.get_layer(i)
        if precision == "int8" and layer.type in q_types:
            return
        if precision == "fp16" and any(
            layer.get_output(j).dtype == trt.DataType.HALF for j in range(int(layer.num_outputs))
        ):
            return
    what = "Q/DQ (QuantizeLinear/DequantizeLinear) layers" if precision == "int8" else "fp16 tensors"
    raise ModelError(f"{onnx_name} holds no {what}, so a strongly typed {precision} engine cannot be built from it.")


def _read_onnx(onnx_path: Path, onnx_sha256: str | None) -> bytes:
    """The file's bytes, size-bounded, and (given its sha256) the very bytes that were verified."""
    size = onnx_path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise ModelError(f"{onnx_path.name} is {size} bytes, over the {MAX_ONNX_BYTES} byte limit.")
    data = onnx_path.read_bytes()
    if onnx_sha256 is not None and hashlib.sha256(data).hexdigest() != onnx_sha256.strip().lower():
        raise ModelError(f"{onnx_path.name} changed since its sha256 was checked; refusing to build it.")
    return data


def _parse(trt: ModuleType, data: bytes, onnx_name: str) -> tuple[Any, Any]:
    """A strongly typed network parsed from ``data``, and its builder."""
    try:
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        parsed = parser.parse(data)
    except _START_ERRORS as exc:  # e.g. Builder(): "factory function returned nullptr" without a GPU
        raise BackendUnavailableError(f"TensorRT cannot start a build here: {one_line(exc)}") from exc
    if not parsed:
        raise EngineBuildError(f"TensorRT cannot parse {onnx_name}: {'; '.join(parser_errors(parser))}")
    return builder, network


def build_engine(
    onnx_path: Path | str,
    *,
    precision: str,
    input_name: str,
    input_chw: tuple[int, int, int],
    max_batch: int,
    compute_capability: tuple[int, int] = (7, 5),
    workspace_bytes: int = WORKSPACE_BYTES,
    onnx_sha256: str | None = None,
) -> bytes:
    """Build a serialized, strongly typed TensorRT plan from an ONNX file.

    Parameters
    ----------
    onnx_path : path-like
        The artifact for ``precision``.
    precision : str
        ``fp32``, ``fp16`` or ``int8``: what the artifact holds (checked).
    input_name, input_chw, max_batch
        The input tensor, its ``(C, H, W)`` and the profile's largest batch.
    compute_capability : tuple of int
        The GPU's; fp16 needs 5.3+, int8 6.1+.
    workspace_bytes : int
        Builder workspace limit.
    onnx_sha256 : str, optional
        When given, the bytes read must have it.

    Raises
    ------
    EngineBuildError
        The ONNX file does not parse, or TensorRT cannot build it.
    ModelError
        The file does not hold ``precision``, is too large, or changed.
    BackendUnavailableError
        This GPU has no fast ``precision``, or TensorRT cannot start here.
    """
    trt = import_tensorrt()
    onnx_path = Path(onnx_path)
    if precision == "fp16" and tuple(compute_capability) < (5, 3):
        raise BackendUnavailableError("This GPU has no fast FP16; choose precision = 'fp32'.")
    if precision == "int8" and tuple(compute_capability) < (6, 1):
        raise BackendUnavailableError("This GPU has no fast INT8; choose precision = 'fp16' or 'fp32'.")
    builder, network = _parse(trt, _read_onnx(onnx_path, onnx_sha256), onnx_path.name)
    check_precision(trt, network, precision, onnx_path.name)
    try:
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        profile = builder.create_optimization_profile()
        c, h, w = (int(v) for v in input_chw)
        batch = int(max_batch)
        profile.set_shape(input_name, (1, c, h, w), (batch, c, h, w), (batch, c, h, w))
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError(f"TensorRT refused the batch profile 1..{batch} for input {input_name!r} of "
                                   f"{onnx_path.name} (is that the model's input name?).")
        plan = builder.build_serialized_network(network, config)
    except (*_START_ERRORS, ValueError) as exc:
        raise EngineBuildError(f"TensorRT failed to build {onnx_path.name} ({precision}): {one_line(exc)}") from exc
    if plan is None:
        raise EngineBuildError(
            f"TensorRT failed to build an engine from {onnx_path.name} ({precision}); its log above says why."
        )
    return bytes(plan)
