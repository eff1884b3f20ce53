"""Model outputs to results: label masks, probability maps, boxes and classes at input resolution.

Vectorised numpy throughout. Used by the daemon and by the trainer's
evaluation, so what is measured offline is what is served. Boxes come from
:mod:`edge.inference.detection` (:func:`decode_detections`, :func:`nms` and
:func:`box_iou` are re-exported here, where the daemon and trainer import them).

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
from edge.inference.detection import box_iou, decode_detections, nms
from edge.inference.manifest import Postprocessing
from edge.inference.preprocess import Geometry, resize_float, resize_linear, resize_nearest
from edge.types import ClassScore

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
        if (geom.src_h, geom.src_w) == (nh, nw):  # the model's size: threshold the logits themselves
            return np.greater(region, cut).view(np.uint8)
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


def class_heatmap(cam: np.ndarray, score: float, index: int, geom: Geometry) -> np.ndarray:
    """Class activation map of label ``index`` (uint8 0..255, ``src_h`` x ``src_w``), scaled by the score.

    Parameters
    ----------
    cam : numpy.ndarray
        ``[K, h, w]``: per feature cell, the head applied to that cell's
        features (a local logit; global average pooling of it is the logit).
    score : float
        The image's calibrated probability of label ``index`` (``classes``).
    index : int
        The label to map (the top class, :func:`classify`).
    geom : Geometry
        Where the source image sits in the model input.

    The label's map is cut to the image (without the letterbox padding),
    stretched to 0..1 within the image (Zhou et al.'s normalisation: the
    hottest cell is 1) and multiplied by ``score``, so the hottest cell reads
    ``255 * score``: a frame the model finds negative stays dark, a positive
    one shows where its evidence lies. Local logits themselves are not used as
    a scale: a trained head's cells reach +-100 on the logit scale, where any
    sigmoid saturates and the hottest region is lost. A flat map is all
    ``255 * score``. Resized bilinearly (8-bit), then stretched back when
    the resampling lowered the peak (a frame smaller than the map averages
    it away), so the hottest point reads ``255 * score`` at every size.
    """
    rows, cols = _region(cam.shape[1], cam.shape[2], geom)
    region = np.asarray(cam[index, rows, cols], dtype=np.float64)
    lo, hi = float(region.min()), float(region.max())
    rel = (region - lo) / (hi - lo) if hi > lo and np.isfinite(hi - lo) else np.ones_like(region)
    cells = _to_uint8(rel * min(max(float(score), 0.0), 1.0))
    out = _resize_uint8(cells, geom.src_h, geom.src_w)
    peak, got = int(cells.max()), int(out.max())
    if 0 < got != peak:  # resampling missed the hottest cell's centre, or averaged it away (a frame smaller than
        # the map): stretch back so the hottest point reads 255 * score, as documented
        gain = np.float32(peak / got)
        out = np.clip(np.rint(np.multiply(out, gain, dtype=np.float32)), 0, 255).astype(np.uint8)
    return out
