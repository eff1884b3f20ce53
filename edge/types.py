"""Small shared types and the seams between daemon stages.

``Box`` is one detection in source-image pixel coordinates (post-processing,
the ZeroMQ and DICOM results, and the trainer's evaluation share it);
``ClassScore`` is one label of a classification with its calibrated
probability.

``Backend`` is what every inference backend implements; ``InferenceService``
is what ingest sources (ZeroMQ, DICOM) call to get a result for one image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "Backend",
    "Box",
    "ClassScore",
    "EXTRA_OUTPUTS",
    "InferenceResult",
    "InferenceService",
    "ResultCallback",
    "MAX_STREAM_CHARS",
    "valid_stream",
]

#: The outputs computed only when a request asks for them (``want``): the class activation map of a
#: classification and the per-pixel foreground probability of a segmentation.
EXTRA_OUTPUTS = ("heatmap", "probability")
#: Longest stream name (characters).
MAX_STREAM_CHARS = 128
# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: never in a
# stream name, so NUL can end a PUB topic and a name prints on one line.
_STREAM_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def valid_stream(value: Any) -> bool:
    r"""Whether ``value`` is a valid stream name (wire and ``[zmq] default_stream`` alike).

    1 to 128 characters, none a control character (C0, DEL, C1) or a Unicode
    line/paragraph separator.

    Examples
    --------
    >>> valid_stream("probe-1"), valid_stream("Sonde-\u00e9"), valid_stream(""), valid_stream("a\x00b")
    (True, True, False, False)
    >>> valid_stream("a\x85b"), valid_stream("a\u2028b"), valid_stream(7)
    (False, False, False)
    """
    return isinstance(value, str) and 0 < len(value) <= MAX_STREAM_CHARS and _STREAM_FORBIDDEN.search(value) is None


@dataclass(frozen=True)
class Box:
    """One detection in source-image pixel coordinates (x right, y down)."""

    label: str
    score: float
    x0: float
    y0: float
    x1: float
    y1: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict with rounded coordinates (written out: ``dataclasses.asdict`` deep-copies)."""
        return {
            "label": self.label,
            "score": round(float(self.score), 4),
            "x0": round(float(self.x0), 2),
            "y0": round(float(self.y0), 2),
            "x1": round(float(self.x1), 2),
            "y1": round(float(self.y1), 2),
        }


@dataclass(frozen=True)
class ClassScore:
    """One label of a classification and its calibrated probability in [0, 1]."""

    label: str
    score: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict, the score rounded to 6 decimals."""
        return {"label": self.label, "score": round(float(self.score), 6)}


@runtime_checkable
class Backend(Protocol):
    """One loaded model on one runtime: load in the constructor, infer, close.

    ``infer`` takes a float32 ``[N, C, H, W]`` batch and returns each output
    by name (``logits`` for segmentation; ``heatmap``, ``size``, ``offset``
    for detection; ``logits`` and optionally ``cam`` for classification),
    batch first. It must release the GIL while computing.
    """

    name: str  # "onnxruntime" or "tensorrt"
    precision: str  # "fp32", "fp16" or "int8"
    max_batch: int

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass
class InferenceResult:
    """The outcome for one image (one frame).

    ``classes`` and ``decision`` are set for a classification model's ``ok``
    result (``None`` otherwise): the calibrated probabilities, best first,
    and whether the top label's probability reaches the manifest's
    threshold. ``heatmap`` (classification: the class activation map of
    ``classes[0]``) and ``probability`` (segmentation: the foreground
    probability per pixel) are uint8 ``[H, W]`` at the input's resolution,
    0..255, computed only when the submission asked for them
    (:data:`EXTRA_OUTPUTS`); ``None`` otherwise.
    """

    status: str  # "ok" | "dropped" | "error"
    model: str
    model_version: str = ""
    task: str = ""
    mask: np.ndarray | None = None  # uint8 [H, W] at input resolution (segmentation)
    boxes: list[Box] = field(default_factory=list)  # input pixel coordinates (detection)
    classes: list[ClassScore] | None = None  # best first (classification)
    decision: bool | None = None  # classes[0] at or above the threshold (classification)
    heatmap: np.ndarray | None = None  # uint8 [H, W], asked for (classification)
    probability: np.ndarray | None = None  # uint8 [H, W], asked for (segmentation)
    timing_us: dict[str, int] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str | None = None


ResultCallback = Callable[[InferenceResult], None]


class InferenceService(Protocol):
    """What ingest sources call: the scheduler in front of the loaded models."""

    def models(self) -> Sequence[str]: ...

    def submit(
        self,
        image: np.ndarray,
        *,
        model: str | None,
        source: str,
        stream: str,
        callback: ResultCallback,
        received_ns: int | None = None,
        live: bool = True,
        track_e2e: bool = True,
        want: frozenset[str] = frozenset(),
    ) -> None:
        """Queue one image; ``callback`` is called exactly once, from a worker thread.

        ``live`` frames never block (an over-long stream backlog sheds its
        oldest frame); ``live=False`` waits for room instead. ``track_e2e``
        False: the source observes the end-to-end latency itself, after its
        own egress. ``want``: the :data:`EXTRA_OUTPUTS` to compute for this
        image (those the model cannot produce are ignored). See
        :meth:`edge.scheduler.Scheduler.submit`.
        """
        ...

    def infer(
        self,
        image: np.ndarray,
        *,
        model: str,
        source: str,
        timeout_s: float = 30.0,
        want: frozenset[str] = frozenset(),
    ) -> InferenceResult:
        """Blocking convenience for non-live sources (DICOM): submit and wait."""
        ...
