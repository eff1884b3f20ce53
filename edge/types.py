"""Small shared types and the seams between daemon stages.

``Backend`` is what every inference backend implements; ``InferenceService``
is what ingest sources (ZeroMQ, DICOM) call to get a result for one image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from edge.postprocess import Box

__all__ = ["Backend", "InferenceResult", "InferenceService", "ResultCallback"]


@runtime_checkable
class Backend(Protocol):
    """One loaded model on one runtime: load in the constructor, infer, close.

    ``infer`` takes a float32 ``[N, C, H, W]`` batch and returns each output
    by name (``logits`` for segmentation; ``heatmap``, ``size``, ``offset``
    for detection), batch first. It must release the GIL while computing.
    """

    name: str  # "onnxruntime" or "tensorrt"
    precision: str  # "fp32", "fp16" or "int8"
    max_batch: int

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass
class InferenceResult:
    """The outcome for one image (one frame)."""

    status: str  # "ok" | "dropped" | "error"
    model: str
    model_version: str = ""
    task: str = ""
    mask: np.ndarray | None = None  # uint8 [H, W] at input resolution (segmentation)
    boxes: list[Box] = field(default_factory=list)  # input pixel coordinates (detection)
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
    ) -> None:
        """Queue one image; ``callback`` is called exactly once, from a worker thread.

        ``live`` frames never block (an over-long stream backlog sheds its
        oldest frame); ``live=False`` waits for room instead. ``track_e2e``
        False: the source observes the end-to-end latency itself, after its
        own egress. See :meth:`edge.scheduler.Scheduler.submit`.
        """
        ...

    def infer(self, image: np.ndarray, *, model: str, source: str, timeout_s: float = 30.0) -> InferenceResult:
        """Blocking convenience for non-live sources (DICOM): submit and wait."""
        ...
