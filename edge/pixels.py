"""DICOM pixel data to arrays in modality units.

One place for photometric interpretation, rescale slope/intercept and the
VOI window, used by the DICOM ingest and by the trainer's DICOM loader.
Compressed transfer syntaxes decode through pydicom's pixel handlers
(pylibjpeg + plugins for JPEG, JPEG-LS, JPEG 2000 and RLE).
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from edge.errors import DataError

__all__ = ["number_of_frames", "decode_frames", "frame_to_array", "iter_frames"]

_log = logging.getLogger(__name__)


def number_of_frames(ds: Dataset) -> int:
    """``NumberOfFrames`` (1 when absent)."""
    try:
        return max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def decode_frames(ds: Dataset) -> np.ndarray:
    """Decoded pixel array of all frames, ``[F, H, W(, 3)]``; raises :class:`DataError`."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DataError(f"Instance of SOP class {getattr(ds, 'SOPClassUID', '?')} has no pixel data.")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types; we translate once here
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise DataError(f"Cannot decode pixel data (transfer syntax {ts}): {exc}.") from exc
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
    frames = decode_frames(ds)
    for i in range(0, frames.shape[0], stride):
        yield i + 1, frame_to_array(ds, frames[i], apply_window=apply_window)
