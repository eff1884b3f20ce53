"""Metrics, and that training targets decode through edge.inference.postprocess to the ground truth."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edge.inference.manifest import InputSpec, Postprocessing  # noqa: E402
from trainer.data import synthetic_detection_set, synthetic_segmentation_set  # noqa: E402
from trainer.evaluate import (  # noqa: E402
    average_precision,
    dice_iou,
    evaluate_detection,
    evaluate_segmentation,
    pick_threshold,
)
from trainer.train import _batch, detection_targets  # noqa: E402

SPEC = InputSpec(size=(128, 128))


def test_dice_iou_values() -> None:
    a = np.zeros((10, 10), np.uint8)
    b = np.zeros((10, 10), np.uint8)
    assert dice_iou(a, b) == (1.0, 1.0)
    a[:5] = 1
    b[:, :5] = 1
    d, u = dice_iou(a, b)
    assert d == pytest.approx(0.5) and u == pytest.approx(25 / 75)


def test_perfect_segmentation_scores_high_through_postprocess(cache_dir: str) -> None:
    ds = synthetic_segmentation_set(4, 41, SPEC, cache_dir=cache_dir)

    def oracle(batch: np.ndarray) -> dict[str, np.ndarray]:
        idx = [int(np.flatnonzero((ds.inputs == b).all(axis=(1, 2, 3)))[0]) for b in batch]
        return {"logits": np.where(ds.targets[idx] > 0, 8.0, -8.0).astype(np.float32)}

    m = evaluate_segmentation(oracle, ds, threshold=0.5, batch_size=2)
    assert m["n"] == 4 and m["dice"] > 0.93
    assert len(m["per_case"]) == 4 and all(0.9 < c["dice"] <= 1 for c in m["per_case"])

    def empty(batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": np.full((len(batch), 1, 128, 128), -8.0, np.float32)}

    assert evaluate_segmentation(empty, ds)["dice"] == 0.0


def test_detection_targets_decode_to_ground_truth(cache_dir: str) -> None:
    """Targets built for training, read by the served decoder, give back the boxes: FROC and mAP ~ 1."""
    ds = synthetic_detection_set(6, 42, SPEC, cache_dir=cache_dir)
    post = Postprocessing(threshold=0.5, nms_iou=0.3, max_detections=20, stride=4)

    def oracle(batch: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.array([int(np.flatnonzero((ds.inputs == b).all(axis=(1, 2, 3)))[0]) for b in batch])
        b = _batch(ds, idx, "detection")
        t = detection_targets(b["boxes"], b["classes"], b["valid"], 1, 32, 32, 4)
        return {"heatmap": t["heatmap"].numpy(), "size": t["size"].numpy(), "offset": t["offset"].numpy()}

    m = evaluate_detection(oracle, ds, post, ["nodule"])
    assert m["n_nodules"] > 0
    assert m["sensitivity"] == 1.0 and m["fp_per_image"] == 0.0
    assert m["map50"] > 0.99
    assert m["sensitivity_at_0.25fp"] == 1.0


def test_average_precision_penalises_misses_and_false_positives(cache_dir: str) -> None:
    ds = synthetic_detection_set(4, 43, SPEC, cache_dir=cache_dir)
    perfect = [[(0, 0.9, b) for b in boxes] for boxes in ds.boxes]
    assert average_precision(perfect, ds, 1) == pytest.approx(1.0)
    half = [[(0, 0.9, b) for b in boxes[:1]] for boxes in ds.boxes]
    n_gt = sum(len(b) for b in ds.boxes)
    assert average_precision(half, ds, 1) == pytest.approx(sum(min(1, len(b)) for b in ds.boxes) / n_gt)
    junk = [d + [(0, 0.95, np.array([0.0, 0.0, 5.0, 5.0]))] for d in perfect]
    assert average_precision(junk, ds, 1) < 1.0


def test_pick_threshold_respects_budget() -> None:
    pts = [
        {"threshold": 0.1, "sensitivity": 1.0, "fp_per_image": 2.0},
        {"threshold": 0.3, "sensitivity": 0.97, "fp_per_image": 0.2},
        {"threshold": 0.5, "sensitivity": 0.9, "fp_per_image": 0.05},
    ]
    assert pick_threshold(pts, 0.25)["threshold"] == 0.3
    assert pick_threshold(pts, 0.01)["threshold"] == 0.5
