"""The X-ray generator lives in ``edge.tools.synthetic_xray``; the trainer draws its sets from it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import edge.tools.synthetic_xray as gen  # noqa: E402
from edge.errors import DataError  # noqa: E402
import trainer.classification_data as cls_data  # noqa: E402
import trainer.data as data  # noqa: E402


def test_the_classifier_set_is_drawn_by_the_edge_generator() -> None:
    assert cls_data.make_classification_xray is gen.make_classification_xray
    ds = cls_data.synthetic_classification_set(8, 3, shape=(96, 96))  # sample 6 is the first positive
    for i in range(8):
        img, boxes = gen.make_classification_xray(gen.sample_rng(3, i), cls_data.positive_schedule(i), (96, 96))
        assert np.array_equal(ds.images[i], img) and np.array_equal(ds.boxes[i], boxes)
    assert ds.labels.tolist() == [0, 0, 0, 0, 0, 0, 1, 0]


@pytest.mark.parametrize("nodules", [None, 0, 3])
def test_trainer_data_make_xray_draws_the_same_pixels(nodules: int | None) -> None:
    # trainer.data.make_xray (the detector's sets) and the edge generator agree sample for sample.
    for i in range(3):
        a_img, a_boxes = data.make_xray(data.sample_rng(11, i), (96, 128), nodules=nodules)
        b_img, b_boxes = gen.make_xray(gen.sample_rng(11, i), (96, 128), nodules=nodules)
        assert np.array_equal(a_img, b_img) and np.array_equal(a_boxes, b_boxes)
    with pytest.raises(DataError, match="nodules"):
        gen.make_xray(gen.sample_rng(0, 0), (64, 64), nodules=gen.MAX_NODULES + 1)


@pytest.mark.parametrize("shape", [(0, 0), (-5, 10), (10**6, 10**6), (True, 64), (64.0, 64), (64,)])
def test_make_xray_refuses_a_shape_before_allocating(shape: object) -> None:
    from edge.errors import DataError
    from edge.tools.synthetic_xray import make_xray, sample_rng

    with pytest.raises(DataError, match="shape"):
        make_xray(sample_rng(1, 0), shape)  # type: ignore[arg-type]
