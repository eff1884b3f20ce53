"""Pixels to model input: the one preprocessing path of trainer and daemon.

Both the trainer (``trainer/data.py``) and the daemon call :func:`preprocess`
so a model sees identical inputs in training and in service. All operations
are vectorised numpy or Pillow's C resampling; nothing loops over pixels.

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

from dataclasses import dataclass

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
    "resize_nearest",
    "preprocess",
]

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "float32")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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


def resize_float(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of one float32 plane."""
    if plane.shape == (height, width):
        return plane.astype(np.float32, copy=False)
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D label image (index arithmetic, no loops)."""
    h, w = labels.shape
    if (h, w) == (height, width):
        return labels
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.intp), w - 1)
    return labels[rows[:, None], cols[None, :]]


def _normalize_into(src: np.ndarray, dst: np.ndarray, pre: Preprocessing) -> None:
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
    stretch), intensity normalisation over the image (not the padding), and
    zero padding to the model input size.

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
    that is still in cache. Every path computes the same float32 values.
    """
    dst_h, dst_w = spec.size
    if out is None:
        out = np.empty((spec.channels, dst_h, dst_w), dtype=np.float32)
    elif out.shape != (spec.channels, dst_h, dst_w) or out.dtype != np.float32:
        raise ValueError(f"out has shape {out.shape} {out.dtype}; expected {(spec.channels, dst_h, dst_w)} float32.")
    plane = _gray_plane(image, spec.channels)
    if plane is not None and pre.window is None and plane.shape == (dst_h, dst_w):
        geom = geometry_for(dst_h, dst_w, dst_h, dst_w, pre.resize)
        _normalize_into(plane, out[0], pre)
        return out, geom
    planes = to_float_channels(image, spec.channels)
    if pre.window is not None:
        center, width = pre.window
        planes = np.clip((planes - np.float32(center - width / 2.0)) / np.float32(width), 0.0, 1.0)
    geom = geometry_for(planes.shape[1], planes.shape[2], dst_h, dst_w, pre.resize)
    resized = np.stack([resize_float(p, geom.new_h, geom.new_w) for p in planes])
    _normalize_into(resized, resized, pre)
    top, left, nh, nw = geom.top, geom.left, geom.new_h, geom.new_w
    out[:, top : top + nh, left : left + nw] = resized
    if (nh, nw) != (dst_h, dst_w):
        out[:, :top] = 0.0
        out[:, top + nh :] = 0.0
        out[:, top : top + nh, :left] = 0.0
        out[:, top : top + nh, left + nw :] = 0.0
    return out, geom
