"""The INT8 accuracy gate's verdict: scores, pass or refuse, and how the scores are measured.

:func:`trainer.quantize.quantize_with_gate` quantizes and asks this module
whether the result may be published. A CPU artifact is scored twice: on the
daemon's own ONNX Runtime session (the fused integer kernels of the CPU the
gate runs on) and on the graph's Q/DQ reference arithmetic (what TensorRT,
and any CPU whose kernels do not saturate, computes). Both must be within
the allowed drop of FP32 and within it of each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

from edge.errors import EngineBuildError

if TYPE_CHECKING:
    from edge.inference.manifest import Manifest
    from trainer.data import DetectionSet, SegmentationSet

__all__ = [
    "DEFAULT_MAX_DICE_DROP",
    "DEFAULT_MAX_MAP_DROP",
    "REFERENCE_RUN",
    "GateRefused",
    "GateResult",
    "gate_scorers",
    "gate_summary",
    "refusal_message",
]

DEFAULT_MAX_DICE_DROP = 0.01
DEFAULT_MAX_MAP_DROP = 0.02


class GateRefused(EngineBuildError):
    """The INT8 model lost more accuracy than the gate allows; no artifact was written."""


@dataclass(frozen=True)
class GateResult:
    """FP32 and INT8 scores on the held-out set and the allowed drop.

    ``reference`` is the INT8 model's score on the Q/DQ reference arithmetic
    when the gate also measured it (the CPU artifact): then both scores must
    be within ``max_drop`` of FP32 and within ``max_drop`` of each other.
    """

    metric: str
    fp32: float
    int8: float
    max_drop: float
    reference: float | None = None

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
    def passed(self) -> bool:
        """Whether every drop, and the served-vs-reference difference, is within the allowed one."""
        if self.reference is None:
            return self.drop <= self.max_drop
        return max(self.drop, self.fp32 - self.reference, abs(self.int8 - self.reference)) <= self.max_drop


def refusal_message(result: GateResult, out_path: Path) -> str:
    """Why the gate refuses ``result`` (a sentence for :class:`GateRefused`).

    A served score far from the reference one is named first: it is the
    symptom of saturating kernels, whatever the drops are.
    """
    r, m = result, result.metric
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
    out = {"fp32": result.fp32, "int8": result.int8, "drop": result.drop, "max_drop": result.max_drop}
    if result.reference is not None:
        out |= {"reference": result.reference, "reference_drop": float(result.reference_drop or 0.0),
                "divergence": float(result.divergence or 0.0)}
    return out


REFERENCE_RUN = "reference"  # key of the Q/DQ reference run's metrics in the gate's ``full`` record


def gate_scorers(
    man: "Manifest", test: "DetectionSet | SegmentationSet", metric: str, fp32: Path, key: str, full: dict[str, dict]
) -> tuple[Callable[[Path], float], Callable[[Path], float] | None]:
    """``(score, reference_score)`` for the gate; each run's full metrics are kept in ``full``.

    The CPU artifact (``int8``) is scored on the daemon's own ONNX Runtime
    session (:func:`daemon_cpu_runner`: the fused kernels that serve it) and
    on the graph's Q/DQ arithmetic (:func:`qdq_reference_runner`); the
    TensorRT one on the Q/DQ arithmetic only, which TensorRT implements;
    FP32 as always.
    """
    from trainer.evaluate import evaluate_model, onnx_runner
    from trainer.qdq_graph import daemon_cpu_runner, qdq_reference_runner

    int8_runner = qdq_reference_runner if key == "int8-tensorrt" else daemon_cpu_runner

    def _eval(run: Callable[[np.ndarray], dict[str, np.ndarray]], record: str) -> float:
        m = evaluate_model(run, man.task, test, man.postprocessing, list(man.labels))
        full[record] = m
        return float(m[metric])

    def score(path: Path) -> float:
        return _eval(onnx_runner(path) if Path(path) == Path(fp32) else int8_runner(path), str(path))

    def reference(path: Path) -> float:
        return _eval(qdq_reference_runner(path), REFERENCE_RUN)

    return score, (None if key == "int8-tensorrt" else reference)
