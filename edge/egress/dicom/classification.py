"""What a classification result says, per source instance and processed frame.

A classification model answers per frame with its labels' calibrated
probabilities (best first) and a decision at its threshold
(:class:`edge.types.InferenceResult` ``classes``, ``decision``), and on
request a class activation map (``heatmap``). The DICOM results carry them
as:

- :class:`ClassifierInfo`: :class:`~edge.egress.dicom.common.ModelInfo`
  plus the decision threshold the model runs with (stated in the SR's
  algorithm parameters);
- :class:`ClassifiedSource`: :class:`~edge.egress.dicom.common.SourceResult`
  plus, per processed frame, the classes and the decision, and the class
  activation maps of the first processed frames (for the overlays).

The TID 1500 SR of them is made by :func:`edge.egress.dicom.sr.make_findings_sr`,
the overlay by :func:`edge.egress.dicom.sc.make_overlay`.

Examples
--------
>>> from pydicom.dataset import Dataset
>>> src = ClassifiedSource(Dataset(), [1], classes=[[{"label": "nodule", "score": 0.83}]], decisions=[True])
>>> src.top(0)
('nodule', 0.83, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edge.egress.dicom.common import ModelInfo, SourceResult
from edge.errors import DataError

__all__ = ["ClassifierInfo", "ClassifiedSource", "threshold_parameter"]


@dataclass(frozen=True)
class ClassifierInfo(ModelInfo):
    """A classification model's :class:`ModelInfo` with the decision threshold it runs with.

    ``threshold``: the calibrated probability at or above which the top
    label is called present (the manifest's, or ``[[models]] threshold``);
    ``None`` when not known (the SR then states no threshold).
    """

    threshold: float | None = None


@dataclass
class ClassifiedSource(SourceResult):
    """One source instance and the classification of each processed frame.

    ``classes[i]``: frame ``frames[i]``'s labels with their calibrated
    probabilities, best first (``{"label", "score"}`` dicts, as
    :meth:`edge.types.ClassScore.to_dict` gives them); ``decisions[i]``:
    whether its top label reaches the threshold. ``heatmaps``: ``[k, H, W]``
    uint8 class activation maps of the first ``k`` processed frames (the
    overlays' frames), ``None`` when none was computed. ``threshold``: the
    decision threshold the frames were classified at, ``None`` if unknown.
    """

    classes: list[list[dict]] = field(default_factory=list)
    decisions: list[bool] = field(default_factory=list)
    heatmaps: np.ndarray | None = None
    threshold: float | None = None

    def top(self, index: int) -> tuple[str, float, bool]:
        """``(label, probability, decision)`` of processed frame ``index`` (its best label).

        Raises
        ------
        DataError
            The frame has no classification, or it is malformed.
        """
        if index >= len(self.classes) or index >= len(self.decisions) or not self.classes[index]:
            raise DataError(f"Processed frame {index + 1} of an instance has no classification.")
        best = self.classes[index][0]
        try:
            label, score = str(best["label"]), float(best["score"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"The classification of processed frame {index + 1} is malformed.") from exc
        if not label or not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise DataError(f"The classification of processed frame {index + 1} is not a label and a probability.")
        return label, score, bool(self.decisions[index])

    def heatmap(self, index: int) -> np.ndarray | None:
        """The class activation map of processed frame ``index``, or ``None`` when it was not computed."""
        if self.heatmaps is None or index >= len(self.heatmaps):
            return None
        return np.asarray(self.heatmaps[index])


def threshold_parameter(threshold: float) -> str:
    """The algorithm parameter stating a decision threshold (TID 4019 *Algorithm Parameters*).

    Examples
    --------
    >>> threshold_parameter(0.4213)
    'decision threshold 0.4213: Present when the calibrated probability is at or above it'
    """
    return f"decision threshold {threshold:.4f}: Present when the calibrated probability is at or above it"
