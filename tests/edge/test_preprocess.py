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


# ------------------------------------------------------------------ the model-input resize (OpenCV)
def _smooth_and_speckle(h: int, w: int, dtype: str, seed: int) -> np.ndarray:
    """A test image with structure and pixel-level texture (speckle), in ``dtype``'s range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 0.5 + 0.3 * np.sin(yy / 17.0) * np.cos(xx / 23.0)
    img = np.clip(base * rng.rayleigh(0.8, (h, w)), 0.0, 1.0)
    top = {"uint8": 255, "uint16": 4095, "int16": 2000, "float32": 1.0}[dtype]
    return (img * top - (1000 if dtype == "int16" else 0)).astype(dtype)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
@pytest.mark.parametrize("src,dst", [((512, 512), (256, 256)), ((480, 640), (160, 320)), ((90, 120), (30, 40))])
def test_resize_plane_is_pillows_filter_inside_the_image_at_whole_number_scales(
    dtype: str, src: tuple[int, int], dst: tuple[int, int]
) -> None:
    from edge.inference.preprocess import resize_float, resize_plane

    img = _smooth_and_speckle(*src, dtype, seed=sum(src))
    got, want = resize_plane(img, *dst), resize_float(img.astype(np.float32), *dst)
    assert got.shape == dst and got.dtype == np.float32 and got.flags.c_contiguous
    span = float(img.max()) - float(img.min())
    # the outermost output pixels differ: Pillow renormalises its taps there, OpenCV replicates the edge
    np.testing.assert_allclose(got[2:-2, 2:-2], want[2:-2, 2:-2], rtol=0, atol=1e-5 * span)
    assert np.abs(got - want).max() < 0.05 * span


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_resize_plane_stays_close_to_pillow_at_a_fractional_scale(dtype: str) -> None:
    """480x640 -> 192x256 (2.5x): the probe frame; linear sampling between prefiltered pixels."""
    from edge.inference.preprocess import resize_float, resize_plane

    img = _smooth_and_speckle(480, 640, dtype, seed=3)
    span = float(img.max()) - float(img.min())
    diff = np.abs(resize_plane(img, 192, 256) - resize_float(img.astype(np.float32), 192, 256)) / span
    # pure pixel-level speckle, the hardest case: 1.3/255 on average (a box average, INTER_AREA: 7.3/255)
    assert diff.mean() < 2.0 / 255 and diff.max() < 0.08
    # and it is an antialiasing filter: an alternating pattern (above the new Nyquist rate) is averaged away
    stripes = np.tile(np.array([0, 255], np.uint8), (480, 320))
    flat = resize_plane(stripes, 192, 256)
    assert np.abs(flat[4:-4, 4:-4] - 127.5).max() < 25.0


@pytest.mark.parametrize("src,dst", [((100, 70), (256, 256)), ((7, 9), (50, 50)), ((192, 256), (192, 256))])
def test_enlarging_is_pillows_bilinear(src: tuple[int, int], dst: tuple[int, int]) -> None:
    from edge.inference.preprocess import resize_float, resize_linear, resize_plane

    img = _smooth_and_speckle(*src, "float32", seed=5)
    want = resize_float(img, *dst)
    for got in (resize_plane(img, *dst), resize_linear(img, *dst)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert got is not img and not np.shares_memory(got, img)


def test_uint8_is_filtered_as_it_is_and_gives_what_its_float32_copy_gives() -> None:
    from edge.inference.preprocess import resize_plane

    img = _smooth_and_speckle(480, 640, "uint8", seed=9)
    before = img.copy()
    np.testing.assert_allclose(resize_plane(img, 192, 256), resize_plane(img.astype(np.float32), 192, 256), atol=1e-3)
    np.testing.assert_array_equal(img, before)
    pre = dataclasses.replace(Preprocessing(), normalize="fixed", mean=0.0, std=255.0)
    a, ga = preprocess(img, InputSpec(size=(256, 256)), pre)
    b, gb = preprocess(img.astype(np.float32), InputSpec(size=(256, 256)), pre)
    assert ga == gb and (ga.new_h, ga.new_w, ga.top) == (192, 256, 32)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert (a[0, :32] == 0).all() and (a[0, 224:] == 0).all() and a[0, 32:224].min() >= 0.0


def test_triangle_taps() -> None:
    from edge.inference.preprocess import triangle_taps

    assert triangle_taps(1.0).tolist() == [1.0] and triangle_taps(0.5).tolist() == [1.0]
    np.testing.assert_allclose(triangle_taps(2.0), np.array([1, 2, 1]) / 4)
    np.testing.assert_allclose(triangle_taps(2.5), np.array([0.2, 0.6, 1.0, 0.6, 0.2]) / 2.6, rtol=1e-6)
    for s in (1.25, 2.5, 3.0, 7.3):
        k = triangle_taps(s)
        assert k.dtype == np.float32 and k.size % 2 == 1 and abs(float(k.sum()) - 1) < 1e-6
        np.testing.assert_array_equal(k, k[::-1])
        assert not k.flags.writeable


def test_resize_plane_refuses_what_it_cannot_resize() -> None:
    from edge.errors import DataError
    from edge.inference.preprocess import resize_plane

    with pytest.raises(DataError, match="one \\[H, W\\] plane"):
        resize_plane(np.zeros((4, 4, 3), np.uint8), 2, 2)
    with pytest.raises(DataError, match="Cannot resize"):
        resize_plane(np.zeros((4, 4), np.uint8), 0, 2)


# ------------------------------------------------------------------ steep shrinks (elongated or huge frames)
@pytest.mark.parametrize("src,dst", [((4096, 64), (256, 4)), ((20000, 3), (256, 1)), ((64, 3000), (4, 192))])
def test_a_steep_shrink_is_pillows_own_filter(src: tuple[int, int], dst: tuple[int, int]) -> None:
    """Past PILLOW_SCALE (and up to REDUCE_SCALE) the resize is exactly Pillow's antialiased bilinear filter."""
    from edge.inference.preprocess import PILLOW_SCALE, REDUCE_SCALE, resize_float, resize_plane

    assert max(src[0] / dst[0], src[1] / dst[1]) > PILLOW_SCALE
    assert max(src[0] / dst[0], src[1] / dst[1]) <= REDUCE_SCALE or src == (20000, 3)
    img = _smooth_and_speckle(*src, "uint16", seed=5)
    got, want = resize_plane(img, *dst), resize_float(img.astype(np.float32), *dst)
    span = float(img.max()) - float(img.min())
    if src == (20000, 3):  # 78x: box-reduced first, within 2 % of the range of the exact filter on speckle
        assert np.abs(got - want).max() < 0.02 * span
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * span)


@pytest.mark.parametrize("shape", [(2_000_000, 1), (1, 300_000), (4096, 4096), (9000, 40)])
def test_no_frame_meets_a_prefilter_longer_than_the_steep_bound(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OpenCV prefilter costs pixels x taps: a 2,000,000 x 1 strip once took 40 s through it in the daemon.

    Whatever the frame, the filter it meets has at most 2 x PILLOW_SCALE + 1 taps per axis, and the
    result is still a finite, normalised model input.
    """
    import cv2

    from edge.inference import preprocess as pp

    seen: list[int] = []
    real = cv2.sepFilter2D

    def counting(src, ddepth, kx, ky, **kw):  # type: ignore[no-untyped-def]
        seen.append(max(np.asarray(kx).size, np.asarray(ky).size))
        return real(src, ddepth, kx, ky, **kw)

    monkeypatch.setattr(pp.cv2, "sepFilter2D", counting)
    img = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)
    for pre in (Preprocessing(normalize="minmax"), Preprocessing(normalize="fixed", mean=0.0, std=255.0)):
        x, geom = preprocess(img, InputSpec(size=(256, 256)), pre)
        assert np.isfinite(x).all() and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert (geom.src_h, geom.src_w) == shape
    assert all(n <= 2 * pp.PILLOW_SCALE + 1 for n in seen), seen


@pytest.mark.parametrize("normalize", ["minmax", "zscore"])
@pytest.mark.parametrize("shape", [(512, 512), (256, 256), (40, 3000)])
def test_finite_float32_pixels_whose_range_overflows_float32_normalise_like_any_others(
    normalize: str, shape: tuple[int, int]
) -> None:
    """[-1.5e38, 1.5e38] is an affine copy of [0, 1]: minmax and zscore give the same model input, finite.

    Before, ``x - min`` overflowed float32 (a detector found nothing, a classifier answered ``internal``).
    """
    import warnings

    unit = np.random.default_rng(7).random(shape)
    small, huge = unit.astype(np.float32), (unit * 3e38 - 1.5e38).astype(np.float32)
    assert np.isfinite(huge).all()
    spec, pre = InputSpec(size=(256, 256)), Preprocessing(normalize=normalize)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow on the way either
        want, _ = preprocess(small, spec, pre)
        got, _ = preprocess(huge, spec, pre)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want).max())))
