"""INT8 quantization with explicit Q/DQ nodes, behind an accuracy gate.

The INT8 artifact is a QDQ ONNX model (``QuantizeLinear`` /
``DequantizeLinear`` pairs around every Conv): the one format that both
ONNX Runtime and TensorRT (10.1+ deprecated, 11 removed the implicit INT8
calibrator) build from.

- weights: symmetric int8, per output channel;
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
- calibration: min-max (or percentile) over a calibration set drawn from
  **training** data only; a set of size zero is a :class:`DataError`;
- gate: the INT8 model is evaluated on the held-out set beside FP32; when
  Dice (segmentation) or mAP@0.5 (detection) drops by more than the
  threshold, :class:`GateRefused` is raised and nothing is written.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np

from edge.errors import DataError, EngineBuildError
from edge.fileio import atomic_file

if TYPE_CHECKING:
    from edge.inference.manifest import Manifest
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
    "quantize_engine",
]

_log = logging.getLogger(__name__)

DEFAULT_MAX_DICE_DROP = 0.01
DEFAULT_MAX_MAP_DROP = 0.02


class GateRefused(EngineBuildError):
    """The INT8 model lost more accuracy than the gate allows; no artifact was written."""


@dataclass(frozen=True)
class GateResult:
    """FP32 and INT8 scores on the held-out set and the allowed drop."""

    metric: str
    fp32: float
    int8: float
    max_drop: float

    @property
    def drop(self) -> float:
        """FP32 score minus INT8 score."""
        return self.fp32 - self.int8

    @property
    def passed(self) -> bool:
        """Whether the drop is within the allowed one."""
        return self.drop <= self.max_drop


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
    "int8": "onnxruntime CPU, fused integer kernels",
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
    pre: Path, out: Path, reader: _Reader, activation_type: str, method: str, exclude: list[str], quantize_bias: bool
) -> None:
    """ONNX Runtime's ``quantize_static`` in QDQ format: symmetric per-channel int8 weights."""
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
        Node names kept in float.
    quantize_bias : bool, optional
        Quantize Conv biases to INT32 behind a DequantizeLinear. Default:
        yes for ``uint8`` (ONNX Runtime CPU), no for ``int8`` (TensorRT, whose
        DequantizeLinear takes only INT8 inputs; ``True`` there is refused).

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
    import onnx

    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        _pre_process(fp32_path, pre)
        tmp_out = Path(tmp) / "int8.onnx"
        try:
            _quantize_static(pre, tmp_out, _Reader(input_name, calib), activation_type, method,
                             exclude_nodes or [], quantize_bias)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise EngineBuildError(f"ONNX Runtime could not quantize {fp32_path}: {exc}.") from exc
        if activation_type == "int8":
            from trainer.qdq_graph import finish_for_tensorrt

            finish_for_tensorrt(tmp_out, f"The int8 Q/DQ model of {fp32_path}")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp_out, "rb") as src, atomic_file(out_path) as dst:
            shutil.copyfileobj(src, dst)
    _log.info("Wrote INT8 Q/DQ model %s (%s activations, %s biases, %s calibration on %d inputs)", out_path,
              activation_type, "int32" if quantize_bias else "float", method, calib.shape[0])
    return out_path


def quantize_with_gate(
    fp32_path: Path | str,
    out_path: Path | str,
    calibration_inputs: np.ndarray,
    score: Callable[[Path], float],
    metric: str,
    max_drop: float,
    fp32_score: float | None = None,
    **quant_kwargs: object,
) -> GateResult:
    """Quantize to a staging file, score INT8 vs FP32 with ``score``, publish only if within ``max_drop``.

    ``score(path)`` evaluates an ONNX file on the held-out set and returns
    the gated metric (higher is better).

    Raises
    ------
    GateRefused
        If the INT8 model's score drops by more than ``max_drop``; ``out_path``
        is then left untouched (not created, or the previous file kept).
    """
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent if out_path.parent.is_dir() else None) as tmp:
        staged = Path(tmp) / out_path.name
        quantize_int8(fp32_path, staged, calibration_inputs, **quant_kwargs)  # type: ignore[arg-type]
        ref = score(Path(fp32_path)) if fp32_score is None else fp32_score
        got = score(staged)
        result = GateResult(metric=metric, fp32=float(ref), int8=float(got), max_drop=float(max_drop))
        if not result.passed:
            raise GateRefused(
                f"INT8 {metric} {got:.4f} is {result.drop:.4f} below FP32 {ref:.4f}, more than the "
                f"allowed {max_drop:.4f}; refusing to write {out_path}."
            )
        os.replace(staged, out_path)
    _log.info("INT8 gate passed: %s FP32 %.4f INT8 %.4f (drop %.4f <= %.4f)", metric, ref, got, result.drop, max_drop)
    return result


def gate_summary(result: GateResult) -> Mapping[str, float]:
    """The gate's numbers as a flat mapping (for manifests and JSON output)."""
    return {"fp32": result.fp32, "int8": result.int8, "drop": result.drop, "max_drop": result.max_drop}


def _calibration_folder(manifest: "Manifest", data: str | None) -> tuple[str | None, list[str] | None]:
    """``(folder, items)`` to calibrate from, or ``(None, None)`` for the synthetic generator.

    ``data`` wins; a model trained on a user's folder otherwise calibrates on
    that folder (less any held-out split recorded for it). The recorded
    held-out folder is never a calibration set.
    """
    from trainer.data import folder_items
    from trainer.provenance import is_user_data

    training = manifest.training
    held = training.get("heldout") if isinstance(training.get("heldout"), Mapping) else None
    split = held.get("split") if held is not None and isinstance(held.get("split"), Mapping) else None
    if data:
        if held is not None and split is None and held.get("data") not in (None, "synthetic") and (
            Path(str(held["data"])).resolve() == Path(data).resolve()
        ):
            raise DataError(f"{data} is model {manifest.name!r}'s held-out folder; calibration must come from training data.")
        return data, None
    if not is_user_data(training):
        return None, None
    folder = training.get("data")
    if not isinstance(folder, str) or not Path(folder).is_dir():
        raise DataError(
            f"Model {manifest.name!r} was trained on your own data ({folder}), which is not a folder here; "
            "give --calib-data FOLDER (training images) to calibrate INT8 on."
        )
    if split is not None and held is not None and Path(str(held.get("data"))).resolve() == Path(folder).resolve():
        hidden = set(split.get("items") or ())
        return folder, [i for i in folder_items(folder, manifest.task) if i not in hidden]
    return folder, None


def calibration_inputs(manifest: "Manifest", n: int, data: str | None = None) -> np.ndarray:
    """``n`` calibration inputs from the model's **training** data.

    Synthetic models regenerate the first ``n`` samples of their training
    seed (recorded in the manifest). Models trained on a folder use ``data``
    or, without it, the training folder recorded in the manifest (less its
    held-out split); never the synthetic generator. The held-out seed and
    the recorded held-out folder are refused.
    """
    from trainer.data import load_detection_folder, load_segmentation_folder, synthetic_detection_set, synthetic_segmentation_set, default_cache_dir
    from trainer.evaluate import HELDOUT_SEED, TRAIN_SEED

    if n <= 0:
        raise DataError(f"The calibration set has size {n}; INT8 calibration needs at least one training sample.")
    folder, items = _calibration_folder(manifest, data)
    if folder is not None:
        if manifest.task == "segmentation":
            ds = load_segmentation_folder(folder, manifest.input, manifest.preprocessing, items=items)
        else:
            ds = load_detection_folder(folder, manifest.input, manifest.preprocessing, labels=list(manifest.labels), items=items)[0]
        return ds.inputs[:n]
    seed = int(manifest.training.get("data_seed", TRAIN_SEED))
    if seed == HELDOUT_SEED:
        raise DataError(f"Seed {seed} is the held-out set's; calibration must come from training data.")
    make = synthetic_segmentation_set if manifest.task == "segmentation" else synthetic_detection_set
    return make(n, seed, manifest.input, manifest.preprocessing, keep_source=False, cache_dir=default_cache_dir() / "data").inputs


def _calibration_source(man: "Manifest", calib_data: str | None) -> str:
    """Where the calibration inputs came from, as the quantization record names it."""
    folder, _ = _calibration_folder(man, calib_data)
    return folder if folder is not None else f"training data (seed {man.training.get('data_seed', 1)})"


def _gated_metrics(man: "Manifest", full: Mapping[str, dict], fp32: str, key: str) -> dict[str, dict]:
    """The manifest's metrics with the INT8 artifact's (and FP32's, if missing) from the gate's runs."""
    from trainer.evaluate import summarize

    int8_metrics = summarize(man.task, next(v for k, v in full.items() if k != fp32))
    metrics = {k: dict(v) for k, v in man.metrics.items()}
    metrics[key] = int8_metrics
    if "fp32" not in metrics:
        metrics["fp32"] = summarize(man.task, full[fp32])
    return metrics


def _gate_scorer(
    man: "Manifest", test: "DetectionSet | SegmentationSet", metric: str, fp32: Path, key: str, full: dict[str, dict]
) -> Callable[[Path], float]:
    """``score(path)`` for the gate: the held-out metric of an ONNX file, its full metrics kept in ``full``.

    The CPU artifact (``int8``) is scored on the fused kernels that serve it;
    the TensorRT one on the graph's own Q/DQ arithmetic
    (:func:`qdq_reference_runner`), which TensorRT implements; FP32 as always.
    """
    from trainer.evaluate import evaluate_model, onnx_runner
    from trainer.qdq_graph import qdq_reference_runner

    int8_runner = qdq_reference_runner if key == "int8-tensorrt" else onnx_runner

    def score(path: Path) -> float:
        run = onnx_runner(path) if Path(path) == Path(fp32) else int8_runner(path)
        m = evaluate_model(run, man.task, test, man.postprocessing, list(man.labels))
        full[str(path)] = m
        return float(m[metric])

    return score


def _quantization_record(key: str, method: str, calib_n: int, calib_source: str) -> dict[str, object]:
    """How an INT8 artifact was made, as ``training.quantization[_tensorrt]`` records it (less gate and set)."""
    trt = key == "int8-tensorrt"
    return {
        "format": "QDQ",
        "weights": "int8 symmetric per-channel",
        "activations": "int8 symmetric" if trt else "uint8 asymmetric",
        "biases": "float" if trt else "int32",
        "tool": f"onnxruntime.quantization.quantize_static {_ort_version()}",
        "calibration": {"method": method, "n": calib_n, "source": calib_source},
    }


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
) -> GateResult:
    """Quantize ``engine_dir/model.onnx`` behind the gate and update its manifest.

    On success the artifact is written and the manifest gains it, its
    held-out metrics and the gate record: ``uint8`` activations give the
    ``int8`` artifact (``model.int8.onnx``, for ONNX Runtime on CPU), ``int8``
    (symmetric) activations the ``int8-tensorrt`` one
    (``model.int8-tensorrt.onnx``, recorded under
    ``training.quantization_tensorrt``). On refusal
    (:class:`GateRefused`) nothing in ``engine_dir`` changes.

    The gate's held-out set is the one the manifest records
    (:func:`trainer.provenance.plan_heldout`), or ``heldout_data``; it is
    written into the quantization record.

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
    from trainer.provenance import plan_heldout

    d = Path(engine_dir)
    man = Manifest.load(d)
    fp32 = man.artifact_path("fp32", verify=True)
    metric = gated_metric(man.task)
    if max_drop is None:
        max_drop = DEFAULT_MAX_DICE_DROP if man.task == "segmentation" else DEFAULT_MAX_MAP_DROP
    plan = plan_heldout(man.training, man.task, heldout_data, heldout_n, what=f"Model {man.name!r} ({d})")
    calib = calib_override if calib_override is not None else calibration_inputs(man, calib_n, calib_data)
    test = plan.load(man.task, man.input, man.preprocessing, list(man.labels))
    held_record = plan.record(man.task, len(test))
    recorded = man.training.get("heldout")
    if isinstance(recorded, Mapping) and recorded.get("data") != held_record["data"]:
        _log.warning("The INT8 gate of %s runs on %s, not on the held-out set its other metrics came from (%s).",
                     man.name, held_record["data"], recorded.get("data"))
    full: dict[str, dict] = {}
    key = "int8-tensorrt" if activation_type == "int8" else "int8"
    record = "quantization_tensorrt" if key == "int8-tensorrt" else "quantization"
    score = _gate_scorer(man, test, metric, fp32, key, full)
    result = quantize_with_gate(
        fp32, d / ARTIFACT_FILES[key], calib, score, metric, max_drop,
        activation_type=activation_type, method=method,
    )
    metrics = _gated_metrics(man, full, str(fp32), key)
    training = dict(man.training)
    if not isinstance(recorded, Mapping):  # exported with --no-eval: the gate's set is now the model's
        training["heldout"] = held_record
    calib_source = "given inputs" if calib_override is not None else _calibration_source(man, calib_data)
    training[record] = {
        **_quantization_record(key, method, int(calib.shape[0]), calib_source),
        "gate": {"metric": metric, **gate_summary(result), "runtime": _GATE_RUNTIME[key]},
        "heldout": held_record,
    }
    new = build_manifest(
        d, man.name, man.task, list(man.labels), man.input, man.preprocessing, man.postprocessing,
        metrics=metrics, training=training, intended_use=man.intended_use, version=man.version,
        research_only=man.research_only,
    )
    write_manifest(new, d)
    return result
