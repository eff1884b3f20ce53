"""Preprocessing: the serving fast path computes exactly what the general path computes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge.manifest import InputSpec, Preprocessing
from edge.preprocess import _normalize_inplace, preprocess, to_float_channels

SPEC = InputSpec(size=(48, 64))


def _reference(img: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Float32 copy, then normalisation in place: the arithmetic of every other path."""
    ref = to_float_channels(img, 1).copy()
    _normalize_inplace(ref, pre)
    return ref


@pytest.mark.parametrize("normalize", ["fixed", "minmax", "zscore"])
@pytest.mark.parametrize("mean,std", [(0.0, 255.0), (12.5, 40.0)])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_model_size_fast_path_is_bit_identical(normalize: str, mean: float, std: float, dtype: str) -> None:
    rng = np.random.default_rng(7)
    img = rng.integers(-500 if dtype == "int16" else 0, 250, size=SPEC.size).astype(dtype)
    pre = dataclasses.replace(Preprocessing(), normalize=normalize, mean=mean, std=std)
    out = np.full((1, *SPEC.size), np.nan, np.float32)
    x, geom = preprocess(img, SPEC, pre, out=out)
    assert x is out and (geom.top, geom.left, geom.new_h, geom.new_w) == (0, 0, *SPEC.size)
    np.testing.assert_array_equal(x, _reference(img, pre))
    assert img.dtype == np.dtype(dtype)  # the source is never modified in place


def test_letterbox_into_a_batch_slot_pads_with_zeros() -> None:
    img = np.full((30, 80), 200, np.uint8)
    pre = dataclasses.replace(Preprocessing(), normalize="fixed", mean=0.0, std=255.0)
    batch = np.full((2, 1, *SPEC.size), np.nan, np.float32)
    _, geom = preprocess(img, SPEC, pre, out=batch[1])
    inside = batch[1, 0, geom.top : geom.top + geom.new_h, geom.left : geom.left + geom.new_w]
    assert geom.new_w == 64 and geom.new_h == 24 and geom.top == 12
    assert np.isfinite(batch[1]).all() and (batch[1, 0, : geom.top] == 0).all() and (batch[1, 0, geom.top + geom.new_h :] == 0).all()
    np.testing.assert_allclose(inside, 200 / 255, rtol=1e-6)
    assert np.isnan(batch[0]).all()  # the other slot is untouched
    x2, _ = preprocess(img, SPEC, pre)
    np.testing.assert_array_equal(x2, batch[1])


def test_out_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="expected"):
        preprocess(np.zeros(SPEC.size, np.uint8), SPEC, Preprocessing(), out=np.empty((1, 8, 8), np.float32))
