"""The INT8 accuracy gate's verdict: scores, pass or refuse, and how the scores are measured.

:func:`trainer.quantize.quantize_with_gate` quantizes and asks this module
whether the result may be published. A CPU artifact is scored twice: on the
daemon's own ONNX Runtime session (the fused integer kernels of the CPU the
gate runs on) and on the graph's Q/DQ reference arithmetic (what TensorRT,
and any CPU whose kernels do not saturate, computes). Both must be within
the allowed drop of FP32 and within it of each other.

What is gated, per task (:data:`GATED_METRICS`): Dice (segmentation,
allowed drop 0.01), mAP@0.5 (detection, 0.02), and for a classifier two
scores at once: ROC AUC (0.01) and the sensitivity at the manifest's
operating threshold (0.02; the threshold chosen on the validation set, not
refitted for INT8). Every gated score must pass, on every runtime.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from edge.errors import EngineBuildError

if TYPE_CHECKING:
    from edge.inference.manifest import Manifest
    from trainer.classification_data import ClassificationSet
    from trainer.data import DetectionSet, SegmentationSet

__all__ = [
    "DEFAULT_MAX_DICE_DROP",
    "DEFAULT_MAX_MAP_DROP",
    "DEFAULT_MAX_AUC_DROP",
    "DEFAULT_MAX_SENSITIVITY_DROP",
    "GATED_METRICS",
    "REFERENCE_RUN",
    "gate_result",
    "gated_metrics",
    "GateRefused",
    "GateResult",
    "gate_scorers",
    "gate_summary",
    "refusal_message",
]

DEFAULT_MAX_DICE_DROP = 0.01
DEFAULT_MAX_MAP_DROP = 0.02
DEFAULT_MAX_AUC_DROP = 0.01
DEFAULT_MAX_SENSITIVITY_DROP = 0.02
#: The gated scores of each task and their default allowed drops; the first is the task's main
#: metric (``GateResult.metric``), the others are gated beside it (``GateResult.also``).
GATED_METRICS: Mapping[str, Mapping[str, float]] = {
    "segmentation": {"dice": DEFAULT_MAX_DICE_DROP},
    "detection": {"map50": DEFAULT_MAX_MAP_DROP},
    "classification": {"roc_auc": DEFAULT_MAX_AUC_DROP, "sensitivity": DEFAULT_MAX_SENSITIVITY_DROP},
}


class GateRefused(EngineBuildError):
    """The INT8 model lost more accuracy than the gate allows; no artifact was written."""


@dataclass(frozen=True)
class GateResult:
    """FP32 and INT8 scores on the held-out set and the allowed drop.

    ``reference`` is the INT8 model's score on the Q/DQ reference arithmetic
    when the gate also measured it (the CPU artifact): then both scores must
    be within ``max_drop`` of FP32 and within ``max_drop`` of each other.
    ``also`` holds the other gated metrics of the task (a classifier's
    sensitivity at its threshold), each judged the same way; the gate
    passes only when every one does.
    """

    metric: str
    fp32: float
    int8: float
    max_drop: float
    reference: float | None = None
    also: tuple["GateResult", ...] = ()

    @property
    def drop(self) -> float:
        """FP32 score minus INT8 score."""
        return self.fp32 - self.int8

    @property
    def reference_drop(self) -> float | None:
        """FP32 score minus the INT8 reference score (None when not measured)."""
        return None if self.reference is None else self.fp32 - self.reference

    @property
    def divergence(self) -> float | None:
        """How far the served INT8 score is from the reference one (None when not measured)."""
        return None if self.reference is None else abs(self.int8 - self.reference)

    @property
    def own_passed(self) -> bool:
        """Whether this metric's drops, and its served-vs-reference difference, are within the allowed one."""
        if self.reference is None:
            return self.drop <= self.max_drop
        return max(self.drop, self.fp32 - self.reference, abs(self.int8 - self.reference)) <= self.max_drop

    @property
    def passed(self) -> bool:
        """Whether this metric and every one in ``also`` is within its allowed drop."""
        return self.own_passed and all(a.passed for a in self.also)


def refusal_message(result: GateResult, out_path: Path) -> str:
    """Why the gate refuses ``result`` (a sentence for :class:`GateRefused`).

    A served score far from the reference one is named first: it is the
    symptom of saturating kernels, whatever the drops are. The first failing
    metric is named (the main one before those in ``also``).
    """
    failing = next((x for x in (result, *result.also) if not x.own_passed), result)
    r, m = failing, failing.metric
    tail = f"refusing to write {out_path}."
    if r.reference is not None and abs(r.int8 - r.reference) > r.max_drop:
        return (
            f"INT8 {m} on this CPU's fused kernels ({r.int8:.4f}) differs from the Q/DQ reference arithmetic "
            f"({r.reference:.4f}; FP32 {r.fp32:.4f}) by {abs(r.int8 - r.reference):.4f}, more than the allowed "
            f"{r.max_drop:.4f}: the symptom of ONNX Runtime's u8s8 kernels saturating their 16-bit sums on x86 "
            "CPUs without VNNI, so the artifact would score differently from one CPU to another (quantize with "
            f"reduce_range, the default); {tail}"
        )
    if r.reference is not None and r.fp32 - r.reference > r.max_drop:
        return (f"INT8 {m} on the Q/DQ reference arithmetic {r.reference:.4f} is {r.fp32 - r.reference:.4f} below "
                f"FP32 {r.fp32:.4f}, more than the allowed {r.max_drop:.4f}; {tail}")
    return (f"INT8 {m} {r.int8:.4f} is {r.drop:.4f} below FP32 {r.fp32:.4f}, more than the allowed "
            f"{r.max_drop:.4f}; {tail}")


def gate_summary(result: GateResult) -> Mapping[str, float]:
    """The gate's numbers as a flat mapping (for manifests and JSON output)."""
    out: dict[str, Any] = {"fp32": result.fp32, "int8": result.int8, "drop": result.drop, "max_drop": result.max_drop}
    if result.reference is not None:
        out |= {"reference": result.reference, "reference_drop": float(result.reference_drop or 0.0),
                "divergence": float(result.divergence or 0.0)}
    if result.also:
        out["also"] = {a.metric: {"metric": a.metric, **gate_summary(a)} for a in result.also}
    return out


def _as_scores(value: "float | Mapping[str, float]", metric: str) -> dict[str, float]:
    """A scorer's answer as ``{metric: value}`` (a bare number is the main metric's)."""
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    return {metric: float(value)}


def _need(scores: Mapping[str, float], metric: str, what: str) -> float:
    if metric not in scores:
        raise EngineBuildError(f"The INT8 gate needs {metric!r} from the {what} scorer; it gave {sorted(scores)}.")
    return float(scores[metric])


def gate_result(
    metric: str,
    max_drop: float,
    fp32: "float | Mapping[str, float]",
    int8: "float | Mapping[str, float]",
    reference: "float | Mapping[str, float] | None" = None,
    also: Mapping[str, float] | None = None,
) -> GateResult:
    """The verdict from the scorers' answers: ``metric`` within ``max_drop``, each of ``also`` within its own.

    ``also`` maps further gated metrics to their allowed drops; the scorers
    must then return a mapping holding them.

    Raises
    ------
    EngineBuildError
        If a scorer's answer lacks a gated metric.
    """
    f, i = _as_scores(fp32, metric), _as_scores(int8, metric)
    r = None if reference is None else _as_scores(reference, metric)

    def one(m: str, d: float) -> GateResult:
        return GateResult(metric=m, fp32=_need(f, m, "FP32"), int8=_need(i, m, "INT8"), max_drop=float(d),
                          reference=None if r is None else _need(r, m, "reference"))

    return dataclasses.replace(one(metric, max_drop), also=tuple(one(m, d) for m, d in (also or {}).items()))


def gated_metrics(task: str, max_drop: float | None = None) -> tuple[str, float, dict[str, float]]:
    """``(metric, max_drop, also)`` of ``task``'s gate; ``max_drop`` overrides the main metric's default only."""
    table = dict(GATED_METRICS.get(task, GATED_METRICS["detection"]))
    metric, default = next(iter(table.items()))
    table.pop(metric)
    return metric, float(default if max_drop is None else max_drop), table


REFERENCE_RUN = "reference"  # key of the Q/DQ reference run's metrics in the gate's ``full`` record


def gate_scorers(
    man: "Manifest", test: "DetectionSet | SegmentationSet | ClassificationSet", metric: str, fp32: Path, key: str,
    full: dict[str, dict], also: Sequence[str] = (),
) -> tuple[Callable[[Path], Any], Callable[[Path], Any] | None]:
    """``(score, reference_score)`` for the gate; each run's full metrics are kept in ``full``.

    A scorer returns ``metric``'s value, or with ``also`` (further gated
    metrics) a mapping of every gated metric, read from the run's scalars
    (:func:`trainer.evaluate.summarize`: a classifier's report is nested).

    The CPU artifact (``int8``) is scored on the daemon's own ONNX Runtime
    session (:func:`daemon_cpu_runner`: the fused kernels that serve it) and
    on the graph's Q/DQ arithmetic (:func:`qdq_reference_runner`); the
    TensorRT one on the Q/DQ arithmetic only, which TensorRT implements;
    FP32 as always.
    """
    from trainer.evaluate import evaluate_model, onnx_runner, summarize
    from trainer.qdq_graph import daemon_cpu_runner, qdq_reference_runner

    int8_runner = qdq_reference_runner if key == "int8-tensorrt" else daemon_cpu_runner

    def _eval(run: Callable[[np.ndarray], dict[str, np.ndarray]], record: str) -> Any:
        m = evaluate_model(run, man.task, test, man.postprocessing, list(man.labels))
        full[record] = m
        flat = summarize(man.task, m) if man.task == "classification" else m
        if not also:
            return float(flat[metric])
        return {k: float(flat[k]) for k in (metric, *also) if flat.get(k) is not None}

    def score(path: Path) -> Any:
        return _eval(onnx_runner(path) if Path(path) == Path(fp32) else int8_runner(path), str(path))

    def reference(path: Path) -> Any:
        return _eval(qdq_reference_runner(path), REFERENCE_RUN)

    return score, (None if key == "int8-tensorrt" else reference)
