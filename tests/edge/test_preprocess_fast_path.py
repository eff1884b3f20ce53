"""The serving path's preprocessing gives today's model inputs, to float32 rounding (:mod:`edge.inference.preprocess`).

The reference (``ref_*`` below) is :func:`~edge.inference.preprocess.preprocess`
as it stood before the resize was written straight into ``out``, ``fixed``
normalisation folded into the resize filter, ``cv2.INTER_AREA`` used where
an axis is exactly halved and ``cv2.minMaxLoc`` used on integer pixels
(copied verbatim, names prefixed ``ref_``). Measured on 304 seeded frames
of each native source: 480x640 uint8 ultrasound and 512x512 uint16 X-ray
to 256x256 differ by at most 1.8e-7 (``fixed`` 0/255) and 9.5e-7 (``fixed``
0/255 on 12-bit values up to 16), and not at all for ``minmax`` and
``zscore``.

Profiles: ``MEDGE_HYPOTHESIS_PROFILE=ci`` (default, 150 examples a test) or
``release`` (5,000).
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge.errors import DataError
from edge.inference.manifest import InputSpec, Preprocessing
from edge.inference.preprocess import Geometry, geometry_for, preprocess, to_float_channels, triangle_taps

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("preprocess-ci", max_examples=150, **_COMMON)
settings.register_profile("preprocess-release", max_examples=5_000, **_COMMON)
PROFILE = settings.get_profile("preprocess-" + os.environ.get("MEDGE_HYPOTHESIS_PROFILE", "ci"))

NORMALIZATIONS = {
    "fixed": Preprocessing(normalize="fixed", mean=0.0, std=255.0),
    "fixed-offset": Preprocessing(normalize="fixed", mean=100.0, std=1000.0),
    "minmax": Preprocessing(normalize="minmax"),
    "zscore": Preprocessing(normalize="zscore"),
}


# ------------------------------------------------------------------ reference (verbatim, renamed)
def ref_resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """The model-input resize of one 2-D plane: a new float32 ``height`` x ``width`` array.

    Parameters
    ----------
    plane : numpy.ndarray
        ``[H, W]`` uint8, uint16, int16 or float32 (never modified).
    height, width : int
        The size inside the model input (:attr:`Geometry.new_h`, :attr:`Geometry.new_w`).

    Returns
    -------
    numpy.ndarray
        float32, C-contiguous, never a view of ``plane``.

    Notes
    -----
    Pillow's antialiased bilinear filter (:func:`resize_float`, what the
    bundled models were trained on) in two OpenCV steps:

    1. Along each axis shrunk by ``s > 1``, a separable prefilter with
       Pillow's triangle of half-width ``s`` sampled at whole pixels
       (:func:`triangle_taps`; ``cv2.sepFilter2D``, float32 result, edge
       pixels replicated).
    2. Bilinear sampling at the output pixels' centres
       (``cv2.INTER_LINEAR``, half-pixel centres).

    When enlarging, and inside the image when ``s`` is a whole number (a
    512x512 radiograph to 256x256), this is Pillow's result to float32
    rounding; at 2.5x (480x640 to 192x256) it differs from it by 0.5/255
    of the range on average. About four times faster than Pillow on a
    probe frame. A box average (``cv2.INTER_AREA``) is not the same
    filter: the bundled segmentation model loses 0.07 held-out Dice on it.
    """
    if plane.ndim != 2:
        raise DataError(f"resize_plane takes one [H, W] plane, not shape {list(plane.shape)}.")
    if height <= 0 or width <= 0:
        raise DataError(f"Cannot resize to {height}x{width}.")
    h, w = plane.shape
    ky, kx = triangle_taps(h / height), triangle_taps(w / width)
    if ky.size > 1 or kx.size > 1:
        # uint8 goes straight in (OpenCV's fastest input here); other types are filtered as float32
        src = plane if plane.dtype == np.uint8 else plane.astype(np.float32, copy=False)
        x = cv2.sepFilter2D(np.ascontiguousarray(src), cv2.CV_32F, kx, ky, borderType=cv2.BORDER_REPLICATE)
    else:
        x = plane.astype(np.float32)  # a copy, even of float32: never a view of the caller's image
    if x.shape == (height, width):
        return x
    return cv2.resize(x, (width, height), interpolation=cv2.INTER_LINEAR)


def ref_normalize_into(src: np.ndarray, dst: np.ndarray, pre: Preprocessing) -> None:
    """``dst = normalise(float32(src))``; ``dst`` may be ``src`` itself (in place).

    ``fixed`` and ``minmax`` subtract a float32 constant while converting and
    then scale in place: float32 arithmetic throughout, the same values as
    normalising a float32 copy, with one pass over the source. ``zscore``
    needs float32 statistics of the converted image, so it converts first.
    """
    if pre.normalize == "zscore":
        if dst is not src:
            np.copyto(dst, src, casting="unsafe")
        sd = float(dst.std())
        dst -= np.float32(dst.mean())
        dst *= np.float32(1.0 / sd if sd > 1e-12 else 0.0)
        return
    if pre.normalize == "minmax":
        lo, hi = float(src.min()), float(src.max())
        if hi - lo < 1e-12:
            dst.fill(0.0)
            return
        offset, scale = lo, 1.0 / (hi - lo)
    else:
        offset, scale = pre.mean, 1.0 / pre.std
    np.subtract(src, np.float32(offset), out=dst, dtype=np.float32)
    dst *= np.float32(scale)


def ref_gray_plane(image: np.ndarray, channels: int) -> np.ndarray | None:
    """The single source plane when no channel conversion is needed (any dtype), else None."""
    if channels != 1:
        return None
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    return None


def ref_preprocess(
    image: np.ndarray, spec: InputSpec, pre: Preprocessing, out: np.ndarray | None = None
) -> tuple[np.ndarray, Geometry]:
    """Turn one image into a ``[C, H, W]`` float32 model input.

    Steps: to float channels, optional CT window, resize (letterbox or
    stretch; :func:`resize_plane`), intensity normalisation over the image
    (not the padding), and zero padding to the model input size. A
    uint8 grayscale image without a window is filtered as it is (no float32
    copy at full size).

    Parameters
    ----------
    image : numpy.ndarray
        ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` of a supported dtype, already
        in modality units (see :mod:`edge.ingest.dicom.pixels` for DICOM).
    spec, pre
        From the model's manifest.
    out : numpy.ndarray, optional
        A C-contiguous float32 ``[C, H, W]`` array to write into (one slot
        of a batch tensor: the serving path then copies nothing more).

    Returns
    -------
    tensor : numpy.ndarray
        ``[C, H, W]`` float32 (``out`` when given).
    geometry : Geometry
        Where the image sits in the tensor, to map results back.

    Notes
    -----
    When the image already has the model's size and needs no channel
    conversion or window, it is converted straight into ``out`` and
    normalised there in place: one pass over the source, two over a buffer
    that is still in cache. The resized image is normalised straight into
    its place in ``out``. Every path computes the same float32 values from
    the same resized image.
    """
    dst_h, dst_w = spec.size
    if out is None:
        out = np.empty((spec.channels, dst_h, dst_w), dtype=np.float32)
    elif out.shape != (spec.channels, dst_h, dst_w) or out.dtype != np.float32:
        raise ValueError(f"out has shape {out.shape} {out.dtype}; expected {(spec.channels, dst_h, dst_w)} float32.")
    plane = ref_gray_plane(image, spec.channels)
    if plane is not None and pre.window is None:
        geom = geometry_for(plane.shape[0], plane.shape[1], dst_h, dst_w, pre.resize)
        if plane.shape == (dst_h, dst_w):
            ref_normalize_into(plane, out[0], pre)
            return out, geom
        resized = ref_resize_plane(plane, geom.new_h, geom.new_w)[None]
    else:
        planes = to_float_channels(image, spec.channels)
        if pre.window is not None:
            center, width = pre.window
            planes = np.clip((planes - np.float32(center - width / 2.0)) / np.float32(width), 0.0, 1.0)
        geom = geometry_for(planes.shape[1], planes.shape[2], dst_h, dst_w, pre.resize)
        resized = np.stack([ref_resize_plane(p, geom.new_h, geom.new_w) for p in planes])
    top, left, nh, nw = geom.top, geom.left, geom.new_h, geom.new_w
    ref_normalize_into(resized, out[:, top : top + nh, left : left + nw], pre)
    if (nh, nw) != (dst_h, dst_w):
        out[:, :top] = 0.0
        out[:, top + nh :] = 0.0
        out[:, top : top + nh, :left] = 0.0
        out[:, top : top + nh, left + nw :] = 0.0
    return out, geom


# ------------------------------------------------------------------ comparison
def _tolerance(image: np.ndarray, pre: Preprocessing, want: np.ndarray) -> float:
    """A few float32 roundings of the largest magnitude either computation holds."""
    finite = np.isfinite(want)
    top = float(np.abs(want[finite]).max()) if finite.any() else 0.0
    if pre.normalize == "fixed":
        pixels = np.abs(image.astype(np.float64))
        top = max(top, (float(pixels[np.isfinite(pixels)].max(initial=0.0)) + abs(pre.mean)) / pre.std)
    return 8 * float(np.finfo(np.float32).eps) * max(top, 1.0)


def assert_same_input(image: np.ndarray, spec: InputSpec, pre: Preprocessing) -> np.ndarray:
    """Today's tensor and geometry, to float32 rounding (NaN where it has NaN); the new tensor."""
    with np.errstate(invalid="ignore", over="ignore"):  # infinities in float32 images warn on both sides
        got, geom = preprocess(image, spec, pre, out=np.full((spec.channels, *spec.size), np.nan, np.float32))
        want, ref_geom = ref_preprocess(image, spec, pre)
    assert geom == ref_geom and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(image, pre, want), equal_nan=True)
    return got


def _source(kind: str, seed: int):
    from edge.tools.synthetic import make_source

    if kind == "ultrasound":
        return make_source("ultrasound", 480, 640, "uint8", seed=seed, loop=8)
    return make_source("xray", 512, 512, "uint16", seed=seed, loop=8)


@pytest.mark.parametrize("kind", ["ultrasound", "xray"])
@pytest.mark.parametrize("norm", list(NORMALIZATIONS))
def test_native_frames_give_todays_model_input(kind: str, norm: str) -> None:
    """24 seeded native frames a source (480x640 uint8, 512x512 uint16): today's input; minmax and zscore exactly."""
    spec, pre = InputSpec(size=(256, 256)), NORMALIZATIONS[norm]
    for seed in range(3):
        src = _source(kind, seed)
        for i in range(8):
            image = src.frame(i)
            got = assert_same_input(image, spec, pre)
            if norm in ("minmax", "zscore"):  # nothing but exact selections and the same float32 sampling
                np.testing.assert_array_equal(got, ref_preprocess(image, spec, pre)[0])


@st.composite
def images(draw: st.DrawFn) -> tuple[np.ndarray, InputSpec, Preprocessing]:
    """Any supported grayscale image, input size and normalisation; exact halvings, enlarging and NaN included."""
    dtype = draw(st.sampled_from(["uint8", "uint16", "int16", "float32"]))
    dst_h, dst_w = draw(st.integers(4, 64)), draw(st.integers(4, 64))
    if draw(st.booleans()):  # whole-number scales: halved (the INTER_AREA route), kept, or a third (not that route)
        h, w = dst_h * draw(st.sampled_from([1, 2, 3])), dst_w * draw(st.sampled_from([1, 2, 3]))
    else:
        h, w = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lo, hi = {"uint8": (0, 256), "uint16": (0, 4096), "int16": (-1000, 3000), "float32": (-2, 2)}[dtype]
    image = (rng.random((h, w)) * (hi - lo) + lo).astype(dtype)
    if dtype == "float32" and draw(st.integers(0, 4)) == 0:
        image.reshape(-1)[rng.integers(0, image.size, 2)] = rng.choice([np.nan, np.inf, -np.inf], 2)
    if draw(st.booleans()):
        image = image[:, :, None]
    norm = draw(st.sampled_from(list(NORMALIZATIONS)))
    pre = Preprocessing(
        resize=draw(st.sampled_from(["letterbox", "stretch"])),
        normalize=NORMALIZATIONS[norm].normalize,
        mean=NORMALIZATIONS[norm].mean,
        std=NORMALIZATIONS[norm].std,
    )
    return image, InputSpec(size=(dst_h, dst_w)), pre


@PROFILE
@given(images())
def test_any_grayscale_image_gives_todays_model_input(case: tuple) -> None:
    """Odd sizes, both resize policies, every normalisation, every dtype, NaN and infinities: today's input.

    Shrinks steeper than ``PILLOW_SCALE`` go through Pillow since 2026-12-01 (a change of filter, not of
    speed: ``tests/edge/test_preprocess.py`` holds them to Pillow's own filter).
    """
    from edge.inference.preprocess import PILLOW_SCALE, geometry_for

    image, spec, pre = case
    geom = geometry_for(image.shape[0], image.shape[1], *spec.size, pre.resize)
    assume(image.shape[0] <= PILLOW_SCALE * geom.new_h and image.shape[1] <= PILLOW_SCALE * geom.new_w)
    assert_same_input(*case)


def test_the_resize_is_written_into_its_place_and_the_padding_is_zero() -> None:
    """Letterboxed on both sides (a tall frame): the image lands in ``out`` where its geometry says, zeros round it."""
    image = (np.random.default_rng(3).random((300, 120)) * 255).astype(np.uint8)
    spec, pre = InputSpec(size=(64, 64)), NORMALIZATIONS["fixed"]
    out = np.full((2, 1, 64, 64), np.nan, np.float32)
    got, geom = preprocess(image, spec, pre, out=out[1])
    assert got is out[1] or np.shares_memory(got, out[1])
    assert geom.left > 0 and np.isnan(out[0]).all()
    inside = out[1, 0, geom.top : geom.top + geom.new_h, geom.left : geom.left + geom.new_w]
    assert np.isfinite(inside).all() and inside.max() > 0.5
    out[1, 0, geom.top : geom.top + geom.new_h, geom.left : geom.left + geom.new_w] = 0.0
    assert (out[1] == 0.0).all()
    assert_same_input(image, spec, pre)


def test_a_zero_std_still_fails_as_before() -> None:
    """The fold computes ``1 / std`` up front; a zero ``std`` raises what it always raised."""
    pre = Preprocessing(normalize="fixed", mean=0.0, std=0.0)
    for image in (np.zeros((40, 40), np.uint8), np.zeros((16, 16), np.uint8)):
        with pytest.raises(ZeroDivisionError):
            ref_preprocess(image, InputSpec(size=(16, 16)), pre)
        with pytest.raises(ZeroDivisionError):
            preprocess(image, InputSpec(size=(16, 16)), pre)


def test_a_nan_float_image_is_not_normalised_by_opencvs_minimum() -> None:
    """float32 pixels may hold NaN: minmax takes numpy's NaN-propagating route, as before (all NaN)."""
    image = np.random.default_rng(4).random((64, 64)).astype(np.float32)
    image[5, 5] = np.nan
    got = assert_same_input(image, InputSpec(size=(32, 32)), NORMALIZATIONS["minmax"])
    assert np.isnan(got).all()


@PROFILE
@given(st.integers(1, 60), st.integers(1, 60), st.integers(1, 200), st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_resize_nearest_picks_todays_pixels(h: int, w: int, height: int, width: int, seed: int) -> None:
    """Two one-axis gathers pick the pixels the one broadcast index picked, at any scale."""
    from edge.inference.preprocess import resize_nearest

    labels = np.random.default_rng(seed).integers(0, 4, size=(h, w)).astype(np.uint8)
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.intp), w - 1)
    got = resize_nearest(labels, height, width)
    np.testing.assert_array_equal(got, labels[rows[:, None], cols[None, :]])
    assert got.dtype == np.uint8 and (got.shape == (h, w) or got.flags.c_contiguous)
