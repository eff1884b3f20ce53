"""INT8 quantization with explicit Q/DQ nodes, behind an accuracy gate.

The INT8 artifact is a QDQ ONNX model (``QuantizeLinear`` /
``DequantizeLinear`` pairs around every Conv): the one format that both
ONNX Runtime and TensorRT (10.1+ deprecated, 11 removed the implicit INT8
calibrator) build from.

- weights: symmetric int8, per output channel; for the CPU artifact (uint8
  activations) in a 7-bit range by default (``reduce_range``): ONNX
  Runtime's u8s8 kernels on x86 CPUs without VNNI add pairs of u8 x s8
  products in signed 16 bits (``VPMADDUBSW``), which saturate with full
  8-bit weights; with 7-bit weights every pair fits;
- activations: symmetric int8 (zero point 0), the form TensorRT requires;
  ``activation_type="uint8"`` is available for CPU-only deployments;
- biases: left in float for TensorRT (its DequantizeLinear takes only INT8
  inputs, so an INT32 bias behind a DequantizeLinear cannot be built; the
  graph is checked with :func:`trainer.qdq_graph.tensorrt_qdq_problems`),
  INT32 behind a DequantizeLinear for ONNX Runtime's CPU kernels (uint8,
  where ``DQ -> Conv -> Q`` becomes one ``QLinearConv``);
- placement for TensorRT: Q/DQ on the inputs of Conv (and Gemm, MatMul,
  ConvTranspose), MaxPool, Concat and Resize; Conv outputs stay in float
  (TensorRT fuses bias and ReLU and quantizes at the next op's input), and
  so do the model's outputs;
- a classifier's class activation map (output ``cam``) is computed in float
  in both artifacts: the nodes between the last Conv and the ``cam`` output
  are excluded from quantization (:func:`float_output_nodes`), so the map
  keeps its FP32 resolution and only the features feeding it are quantized;
- calibration: min-max (or percentile) over a calibration set drawn from
  **training** data only; a set of size zero is a :class:`DataError`;
- gate: the INT8 model is evaluated on the held-out set beside FP32; when
  Dice (segmentation), mAP@0.5 (detection), or a classifier's ROC AUC or
  sensitivity at its manifest threshold (:data:`trainer.int8_gate.GATED_METRICS`)
  drops by more than its threshold, :class:`GateRefused` is raised and
  nothing is written. The CPU
  artifact is scored twice: on the daemon's own session (fused integer
  kernels of the CPU the gate runs on) and on the graph's Q/DQ reference
  arithmetic (what any other CPU computes, within rounding); both must pass,
  and they must agree within the threshold, or the gate refuses (a fused
  score far from the reference is the symptom of saturating kernels).

Examples
--------
>>> from trainer.quantize import quantize_int8  # doctest: +SKIP
>>> quantize_int8("model.onnx", "model.int8.onnx", calibration_inputs)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import numpy as np

from edge.errors import DataError, EngineBuildError
from edge.fileio import atomic_file
from trainer.calibration import calibration_inputs, calibration_source
from trainer.int8_gate import (
    DEFAULT_MAX_DICE_DROP,
    DEFAULT_MAX_MAP_DROP,
    REFERENCE_RUN,
    GateRefused,
    GateResult,
    gate_result,
    gate_scorers,
    gate_summary,
    gated_metrics,
    refusal_message,
)

if TYPE_CHECKING:
    import onnx

    from edge.inference.manifest import Manifest
    from trainer.classification_data import ClassificationSet
    from trainer.data import DetectionSet, SegmentationSet

__all__ = [
    "DEFAULT_MAX_DICE_DROP",
    "DEFAULT_MAX_MAP_DROP",
    "GateRefused",
    "GateResult",
    "quantize_int8",
    "quantize_with_gate",
    "gate_summary",
    "calibration_inputs",
    "float_output_nodes",
    "quantize_engine",
]

_log = logging.getLogger(__name__)

class _Reader:
    """ORT ``CalibrationDataReader`` over an ``[N, C, H, W]`` array in small batches."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch: int = 8) -> None:
        self._name = input_name
        self._inputs = inputs
        self._batch = batch
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _gen(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, self._inputs.shape[0], self._batch):
            yield {self._name: np.ascontiguousarray(self._inputs[i : i + self._batch], dtype=np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._gen()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def _pre_process(fp32_path: Path | str, pre: Path) -> None:
    """ONNX Runtime's optional quantization pre-processing into ``pre`` (a plain copy when it fails)."""
    import onnx
    import onnx.shape_inference
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    except (RuntimeError, ValueError, KeyError, onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        # Optional step (shape inference + graph clean-up); quantization works without it.
        _log.warning("ONNX Runtime quantization pre-processing skipped: %s", exc)
        shutil.copyfile(fp32_path, pre)


_GATE_RUNTIME = {
    "int8": "onnxruntime CPU, the daemon's session (ORT_ENABLE_ALL: fused integer kernels)",
    "int8-tensorrt": "onnxruntime CPU, graph optimizations off (Q/DQ reference arithmetic)",
}


def _ort_version() -> str:
    """The installed ONNX Runtime's version (the quantizer that wrote an artifact)."""
    import onnxruntime

    return str(onnxruntime.__version__)


_METHODS = ("minmax", "percentile")
#: Ops whose inputs TensorRT wants quantized and whose outputs it leaves in float, fusing bias and ReLU.
_TENSORRT_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: What the TensorRT artifact quantizes: the weighted ops' inputs, and int8 data movement between them.
_TENSORRT_OP_TYPES = _TENSORRT_WEIGHTED_OPS + ("MaxPool", "Concat", "Resize")


#: Model outputs computed in float in every INT8 artifact: a classifier's class activation map.
FLOAT_OUTPUTS = ("cam",)


def float_output_nodes(model: "onnx.ModelProto", outputs: Sequence[str] = FLOAT_OUTPUTS) -> list[str]:
    """Names of the nodes that compute ``outputs`` from the last weighted op, that op included.

    From each named graph output present in ``model`` the producers are
    followed back, one input at a time, through data-movement and
    element-wise nodes, to the first Conv / Gemm / MatMul / ConvTranspose
    (the map's own 1 x 1 convolution for a CAM). Excluding these from
    quantization leaves the output in float. Outputs the graph lacks are
    ignored (segmentation and detection models have none of them).
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    names: list[str] = []
    for out in outputs:
        node = producer.get(out)
        for _ in range(len(model.graph.node)):  # bounded walk back to the weighted op
            if node is None:
                break
            if node.name:
                names.append(node.name)
            if node.op_type in _TENSORRT_WEIGHTED_OPS or not node.input:
                break
            node = producer.get(node.input[0])
    return names


def _check_quantize_args(calib: np.ndarray, activation_type: str, method: str, quantize_bias: bool | None) -> bool:
    """Validate :func:`quantize_int8`'s arguments; returns whether to quantize biases."""
    if calib.ndim != 4 or calib.shape[0] == 0:
        raise DataError(
            f"The calibration set has shape {list(calib.shape)}; it needs at least one [C, H, W] "
            "input drawn from the training data (a calibration set of size zero cannot set INT8 ranges)."
        )
    if activation_type not in ("int8", "uint8"):
        raise EngineBuildError(f"activation_type {activation_type!r} is not 'int8' or 'uint8'.")
    if method not in _METHODS:
        raise EngineBuildError(f"Calibration method {method!r} is not one of {sorted(_METHODS)}.")
    for_tensorrt = activation_type == "int8"
    if quantize_bias is None:
        return not for_tensorrt
    if for_tensorrt and quantize_bias:
        raise EngineBuildError(
            "quantize_bias=True with int8 activations gives INT32 DequantizeLinear inputs, which TensorRT "
            "cannot build; leave biases in float for the TensorRT artifact."
        )
    return quantize_bias


def _quantize_static(
    pre: Path, out: Path, reader: _Reader, activation_type: str, method: str, exclude: list[str], quantize_bias: bool,
    reduce_range: bool,
) -> None:
    """ONNX Runtime's ``quantize_static``, QDQ format: symmetric per-channel int8 weights (7-bit: ``reduce_range``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    symmetric = activation_type == "int8"
    extra: dict[str, object] = {
        "ActivationSymmetric": symmetric,
        "WeightSymmetric": True,
        "CalibMovingAverage": False,
        "QuantizeBias": quantize_bias,  # False: no INT32 bias behind a DequantizeLinear (TensorRT)
    }
    if symmetric:  # TensorRT's placement: Q/DQ on the inputs of weighted ops, their outputs left in float
        extra["OpTypesToExcludeOutputQuantization"] = list(_TENSORRT_WEIGHTED_OPS)
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    quantize_static(
        str(pre),
        str(out),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(_TENSORRT_OP_TYPES) if symmetric else None,
        per_channel=True,
        reduce_range=reduce_range,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        calibrate_method=CalibrationMethod.MinMax if method == "minmax" else CalibrationMethod.Percentile,
        nodes_to_exclude=exclude,
        extra_options=extra,
    )


def quantize_int8(
    fp32_path: Path | str,
    out_path: Path | str,
    calibration_inputs: np.ndarray,
    activation_type: str = "int8",
    method: str = "minmax",
    exclude_nodes: list[str] | None = None,
    quantize_bias: bool | None = None,
    reduce_range: bool | None = None,
) -> Path:
    """Write an explicit-Q/DQ INT8 copy of ``fp32_path`` calibrated on ``calibration_inputs``.

    Parameters
    ----------
    fp32_path, out_path
        The FP32 ONNX model and where to write the INT8 one.
    calibration_inputs : numpy.ndarray
        ``[N, C, H, W]`` float32 model inputs from training data, ``N >= 1``.
    activation_type : str
        ``int8`` (symmetric, TensorRT-compatible) or ``uint8`` (asymmetric).
    method : str
        ``minmax`` or ``percentile`` (99.999th) calibration.
    exclude_nodes : list of str, optional
        Node names kept in float, beside those that compute a
        :data:`FLOAT_OUTPUTS` output (:func:`float_output_nodes`; the
        classifier's ``cam``), which are always kept in float.
    quantize_bias : bool, optional
        Quantize Conv biases to INT32 behind a DequantizeLinear. Default:
        yes for ``uint8`` (ONNX Runtime CPU), no for ``int8`` (TensorRT, whose
        DequantizeLinear takes only INT8 inputs; ``True`` there is refused).
    reduce_range : bool, optional
        Quantize weights in a 7-bit range (ONNX Runtime's ``reduce_range``),
        so that the u8s8 kernels of x86 CPUs without VNNI cannot saturate
        their 16-bit pair sums. Default: yes for ``uint8`` (the CPU
        artifact), no for ``int8`` (TensorRT accumulates in int32).

    Raises
    ------
    DataError
        If the calibration set is empty or not ``[N, C, H, W]``.
    EngineBuildError
        If ONNX Runtime cannot quantize the model, or an ``int8`` (TensorRT)
        model comes out with a Q/DQ node TensorRT cannot build.
    """
    calib = np.asarray(calibration_inputs)
    quantize_bias = _check_quantize_args(calib, activation_type, method, quantize_bias)
    if reduce_range is None:
        reduce_range = activation_type == "uint8"
    import onnx

    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        _pre_process(fp32_path, pre)
        tmp_out = Path(tmp) / "int8.onnx"
        exclude = list(exclude_nodes or []) + float_output_nodes(onnx.load(str(pre)))  # names after pre-processing
        try:
            _quantize_static(pre, tmp_out, _Reader(input_name, calib), activation_type, method,
                             exclude, quantize_bias, reduce_range)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise EngineBuildError(f"ONNX Runtime could not quantize {fp32_path}: {exc}.") from exc
        if activation_type == "int8":
            from trainer.qdq_graph import finish_for_tensorrt

            finish_for_tensorrt(tmp_out, f"The int8 Q/DQ model of {fp32_path}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp_out, "rb") as src, atomic_file(out_path) as dst:
            shutil.copyfileobj(src, dst)
    _log.info("Wrote INT8 Q/DQ model %s (%s activations, %d-bit weights, %s biases, %s calibration on %d inputs)",
              out_path, activation_type, 7 if reduce_range else 8, "int32" if quantize_bias else "float", method,
              calib.shape[0])
    return out_path


def quantize_with_gate(
    fp32_path: Path | str,
    out_path: Path | str,
    calibration_inputs: np.ndarray,
    score: Callable[[Path], float],
    metric: str,
    max_drop: float,
    fp32_score: float | Mapping[str, float] | None = None,
    reference_score: Callable[[Path], object] | None = None,
    also: Mapping[str, float] | None = None,
    **quant_kwargs: object,
) -> GateResult:
    """Quantize to a staging file, score INT8 vs FP32 with ``score``, publish only if within ``max_drop``.

    ``score(path)`` evaluates an ONNX file on the held-out set and returns
    the gated metric (higher is better). ``reference_score(path)``, when
    given, scores the INT8 file a second way (the Q/DQ reference
    arithmetic): it too must be within ``max_drop`` of FP32, and within
    ``max_drop`` of ``score``. ``also`` gates further metrics (name: allowed
    drop) the same way; the scorers then return ``{metric: value}`` mappings
    holding ``metric`` and every one of ``also``.

    Raises
    ------
    GateRefused
        If an INT8 score drops by more than ``max_drop``, or the two INT8
        scores differ by more than that; ``out_path`` is then left untouched
        (not created, or the previous file kept).
    """
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent if out_path.parent.is_dir() else None) as tmp:
        staged = Path(tmp) / out_path.name
        quantize_int8(fp32_path, staged, calibration_inputs, **quant_kwargs)  # type: ignore[arg-type]
        ref = score(Path(fp32_path)) if fp32_score is None else fp32_score
        got = score(staged)
        reference = None if reference_score is None else reference_score(staged)
        result = gate_result(metric, max_drop, ref, got, reference, also)  # type: ignore[arg-type]
        if not result.passed:
            raise GateRefused(refusal_message(result, out_path))
        os.replace(staged, out_path)
    for r in (result, *result.also):
        _log.info("INT8 gate passed: %s FP32 %.4f INT8 %.4f (drop %.4f <= %.4f)%s", r.metric, r.fp32, r.int8, r.drop,
                  r.max_drop, "" if r.reference is None else f", Q/DQ reference {r.reference:.4f}")
    return result


def _gated_metrics(man: "Manifest", full: Mapping[str, dict], fp32: str, key: str) -> dict[str, dict]:
    """The manifest's metrics with the INT8 artifact's served score (and FP32's, if missing) from the gate's runs."""
    from trainer.evaluate import summarize

    int8_metrics = summarize(man.task, next(v for k, v in full.items() if k not in (fp32, REFERENCE_RUN)))
    metrics = {k: dict(v) for k, v in man.metrics.items()}
    metrics[key] = int8_metrics
    if "fp32" not in metrics:
        metrics["fp32"] = summarize(man.task, full[fp32])
    return metrics


_REDUCE_RANGE_WHY = (
    "weights in 7 bits so that ONNX Runtime's u8s8 CPU kernels cannot saturate: on x86 CPUs without VNNI "
    "(AVX2, AVX-512 without VNNI) VPMADDUBSW adds pairs of uint8 x int8 products in signed 16 bits, which "
    "overflows with 8-bit weights (measured on AMD EPYC, AVX2: seg Dice 0.54, det mAP 0.78 instead of 0.93 / 0.99)"
)


def _quantization_record(
    key: str, method: str, calib_n: int, calib_source: str, reduce_range: bool
) -> dict[str, object]:
    """How an INT8 artifact was made, as ``training.quantization[_tensorrt]`` records it (less gate and set)."""
    trt = key == "int8-tensorrt"
    return {
        "format": "QDQ",
        "weights": "int8 symmetric per-channel" + (", 7-bit range (reduce_range)" if reduce_range else ""),
        "activations": "int8 symmetric" if trt else "uint8 asymmetric",
        "biases": "float" if trt else "int32",
        "reduce_range": {"enabled": reduce_range, "why": _REDUCE_RANGE_WHY if reduce_range else "turned off"},
        "tool": f"onnxruntime.quantization.quantize_static {_ort_version()}",
        "calibration": {"method": method, "n": calib_n, "source": calib_source},
    }


def _gate_record(result: GateResult, key: str) -> dict[str, object]:
    """``gate`` of the quantization record: scores, runtimes, and the CPU that measured them."""
    from trainer.qdq_graph import cpu_int8_features

    record: dict[str, object] = {"metric": result.metric, **gate_summary(result), "runtime": _GATE_RUNTIME[key]}
    if result.reference is not None:
        record["reference_runtime"] = _GATE_RUNTIME["int8-tensorrt"]
        record["cpu"] = cpu_int8_features()
    return record


def _heldout_for_gate(
    man: "Manifest", d: Path, heldout_data: str | None, heldout_n: int | None
) -> tuple["DetectionSet | SegmentationSet | ClassificationSet", dict[str, object]]:
    """``(test set, its record)`` of the gate: the recorded held-out set or ``heldout_data``."""
    from trainer.provenance import plan_heldout

    plan = plan_heldout(man.training, man.task, heldout_data, heldout_n, what=f"Model {man.name!r} ({d})")
    test = plan.load(man.task, man.input, man.preprocessing, list(man.labels), training=man.training)
    held_record = plan.record(man.task, len(test))
    recorded = man.training.get("heldout")
    if isinstance(recorded, Mapping) and recorded.get("data") != held_record["data"]:
        _log.warning("The INT8 gate of %s runs on %s, not on the held-out set its other metrics came from (%s).",
                     man.name, held_record["data"], recorded.get("data"))
    return test, held_record


def _calibration(man: "Manifest", calib_n: int, calib_data: str | None) -> np.ndarray:
    """The calibration inputs: :func:`calibration_inputs`, or for a synthetic classifier its own training set."""
    from trainer.provenance import is_user_data

    if man.task != "classification" or calib_data or is_user_data(man.training):
        return calibration_inputs(man, calib_n, calib_data)
    from trainer.classification_data import POSITIVE_FRACTION, synthetic_classification_set
    from trainer.data import XRAY_SHAPE, default_cache_dir
    from trainer.evaluate import HELDOUT_SEED, TRAIN_SEED

    if calib_n <= 0:
        raise DataError(f"The calibration set has size {calib_n}; INT8 calibration needs at least one training sample.")
    seed = int(man.training.get("data_seed", TRAIN_SEED))
    if seed == HELDOUT_SEED:
        raise DataError(f"Seed {seed} is the held-out set's; calibration must come from training data.")
    shape = tuple(int(v) for v in man.training.get("source_shape") or XRAY_SHAPE)
    fraction = float(man.training.get("positive_fraction") or POSITIVE_FRACTION)
    return synthetic_classification_set(
        calib_n, seed, man.input, man.preprocessing, keep_source=False, cache_dir=default_cache_dir() / "data",
        positive_fraction=fraction, shape=(shape[0], shape[1]),
    ).inputs


def quantize_engine(
    engine_dir: Path | str,
    calib_n: int = 64,
    calib_data: str | None = None,
    max_drop: float | None = None,
    activation_type: str = "uint8",
    method: str = "minmax",
    heldout_n: int | None = None,
    heldout_data: str | None = None,
    calib_override: np.ndarray | None = None,
    reduce_range: bool | None = None,
    also_max_drop: Mapping[str, float] | None = None,
) -> GateResult:
    """Quantize ``engine_dir/model.onnx`` behind the gate and update its manifest.

    On success the artifact is written and the manifest gains it, its
    held-out metrics and the gate record: ``uint8`` activations give the
    ``int8`` artifact (``model.int8.onnx``, for ONNX Runtime on CPU; 7-bit
    weights unless ``reduce_range=False``), ``int8`` (symmetric) activations
    the ``int8-tensorrt`` one (``model.int8-tensorrt.onnx``, recorded under
    ``training.quantization_tensorrt``). On refusal (:class:`GateRefused`)
    nothing in ``engine_dir`` changes.

    The gate's held-out set is the one the manifest records
    (:func:`trainer.provenance.plan_heldout`), or ``heldout_data``; it is
    written into the quantization record. ``max_drop`` is the allowed drop
    of the task's main metric (default from
    :data:`trainer.int8_gate.GATED_METRICS`); ``also_max_drop`` overrides
    the others' (a classifier's ``sensitivity``).

    Raises
    ------
    DataError
        Before anything is written, when the model was trained on a user's
        data, its manifest records no held-out set and ``heldout_data`` is
        not given; or when no calibration data can be found for it.
    """
    from edge.inference.manifest import Manifest
    from trainer.evaluate import gated_metric
    from trainer.export import ARTIFACT_FILES, build_manifest, write_manifest

    d = Path(engine_dir)
    man = Manifest.load(d)
    fp32 = man.artifact_path("fp32", verify=True)
    metric = gated_metric(man.task)
    main, max_drop, also = gated_metrics(man.task, max_drop)
    if main != metric:
        raise EngineBuildError(f"The gate's main metric for {man.task} is {main}, the evaluation's {metric}.")
    also.update(also_max_drop or {})
    if reduce_range is None:
        reduce_range = activation_type == "uint8"
    calib = calib_override if calib_override is not None else _calibration(man, calib_n, calib_data)
    test, held_record = _heldout_for_gate(man, d, heldout_data, heldout_n)
    full: dict[str, dict] = {}
    key = "int8-tensorrt" if activation_type == "int8" else "int8"
    score, reference = gate_scorers(man, test, metric, fp32, key, full, also=tuple(also))
    result = quantize_with_gate(
        fp32, d / ARTIFACT_FILES[key], calib, score, metric, max_drop, reference_score=reference, also=also,
        activation_type=activation_type, method=method, reduce_range=reduce_range,
    )
    training = dict(man.training)
    if not isinstance(man.training.get("heldout"), Mapping):  # exported with --no-eval: the gate's set is the model's
        training["heldout"] = held_record
    calib_source = "given inputs" if calib_override is not None else calibration_source(man, calib_data)
    training["quantization_tensorrt" if key == "int8-tensorrt" else "quantization"] = {
        **_quantization_record(key, method, int(calib.shape[0]), calib_source, reduce_range),
        "gate": _gate_record(result, key),
        "heldout": held_record,
    }
    new = build_manifest(
        d, man.name, man.task, list(man.labels), man.input, man.preprocessing, man.postprocessing,
        metrics=_gated_metrics(man, full, str(fp32), key), training=training, intended_use=man.intended_use,
        version=man.version, research_only=man.research_only,
    )
    write_manifest(new, d)
    return result
