"""Pixels to model input: the one preprocessing path of trainer and daemon.

Both the trainer (``trainer/data.py``) and the daemon call :func:`preprocess`
so a model sees identical inputs in training and in service. All operations
are vectorised numpy or OpenCV (``cv2.resize``); nothing loops over pixels.

The model-input resize (:func:`resize_plane`) is Pillow's antialiased
bilinear filter rebuilt from two OpenCV calls (a triangle prefilter, then
bilinear sampling): about four times faster on a probe's 480x640 frame, and
equal to Pillow inside the image at whole-number scales. :func:`resize_float`
(Pillow itself) stays for the synthetic-data generators and the
post-processing, whose pixels must not change.

Examples
--------
>>> import numpy as np
>>> from edge.inference.manifest import InputSpec, Preprocessing
>>> img = np.zeros((480, 640), dtype=np.uint8)
>>> x, geom = preprocess(img, InputSpec(size=(256, 256)), Preprocessing())
>>> x.shape, x.dtype
((1, 256, 256), dtype('float32'))
>>> geom.new_h, geom.new_w, geom.top, geom.left
(192, 256, 32, 0)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from edge.errors import DataError
from edge.inference.manifest import InputSpec, Preprocessing

__all__ = [
    "SUPPORTED_DTYPES",
    "Geometry",
    "geometry_for",
    "to_float_channels",
    "resize_float",
    "resize_plane",
    "resize_linear",
    "triangle_taps",
    "resize_nearest",
    "preprocess",
]

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "float32")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: Pixel types ``cv2.minMaxLoc`` takes (single channel).
_MINMAX_DTYPES = frozenset(np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.float32))

#: Shrinking by more than this along an axis, :func:`resize_plane` is Pillow's own filter: its cost grows
#: with the pixels, while the OpenCV prefilter's grows with pixels x taps (2 x the scale). A 200,000 x 1
#: frame took 271 ms through OpenCV and 2.3 ms through Pillow; 4096 x 4096 50 against 17 ms; 2048 x 2048
#: (scale 8) 5.6 against 13.8 ms (2-vCPU AMD EPYC, 2026-12-01).
PILLOW_SCALE = 12.0
#: Shrinking by more than this (a strip of millions of pixels by one), Pillow first box-reduces by an
#: integer factor (``reducing_gap=2``): computing its filter's weights costs time in proportion to the long
#: side (240 ms for 16,777,216 x 1), the reduction 7 ms; values within 1/255 (noise) to 2/100 (speckle) of the
#: range of the exact filter.
REDUCE_SCALE = 64.0

# One frame's resize takes tens of microseconds: splitting it over OpenCV's thread pool only adds
# hand-offs, and the daemon's workers and ONNX Runtime already use the cores. Process-wide setting.
cv2.setNumThreads(1)


@dataclass(frozen=True)
class Geometry:
    """Where the source image sits inside the model input (letterbox or stretch).

    The source (``src_h`` x ``src_w``) is resized to ``new_h`` x ``new_w`` and
    placed at (``top``, ``left``) inside a ``dst_h`` x ``dst_w`` canvas.
    """

    src_h: int
    src_w: int
    dst_h: int
    dst_w: int
    new_h: int
    new_w: int
    top: int
    left: int

    def to_source(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map model-input pixel coordinates to source pixel coordinates."""
        sx = (np.asarray(x, dtype=np.float64) - self.left) * (self.src_w / self.new_w)
        sy = (np.asarray(y, dtype=np.float64) - self.top) * (self.src_h / self.new_h)
        return sx, sy

    def to_input(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map source pixel coordinates to model-input pixel coordinates."""
        ix = np.asarray(x, dtype=np.float64) * (self.new_w / self.src_w) + self.left
        iy = np.asarray(y, dtype=np.float64) * (self.new_h / self.src_h) + self.top
        return ix, iy


def geometry_for(src_h: int, src_w: int, dst_h: int, dst_w: int, policy: str) -> Geometry:
    """Placement of a ``src_h`` x ``src_w`` image in a ``dst_h`` x ``dst_w`` input."""
    if src_h <= 0 or src_w <= 0:
        raise DataError(f"Image of shape {src_h}x{src_w} is empty.")
    if policy == "stretch":
        return Geometry(src_h, src_w, dst_h, dst_w, dst_h, dst_w, 0, 0)
    scale = min(dst_h / src_h, dst_w / src_w)
    new_h = max(1, min(dst_h, int(round(src_h * scale))))
    new_w = max(1, min(dst_w, int(round(src_w * scale))))
    return Geometry(src_h, src_w, dst_h, dst_w, new_h, new_w, (dst_h - new_h) // 2, (dst_w - new_w) // 2)


def to_float_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Return ``image`` as float32 ``[channels, H, W]``.

    Accepts ``[H, W]``, ``[H, W, 1]`` and ``[H, W, 3]``. RGB becomes luma for a
    grayscale model; grayscale is repeated for an RGB model.
    """
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        g = image.astype(np.float32, copy=False)
        return g[None] if channels == 1 else np.repeat(g[None], 3, axis=0)
    if image.ndim == 3 and image.shape[2] == 3:
        if channels == 1:
            return (image.astype(np.float32, copy=False) @ _LUMA)[None]
        return np.ascontiguousarray(np.moveaxis(image.astype(np.float32, copy=False), 2, 0))
    raise DataError(f"Image shape {list(image.shape)} is not [H, W], [H, W, 1] or [H, W, 3].")


def resize_float(plane: np.ndarray, height: int, width: int, reducing_gap: float | None = None) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of one float32 plane (Pillow; ``reducing_gap`` as Pillow's)."""
    if plane.shape == (height, width):
        return plane.astype(np.float32, copy=False)
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    return np.asarray(
        img.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=reducing_gap), dtype=np.float32
    )


def resize_linear(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one 2-D plane to a new float32 array (``cv2.INTER_LINEAR``, no antialiasing).

    Half-pixel centres, edge pixels replicated. When enlarging (both axes)
    this is the interpolation of :func:`resize_float` (Pillow's bilinear
    filter has support 1 then) to float32 rounding; shrinking, it aliases:
    use :func:`resize_plane`.
    """
    x = np.ascontiguousarray(plane, dtype=np.float32)
    if x.shape == (height, width):
        return x.copy() if x is plane else x
    return cv2.resize(x, (width, height), interpolation=cv2.INTER_LINEAR)


@functools.lru_cache(maxsize=64)
def triangle_taps(scale: float) -> np.ndarray:
    """The prefilter of :func:`resize_plane` for shrinking by ``scale``: Pillow's triangle at whole-pixel offsets.

    ``max(0, 1 - |d| / scale)`` for integer ``d``, normalised to sum 1, as
    float32 (read-only); ``[1]`` when ``scale <= 1`` (enlarging needs none).
    """
    if scale <= 1.0:
        taps = np.ones(1, np.float32)
    else:
        d = np.arange(-math.ceil(scale), math.ceil(scale) + 1, dtype=np.float64)
        w = np.clip(1.0 - np.abs(d) / scale, 0.0, None)
        w = w[w > 0]
        taps = (w / w.sum()).astype(np.float32)
    taps.setflags(write=False)
    return taps


def resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
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
       (``cv2.INTER_LINEAR``, half-pixel centres). Where every axis is
       kept or halved exactly (a 512x512 radiograph to 256x256), each
       output pixel is the mean of a 2x2 (or 2x1) block, and for integer
       pixels ``cv2.INTER_AREA``'s integer-scale path computes that mean
       in half the time (the same values to float32 rounding).

    When enlarging, and inside the image when ``s`` is a whole number (a
    512x512 radiograph to 256x256), this is Pillow's result to float32
    rounding; at 2.5x (480x640 to 192x256) it differs from it by 0.5/255
    of the range on average. About four times faster than Pillow on a
    probe frame. A box average (``cv2.INTER_AREA`` at other scales) is
    not the same filter: the bundled segmentation model loses 0.07
    held-out Dice on it.

    Shrinking by more than :data:`PILLOW_SCALE` along either axis (a
    4096x4096 frame, a 200,000x1 strip), the prefilter's taps outnumber
    what it saves: Pillow resizes instead (:func:`resize_float`'s filter),
    whose cost grows with the pixels alone, and beyond :data:`REDUCE_SCALE`
    (a strip) box-reduces first, so no frame within the daemon's pixel
    bound takes more than about 0.1 s.
    """
    _check_resize(plane, height, width)
    if _steep(plane, height, width):
        return _resize_steep(plane, height, width)
    x = _prefiltered(plane, height, width, 1.0, 0.0)
    if x is None:
        x = plane.astype(np.float32)  # a copy, even of float32: never a view of the caller's image
    if x.shape == (height, width):
        return x
    return _resample(x, height, width, finite=plane.dtype.kind in "iub")


def _steep(plane: np.ndarray, height: int, width: int) -> bool:
    """Whether some axis shrinks by more than :data:`PILLOW_SCALE` (Pillow resizes then; see there)."""
    return plane.shape[0] > PILLOW_SCALE * height or plane.shape[1] > PILLOW_SCALE * width


def _resize_steep(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """:func:`resize_float` (a new array), box-reduced first beyond :data:`REDUCE_SCALE`."""
    gap = 2.0 if plane.shape[0] > REDUCE_SCALE * height or plane.shape[1] > REDUCE_SCALE * width else None
    return resize_float(plane, height, width, reducing_gap=gap)


def _check_resize(plane: np.ndarray, height: int, width: int) -> None:
    """Refuse what :func:`resize_plane` cannot resize."""
    if plane.ndim != 2:
        raise DataError(f"resize_plane takes one [H, W] plane, not shape {list(plane.shape)}.")
    if height <= 0 or width <= 0:
        raise DataError(f"Cannot resize to {height}x{width}.")


def _prefiltered(plane: np.ndarray, height: int, width: int, gain: float, delta: float) -> np.ndarray | None:
    """Step 1 of :func:`resize_plane` times ``gain`` plus ``delta`` (a new float32 array); None when no axis shrinks.

    ``gain`` scales the vertical taps and ``delta`` is OpenCV's, added to
    each filtered pixel: a ``fixed`` normalisation folded into the filter
    costs no pass of its own (bilinear sampling's weights sum to one, so it
    commutes with it to float32 rounding).
    """
    h, w = plane.shape
    ky, kx = triangle_taps(h / height), triangle_taps(w / width)
    if ky.size == 1 and kx.size == 1:
        return None
    if gain != 1.0:
        ky = ky * np.float32(gain)
    # uint8 goes straight in (OpenCV's fastest input here); other types are filtered as float32
    src = plane if plane.dtype == np.uint8 else plane.astype(np.float32, copy=False)
    return cv2.sepFilter2D(
        np.ascontiguousarray(src), cv2.CV_32F, kx, ky, delta=delta, borderType=cv2.BORDER_REPLICATE
    )


def _resample(
    x: np.ndarray, height: int, width: int, dst: np.ndarray | None = None, finite: bool = False
) -> np.ndarray:
    """Step 2 of :func:`resize_plane` on a float32 plane: into ``dst`` (a 2-D float32 view) when given.

    ``finite``: ``x`` comes from integer pixels, so the 2x2 mean of
    ``cv2.INTER_AREA`` may stand in for bilinear sampling at a halving (with
    infinities the two differ: bilinear sampling multiplies a zero weight).
    """
    h, w = x.shape
    halved = finite and h in (height, 2 * height) and w in (width, 2 * width)
    interpolation = cv2.INTER_AREA if halved else cv2.INTER_LINEAR
    if dst is None or dst.strides[-1] != dst.itemsize:
        out = cv2.resize(x, (width, height), interpolation=interpolation)
        if dst is None:
            return out
        dst[...] = out
        return dst
    out = cv2.resize(x, (width, height), dst=dst, interpolation=interpolation)
    if out is not dst:  # OpenCV reallocated (it should not for a float32 view of the right size): copy
        dst[...] = out
    return dst


def resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D label image (index arithmetic, no loops)."""
    h, w = labels.shape
    if (h, w) == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.intp), w - 1)
    # rows, then columns: two contiguous gathers, four times faster than one broadcast [height, width] index
    return np.take(np.take(labels, rows, axis=0), cols, axis=1)


def _normalize_into(src: np.ndarray, dst: np.ndarray, pre: Preprocessing, finite: bool = False) -> None:
    """``dst = normalise(float32(src))``; ``dst`` may be ``src`` itself (in place).

    ``fixed`` and ``minmax`` subtract a float32 constant while converting and
    then scale in place: float32 arithmetic throughout, the same values as
    normalising a float32 copy, with one pass over the source. ``zscore``
    needs float32 statistics of the converted image, so it converts first.
    ``finite``: ``src`` holds no NaN (it comes from integer pixels), so one
    ``cv2.minMaxLoc`` pass finds the same minimum and maximum as numpy's two.
    """
    if pre.normalize == "zscore":
        if dst is not src:
            np.copyto(dst, src, casting="unsafe")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught below, not warned about
            sd, mean = float(dst.std()), float(dst.mean())
        if not (math.isfinite(sd) and math.isfinite(mean)) and np.isfinite(dst).all():
            sd, mean = float(dst.std(dtype=np.float64)), float(dst.mean(dtype=np.float64))  # float32 overflowed
            np.copyto(dst, (dst.astype(np.float64) - mean) * (1.0 / sd if sd > 1e-12 else 0.0), casting="unsafe")
            return
        dst -= np.float32(mean)
        dst *= np.float32(1.0 / sd if sd > 1e-12 else 0.0)
        return
    if pre.normalize == "minmax":
        lo, hi = _min_max(src, finite)
        if hi - lo < 1e-12:
            dst.fill(0.0)
            return
        offset, scale = lo, 1.0 / (hi - lo)
        if hi - lo > _FLOAT32_MAX:  # finite float32 pixels whose range is not: x - lo would overflow
            np.copyto(dst, (src.astype(np.float64) - lo) * scale, casting="unsafe")
            return
    else:
        offset, scale = pre.mean, 1.0 / pre.std
    np.subtract(src, np.float32(offset), out=dst, dtype=np.float32)
    dst *= np.float32(scale)


def _min_max(x: np.ndarray, finite: bool) -> tuple[float, float]:
    """``float(x.min()), float(x.max())``; one OpenCV pass over a single NaN-free plane (exact: it selects values)."""
    plane = x[0] if x.ndim == 3 and x.shape[0] == 1 else x
    one_plane = plane.ndim == 2 and plane.size > 0 and plane.strides[-1] == plane.itemsize
    if finite and one_plane and plane.dtype in _MINMAX_DTYPES:
        lo, hi, _, _ = cv2.minMaxLoc(plane)
        return lo, hi
    return float(x.min()), float(x.max())


def _gray_plane(image: np.ndarray, channels: int) -> np.ndarray | None:
    """The single source plane when no channel conversion is needed (any dtype), else None."""
    if channels != 1:
        return None
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    return None


def preprocess(
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
    that is still in cache. A grayscale image is resized straight into its
    place in ``out`` and normalised there (``fixed`` normalisation folded
    into the resize filter: the same values to float32 rounding).
    """
    dst_h, dst_w = spec.size
    if out is None:
        out = np.empty((spec.channels, dst_h, dst_w), dtype=np.float32)
    elif out.shape != (spec.channels, dst_h, dst_w) or out.dtype != np.float32:
        raise ValueError(f"out has shape {out.shape} {out.dtype}; expected {(spec.channels, dst_h, dst_w)} float32.")
    plane = _gray_plane(image, spec.channels)
    if plane is not None and pre.window is None:
        geom = geometry_for(plane.shape[0], plane.shape[1], dst_h, dst_w, pre.resize)
        region = out[0, geom.top : geom.top + geom.new_h, geom.left : geom.left + geom.new_w]
        _resize_normalized_into(plane, region, pre)
    else:
        planes = to_float_channels(image, spec.channels)
        if pre.window is not None:
            center, width = pre.window
            planes = np.clip((planes - np.float32(center - width / 2.0)) / np.float32(width), 0.0, 1.0)
        geom = geometry_for(planes.shape[1], planes.shape[2], dst_h, dst_w, pre.resize)
        resized = np.stack([resize_plane(p, geom.new_h, geom.new_w) for p in planes])
        _normalize_into(resized, out[:, geom.top : geom.top + geom.new_h, geom.left : geom.left + geom.new_w], pre)
    top, left, nh, nw = geom.top, geom.left, geom.new_h, geom.new_w
    if (nh, nw) != (dst_h, dst_w):
        out[:, :top] = 0.0
        out[:, top + nh :] = 0.0
        out[:, top : top + nh, :left] = 0.0
        out[:, top : top + nh, left + nw :] = 0.0
    return out, geom


def _resize_normalized_into(plane: np.ndarray, dst: np.ndarray, pre: Preprocessing) -> None:
    """``dst = normalise(resize_plane(plane))`` for one grayscale plane, written into ``dst`` (its place in ``out``).

    A plane of ``dst``'s size is normalised as it is converted (one pass).
    A shrunk plane is filtered, sampled straight into ``dst`` and normalised
    there; ``fixed`` normalisation is folded into the filter
    (:func:`_prefiltered`'s ``gain`` and ``delta``: the same values to
    float32 rounding, one pass fewer). Integer pixels cannot be NaN, so
    ``minmax`` takes :func:`_min_max`'s one-pass route.
    """
    height, width = dst.shape
    finite = plane.dtype.kind in "iub"
    if plane.shape == (height, width):
        _normalize_into(plane, dst, pre, finite)
        return
    _check_resize(plane, height, width)
    if _steep(plane, height, width):
        dst[...] = _resize_steep(plane, height, width)
        _normalize_into(dst, dst, pre, finite)
        return
    fold = pre.normalize == "fixed"
    gain = 1.0 / pre.std if fold else 1.0
    x = _prefiltered(plane, height, width, gain, -pre.mean * gain if fold else 0.0)
    if x is None:  # enlarging: nothing to fold into
        fold = False
        x = np.ascontiguousarray(plane, dtype=np.float32)
    _resample(x, height, width, dst, finite)
    if not fold:
        _normalize_into(dst, dst, pre, finite)
