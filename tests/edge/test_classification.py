"""Classification in the daemon's inference path, and the maps asked for with ``want``.

No daemon and no sockets here (``test_classification_zmq.py`` has those):
the post-processing functions, :class:`~edge.inference.model.LoadedModel` on
the committed fixture models (``tiny-cls``: ``p = sigmoid(20 * (f - 0.1))``,
``f`` the mean of the min-max normalised, letterboxed input), the reply
encoder and the ``op: models`` description.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edge.egress.zmq import MAP_FRAMES, encode_result
from edge.egress.zmq_catalogue import describe_model
from edge.errors import ModelError
from edge.inference.manifest import Manifest, Postprocessing
from edge.inference.model import LoadedModel, load_model
from edge.inference.postprocess import (
    calibrated_probabilities,
    class_heatmap,
    classify,
    segmentation_mask,
    segmentation_probability,
)
from edge.inference.preprocess import geometry_for
from edge.types import ClassScore, InferenceResult


def _load(engines: Path, name: str) -> LoadedModel:
    return load_model(engines / name, precision="fp32", backend="onnxruntime", provider="cpu", warmup_iterations=0)


def _square(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.zeros((h, w), np.uint8)
    y0, x0, y1, x1 = box
    img[y0:y1, x0:x1] = 200
    return img


def _expected_p(img: np.ndarray, size: int = 64) -> float:
    """tiny-cls by hand: the bright share of the letterboxed model input, through 20 * (f - 0.1) / T=2."""
    g = geometry_for(img.shape[0], img.shape[1], size, size, "letterbox")
    f = (img > 0).mean() * (g.new_h * g.new_w) / (size * size)
    return 1.0 / (1.0 + math.exp(-20.0 * (f - 0.1)))


# ------------------------------------------------------------------ pure functions
def test_calibrated_probabilities_sigmoid_and_softmax_with_temperature() -> None:
    assert calibrated_probabilities(np.array([2.0]), 2.0)[0] == pytest.approx(1 / (1 + math.exp(-1.0)))
    p1 = calibrated_probabilities(np.array([3.0, 1.0, -2.0]), 1.0)
    p3 = calibrated_probabilities(np.array([3.0, 1.0, -2.0]), 3.0)
    assert p1.sum() == pytest.approx(1.0) and p3.sum() == pytest.approx(1.0)
    assert list(np.argsort(-p1)) == list(np.argsort(-p3)) == [0, 1, 2]  # a temperature never reorders
    assert p3[0] < p1[0]  # T > 1 softens
    assert calibrated_probabilities(np.array([800.0]), 1.0)[0] == 1.0  # no overflow warning, no NaN


def test_classify_one_label_is_its_sigmoid_and_decides_at_the_threshold() -> None:
    post = Postprocessing(threshold=0.5, temperature=2.0)
    classes, decision, top = classify(np.array([0.0]), ("nodule",), post)
    assert classes == [ClassScore("nodule", 0.5)] and decision is True and top == 0  # at the threshold: positive
    classes, decision, _ = classify(np.array([-0.01]), ("nodule",), post)
    assert len(classes) == 1 and classes[0].score < 0.5 and decision is False


def test_classify_several_labels_best_first() -> None:
    post = Postprocessing(threshold=0.6, temperature=1.0)
    classes, decision, top = classify(np.array([0.1, 2.0, 0.5]), ("normal", "nodule", "mass"), post)
    assert [c.label for c in classes] == ["nodule", "mass", "normal"]
    assert top == 1 and sum(c.score for c in classes) == pytest.approx(1.0)
    assert decision == (classes[0].score >= 0.6)
    _, undecided, _ = classify(np.array([0.0, 0.1, 0.0]), ("a", "b", "c"), post)
    assert undecided is False  # the top class is below the threshold
    with pytest.raises(ModelError, match="2 logits for 3 labels"):
        classify(np.zeros(2), ("a", "b", "c"), post)


def test_class_heatmap_peaks_where_the_evidence_is_scaled_by_the_score() -> None:
    """The hottest cell maps to its place in the source image at 255 * score; a low score stays dark."""
    geom = geometry_for(48, 64, 64, 64, "letterbox")  # 48 rows of image, 8 rows of padding above and below
    cam = np.full((1, 8, 8), -4.0)
    cam[0, 5, 7] = 120.0  # the last image row of cells (rows 1..6 hold the image), last column; logit scale
    cam[0, 0, 0] = 500.0  # in the letterbox padding: not part of the image, must not set the scale
    hm = class_heatmap(cam, 0.9, 0, geom)
    assert hm.shape == (48, 64) and hm.dtype == np.uint8
    y, x = np.unravel_index(int(np.argmax(hm)), hm.shape)
    assert 32 <= y < 40 and x >= 56 and 215 <= hm.max() <= 230  # 255 * 0.9 = 229.5, a little blurred
    assert np.percentile(hm, 50) == 0  # the rest of the image is the coldest cell
    cold = class_heatmap(cam, 0.02, 0, geom)
    assert cold.max() <= 6  # a frame the model finds negative is dark everywhere
    # a constant added to the cam, or a larger spread of the same shape, changes nothing
    assert np.array_equal(class_heatmap(cam * 3.0 + 5.0, 0.9, 0, geom), hm)
    assert np.array_equal(class_heatmap(np.zeros((1, 8, 8)), 0.5, 0, geom), np.full((48, 64), 128, np.uint8))


@pytest.mark.parametrize("src", [(1, 1), (8, 8), (3, 5), (16, 16), (100, 100), (37, 300), (512, 512)])
def test_the_hottest_point_reads_255_times_the_score_at_every_frame_size(src: tuple[int, int]) -> None:
    """Even a frame smaller than the 16x16 map, whose shrink averages the peak away (a 1x1 frame read 42, not 136)."""
    cam = np.random.default_rng(sum(src)).normal(0.0, 1.0, (1, 16, 16))
    cam[0, 9, 4] = 30.0
    for score in (0.533, 0.9, 1.0):
        hm = class_heatmap(cam, score, 0, geometry_for(*src, 256, 256, "letterbox"))
        assert hm.shape == src and int(hm.max()) == int(np.rint(255 * score))


def test_class_heatmap_of_several_labels_maps_the_chosen_label() -> None:
    geom = geometry_for(32, 32, 32, 32, "letterbox")
    cam = np.zeros((3, 4, 4))
    cam[2, 0, 0] = 8.0
    cam[1, 3, 3] = 8.0
    hm = class_heatmap(cam, 1.0, 2, geom)
    assert hm[:4, :4].min() == 255 and hm[:8, :8].mean() > 150 and hm[24:, 24:].max() == 0  # label 1's cell is not drawn


def _agrees(p: np.ndarray, mask: np.ndarray) -> bool:
    """The probability map agrees with the mask at threshold 0.5 on every pixel (up to rounding 0.5 to 128)."""
    return bool(p[mask == 1].min() >= 128 and p[mask == 0].max() <= 128)


def test_segmentation_probability_matches_the_mask() -> None:
    rng = np.random.default_rng(3)
    geom = geometry_for(90, 120, 64, 64, "letterbox")
    yy, xx = np.mgrid[:64, :64]
    logits = (6.0 - ((yy - 30) ** 2 + (xx - 24) ** 2) / 40.0).astype(np.float32)[None]  # a smooth blob
    p = segmentation_probability(logits, geom)
    mask = segmentation_mask(logits, geom, 0.5)
    assert p.shape == mask.shape == (90, 120) and p.dtype == np.uint8
    assert 0.05 < mask.mean() < 0.5 and _agrees(p, mask)
    assert p.max() >= 254 and p.min() == 0  # a fixed scale: round(255 sigmoid(6)) = 254, sigmoid(-30) -> 0
    multi = rng.normal(size=(3, 64, 64)).astype(np.float32)
    fg = segmentation_probability(multi, geom)
    labelled = segmentation_mask(multi, geom, 0.5) > 0
    assert fg[labelled].mean() > fg[~labelled].mean()  # 1 - P(background) is higher where a label won


# ------------------------------------------------------------------ LoadedModel on tiny-cls
def test_tiny_cls_scores_decides_and_maps_only_when_asked(fixture_engines_with_cls: Path) -> None:
    model = _load(fixture_engines_with_cls, "tiny-cls")
    assert model.task == "classification" and model.extra_outputs == {"heatmap"}
    big, small = _square(96, 128, (20, 30, 60, 80)), _square(96, 128, (40, 50, 50, 60))
    plain, mapped, negative = model.run([big, big, small], [frozenset(), frozenset({"heatmap", "probability"}),
                                                            frozenset({"heatmap"})])
    for res, img in ((plain, big), (negative, small)):
        assert res.status == "ok" and len(res.classes) == 1 and res.classes[0].label == "nodule"
        assert res.classes[0].score == pytest.approx(_expected_p(img), abs=1e-4)
    assert plain.decision is True and negative.decision is False
    assert plain.heatmap is None and plain.probability is None and plain.mask is None and plain.boxes == []
    assert mapped.probability is None  # not a segmentation model: ignored
    hm = mapped.heatmap
    assert hm is not None and hm.shape == big.shape and hm.dtype == np.uint8
    y, x = np.unravel_index(int(np.argmax(hm)), hm.shape)
    assert 20 <= y < 60 and 30 <= x < 80  # the hottest point is on the square
    assert hm.max() == pytest.approx(255 * mapped.classes[0].score, abs=2)  # scaled by the score
    assert hm[25:55, 35:75].mean() > 3 * hm[80:, :20].mean() and hm[80:, :20].max() < 60  # dark elsewhere
    assert negative.heatmap is not None and negative.heatmap.max() <= 255 * negative.classes[0].score + 1
    assert model.run([big])[0].heatmap is None  # the default path computes no map


def test_seg_probability_and_det_ignore(fixture_engines_with_cls: Path) -> None:
    seg, det = _load(fixture_engines_with_cls, "tiny-seg"), _load(fixture_engines_with_cls, "tiny-det")
    img = _square(80, 100, (10, 20, 50, 70))
    [res] = seg.run([img], [frozenset({"probability", "heatmap"})])
    assert res.probability is not None and res.heatmap is None and res.classes is None
    assert res.probability.shape == img.shape and res.mask is not None and _agrees(res.probability, res.mask)
    [plain] = seg.run([img])
    assert plain.probability is None and np.array_equal(plain.mask, res.mask)
    [dres] = det.run([img], [frozenset({"probability", "heatmap"})])
    assert dres.boxes and dres.probability is None and dres.heatmap is None and dres.classes is None
    with pytest.raises(ValueError):
        seg.run([img, img], [frozenset()])


class _NanBackend:
    name, precision, max_batch = "fake", "fp32", 4

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = batch.shape[0]
        return {"logits": np.full((n, 1), np.nan, np.float32), "cam": np.zeros((n, 1, 8, 8), np.float32)}

    def close(self) -> None:
        pass


def test_non_finite_logits_are_an_internal_error(fixture_engines_with_cls: Path) -> None:
    model = LoadedModel(Manifest.load(fixture_engines_with_cls / "tiny-cls"), _NanBackend())
    [res] = model.run([np.zeros((8, 8), np.uint8)])
    assert res.status == "error" and res.error_code == "internal" and res.classes is None


# ------------------------------------------------------------------ reply encoding and the catalogue
def test_encode_classification_reply_frames_in_documented_order() -> None:
    hm, prob = np.full((3, 4), 9, np.uint8), np.full((3, 4), 7, np.uint8)
    res = InferenceResult(status="ok", model="c", model_version="1", task="classification",
                          classes=[ClassScore("nodule", 0.91234567)], decision=True, heatmap=hm)
    reply = encode_result("a", res, stream="s")
    hdr = json.loads(reply.header)
    assert hdr["classes"] == [{"label": "nodule", "score": 0.912346}] and hdr["decision"] is True
    assert hdr["heatmap"] == {"dtype": "uint8", "shape": [3, 4]} and "mask" not in hdr and hdr["boxes"] == []
    assert reply.mask is None and len(reply.payload) == 1 and np.array_equal(reply.payload[0], hm)
    seg = InferenceResult(status="ok", model="s", task="segmentation", mask=np.ones((3, 4), np.uint8),
                          probability=prob, heatmap=hm)
    both = encode_result("b", seg, stream="s")
    assert [k for k in MAP_FRAMES if k in json.loads(both.header)] == ["mask", "probability", "heatmap"]
    assert [int(f[0, 0]) for f in both.payload] == [1, 7, 9]
    no_mask = encode_result("c", seg, stream="s", want_mask=False)
    assert "mask" not in json.loads(no_mask.header) and [int(f[0, 0]) for f in no_mask.payload] == [7, 9]
    dropped = encode_result("d", InferenceResult(status="dropped", model="c", classes=[], heatmap=hm), stream="s")
    assert dropped.payload == () and "classes" not in json.loads(dropped.header)


def test_describe_classification_model(fixture_engines_with_cls: Path) -> None:
    out = describe_model(Manifest.load(fixture_engines_with_cls / "tiny-cls"))["output"]
    assert out == {"mask": False, "boxes": False, "probability": False, "classes": True, "heatmap": True,
                   "threshold": 0.5, "temperature": 2.0, "max_detections": None, "nms_iou": None}
    det = describe_model(Manifest.load(fixture_engines_with_cls / "tiny-det"))["output"]
    assert det["boxes"] is True and det["heatmap"] is False and det["classes"] is False and det["nms_iou"] == 0.5
