"""Model outputs to results: label masks at input resolution and boxes.

Vectorised numpy throughout. Used by the daemon and by the trainer's
evaluation, so what is measured offline is what is served.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from edge.manifest import Postprocessing
from edge.preprocess import Geometry, resize_float, resize_nearest

__all__ = ["Box", "segmentation_mask", "decode_detections", "nms", "box_iou"]


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
        """JSON-ready dict with rounded coordinates."""
        d = asdict(self)
        for k in ("x0", "y0", "x1", "y1"):
            d[k] = round(float(d[k]), 2)
        d["score"] = round(float(d["score"]), 4)
        return d


def segmentation_mask(logits: np.ndarray, geom: Geometry, threshold: float) -> np.ndarray:
    """Label mask (uint8, ``src_h`` x ``src_w``) from one image's logits ``[C, h, w]``.

    One channel: sigmoid probability above ``threshold`` is label 1 (the test
    is done on the logit, so no exponentials). Several channels: channel 0 is
    background and the argmax is the label value.
    """
    c, h, w = logits.shape
    sy, sx = h / geom.dst_h, w / geom.dst_w
    top, left = int(round(geom.top * sy)), int(round(geom.left * sx))
    nh, nw = max(1, int(round(geom.new_h * sy))), max(1, int(round(geom.new_w * sx)))
    if c == 1:
        t = min(max(threshold, 1e-6), 1 - 1e-6)
        cut = np.float32(math.log(t / (1.0 - t)))
        region = logits[0, top : top + nh, left : left + nw]
        up = resize_float(region, geom.src_h, geom.src_w)
        return (up > cut).view(np.uint8)  # a fresh 0/1 array; the view saves a second pass
    labels = np.argmax(logits[:, top : top + nh, left : left + nw], axis=0).astype(np.uint8)
    return resize_nearest(labels, geom.src_h, geom.src_w)


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one ``[4]`` box (x0, y0, x1, y1) with ``[N, 4]`` boxes."""
    ix0 = np.maximum(box[0], others[:, 0])
    iy0 = np.maximum(box[1], others[:, 1])
    ix1 = np.minimum(box[2], others[:, 2])
    iy1 = np.minimum(box[3], others[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first.

    The pairwise IoU matrix is computed once (the daemon calls this per
    frame; candidates are capped upstream, so the matrix is small).
    """
    order = np.argsort(-scores, kind="stable")
    n = order.size
    if n <= 1:
        return order.astype(np.intp)
    b = np.asarray(boxes, dtype=np.float64)[order]
    ix0 = np.maximum(b[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(b[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(b[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(b[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    ious = inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)
    suppressed = np.zeros(n, dtype=bool)
    for i in range(n):
        if not suppressed[i]:
            suppressed[i + 1 :] |= ious[i, i + 1 :] > iou
    return order[~suppressed].astype(np.intp)


def _peaks(heatmap: np.ndarray) -> np.ndarray:
    """Boolean mask of 3x3 local maxima of ``[K, h, w]``."""
    padded = np.pad(heatmap, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = heatmap.shape[1:]
    is_max = np.ones(heatmap.shape, dtype=bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == 1 and dx == 1:
                continue
            is_max &= heatmap >= padded[:, dy : dy + h, dx : dx + w]
    return is_max


def decode_detections(
    heatmap: np.ndarray,
    size: np.ndarray,
    offset: np.ndarray,
    geom: Geometry,
    post: Postprocessing,
    labels: Sequence[str],
    threshold: float | None = None,
) -> list[Box]:
    """Boxes in source pixels from one image's CenterNet outputs.

    ``heatmap`` is ``[K, h, w]`` probabilities, ``size`` and ``offset`` are
    ``[2, h, w]`` (width/height in model-input pixels; sub-cell x/y offset).
    ``threshold`` overrides the manifest's score threshold (evaluation
    sweeps it for FROC).
    """
    thr = post.threshold if threshold is None else threshold
    cand = _peaks(heatmap) & (heatmap >= thr)
    k, ys, xs = np.nonzero(cand)
    if k.size == 0:
        return []
    scores = heatmap[k, ys, xs]
    top = np.argsort(-scores, kind="stable")[: max(post.max_detections * 4, post.max_detections)]
    k, ys, xs, scores = k[top], ys[top], xs[top], scores[top]
    cx = (xs + offset[0, ys, xs]) * post.stride
    cy = (ys + offset[1, ys, xs]) * post.stride
    bw = np.maximum(size[0, ys, xs], 1.0)
    bh = np.maximum(size[1, ys, xs], 1.0)
    x0, y0 = geom.to_source(cx - bw / 2, cy - bh / 2)
    x1, y1 = geom.to_source(cx + bw / 2, cy + bh / 2)
    boxes = np.stack(
        [
            np.clip(x0, 0, geom.src_w),
            np.clip(y0, 0, geom.src_h),
            np.clip(x1, 0, geom.src_w),
            np.clip(y1, 0, geom.src_h),
        ],
        axis=1,
    )
    out: list[Box] = []
    for cls in np.unique(k):
        idx = np.nonzero(k == cls)[0]
        kept = idx[nms(boxes[idx], scores[idx], post.nms_iou)]
        out.extend(
            Box(labels[int(cls)], float(scores[i]), *map(float, boxes[i])) for i in kept
        )
    out.sort(key=lambda b: -b.score)
    return out[: post.max_detections]
