"""Model outputs to results: label masks, probability maps, boxes and classes at input resolution.

Vectorised numpy throughout. Used by the daemon and by the trainer's
evaluation, so what is measured offline is what is served.

The maps a request asks for (``want``) are uint8 ``[H, W]`` at the source
image's resolution, 0..255 = ``round(255 * p)``, the letterbox padding cut
away before resizing:

* :func:`segmentation_probability`: ``p`` is the model's foreground
  probability per pixel, the sigmoid of the same bilinearly resized logits
  the mask thresholds (one channel: ``mask == 1`` exactly where
  ``p > threshold`` before rounding, so an overlay of both agrees on every
  pixel; it costs the float resize, about 8 ms for 480x640 on a 2-vCPU VM).
* :func:`class_heatmap`: ``p`` is the class activation map on the
  calibrated probability scale: each feature cell's local logit (``cam``,
  shifted so its spatial mean is the image's logit) through the same
  temperature and sigmoid/softmax as the score, quantised at feature
  resolution and enlarged bilinearly. A fixed scale, not min-max: a frame
  the model finds negative stays dark, and maps of two frames compare.

Examples
--------
>>> import numpy as np
>>> from edge.inference.manifest import Postprocessing
>>> classes, decision, top = classify(np.array([2.0]), ("nodule",), Postprocessing(threshold=0.5, temperature=2.0))
>>> [(c.label, round(c.score, 3)) for c in classes], decision, top
([('nodule', 0.731)], True, 0)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from edge.errors import ModelError
from edge.inference.manifest import Postprocessing
from edge.inference.preprocess import Geometry, resize_float, resize_linear, resize_nearest
from edge.types import Box, ClassScore

__all__ = [
    "segmentation_mask",
    "segmentation_probability",
    "decode_detections",
    "nms",
    "box_iou",
    "calibrated_probabilities",
    "classify",
    "class_heatmap",
]


def _region(h: int, w: int, geom: Geometry) -> tuple[slice, slice]:
    """Rows and columns of an ``h`` x ``w`` output plane that cover the source image (not the padding)."""
    sy, sx = h / geom.dst_h, w / geom.dst_w
    top, left = int(round(geom.top * sy)), int(round(geom.left * sx))
    nh, nw = max(1, int(round(geom.new_h * sy))), max(1, int(round(geom.new_w * sx)))
    return slice(top, top + nh), slice(left, left + nw)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function without overflow (``tanh`` form), same dtype as ``z``."""
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def _softmax(z: np.ndarray, axis: int = 0) -> np.ndarray:
    """Softmax along ``axis``, shifted by the maximum (no overflow)."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _to_uint8(p: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 ``round(255 * p)`` (``p`` itself is left as it is)."""
    q = np.multiply(p, np.float32(255.0), dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, 0.0, 255.0, out=q)
    return q.astype(np.uint8)


def _resize_uint8(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 map (Pillow, mode ``L``; antialiased when shrinking).

    A class activation map is quantised to 0..255 at feature resolution and
    then enlarged: Pillow's 8-bit resampling is about four times faster than
    its float one (measured 1.4 against 5.8 ms for 16x16 to 512x512 on a
    2-vCPU VM), at a cost of at most one level.
    """
    if plane.shape == (height, width):
        return plane
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.uint8))
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)


def segmentation_mask(logits: np.ndarray, geom: Geometry, threshold: float) -> np.ndarray:
    """Label mask (uint8, ``src_h`` x ``src_w``) from one image's logits ``[C, h, w]``.

    One channel: sigmoid probability above ``threshold`` is label 1 (the test
    is done on the logit, so no exponentials). Several channels: channel 0 is
    background and the argmax is the label value.
    """
    c, h, w = logits.shape
    rows, cols = _region(h, w, geom)
    if c == 1:
        t = min(max(threshold, 1e-6), 1 - 1e-6)
        cut = np.float32(math.log(t / (1.0 - t)))
        region = logits[0, rows, cols]
        nh, nw = region.shape
        if geom.src_h >= nh and geom.src_w >= nw:  # enlarging: Pillow's bilinear, through OpenCV
            up = resize_linear(region, geom.src_h, geom.src_w)
        else:
            up = resize_float(region, geom.src_h, geom.src_w)  # shrinking: antialiased, as ever
        return np.greater(up, cut).view(np.uint8)
    labels = np.argmax(logits[:, rows, cols], axis=0).astype(np.uint8)
    return resize_nearest(labels, geom.src_h, geom.src_w)


def segmentation_probability(logits: np.ndarray, geom: Geometry) -> np.ndarray:
    """Foreground probability map (uint8 0..255, ``src_h`` x ``src_w``) from one image's logits ``[C, h, w]``.

    One channel: ``sigmoid`` of the bilinearly resized logits, the values
    the mask is thresholded on. Several channels: ``1 - softmax[0]`` (any
    label but background; the mask is an argmax there) at the logits'
    resolution, then resized.
    """
    c, h, w = logits.shape
    rows, cols = _region(h, w, geom)
    if c == 1:
        p = _sigmoid(resize_float(logits[0, rows, cols], geom.src_h, geom.src_w))
    else:
        region = np.asarray(logits[:, rows, cols], dtype=np.float32)
        p = resize_float(1.0 - _softmax(region, axis=0)[0], geom.src_h, geom.src_w)
    return _to_uint8(p)


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


def calibrated_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``[K]`` (float64) of one image's logits ``[K]``.

    One logit: ``sigmoid(logit / T)``, the probability of the one label.
    Several: ``softmax(logits / T)`` over the labels.

    Examples
    --------
    >>> calibrated_probabilities(np.array([0.0]), 2.0).tolist(), calibrated_probabilities(np.zeros(2), 1.0).tolist()
    ([0.5], [0.5, 0.5])
    """
    z = np.asarray(logits, dtype=np.float64).reshape(-1) / float(temperature)
    return _sigmoid(z) if z.size == 1 else _softmax(z)


def classify(
    logits: np.ndarray, labels: Sequence[str], post: Postprocessing
) -> tuple[list[ClassScore], bool, int]:
    """``(classes, decision, top)`` of one image's logits ``[K]``.

    ``classes``: every label with its calibrated probability, best first
    (ties in label order); one label (``K = 1``) gives one entry, its
    sigmoid probability. ``decision``: ``classes[0].score >= post.threshold``
    (for one label: the finding is called present). ``top``: the index of
    ``classes[0]`` in ``labels``.

    Raises
    ------
    ModelError
        The model gives a different number of logits than it has labels.
    """
    z = np.asarray(logits).reshape(-1)
    if z.size != len(labels):
        raise ModelError(f"The model gives {z.size} logits for {len(labels)} labels; its manifest does not match it.")
    p = calibrated_probabilities(z, post.temperature or 1.0)
    order = np.argsort(-p, kind="stable")
    classes = [ClassScore(labels[int(i)], float(p[i])) for i in order]
    top = int(order[0])
    return classes, bool(p[top] >= post.threshold), top


def class_heatmap(
    cam: np.ndarray, logits: np.ndarray, index: int, geom: Geometry, temperature: float
) -> np.ndarray:
    """Class activation map of label ``index`` (uint8 0..255, ``src_h`` x ``src_w``).

    Parameters
    ----------
    cam : numpy.ndarray
        ``[K, h, w]``: per feature cell, the head applied to that cell's
        features (a local logit; global average pooling of it is the logit).
    logits : numpy.ndarray
        ``[K]``, the image's logits.
    index : int
        The label to map (the top class, :func:`classify`).
    geom : Geometry
        Where the source image sits in the model input.
    temperature : float
        The manifest's calibration temperature.

    Each channel is shifted so its spatial mean equals its logit (a no-op
    for a head whose ``cam`` carries the bias), passed through the
    score's temperature and sigmoid (one label) or softmax (several), cut to
    the image (without the letterbox padding), quantised to 0..255 and
    resized bilinearly (8-bit: at most one level from resizing the floats).
    """
    local = np.asarray(cam, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    local = (local + (z - local.mean(axis=(1, 2)))[:, None, None]) / float(temperature)
    rows, cols = _region(local.shape[1], local.shape[2], geom)
    region = local[:, rows, cols]
    p = _sigmoid(region[0]) if region.shape[0] == 1 else _softmax(region, axis=0)[index]
    return _resize_uint8(_to_uint8(p), geom.src_h, geom.src_w)
