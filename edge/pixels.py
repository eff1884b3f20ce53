"""DICOM pixel data to arrays in modality units.

One place for photometric interpretation, rescale slope/intercept and the
VOI window, used by the DICOM ingest and by the trainer's DICOM loader.
Compressed transfer syntaxes decode through pydicom's pixel handlers
(pylibjpeg + plugins for JPEG, JPEG-LS, JPEG 2000 and RLE).

:func:`decode_frame` decodes one frame at a time, so a multi-frame
instance never needs all its frames in memory at once (the DICOM workers
use it; :func:`decode_frames` decodes them all, for small instances).
Errors name the frame and the transfer syntax and the type of the
decoder's error, never its message: a decoder's message may quote element
values, and these messages reach logs and the spool's reason files.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from edge.errors import DataError

__all__ = ["number_of_frames", "decode_frame", "decode_frames", "frame_to_array", "iter_frames"]

_log = logging.getLogger(__name__)


def number_of_frames(ds: Dataset) -> int:
    """``NumberOfFrames`` (1 when absent)."""
    try:
        return max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _transfer_syntax(ds: Dataset) -> str:
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?"))


def _has_pixels(ds: Dataset) -> None:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"Instance of SOP class {getattr(ds, 'SOPClassUID', '?')} has no pixel data.")


def decode_frame(ds: Dataset, index: int) -> np.ndarray:
    """One decoded frame, ``[H, W]`` or ``[H, W, 3]`` (``index`` is 0-based); raises :class:`DataError`.

    Only that frame is decoded and held (pydicom's ``pixel_array(ds, index=...)``).

    Examples
    --------
    >>> from pydicom import examples
    >>> decode_frame(examples.ct, 0).shape
    (128, 128)
    """
    _has_pixels(ds)
    n = number_of_frames(ds)
    if not 0 <= index < n:
        raise DataError(f"Frame index {index} is outside the instance's {n} frame(s).")
    try:
        arr = pixel_array(ds, index=index)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types; we translate once here
        raise DataError(
            f"Cannot decode frame {index + 1} (transfer syntax {_transfer_syntax(ds)}): {type(exc).__name__}."
        ) from exc
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if arr.ndim != (2 if spp == 1 else 3):
        raise DataError(f"Decoded frame has unexpected shape {list(arr.shape)}.")
    return arr


def decode_frames(ds: Dataset) -> np.ndarray:
    """Decoded pixel array of all frames, ``[F, H, W(, 3)]``; raises :class:`DataError`."""
    _has_pixels(ds)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types; we translate once here
        raise DataError(f"Cannot decode pixel data (transfer syntax {_transfer_syntax(ds)}): {type(exc).__name__}.") from exc
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if number_of_frames(ds) == 1:
        arr = arr[None]
    if spp == 1 and arr.ndim != 3:
        raise DataError(f"Decoded pixel array has unexpected shape {list(arr.shape)}.")
    return arr


def frame_to_array(ds: Dataset, frame: np.ndarray, apply_window: bool = False) -> np.ndarray:
    """One decoded frame in modality units, ready for :func:`edge.preprocess.preprocess`.

    - ``PALETTE COLOR`` is expanded to RGB through the palette.
    - ``YBR_*`` arrives as RGB (pydicom converts on decode).
    - ``MONOCHROME1`` is inverted so that higher always means brighter.
    - Rescale slope/intercept (modality LUT) is applied, e.g. CT to HU.
    - With ``apply_window``, the dataset's own VOI window/LUT is applied.

    Returns float32 for grayscale (``[H, W]``) and uint8/uint16 RGB ``[H, W, 3]``.
    """
    pi = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if pi == "PALETTE COLOR":
        return np.asarray(apply_color_lut(frame, ds))
    if frame.ndim == 3:
        return frame  # RGB (YBR already converted by pydicom)
    out = apply_modality_lut(frame, ds).astype(np.float32, copy=False)
    if apply_window and ("WindowCenter" in ds or "VOILUTSequence" in ds):
        out = np.asarray(apply_voi_lut(out, ds), dtype=np.float32)
    if pi == "MONOCHROME1":
        out = np.float32(out.max() + out.min()) - out
    return out


def iter_frames(ds: Dataset, stride: int = 1, apply_window: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(frame_number, array)`` (1-based numbers as DICOM counts) every ``stride`` frames."""
    if stride < 1:
        raise DataError(f"Frame stride {stride} is not >= 1.")
    for i in range(0, number_of_frames(ds), stride):
        yield i + 1, frame_to_array(ds, decode_frame(ds, i), apply_window=apply_window)
