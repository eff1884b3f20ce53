"""The detection decoder's two paths give today's boxes bit for bit (:mod:`edge.inference.detection`).

:func:`reference_decode` below is the vectorised decoder as it stood before
the few-peaks path was added (copied verbatim from
``edge/inference/postprocess.py``, names prefixed ``_ref``). The decoder
must give exactly its boxes: same labels, same order, and the same float64
values bit for bit (``float.hex``: the sign of zero and NaN included), for
heatmaps with ties, plateaus, NaN and infinities, several classes, float16,
float32 and float64 outputs (NaN and infinities in ``size`` and ``offset``
too), letterboxed and stretched geometry, and peak counts on both sides of
every cut-off. The two paths are also compared with each other directly,
past the cut-off that chooses between them.

Profiles: ``MEDGE_HYPOTHESIS_PROFILE=ci`` (default, 300 examples a test) or
``release`` (20,000).
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.inference import detection
from edge.inference.manifest import Postprocessing
from edge.inference.postprocess import decode_detections
from edge.inference.preprocess import Geometry, geometry_for
from edge.types import Box

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("fast-path-ci", max_examples=300, **_COMMON)
settings.register_profile("fast-path-release", max_examples=20_000, **_COMMON)
PROFILE = settings.get_profile("fast-path-" + os.environ.get("MEDGE_HYPOTHESIS_PROFILE", "ci"))

LABELS = ("a", "b", "c", "d")


# ------------------------------------------------------------------ reference (verbatim, renamed)
_REF_NEIGHBOURS = np.array([-1, 0, 1], dtype=np.intp)
_REF_KERNEL_3X3 = np.ones((3, 3), dtype=np.uint8)


def _ref_window_max(heatmap: np.ndarray) -> np.ndarray:
    """Maximum over each cell's 3x3 window (cells outside the plane left out) of a float32 ``[K, h, w]``.

    ``cv2.dilate`` with a 3x3 kernel: its default border is ignored by
    the maximum. It selects values (no arithmetic), but is only used on maps
    without NaN, where the order of its comparisons cannot matter.
    """
    planes = [cv2.dilate(np.ascontiguousarray(plane), _REF_KERNEL_3X3) for plane in heatmap]
    return planes[0] if len(planes) == 1 else np.stack(planes)


def _ref_is_peak_gathered(heatmap: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Whether each flat index ``idx`` of ``[K, h, w]`` is ``>=`` each of its in-plane 3x3 neighbours.

    The general path (any dtype, NaN included): the neighbours' row and
    column are clamped to the plane, which maps an outside neighbour onto a
    cell of the same window (the cell itself or a neighbour already
    tested), so the test is unchanged.
    """
    _, h, w = heatmap.shape
    flat = heatmap.reshape(-1)
    rows, xs = np.divmod(idx, w)  # rows: plane * h + y
    ys = rows % h
    ny = np.minimum(np.maximum(ys[:, None] + _REF_NEIGHBOURS, 0), h - 1) + (rows - ys)[:, None]
    nx = np.minimum(np.maximum(xs[:, None] + _REF_NEIGHBOURS, 0), w - 1)
    window = flat[(ny[:, :, None] * w + nx[:, None, :]).reshape(idx.size, 9)]
    return (flat[idx][:, None] >= window).all(axis=1)


def _ref_peak_candidates(heatmap: np.ndarray, threshold: float) -> np.ndarray:
    """Flat indices (ascending) of the 3x3 local maxima of ``[K, h, w]`` scoring ``>= threshold``.

    A cell is a peak when it is ``>=`` each of its (up to eight) in-plane
    neighbours, so every cell of a plateau is one, and a cell next to a NaN
    is none. Only the cells at or above the threshold are tested: against a
    3x3 maximum filter when the map is float32 without NaN (its maximum,
    which propagates NaN, says so), else against their gathered neighbours.
    """
    flat = heatmap.reshape(-1)
    if flat.size == 0:
        return np.empty(0, dtype=np.intp)
    top = flat.max()
    if top < threshold:  # nothing to find (False for a NaN maximum)
        return np.empty(0, dtype=np.intp)
    idx = np.flatnonzero(flat >= threshold)
    if idx.size == 0:
        return idx
    if heatmap.dtype == np.float32 and not np.isnan(top):
        return idx[flat[idx] >= _ref_window_max(heatmap).reshape(-1)[idx]]
    return idx[_ref_is_peak_gathered(heatmap, idx)]


def _ref_top_candidates(scores: np.ndarray, limit: int) -> np.ndarray:
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


def _ref_suppress(boxes: np.ndarray, classes: np.ndarray | None, iou: float) -> np.ndarray:
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


def _ref_decode_boxes(
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


def reference_decode(
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
    ``max_detections`` kept. Vectorised: about 0.08-0.09 ms median for the
    bundled detector at 256x256 (a 64x64 heatmap, a few peaks) on a loaded
    2-vCPU VM, where a full-plane peak mask and NMS per class took 0.2 ms.
    """
    thr = post.threshold if threshold is None else threshold
    peaks = _ref_peak_candidates(heatmap, thr)
    if peaks.size == 0:
        return []
    scores = heatmap.reshape(-1)[peaks]
    top = _ref_top_candidates(scores, max(post.max_detections * 4, post.max_detections))
    peaks, scores = peaks[top], scores[top]
    k, h, w = heatmap.shape
    classes, cells = np.divmod(peaks, h * w) if k > 1 else (None, peaks)
    boxes = _ref_decode_boxes(cells, w, size, offset, geom, post.stride)
    kept = _ref_suppress(boxes, classes, post.nms_iou)[: post.max_detections]
    names = [labels[0]] * kept.size if classes is None else [labels[c] for c in classes[kept].tolist()]
    return [Box(name, s, *b) for name, s, b in zip(names, scores[kept].tolist(), boxes[kept].tolist())]


# ------------------------------------------------------------------ comparison
def _bits(boxes: list[Box]) -> list[tuple[str, ...]]:
    """Each box as its label and the exact bits of its five floats (``float.hex``: -0.0 and NaN kept apart)."""
    rows = []
    for b in boxes:
        values = (b.score, b.x0, b.y0, b.x1, b.y1)
        assert all(type(v) is float for v in values), [type(v) for v in values]
        rows.append((b.label, *(v.hex() for v in values)))
    return rows


_SPECIALS = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0], dtype=np.float64)


def _sprinkle(rng: np.random.Generator, a: np.ndarray, count: int) -> np.ndarray:
    """``a`` with ``count`` random cells set to NaN, +-inf or a signed zero."""
    a = a.copy()
    if count and a.size:
        a.reshape(-1)[rng.integers(0, a.size, count)] = rng.choice(_SPECIALS, count)
    return a


def _heatmap(draw: st.DrawFn, rng: np.random.Generator, k: int, h: int, w: int) -> np.ndarray:
    """Few levels (ties), continuous values or a sparse map of a few bumps; plateaus and specials sometimes."""
    kind = draw(st.sampled_from(["levels", "continuous", "sparse"]))
    if kind == "levels":
        levels = draw(st.integers(1, 6))
        hm = rng.integers(0, levels + 1, size=(k, h, w)) / levels
    elif kind == "continuous":
        hm = rng.random((k, h, w))
    else:
        hm = np.zeros((k, h, w))
        n = draw(st.integers(1, 20))
        hm.reshape(-1)[rng.integers(0, hm.size, n)] = rng.random(n)
        hm = np.maximum(hm, 0.6 * cv2.GaussianBlur(hm.max(axis=0), (3, 3), 0)[None]) if h > 1 and w > 1 else hm
    if draw(st.booleans()):  # broad plateaus: blocks of equal values
        hm = np.repeat(np.repeat(hm[:, ::2, ::2], 2, axis=1), 2, axis=2)[:, :h, :w]
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.float16]))
    return _sprinkle(rng, hm, draw(st.sampled_from([0, 0, 0, 1, 3]))).astype(dtype)


@st.composite
def detection_outputs(draw: st.DrawFn) -> tuple:
    """CenterNet outputs of any shape the decoder meets, with the awkward values it must survive."""
    k, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    heatmap = _heatmap(draw, rng, k, h, w)
    size = rng.random((2, h, w)) * draw(st.sampled_from([2.0, 12.0, 60.0]))  # below 1 too: the one-pixel floor
    offset = rng.random((2, h, w)) * draw(st.sampled_from([1.0, 3.0])) - draw(st.sampled_from([0.0, 1.0]))
    size_dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    size = _sprinkle(rng, size, draw(st.sampled_from([0, 0, 0, 2]))).astype(size_dtype)
    offset_dtype = draw(st.sampled_from([np.float32, np.float64]))
    offset = _sprinkle(rng, offset, draw(st.sampled_from([0, 0, 0, 2]))).astype(offset_dtype)
    stride = draw(st.sampled_from([1, 2, 4, 8]))
    src_h, src_w = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    geom = geometry_for(src_h, src_w, stride * h, stride * w, draw(st.sampled_from(["letterbox", "stretch"])))
    post = Postprocessing(
        threshold=draw(st.sampled_from([0.0, 0.1, 0.275, 0.5, 0.9, 1.0, -1.0])),
        nms_iou=draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0])),
        max_detections=draw(st.integers(1, 25)),
        stride=stride,
    )
    return heatmap, size, offset, geom, post


@PROFILE
@given(detection_outputs())
def test_decode_detections_gives_todays_boxes_bit_for_bit(case: tuple) -> None:
    """Any outputs (NaN, inf, ties, plateaus, several classes, float16/32/64, letterbox): today's exact boxes."""
    heatmap, size, offset, geom, post = case
    labels = LABELS[: heatmap.shape[0]]
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: numpy warns, Python floats do not
        want = reference_decode(heatmap, size, offset, geom, post, labels)
        got = decode_detections(heatmap, size, offset, geom, post, labels)
    assert _bits(got) == _bits(want)


@PROFILE
@given(detection_outputs())
def test_the_python_float_path_equals_the_vectorised_path_past_its_cut_off(case: tuple) -> None:
    """However many peaks (the cut-off only chooses the cheaper one), both paths give the same boxes."""
    heatmap, size, offset, geom, post = case
    peaks = detection._peak_candidates(heatmap, post.threshold)
    if peaks.size == 0 or not detection._plain_inputs(heatmap, size, offset, post):
        return
    labels = LABELS[: heatmap.shape[0]]
    limit = 4 * post.max_detections
    args = (heatmap, peaks, size, offset, geom, post, labels, limit)
    with np.errstate(invalid="ignore", over="ignore"):
        want = detection._decode_many(*args)
    assert _bits(detection._decode_few(*args)) == _bits(want)


@PROFILE
@given(detection_outputs())
def test_the_window_table_finds_the_peaks_the_gathered_test_finds(case: tuple) -> None:
    """For every cell at or above the threshold, however many: the table and the clamped gather agree."""
    heatmap = case[0]
    idx = np.flatnonzero(heatmap.reshape(-1) >= case[4].threshold)
    np.testing.assert_array_equal(
        detection._is_peak_tabled(heatmap, idx), _ref_is_peak_gathered(heatmap, idx)
    )


def test_the_random_cases_reach_both_sides_of_every_cut_off() -> None:
    """The property tests above are only as good as their reach: few and many candidates and peaks."""
    rng = np.random.default_rng(0)
    post = Postprocessing(threshold=0.0, nms_iou=0.3, max_detections=20, stride=4)
    sparse = np.zeros((1, 24, 24), np.float32)
    sparse[0, [3, 10, 20], [4, 12, 2]] = [0.9, 0.8, 0.95]
    dense = rng.random((2, 24, 24)).astype(np.float32)
    cands = [np.count_nonzero(hm >= 0.1) for hm in (sparse, dense)]
    peaks = [detection._peak_candidates(hm, 0.1).size for hm in (sparse, dense)]
    assert cands[0] <= detection._FEW_CANDIDATES < cands[1]
    assert peaks[0] <= detection._FEW_PEAKS < peaks[1]
    for hm in (sparse, dense):
        size, offset = rng.random((2, 24, 24)).astype(np.float32) * 9, rng.random((2, 24, 24)).astype(np.float32)
        geom = geometry_for(300, 200, 96, 96, "letterbox")
        labels = LABELS[: hm.shape[0]]
        got = decode_detections(hm, size, offset, geom, post, labels, 0.1)
        assert got and _bits(got) == _bits(reference_decode(hm, size, offset, geom, post, labels, 0.1))


@pytest.mark.parametrize("nan", [False, True])
def test_a_plane_too_large_for_a_window_table_gives_todays_boxes(nan: bool) -> None:
    """130x130 cells (no cached table): a few candidates are gathered as before, NaN neighbour included."""
    rng = np.random.default_rng(1)
    hm = np.zeros((1, 130, 130), np.float32)
    hm[0, rng.integers(0, 130, 8), rng.integers(0, 130, 8)] = rng.random(8).astype(np.float32) + 0.5
    if nan:
        y, x = np.argwhere(hm[0] > 0)[0]
        hm[0, y, min(x + 1, 129)] = np.nan
    size, offset = np.full((2, 130, 130), 6.0, np.float32), np.zeros((2, 130, 130), np.float32)
    geom = geometry_for(520, 520, 520, 520, "letterbox")
    post = Postprocessing(threshold=0.4, nms_iou=0.3, max_detections=20, stride=4)
    assert hm[0].size > detection._TABLE_CELLS
    got = decode_detections(hm, size, offset, geom, post, ("x",))
    assert got and _bits(got) == _bits(reference_decode(hm, size, offset, geom, post, ("x",)))


# ------------------------------------------------------------------ the bundled model
@pytest.fixture(scope="module")
def detector():
    """The bundled xray-nodule-det, fp32 on ONNX Runtime's CPU provider."""
    from edge.inference.model import load_model

    options = {"precision": "fp32", "backend": "onnxruntime", "provider": "cpu", "intra_op_threads": 1}
    with load_model("xray-nodule-det", **options) as m:
        yield m


@pytest.mark.parametrize("height,width", [(256, 256), (512, 512), (480, 640)])
def test_bundled_detector_frames_take_the_python_path_and_give_todays_boxes(detector, height: int, width: int) -> None:
    """32 held-out frames a size: most take the few-peaks path, and every frame gives today's exact boxes."""
    from edge.tools.synthetic import XrayFrames

    post, labels, few = detector.postprocessing, detector.manifest.labels, 0
    for seed in range(3000, 3004):
        frames = XrayFrames(height, width, "uint16", seed=seed, loop=8)
        inputs, geoms = zip(*(detector.preprocess(frames.frame(i)) for i in range(8)))
        out = detector.infer(np.stack(inputs))
        for j, geom in enumerate(geoms):
            args = (out["heatmap"][j], out["size"][j], out["offset"][j], geom, post, labels)
            assert _bits(decode_detections(*args)) == _bits(reference_decode(*args))
            few += 0 < detection._peak_candidates(args[0], post.threshold).size <= detection._FEW_PEAKS
    assert few >= 24
