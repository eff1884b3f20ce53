"""Detection outputs to boxes: CenterNet heatmap peaks, box decoding, class-aware greedy NMS.

:func:`decode_detections` turns one image's ``heatmap``, ``size`` and
``offset`` into boxes (:class:`~edge.types.Box`) in source pixels. Two
paths give the same boxes, bit for bit, in the same order:

* **a few peaks** (the usual frame: a handful of cells at or above the
  threshold, two to four peaks among them): the cells' 3x3 windows are
  gathered through a cached table of neighbour indices, and the peaks are
  sorted, decoded and suppressed in Python floats. The arithmetic is the
  vectorised path's, operation for operation, in IEEE double (a box's half
  size is float32 arithmetic there, and ``max(size, 1) / 2`` is exact in
  either); what it saves is numpy's fixed cost per call, which the daemon
  pays two to four times over right after an inference has evicted the
  caches;
* **many peaks** (a low threshold, an evaluation sweep): a 3x3 maximum
  filter over the planes, a partial top-k and one pairwise IoU matrix.

``tests/edge/test_detection_fast_path.py`` holds the two paths (and the
decoder as it was before the split) to equal outputs on random heatmaps
with ties, plateaus, NaN and infinities.
"""

from __future__ import annotations

import functools
from typing import Sequence

import cv2
import numpy as np

from edge.inference.manifest import Postprocessing
from edge.inference.preprocess import Geometry
from edge.types import Box

__all__ = ["box_iou", "nms", "decode_detections"]

#: At most this many cells at or above the threshold: tested through :func:`_window_table`, not a maximum filter.
_FEW_CANDIDATES = 48
#: Planes of at most this many cells get a cached window table (9 indices a cell: 1.2 MB at 128x128).
_TABLE_CELLS = 128 * 128
#: At most this many peaks: decoded and suppressed in Python floats (their pairwise IoU is cheaper one by one).
_FEW_PEAKS = 12
#: The dtypes whose values ``tolist`` turns into Python floats exactly (the few-peaks path's inputs).
_PLAIN_FLOATS = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))

_NEIGHBOURS = np.array([-1, 0, 1], dtype=np.intp)
_KERNEL_3X3 = np.ones((3, 3), dtype=np.uint8)


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
    if order.size <= 1:
        return order.astype(np.intp)
    b = np.asarray(boxes, dtype=np.float64)[order]
    return order[_suppress(b, None, iou)].astype(np.intp)


# ------------------------------------------------------------------ peaks
@functools.lru_cache(maxsize=4)
def _window_table(h: int, w: int) -> np.ndarray:
    """``[h * w, 9]`` flat indices of each cell's 3x3 window in an ``h`` x ``w`` plane, clamped to it (read-only).

    A neighbour outside the plane is clamped onto a cell of the same window
    (the cell itself or a neighbour already listed), so a cell is ``>=``
    every entry of its row exactly when it is ``>=`` its in-plane neighbours.
    """
    ny = np.clip(np.arange(h, dtype=np.intp)[:, None] + _NEIGHBOURS, 0, h - 1)  # [h, 3]
    nx = np.clip(np.arange(w, dtype=np.intp)[:, None] + _NEIGHBOURS, 0, w - 1)  # [w, 3]
    table = (ny[:, None, :, None] * w + nx[None, :, None, :]).reshape(h * w, 9)
    table.setflags(write=False)
    return table


def _is_peak_tabled(heatmap: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Whether each flat index ``idx`` of ``[K, h, w]`` is ``>=`` each of its in-plane 3x3 neighbours (a NaN: no)."""
    k, h, w = heatmap.shape
    flat = heatmap.reshape(-1)
    table = _window_table(h, w)
    if k == 1:
        window = flat[table[idx]]
    else:
        plane, cell = np.divmod(idx, h * w)
        window = flat[table[cell] + (plane * (h * w))[:, None]]
    return (flat[idx][:, None] >= window).all(axis=1)


def _window_max(heatmap: np.ndarray) -> np.ndarray:
    """Maximum over each cell's 3x3 window (cells outside the plane left out) of a float32 ``[K, h, w]``.

    ``cv2.dilate`` with a 3x3 kernel: its default border is ignored by
    the maximum. It selects values (no arithmetic), but is only used on maps
    without NaN, where the order of its comparisons cannot matter.
    """
    planes = [cv2.dilate(np.ascontiguousarray(plane), _KERNEL_3X3) for plane in heatmap]
    return planes[0] if len(planes) == 1 else np.stack(planes)


def _is_peak_gathered(heatmap: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Whether each flat index ``idx`` of ``[K, h, w]`` is ``>=`` each of its in-plane 3x3 neighbours.

    For planes too large for a cached :func:`_window_table` (any dtype, NaN
    included): the neighbours' row and column are clamped to the plane, as
    the table's are.
    """
    _, h, w = heatmap.shape
    flat = heatmap.reshape(-1)
    rows, xs = np.divmod(idx, w)  # rows: plane * h + y
    ys = rows % h
    ny = np.minimum(np.maximum(ys[:, None] + _NEIGHBOURS, 0), h - 1) + (rows - ys)[:, None]
    nx = np.minimum(np.maximum(xs[:, None] + _NEIGHBOURS, 0), w - 1)
    window = flat[(ny[:, :, None] * w + nx[:, None, :]).reshape(idx.size, 9)]
    return (flat[idx][:, None] >= window).all(axis=1)


def _peak_candidates(heatmap: np.ndarray, threshold: float) -> np.ndarray:
    """Flat indices (ascending) of the 3x3 local maxima of ``[K, h, w]`` scoring ``>= threshold``.

    A cell is a peak when it is ``>=`` each of its (up to eight) in-plane
    neighbours, so every cell of a plateau is one, and a cell next to a NaN
    is none. Only the cells at or above the threshold are tested: a few
    through the cached window table, many against a 3x3 maximum filter when
    the map is float32 without NaN (its maximum, which propagates NaN, says
    so), else against their gathered neighbours.
    """
    flat = heatmap.reshape(-1)
    idx = (flat >= threshold).nonzero()[0]
    if idx.size == 0:
        return idx
    _, h, w = heatmap.shape
    if idx.size <= _FEW_CANDIDATES and h * w <= _TABLE_CELLS:
        return idx[_is_peak_tabled(heatmap, idx)]
    if heatmap.dtype == np.float32 and not np.isnan(flat.max()):
        return idx[flat[idx] >= _window_max(heatmap).reshape(-1)[idx]]
    return idx[_is_peak_gathered(heatmap, idx)]


# ------------------------------------------------------------------ many peaks (vectorised)
def _top_candidates(scores: np.ndarray, limit: int) -> np.ndarray:
    """Positions of the ``limit`` best ``scores``, best first, ties in position order.

    The same order as ``np.argsort(-scores, kind="stable")[:limit]``: a
    partition finds the ``limit``-th best score, and only the scores at or
    above it (ties at the cut included) are sorted.
    """
    if scores.size > limit > 0:
        cut = -np.partition(-scores, limit - 1)[limit - 1]
        pos = np.flatnonzero(scores >= cut)
        return pos[np.argsort(-scores[pos], kind="stable")[:limit]]
    return np.argsort(-scores, kind="stable")[:limit]


def _suppress(boxes: np.ndarray, classes: np.ndarray | None, iou: float) -> np.ndarray:
    """Greedy NMS of ``[n, 4]`` float64 boxes already in score order: the positions kept, in order.

    A box is suppressed by a kept, better box whose IoU with it is above
    ``iou`` and, when ``classes`` (``[n]``) is given, of the same class.
    """
    n = boxes.shape[0]
    if n <= 1:
        return np.arange(n)
    lo = np.maximum(boxes[:, None, :2], boxes[None, :, :2])  # [n, n, (x, y)]
    wh = np.maximum(np.minimum(boxes[:, None, 2:], boxes[None, :, 2:]) - lo, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    side = boxes[:, 2:] - boxes[:, :2]
    area = side[:, 0] * side[:, 1]
    over = inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9) > iou
    if classes is not None:
        over &= classes[:, None] == classes[None, :]
    suppressed = np.zeros(n, dtype=bool)
    for i in range(n - 1):
        if not suppressed[i]:
            suppressed[i + 1 :] |= over[i, i + 1 :]
    return np.flatnonzero(~suppressed)


def _decode_boxes(
    cells: np.ndarray, w: int, size: np.ndarray, offset: np.ndarray, geom: Geometry, stride: int
) -> np.ndarray:
    """``[n, 4]`` float64 boxes (x0, y0, x1, y1) in source pixels, clipped to the image, of heatmap cells.

    The centre is ``(cell + offset) * stride`` in model-input pixels, the
    width and height at least one pixel; corners are mapped as
    :meth:`Geometry.to_source` maps them.
    """
    ys, xs = np.divmod(cells, w)
    centre = (np.array([xs, ys]) + offset.reshape(2, -1)[:, cells]) * stride  # [2, n] float64
    half = np.maximum(size.reshape(2, -1)[:, cells], 1.0) / 2
    corners = np.array([centre - half, centre + half]).reshape(4, -1)  # x0, y0, x1, y1
    g = np.array(
        [
            [geom.left, geom.top, geom.left, geom.top],
            [geom.src_w / geom.new_w, geom.src_h / geom.new_h] * 2,
            [geom.src_w, geom.src_h, geom.src_w, geom.src_h],
        ],
        dtype=np.float64,
    )[:, :, None]  # shift, scale, bound of (x0, y0, x1, y1)
    return np.minimum(np.maximum((corners - g[0]) * g[1], 0.0), g[2]).T


def _decode_many(
    heatmap: np.ndarray,
    peaks: np.ndarray,
    size: np.ndarray,
    offset: np.ndarray,
    geom: Geometry,
    post: Postprocessing,
    labels: Sequence[str],
    limit: int,
) -> list[Box]:
    """The vectorised path of :func:`decode_detections` (any number of peaks, any dtypes)."""
    scores = heatmap.reshape(-1)[peaks]
    top = _top_candidates(scores, limit)
    peaks, scores = peaks[top], scores[top]
    k, h, w = heatmap.shape
    classes, cells = np.divmod(peaks, h * w) if k > 1 else (None, peaks)
    boxes = _decode_boxes(cells, w, size, offset, geom, post.stride)
    kept = _suppress(boxes, classes, post.nms_iou)[: post.max_detections]
    names = [labels[0]] * kept.size if classes is None else [labels[c] for c in classes[kept].tolist()]
    return [Box(name, s, *b) for name, s, b in zip(names, scores[kept].tolist(), boxes[kept].tolist())]


# ------------------------------------------------------------------ a few peaks (Python floats)
def _clip(v: float, bound: float) -> float:
    """``np.minimum(np.maximum(v, 0.0), bound)`` of one float (NaN stays NaN)."""
    return 0.0 if v < 0.0 else (bound if v > bound else v)


def _nan_max(a: float, b: float) -> float:
    """``np.maximum`` of two floats: NaN if either is."""
    return a if a >= b or a != a else b


def _nan_min(a: float, b: float) -> float:
    """``np.minimum`` of two floats: NaN if either is."""
    return a if a <= b or a != a else b


def _iou_one(a: tuple[float, ...], area_a: float, b: tuple[float, ...], area_b: float) -> float:
    """IoU of box ``a`` (the better one) with ``b`` in :func:`_suppress`'s operations and order."""
    wx = _nan_min(a[2], b[2]) - _nan_max(a[0], b[0])
    wy = _nan_min(a[3], b[3]) - _nan_max(a[1], b[1])
    inter = (0.0 if wx < 0.0 else wx) * (0.0 if wy < 0.0 else wy)
    union = area_a + area_b - inter
    return inter / (1e-9 if union < 1e-9 else union)


def _suppress_few(boxes: list[tuple[float, ...]], classes: list[int] | None, iou: float, limit: int) -> list[int]:
    """:func:`_suppress` one box at a time, stopping at ``limit`` kept boxes (``limit >= 1``).

    Whether a box survives depends only on the kept boxes before it, so the
    first ``limit`` kept are :func:`_suppress`'s first ``limit``.
    """
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
    alive = [True] * len(boxes)
    kept: list[int] = []
    for i, box in enumerate(boxes):
        if not alive[i]:
            continue
        kept.append(i)
        if len(kept) == limit:
            break
        for j in range(i + 1, len(boxes)):
            if alive[j] and (classes is None or classes[j] == classes[i]):
                alive[j] = not _iou_one(box, areas[i], boxes[j], areas[j]) > iou
    return kept


def _box_few(x: int, y: int, off: tuple[float, float], wh: tuple[float, float], g: tuple[float, ...]) -> tuple:
    """One cell's box as :func:`_decode_boxes` computes it: the same float64 operations, in the same order.

    ``g`` is (stride, left, top, x scale, y scale, width, height) as floats.
    The half size ``max(s, 1) / 2`` is float32 arithmetic there and exact in
    either precision (``s >= 1``); NaN stays NaN, as ``np.maximum`` keeps it.
    """
    stride, left, top, sx, sy, bx, by = g
    cx, cy = (x + off[0]) * stride, (y + off[1]) * stride
    hx, hy = (1.0 if wh[0] < 1.0 else wh[0]) / 2, (1.0 if wh[1] < 1.0 else wh[1]) / 2
    return (
        _clip((cx - hx - left) * sx, bx),
        _clip((cy - hy - top) * sy, by),
        _clip((cx + hx - left) * sx, bx),
        _clip((cy + hy - top) * sy, by),
    )


def _geometry_floats(geom: Geometry, stride: float) -> tuple[float, ...]:
    """(stride, left, top, x scale, y scale, width, height): the float64 values numpy computes with.

    :func:`_decode_boxes` multiplies float64 centres by the stride and puts
    the shift, scale and bounds in one float64 array before any arithmetic.
    """
    return (
        float(stride),
        float(geom.left),
        float(geom.top),
        float(geom.src_w / geom.new_w),
        float(geom.src_h / geom.new_h),
        float(geom.src_w),
        float(geom.src_h),
    )


def _decode_few(
    heatmap: np.ndarray,
    peaks: np.ndarray,
    size: np.ndarray,
    offset: np.ndarray,
    geom: Geometry,
    post: Postprocessing,
    labels: Sequence[str],
    limit: int,
) -> list[Box]:
    """:func:`_decode_many` for a few peaks, in Python floats: the same boxes, bit for bit."""
    k, h, w = heatmap.shape
    cells = peaks if k == 1 else peaks % (h * w)
    scores = heatmap.reshape(-1)[peaks].tolist()
    ox, oy = offset.reshape(2, -1)[:, cells].tolist()
    sw, sh = size.reshape(2, -1)[:, cells].tolist()
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:limit]  # stable, as argsort's
    g = _geometry_floats(geom, post.stride)
    cell_list = cells.tolist()
    boxes = []
    for i in order:
        y, x = divmod(cell_list[i], w)
        boxes.append(_box_few(x, y, (ox[i], oy[i]), (sw[i], sh[i]), g))
    classes = None if k == 1 else [peaks.item(i) // (h * w) for i in order]
    kept = _suppress_few(boxes, classes, float(post.nms_iou), post.max_detections)
    names = [labels[0]] * len(kept) if classes is None else [labels[classes[j]] for j in kept]
    return [Box(name, scores[order[j]], *boxes[j]) for name, j in zip(names, kept)]


def _plain_inputs(heatmap: np.ndarray, size: np.ndarray, offset: np.ndarray, post: Postprocessing) -> bool:
    """Whether :func:`_decode_few` computes exactly what :func:`_decode_many` does for these inputs."""
    return (
        heatmap.dtype in _PLAIN_FLOATS
        and size.dtype in _PLAIN_FLOATS
        and offset.dtype in _PLAIN_FLOATS
        and type(post.max_detections) is int
        and post.max_detections >= 1
    )


def decode_detections(
    heatmap: np.ndarray,
    size: np.ndarray,
    offset: np.ndarray,
    geom: Geometry,
    post: Postprocessing,
    labels: Sequence[str],
    threshold: float | None = None,
) -> list[Box]:
    """Boxes in source pixels from one image's CenterNet outputs, best score first.

    ``heatmap`` is ``[K, h, w]`` probabilities, ``size`` and ``offset`` are
    ``[2, h, w]`` (width/height in model-input pixels; sub-cell x/y offset).
    ``threshold`` overrides the manifest's score threshold (evaluation
    sweeps it for FROC).

    Peaks are 3x3 local maxima at or above the threshold; the best
    ``4 * max_detections`` of them (ties in class, row, column order) are
    decoded, suppressed per class (greedy NMS at ``nms_iou``) and the best
    ``max_detections`` kept. A few peaks take the Python-float path (about
    25 us warm for the bundled detector's typical frame, three peaks in a
    64x64 heatmap, on a 2-vCPU AMD EPYC, against 75 us vectorised), many the
    vectorised one; both give the same boxes.
    """
    thr = post.threshold if threshold is None else threshold
    peaks = _peak_candidates(heatmap, thr)
    if peaks.size == 0:
        return []
    limit = max(post.max_detections * 4, post.max_detections)
    if peaks.size <= _FEW_PEAKS and _plain_inputs(heatmap, size, offset, post):
        return _decode_few(heatmap, peaks, size, offset, geom, post, labels, limit)
    return _decode_many(heatmap, peaks, size, offset, geom, post, labels, limit)
