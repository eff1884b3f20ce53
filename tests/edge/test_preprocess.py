"""Preprocessing: the serving fast path computes exactly what the general path computes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edge.inference.manifest import InputSpec, Preprocessing
from edge.inference.preprocess import preprocess, to_float_channels

SPEC = InputSpec(size=(48, 64))


def _reference(img: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """The original arithmetic: a float32 copy, then whole-array expressions."""
    x = to_float_channels(img, 1).astype(np.float32)
    if pre.normalize == "minmax":
        lo, hi = float(x.min()), float(x.max())
        return np.zeros_like(x) if hi - lo < 1e-12 else (x - lo) * np.float32(1.0 / (hi - lo))
    if pre.normalize == "zscore":
        sd = float(x.std())
        return (x - np.float32(x.mean())) * np.float32(1.0 / sd if sd > 1e-12 else 0.0)
    return (x - np.float32(pre.mean)) * np.float32(1.0 / pre.std)


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


# ------------------------------------------------------------------ postprocessing
@pytest.mark.parametrize(
    "shape",
    [(192, 256, 480, 640), (64, 64, 100, 70), (7, 9, 50, 50), (256, 256, 256, 256), (192, 256, 512, 512), (5, 5, 5, 40)],
)
@pytest.mark.parametrize("kind", ["blob", "noise"])
def test_upsample_threshold_equals_thresholding_the_float_resize(
    shape: tuple[int, int, int, int], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge-only interpolation gives exactly the mask of the full Pillow float resize."""
    import edge.inference.postprocess
    from edge.inference.postprocess import upsample_threshold
    from edge.inference.preprocess import resize_float

    h, w, oh, ow = shape
    rng = np.random.default_rng(sum(shape))
    if kind == "blob":  # a smooth logit field with a lesion-like region, as a segmentation model gives
        yy, xx = np.mgrid[0:h, 0:w]
        plane = (6.0 - 0.02 * ((yy - h / 2) ** 2 + (xx - w / 3) ** 2) * (256 / max(h, w)) + rng.normal(0, 0.3, (h, w)))
    else:  # edges everywhere: exercises the fall-back to the full resize
        plane = rng.normal(0, 2, (h, w))
    plane = plane.astype(np.float32)
    cut = np.float32(0.25)
    want = (resize_float(plane, oh, ow) > cut).astype(np.uint8)
    if kind == "blob" and oh >= 100:  # a real lesion edge: the interpolate-the-edge path, not the fall-back
        monkeypatch.setattr(edge.inference.postprocess, "resize_float", lambda *a: pytest.fail("fell back to the full resize"))
    got = upsample_threshold(plane, oh, ow, cut)
    assert got.dtype == np.uint8 and got.shape == (oh, ow)
    np.testing.assert_array_equal(got, want)


def test_upsample_threshold_all_background_and_all_foreground() -> None:
    from edge.inference.postprocess import upsample_threshold

    assert not upsample_threshold(np.full((8, 8), -5, np.float32), 20, 30, np.float32(0)).any()
    assert upsample_threshold(np.full((8, 8), 5, np.float32), 20, 30, np.float32(0)).all()
    with pytest.raises(ValueError, match="enlarges only"):
        upsample_threshold(np.zeros((8, 8), np.float32), 4, 30, np.float32(0))
