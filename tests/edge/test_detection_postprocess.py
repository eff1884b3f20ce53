"""Detection post-processing (:func:`edge.inference.postprocess.decode_detections`) against a reference.

The daemon's decoder (:mod:`edge.inference.detection`: peaks tested only
above the threshold, then a few peaks decoded in Python floats or many
vectorised, with a partial top-k and one class-aware IoU matrix; the two
paths are held to each other bit for bit in ``test_detection_fast_path.py``)
must give exactly the boxes of the straightforward decoder kept below
(:func:`reference_decode`: full-plane peak mask, a stable sort of every
peak, greedy NMS one box at a time per class, a final sort by score): same
boxes, same order, same floats to 1e-6, on the bundled detector's outputs
for held-out synthetic frames (square and letterboxed) and on random
heatmaps full of ties and plateaus (hypothesis).

Profiles: ``MEDGE_HYPOTHESIS_PROFILE=ci`` (default, 200 examples a test) or
``release`` (20,000).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.inference.manifest import Postprocessing
from edge.inference.postprocess import box_iou, decode_detections
from edge.inference.preprocess import Geometry, geometry_for
from edge.types import Box

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("release", max_examples=20_000, **_COMMON)
PROFILE = settings.get_profile(os.environ.get("MEDGE_HYPOTHESIS_PROFILE", "ci"))

LABELS = ("a", "b", "c")


# ------------------------------------------------------------------ reference
def reference_peaks(heatmap: np.ndarray) -> np.ndarray:
    """Boolean mask of cells ``>=`` all eight neighbours (outside the plane: ``-inf``)."""
    padded = np.pad(heatmap, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    h, w = heatmap.shape[1:]
    is_max = np.ones(heatmap.shape, dtype=bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if (dy, dx) != (1, 1):
                is_max &= heatmap >= padded[:, dy : dy + h, dx : dx + w]
    return is_max


def reference_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy NMS one box at a time: keep the best, drop what overlaps it by more than ``iou``."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        order = rest[box_iou(boxes[i], boxes[rest]) <= iou] if rest.size else rest
    return keep


def reference_decode(
    heatmap: np.ndarray,
    size: np.ndarray,
    offset: np.ndarray,
    geom: Geometry,
    post: Postprocessing,
    labels: Sequence[str],
    threshold: float | None = None,
) -> list[Box]:
    """The decoder as it was before it was vectorised (a per-class loop, one sort at the end)."""
    thr = post.threshold if threshold is None else threshold
    k, ys, xs = np.nonzero(reference_peaks(heatmap) & (heatmap >= thr))
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
        for i in idx[reference_nms(boxes[idx], scores[idx], post.nms_iou)]:
            out.append(Box(labels[int(cls)], float(scores[i]), *map(float, boxes[i])))
    out.sort(key=lambda b: -b.score)
    return out[: post.max_detections]


def assert_same_boxes(got: list[Box], want: list[Box]) -> None:
    """Same labels in the same order, scores and coordinates within 1e-6 (NaN matching NaN)."""
    assert [b.label for b in got] == [b.label for b in want]
    np.testing.assert_allclose(_as_array(got), _as_array(want), rtol=0, atol=1e-6)


def _as_array(boxes: list[Box]) -> np.ndarray:
    """``[n, 5]`` float64: score, x0, y0, x1, y1 of each box."""
    return np.array([[b.score, b.x0, b.y0, b.x1, b.y1] for b in boxes], dtype=np.float64).reshape(-1, 5)


# --------------------------------------------------------- the bundled model
@pytest.fixture(scope="module")
def detector():
    """The bundled xray-nodule-det, fp32 on ONNX Runtime's CPU provider."""
    from edge.inference.model import load_model

    options = {"precision": "fp32", "backend": "onnxruntime", "provider": "cpu", "intra_op_threads": 1}
    with load_model("xray-nodule-det", **options) as m:
        yield m


def _model_outputs(detector, height: int, width: int, seeds: range) -> list[tuple[dict[str, np.ndarray], Geometry]]:
    """The detector's raw outputs and geometry, 8 held-out synthetic X-ray frames a seed."""
    from edge.tools.synthetic import XrayFrames

    records = []
    for seed in seeds:
        frames = XrayFrames(height, width, "uint16", seed=seed, loop=8)
        inputs, geoms = zip(*(detector.preprocess(frames.frame(i)) for i in range(8)))
        out = detector.infer(np.stack(inputs))
        records.extend(({k: v[j] for k, v in out.items()}, geoms[j]) for j in range(8))
    return records


def _check_outputs(records, post: Postprocessing, labels: Sequence[str]) -> int:
    """Compare both decoders at the manifest's threshold and at a low one; the number of boxes seen."""
    seen = 0
    for out, geom in records:
        for thr in (None, 0.02):
            args = (out["heatmap"], out["size"], out["offset"], geom, post, labels, thr)
            got = decode_detections(*args)
            assert_same_boxes(got, reference_decode(*args))
            seen += len(got)
    return seen


def test_bundled_detector_on_200_held_out_frames_gives_the_reference_boxes(detector) -> None:
    """200 held-out 256x256 frames (seeds 1000..1024): identical boxes, and some frames have several."""
    records = _model_outputs(detector, 256, 256, range(1000, 1025))
    assert len(records) == 200
    assert _check_outputs(records, detector.postprocessing, detector.manifest.labels) > 400


@pytest.mark.parametrize("height,width", [(512, 384), (300, 700), (480, 640)])
def test_bundled_detector_on_letterboxed_frames_gives_the_reference_boxes(detector, height: int, width: int) -> None:
    """Frames that do not fill the input (padding on the left/right or top/bottom): identical boxes."""
    records = _model_outputs(detector, height, width, range(2000, 2002))
    assert records[0][1].left > 0 or records[0][1].top > 0
    assert _check_outputs(records, detector.postprocessing, detector.manifest.labels) > 0


# ------------------------------------------------------------------ properties
@st.composite
def detection_outputs(draw: st.DrawFn) -> tuple:
    """Random CenterNet outputs: heatmaps of few distinct levels (ties, plateaus), odd shapes, NaN sometimes."""
    k = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    levels = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float64]))
    heatmap = (rng.integers(0, levels + 1, size=(k, h, w)) / levels).astype(dtype)
    if draw(st.booleans()):  # broad plateaus: blocks of equal values
        heatmap = np.repeat(np.repeat(heatmap[:, ::2, ::2], 2, axis=1), 2, axis=2)[:, :h, :w].copy()
    if draw(st.integers(0, 5)) == 0:
        heatmap.reshape(-1)[rng.integers(0, heatmap.size)] = np.nan
    size = (rng.random((2, h, w)) * 12).astype(np.float32)  # below 1 too: the one-pixel floor
    offset = rng.random((2, h, w)).astype(np.float32)
    src_h, src_w = draw(st.integers(4, 80)), draw(st.integers(4, 80))
    geom = geometry_for(src_h, src_w, 4 * h, 4 * w, draw(st.sampled_from(["letterbox", "stretch"])))
    post = Postprocessing(
        threshold=draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])),
        nms_iou=draw(st.sampled_from([0.0, 0.1, 0.3, 0.7])),
        max_detections=draw(st.integers(1, 6)),
        stride=4,
    )
    return heatmap, size, offset, geom, post


@PROFILE
@given(detection_outputs())
def test_random_heatmaps_with_ties_and_plateaus_give_the_reference_boxes(case: tuple) -> None:
    """Any heatmap (ties at the top-k cut, plateaus, NaN, edges, several classes): the reference's boxes."""
    heatmap, size, offset, geom, post = case
    got = decode_detections(heatmap, size, offset, geom, post, LABELS)
    assert_same_boxes(got, reference_decode(heatmap, size, offset, geom, post, LABELS))


# ------------------------------------------------------------------ examples
def _one_class(heatmap: list[list[float]], **post: float) -> list[Box]:
    """Decode a one-class float32 heatmap with unit sizes and zero offsets, stride 1, 1:1 geometry."""
    hm = np.array([heatmap], dtype=np.float32)
    h, w = hm.shape[1:]
    geom = geometry_for(h, w, h, w, "stretch")
    settings_ = {"threshold": 0.5, "nms_iou": 0.5, "max_detections": 10, "stride": 1, **post}
    size, offset = np.ones((2, h, w), np.float32), np.zeros((2, h, w), np.float32)
    return decode_detections(hm, size, offset, geom, Postprocessing(**settings_), ("x",))


def test_every_cell_of_a_plateau_is_a_peak_and_a_nan_neighbour_is_not_passed() -> None:
    """A plateau of two cells gives two boxes (row-major order); a cell next to a NaN is no peak."""
    boxes = _one_class([[0.0, 0.9, 0.9, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.8, np.nan]])
    assert [(b.x0, b.y0) for b in boxes] == [(0.5, 0.0), (1.5, 0.0)]
    assert [b.score for b in boxes] == pytest.approx([0.9, 0.9])


def test_ties_at_the_top_k_cut_keep_the_first_cells() -> None:
    """Ten equal peaks, max_detections=2 (8 candidates): the first 8 cells, of which NMS keeps one.

    The first eight peaks' offsets put their boxes on top of each other,
    so the first suppresses the other seven; the last two, cut by the cap,
    must not come back in their place.
    """
    w = 20
    hm = np.zeros((1, 1, w), np.float32)
    hm[0, 0, ::2] = 0.7
    offset = np.zeros((2, 1, w), np.float32)
    offset[0, 0, :16] = 8.0 - np.arange(16)  # centres of cells 0..15 at x = 8
    size = np.full((2, 1, w), 4.0, np.float32)
    geom = geometry_for(1, w, 1, w, "stretch")
    post = Postprocessing(threshold=0.5, nms_iou=0.5, max_detections=2, stride=1)
    boxes = decode_detections(hm, size, offset, geom, post, ("x",))
    assert [(b.x0, b.x1) for b in boxes] == [(6.0, 10.0)]
    assert_same_boxes(boxes, reference_decode(hm, size, offset, geom, post, ("x",)))


@PROFILE
@given(st.integers(0, 2**32 - 1), st.integers(1, 300), st.integers(0, 400), st.integers(1, 4))
def test_top_candidates_is_a_stable_sort_cut(seed: int, n: int, limit: int, levels: int) -> None:
    """The partial top-k gives ``np.argsort(-scores, kind="stable")[:limit]``, ties at the cut included."""
    from edge.inference.detection import _top_candidates

    scores = (np.random.default_rng(seed).integers(0, levels + 1, size=n) / levels).astype(np.float32)
    np.testing.assert_array_equal(_top_candidates(scores, limit), np.argsort(-scores, kind="stable")[:limit])
