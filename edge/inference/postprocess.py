"""Model outputs to results: label masks at input resolution and boxes.

Vectorised numpy throughout. Used by the daemon and by the trainer's
evaluation, so what is measured offline is what is served.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from edge.inference.manifest import Postprocessing
from edge.inference.preprocess import Geometry, resize_float, resize_nearest
from edge.types import Box

__all__ = ["segmentation_mask", "upsample_threshold", "decode_detections", "nms", "box_iou"]


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
        if geom.src_h >= nh and geom.src_w >= nw:
            return upsample_threshold(region, geom.src_h, geom.src_w, cut)
        up = resize_float(region, geom.src_h, geom.src_w)  # shrinking: antialiased, as ever
        return (up > cut).view(np.uint8)
    labels = np.argmax(logits[:, top : top + nh, left : left + nw], axis=0).astype(np.uint8)
    return resize_nearest(labels, geom.src_h, geom.src_w)


_MAX_EDGE_FRACTION = 0.03  # above this share of edge pixels the full float resize is cheaper


@functools.lru_cache(maxsize=64)
def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel bilinear taps along one axis, edge-clamped (Pillow's BILINEAR when enlarging).

    Returns ``(cell, lo, hi, frac)`` per output index: the padded cell index
    (``floor(pos) + 1``), the two source taps and the weight of ``hi``.
    """
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(pos).astype(np.intp)
    taps = (i0 + 1, np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1), pos - i0)
    for a in taps:
        a.setflags(write=False)
    return taps


def upsample_threshold(plane: np.ndarray, height: int, width: int, cut: np.float32) -> np.ndarray:
    """``bilinear_resize(plane) > cut`` as a uint8 0/1 mask, interpolating only where it matters.

    Enlarging only (``height >= plane rows``, ``width >= plane columns``).
    Where the four source pixels around an output pixel are all above (or all
    at or below) ``cut``, so is their bilinear blend: those pixels are filled
    from the low-resolution decision. Only output pixels whose neighbours
    disagree (the mask's edge) are interpolated, in the order Pillow uses
    (rows, then columns, float32 in between), so the mask equals thresholding
    ``resize_float``'s output. A 192x256 -> 480x640 lesion mask takes about
    a fifth of the full float resize; when edges are everywhere (more than
    3 % of the output, e.g. noise) the full resize is used instead.
    """
    h, w = plane.shape
    if height < h or width < w:
        raise ValueError(f"upsample_threshold enlarges only ({h}x{w} -> {height}x{width}).")
    if (h, w) == (height, width):
        return (plane > cut).view(np.uint8)  # a fresh 0/1 array; the view saves a second pass
    out = np.zeros((height, width), np.uint8)
    padded = np.pad(plane > cut, 1, mode="edge")
    q00, q10, q01, q11 = padded[:-1, :-1], padded[1:, :-1], padded[:-1, 1:], padded[1:, 1:]
    every = q00 & q10 & q01 & q11
    some = q00 | q10 | q01 | q11
    if not some.any():
        return out
    cy, ly, hy, fy = _bilinear_taps(h, height)
    cx, lx, hx, fx = _bilinear_taps(w, width)
    rows, cols = np.flatnonzero(some.any(axis=1)), np.flatnonzero(some.any(axis=0))
    y0, y1 = int(np.searchsorted(cy, rows[0])), int(np.searchsorted(cy, rows[-1], "right"))
    x0, x1 = int(np.searchsorted(cx, cols[0])), int(np.searchsorted(cx, cols[-1], "right"))
    state = every.view(np.uint8) + some.view(np.uint8)  # 0: all below, 1: mixed, 2: all above
    mixed = int(np.count_nonzero(some)) - int(np.count_nonzero(every))
    if mixed * (height / h) * (width / w) > _MAX_EDGE_FRACTION * height * width:
        # an edge everywhere (noise): per-pixel interpolation would cost more than the full resize
        out[...] = resize_float(plane, height, width) > cut
        return out
    cells = state.take(cy[y0:y1], axis=0).take(cx[x0:x1], axis=1)
    np.equal(cells, 2, out=out[y0:y1, x0:x1].view(bool))
    ys, xs = np.nonzero(cells == 1)
    if ys.size:
        ys += y0
        xs += x0
        src = plane.astype(np.float64, copy=False)
        wx = fx[xs]
        upper = (src[ly[ys], lx[xs]] * (1.0 - wx) + src[ly[ys], hx[xs]] * wx).astype(np.float32)
        lower = (src[hy[ys], lx[xs]] * (1.0 - wx) + src[hy[ys], hx[xs]] * wx).astype(np.float32)
        wy = fy[ys]
        value = (upper.astype(np.float64) * (1.0 - wy) + lower.astype(np.float64) * wy).astype(np.float32)
        out[ys, xs] = value > cut
    return out


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
