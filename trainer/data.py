"""Training data: two seeded synthetic generators and a loader for users' own data.

Synthetic generators (each sample ``i`` of a set with seed ``s`` is drawn
from ``numpy.random.default_rng([s, i])``, so a sample does not depend on the
set size and any seed gives the same pixels on every machine):

- :func:`make_ultrasound`: a B-mode frame (480 x 640 uint8) with sector/fan
  geometry, Rayleigh speckle, depth attenuation with TGC-like gain, tissue
  layers, hypo- and hyper-echoic lesions with irregular borders, posterior
  acoustic shadowing / enhancement, and its lesion mask (0/1 uint8).
- :func:`make_xray` (:mod:`edge.tools.synthetic_xray`, re-exported here):
  a chest-radiograph-like image (512 x 512 uint16,
  12 bits stored) with body, lung fields, ribs, clavicles, spine, heart,
  vessel texture, quantum noise and 0-4 nodules of varied size and
  contrast, and their boxes ``[M, 4]`` (x0, y0, x1, y1 in source pixels).

Model inputs are made **only** through :func:`edge.inference.preprocess.preprocess`
(masks through :func:`edge.inference.preprocess.resize_nearest` with the same
geometry), so the trainer sees exactly what the daemon will.

User data (:func:`load_segmentation_folder`, :func:`load_detection_folder`):
``images/`` holding DICOM (``.dcm`` or no suffix, read through
:mod:`edge.ingest.dicom.pixels`) or PNG files, and ``masks/<stem>.png`` (segmentation) or
one COCO JSON file of boxes (detection). A folder's *items* are its image
file names; :func:`split_items` sets a seeded fraction of them aside as a
held-out split, and both loaders take ``items`` to load just one side.
Classification sets (nodule present / absent, from :func:`make_xray` with
``nodules``) live in :mod:`trainer.classification_data`.

Examples
--------
>>> from trainer.data import make_ultrasound, make_xray, sample_rng
>>> img, mask = make_ultrasound(sample_rng(0, 0))
>>> img.shape, img.dtype, int(mask.max())
((480, 640), dtype('uint8'), 1)
>>> img, boxes = make_xray(sample_rng(0, 1))
>>> img.shape, img.dtype, boxes.shape[1]
((512, 512), dtype('uint16'), 4)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np

from edge.errors import DataError
from edge.fileio import atomic_file
from edge.inference.manifest import InputSpec, Preprocessing
from edge.inference.preprocess import Geometry, preprocess, resize_nearest
# The X-ray generator lives in edge.tools (numpy only), so the demo streams the very radiographs the
# models were trained on; the ultrasound generator shares its field, blur and blob helpers.
from edge.tools.synthetic_xray import XRAY_SHAPE, make_xray, sample_rng
from edge.tools.synthetic_xray import blur as _blur
from edge.tools.synthetic_xray import irregular_blob as _irregular_blob
from edge.tools.synthetic_xray import smooth_field as _smooth_field

__all__ = [
    "GENERATOR_VERSION",
    "US_SHAPE",
    "XRAY_SHAPE",
    "US_PREPROCESSING",
    "XRAY_PREPROCESSING",
    "sample_rng",
    "make_ultrasound",
    "make_xray",
    "SegmentationSet",
    "DetectionSet",
    "segmentation_set_from_arrays",
    "detection_set_from_arrays",
    "synthetic_segmentation_set",
    "synthetic_detection_set",
    "load_image",
    "load_item",
    "MAX_IMAGE_PIXELS",
    "load_segmentation_folder",
    "load_detection_folder",
    "folder_items",
    "split_items",
    "refuse_aliases",
    "default_cache_dir",
    "cache_path",
    "save_arrays",
    "check_items",
    "boxes_to_input",
    "IMAGE_SUFFIXES",
]

_log = logging.getLogger(__name__)

#: Bump when a generator changes its pixels (invalidates caches).
GENERATOR_VERSION = 2
US_SHAPE = (480, 640)
#: Ultrasound frames are uint8 B-mode: a fixed scale keeps the gain visible to the model.
US_PREPROCESSING = Preprocessing(color="grayscale", resize="letterbox", normalize="fixed", mean=0.0, std=255.0)
#: Radiographs differ in bit depth and exposure: per-image min-max.
XRAY_PREPROCESSING = Preprocessing(color="grayscale", resize="letterbox", normalize="minmax")

_CACHE_FORMAT = 2  # packed masks
IMAGE_SUFFIXES = (".png", ".dcm", ".dicom", "")


# ------------------------------------------------------------- ultrasound
@dataclass
class _Fan:
    """The curvilinear probe's sector: apex, half-angle, radii and per-pixel polar coordinates."""

    apex_x: float
    apex_y: float
    half: float
    r: np.ndarray
    th: np.ndarray
    r0: float
    r_max: float
    sector: np.ndarray
    depth: np.ndarray


def _us_fan(rng: np.random.Generator, shape: tuple[int, int], yy: np.ndarray, xx: np.ndarray) -> _Fan:
    """Curvilinear probe: apex above the frame, fan of +-half_angle."""
    h, w = shape
    apex_x = w / 2 + rng.uniform(-0.02, 0.02) * w
    apex_y = -rng.uniform(0.08, 0.16) * h
    half = np.deg2rad(rng.uniform(30, 40))
    r = np.hypot(xx - apex_x, yy - apex_y)
    th = np.arctan2(xx - apex_x, yy - apex_y)
    r0 = -apex_y + rng.uniform(0.02, 0.05) * h
    r_max = min(h - 1 - apex_y, r0 + rng.uniform(0.82, 0.95) * h)
    sector = (np.abs(th) <= half) & (r >= r0) & (r <= r_max)
    depth = np.clip((r - r0) / (r_max - r0), 0, 1)
    return _Fan(apex_x, apex_y, half, r, th, r0, r_max, sector, depth)


def _us_tissue(rng: np.random.Generator, shape: tuple[int, int], fan: _Fan) -> np.ndarray:
    """Tissue echogenicity: smooth texture + layered near field (skin, fat, fascia, muscle)."""
    echo = np.exp(0.25 * _smooth_field(rng, shape, 48) + 0.12 * _smooth_field(rng, shape, 12))
    wobble = 0.015 * _smooth_field(rng, shape, 96)
    dl = fan.depth + wobble
    skin = rng.uniform(0.02, 0.04)
    fat = skin + rng.uniform(0.05, 0.14)
    echo = echo * np.where(dl < skin, 2.2, 1.0) * np.where((dl >= skin) & (dl < fat), rng.uniform(0.35, 0.6), 1.0)
    for _ in range(int(rng.integers(2, 5))):  # bright fascia lines
        d0 = rng.uniform(fat, 0.95)
        echo = echo * (1 + rng.uniform(0.8, 2.0) * np.exp(-(((dl - d0) / rng.uniform(0.003, 0.008)) ** 2)))
    striation = 1 + 0.15 * np.sin(2 * np.pi * (dl * rng.uniform(20, 40) + 0.3 * fan.th))
    return echo * np.where(dl >= fat, striation, 1.0)


def _us_lesions(rng: np.random.Generator, shape: tuple[int, int], yy: np.ndarray, xx: np.ndarray, fan: _Fan,
                echo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lesions (cyst, hypo- or hyperechoic) with their posterior effect; returns mask, echo and shadow."""
    h = shape[0]
    apex_x, apex_y, half, r, th, r0, r_max, sector = (
        fan.apex_x, fan.apex_y, fan.half, fan.r, fan.th, fan.r0, fan.r_max, fan.sector)
    mask = np.zeros(shape, dtype=bool)
    shadow = np.ones(shape, dtype=np.float32)
    n_lesions = 1 if rng.random() < 0.8 else 2
    for _ in range(n_lesions):
        ld = rng.uniform(0.25, 0.7)
        lt = rng.uniform(-0.6, 0.6) * half
        lr = r0 + ld * (r_max - r0)
        cx, cy = apex_x + lr * np.sin(lt), apex_y + lr * np.cos(lt)
        size = rng.uniform(0.06, 0.16) * h
        ry, rx = size * rng.uniform(0.6, 1.0), size
        rho, border = _irregular_blob(rng, yy, xx, cy, cx, ry, rx, rng.uniform(0.05, 0.25))
        inside = (rho < border) & sector
        if not inside.any():
            continue
        mask |= inside
        kind = rng.choice(["cyst", "hypo", "hyper"], p=[0.25, 0.45, 0.3])
        # Soft margin: echogenicity ramps over a few pixels around the border.
        ramp = np.clip((border - rho) * size / rng.uniform(2.0, 5.0), 0, 1)
        if kind == "cyst":
            factor, texture = rng.uniform(0.02, 0.08), 0.2
        elif kind == "hypo":
            factor, texture = rng.uniform(0.12, 0.35), 0.35
        else:
            factor, texture = rng.uniform(2.6, 4.0), 0.3
        inner = factor * np.exp(texture * _smooth_field(rng, shape, 10))
        echo = echo * (1 - ramp) + echo * inner * ramp
        # Posterior acoustic effect: everything deeper along the same beams.
        ang_bins = np.clip(((th + half) / (2 * half) * 255).astype(np.intp), 0, 255)
        far = np.zeros(256, dtype=np.float32)
        np.maximum.at(far, ang_bins[inside], r[inside])
        behind = (far[ang_bins] > 0) & (r > far[ang_bins]) & ~inside
        if kind == "cyst":
            post = rng.uniform(1.3, 1.8)  # posterior enhancement
        elif kind == "hypo" and rng.random() < 0.6:
            post = rng.uniform(0.25, 0.6)  # shadowing
        else:
            post = rng.uniform(0.85, 1.1)
        effect = _blur(behind.astype(np.float32), 1.0, 4.0)
        shadow *= 1 + (post - 1) * np.clip(effect, 0, 1)
    return mask, echo, shadow


def _us_speckle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Speckle: low-passed complex Gaussian -> Rayleigh envelope (laterally elongated), mean 1."""
    h, w = shape
    z = rng.standard_normal(shape).astype(np.float32) + 1j * rng.standard_normal(shape).astype(np.float32)
    spec = np.fft.fft2(z)
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.fftfreq(w).astype(np.float32)[None, :]
    sy, sx = rng.uniform(0.7, 1.1), rng.uniform(1.6, 2.6)
    spec = spec * np.exp(-2 * np.pi**2 * ((fy * sy) ** 2 + (fx * sx) ** 2))
    speckle = np.abs(np.fft.ifft2(spec)).astype(np.float32)
    speckle /= float(speckle.mean())
    return speckle


def _us_display(rng: np.random.Generator, shape: tuple[int, int], fan: _Fan, scatter: np.ndarray) -> np.ndarray:
    """Attenuation, TGC, log compression to the display range and depth markers (float, 0..255)."""
    h, w = shape
    depth, sector = fan.depth, fan.sector
    # Attenuation and TGC: partly compensated, per-image slider curve.
    atten_db = rng.uniform(18, 35) * depth
    sliders = rng.uniform(-4, 4, size=8) + atten_db.max() * rng.uniform(0.55, 0.9) * np.linspace(0, 1, 8)
    tgc_db = np.interp(depth, np.linspace(0, 1, 8), sliders)
    gain_db = rng.uniform(-4, 4) + tgc_db - atten_db
    env = scatter * (10 ** (gain_db / 20))
    env = env + rng.uniform(0.005, 0.02) * np.abs(rng.standard_normal(shape)).astype(np.float32)

    # Log compression to the display range.
    db = 20 * np.log10(env + 1e-6)
    top = float(np.percentile(db[sector], 99.5)) + rng.uniform(-2, 2)
    dr = rng.uniform(45, 60)
    img = np.clip((db - (top - dr)) / dr, 0, 1) * 255
    img = np.where(sector, img, 0)
    # Depth markers beside the fan, as scanners draw them.
    for d in np.arange(0.1, 1.0, 0.1):
        my = int(fan.apex_y + (fan.r0 + d * (fan.r_max - fan.r0)) * np.cos(fan.half))
        mx = int(min(w - 4, fan.apex_x + (fan.r0 + d * (fan.r_max - fan.r0)) * np.sin(fan.half) + 10))
        if 0 <= my < h - 2:
            img[my : my + 2, mx : mx + 3] = 200
    return img


def make_ultrasound(rng: np.random.Generator, shape: tuple[int, int] = US_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic B-mode frame and its lesion mask.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness (see :func:`sample_rng`).
    shape : tuple of int
        Frame ``(height, width)``.

    Returns
    -------
    image : numpy.ndarray
        ``uint8`` ``[H, W]``; zero outside the sector.
    mask : numpy.ndarray
        ``uint8`` ``[H, W]``; 1 inside a lesion, else 0.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Each stage draws from rng in turn: the order of the calls is the order of the draws.
    fan = _us_fan(rng, shape, yy, xx)
    echo = _us_tissue(rng, shape, fan)
    mask, echo, shadow = _us_lesions(rng, shape, yy, xx, fan, echo)
    speckle = _us_speckle(rng, shape)
    img = _us_display(rng, shape, fan, echo * shadow * speckle)
    return img.astype(np.uint8), mask.astype(np.uint8)


# ------------------------------------------------------------------ sets
@dataclass
class SegmentationSet:
    """Preprocessed segmentation samples (and, optionally, the source images).

    ``inputs`` ``[N, C, H, W]`` float32 and ``targets`` ``[N, 1, H, W]``
    uint8 are in model-input space; ``images`` and ``masks`` (source size)
    are kept for evaluation through the served post-processing.
    """

    inputs: np.ndarray
    targets: np.ndarray
    geoms: list[Geometry]
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class DetectionSet:
    """Preprocessed detection samples.

    ``boxes`` are per-image ``[M, 4]`` source-pixel boxes and ``input_boxes``
    the same boxes in model-input pixels; ``classes`` are per-box label
    indices.
    """

    inputs: np.ndarray
    boxes: list[np.ndarray]
    input_boxes: list[np.ndarray]
    classes: list[np.ndarray]
    geoms: list[Geometry]
    images: list[np.ndarray] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def _mask_to_input(mask: np.ndarray, geom: Geometry) -> np.ndarray:
    """A source-size label mask placed in model-input space like its image."""
    out = np.zeros((geom.dst_h, geom.dst_w), dtype=np.uint8)
    out[geom.top : geom.top + geom.new_h, geom.left : geom.left + geom.new_w] = resize_nearest(
        mask, geom.new_h, geom.new_w
    )
    return out


def boxes_to_input(boxes: np.ndarray, geom: Geometry) -> np.ndarray:
    """Source-pixel boxes ``[M, 4]`` in model-input pixels (the image's letterbox/stretch geometry)."""
    if boxes.size == 0:
        return np.zeros((0, 4), np.float32)
    x0, y0 = geom.to_input(boxes[:, 0], boxes[:, 1])
    x1, y1 = geom.to_input(boxes[:, 2], boxes[:, 3])
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def segmentation_set_from_arrays(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    spec: InputSpec,
    pre: Preprocessing,
    keep_source: bool = True,
    source: str = "",
    keep_images: bool | None = None,
) -> SegmentationSet:
    """Preprocess images and masks into a :class:`SegmentationSet`.

    ``keep_source`` keeps the source masks (evaluation at source resolution
    needs them) and, unless ``keep_images`` is False, the source images.
    """
    if len(images) != len(masks):
        raise DataError(f"{len(images)} images but {len(masks)} masks.")
    if not images:
        raise DataError(f"The segmentation set {source or ''} is empty.".replace("  ", " "))
    xs, ys, geoms = [], [], []
    for img, m in zip(images, masks):
        if img.shape[:2] != m.shape[:2]:
            raise DataError(f"A mask is {m.shape[0]}x{m.shape[1]} but its image is {img.shape[0]}x{img.shape[1]}.")
        x, g = preprocess(img, spec, pre)
        xs.append(x)
        ys.append(_mask_to_input(m, g)[None])
        geoms.append(g)
    return SegmentationSet(
        inputs=np.stack(xs),
        targets=np.stack(ys),
        geoms=geoms,
        images=list(images) if keep_source and keep_images is not False else [],
        masks=list(masks) if keep_source else [],
        source=source,
    )


def detection_set_from_arrays(
    images: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    spec: InputSpec,
    pre: Preprocessing,
    classes: Sequence[np.ndarray] | None = None,
    keep_source: bool = True,
    source: str = "",
) -> DetectionSet:
    """Preprocess images and their boxes into a :class:`DetectionSet`."""
    if len(images) != len(boxes):
        raise DataError(f"{len(images)} images but {len(boxes)} box lists.")
    if not images:
        raise DataError(f"The detection set {source} is empty.")
    xs, geoms, ib = [], [], []
    for img, b in zip(images, boxes):
        x, g = preprocess(img, spec, pre)
        xs.append(x)
        geoms.append(g)
        ib.append(boxes_to_input(np.asarray(b, np.float32).reshape(-1, 4), g))
    cls = [np.zeros(len(b), np.int64) for b in boxes] if classes is None else [np.asarray(c, np.int64) for c in classes]
    return DetectionSet(
        inputs=np.stack(xs),
        boxes=[np.asarray(b, np.float32).reshape(-1, 4) for b in boxes],
        input_boxes=ib,
        classes=cls,
        geoms=geoms,
        images=list(images) if keep_source else [],
        source=source,
    )


def default_cache_dir() -> Path:
    """Where generated sets are cached (``MEDGE_CACHE_DIR`` or ``~/.cache/medge``)."""
    env = os.environ.get("MEDGE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "medge"


def cache_path(cache_dir: Path | None, kind: str, n: int, seed: int) -> Path | None:
    """Cache file of the *source* images (preprocessing is redone on load: it is cheap)."""
    if cache_dir is None:
        return None
    key = json.dumps([GENERATOR_VERSION, _CACHE_FORMAT, kind, n, seed])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{kind}-n{n}-s{seed}-{digest}.npz"


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write a cache ``.npz`` atomically (a half-written cache is never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fh:
        np.savez(fh, **arrays)


def _generate(fn: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]], n: int, seed: int):
    out_a, out_b = [], []
    for i in range(n):
        a, b = fn(sample_rng(seed, i))
        out_a.append(a)
        out_b.append(b)
    return out_a, out_b


def synthetic_segmentation_set(
    n: int,
    seed: int,
    spec: InputSpec | None = None,
    pre: Preprocessing = US_PREPROCESSING,
    keep_source: bool = True,
    cache_dir: Path | str | None = None,
) -> SegmentationSet:
    """``n`` synthetic ultrasound frames with seed ``seed``, preprocessed for ``spec``.

    With ``cache_dir`` the generated frames are stored there (atomically) and
    reused by later calls with the same arguments.
    """
    if n <= 0:
        raise DataError(f"Cannot generate a set of {n} samples.")
    spec = spec or InputSpec()
    path = cache_path(Path(cache_dir) if cache_dir else None, "us", n, seed)
    if path is not None and path.is_file():
        with np.load(path) as z:
            images = list(z["images"])
            shape = z["images"].shape
            masks = list(np.unpackbits(z["masks_packed"], axis=-1, count=shape[-1]).reshape(shape))
        _log.debug("Loaded %d ultrasound frames from %s", n, path)
    else:
        images, masks = _generate(make_ultrasound, n, seed)
        if path is not None:
            save_arrays(path, images=np.stack(images), masks_packed=np.packbits(np.stack(masks) > 0, axis=-1))
    return segmentation_set_from_arrays(images, masks, spec, pre, keep_source, source=f"synthetic-us seed={seed}")


def synthetic_detection_set(
    n: int,
    seed: int,
    spec: InputSpec | None = None,
    pre: Preprocessing = XRAY_PREPROCESSING,
    keep_source: bool = True,
    cache_dir: Path | str | None = None,
) -> DetectionSet:
    """``n`` synthetic chest radiographs with seed ``seed``, preprocessed for ``spec``."""
    if n <= 0:
        raise DataError(f"Cannot generate a set of {n} samples.")
    spec = spec or InputSpec()
    path = cache_path(Path(cache_dir) if cache_dir else None, "xray", n, seed)
    if path is not None and path.is_file():
        with np.load(path) as z:
            images = list(z["images"])
            counts = z["counts"]
            flat = z["boxes"]
        boxes = np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []
        _log.debug("Loaded %d radiographs from %s", n, path)
    else:
        images, boxes = _generate(make_xray, n, seed)
        if path is not None:
            counts = np.array([len(b) for b in boxes], np.int64)
            save_arrays(
                path, images=np.stack(images), counts=counts, boxes=np.concatenate(boxes).reshape(-1, 4)
            )
    return detection_set_from_arrays(images, boxes, spec, pre, keep_source=keep_source, source=f"synthetic-xray seed={seed}")


# ------------------------------------------------------------- user data
#: Most pixels (width x height) of one user image: the daemon's default ``[zmq] max_pixels``
#: (:class:`edge.config.ZmqConfig`), so a model is never trained on frames it could not serve.
MAX_IMAGE_PIXELS = 4096 * 4096


def _check_pixels(width: int, height: int) -> None:
    """Refuse an image with more than :data:`MAX_IMAGE_PIXELS` pixels (before its pixels are decoded)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"the image is {width}x{height}, more than the {MAX_IMAGE_PIXELS} pixels "
            "(4096x4096) a training image may have; downscale it first."
        )


def _load_png(p: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # The size is checked below against a far smaller limit: PIL's own warning adds nothing.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
        with im:
            _check_pixels(im.size[0], im.size[1])
            if im.mode in ("P", "PA"):  # palette indices are not intensities: their colours are
                arr = np.asarray(im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB"))
            else:
                arr = np.asarray(im)
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"the image has more pixels than PIL will decode, far more than the {MAX_IMAGE_PIXELS} pixels "
            "(4096x4096) a training image may have; downscale it first."
        ) from exc
    except UnidentifiedImageError as exc:
        raise DataError("cannot read the PNG: not an image PIL can identify.") from exc
    except OSError as exc:
        # An OSError with a filename would put the file's name (possibly a patient's) in the message.
        raise DataError(f"cannot read the PNG: {exc.strerror if exc.filename else exc}.") from exc
    if arr.ndim == 3 and arr.shape[2] in (2, 4):
        arr = arr[:, :, :-1]  # LA / RGBA: drop the alpha channel
    return arr


def load_image(path: Path | str) -> np.ndarray:
    """Read one image: DICOM through :mod:`edge.ingest.dicom.pixels` (first frame) or PNG.

    Images of more than :data:`MAX_IMAGE_PIXELS` pixels are refused from
    their header, before their pixels are decoded. An alpha channel (LA or
    RGBA PNG) is dropped.

    Raises
    ------
    DataError
        If the file is missing, not a readable DICOM/PNG, has no pixels or
        too many. The message does not name the file (its name may hold a
        patient's): callers say which item it is (:func:`load_item`).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError("the image file does not exist.")
    if p.suffix.lower() == ".png":
        return _load_png(p)
    import pydicom
    from pydicom.errors import InvalidDicomError

    from edge.ingest.dicom.pixels import decode_frames, frame_to_array

    try:
        ds = pydicom.dcmread(p)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read the file as DICOM (not DICOM, or damaged: {type(exc).__name__}).") from exc
    _check_pixels(int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0))
    frames = decode_frames(ds)
    return frame_to_array(ds, frames[0])


def load_item(path: Path | str, where: str) -> np.ndarray:
    """:func:`load_image`, its errors prefixed by ``where`` (the item's position, never its name).

    Examples
    --------
    >>> load_item("/nonexistent/DOE_JANE.png", "Image 3 of data/images (sorted, from 0)")
    Traceback (most recent call last):
    ...
    edge.errors.DataError: Image 3 of data/images (sorted, from 0): the image file does not exist.
    """
    try:
        return load_image(path)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc


def _find_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"Image folder {folder} does not exist.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"Image folder {folder} holds no .png or DICOM files.")
    return files


def check_items(root: Path, wanted: Collection[str] | None, present: Sequence[str]) -> set[str] | None:
    """``wanted`` as a set, after checking that every one of them is in the folder."""
    if wanted is None:
        return None
    want = set(wanted)
    missing = sorted(want - set(present))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} item(s) recorded for {root} are no longer in it ({shown}); "
            "the folder changed since the split was made."
        )
    return want


def load_segmentation_folder(
    root: Path | str,
    spec: InputSpec | None = None,
    pre: Preprocessing = US_PREPROCESSING,
    items: Collection[str] | None = None,
) -> SegmentationSet:
    """Load ``root/images/*`` with ``root/masks/<stem>.png`` (non-zero = lesion).

    ``items``: load only these image file names (one side of a split).

    Raises
    ------
    DataError
        For a missing or unreadable file, a mask whose size differs from its
        image, or an item of ``items`` that the folder does not hold.
    """
    root = Path(root)
    images, masks = [], []
    files = _find_images(root / "images")
    want = check_items(root, items, [f.name for f in files])
    for k, img_path in enumerate(files):
        if want is not None and img_path.name not in want:
            continue
        where = f"Image {k} of {root / 'images'} (sorted by name, counting from 0)"
        mask_path = root / "masks" / f"{img_path.stem}.png"
        if not mask_path.is_file():
            raise DataError(f"{where} has no mask in {root / 'masks'} (masks/<image stem>.png).")
        img = load_item(img_path, where)
        m = load_item(mask_path, f"The mask of {where[0].lower()}{where[1:]}")
        if m.ndim == 3:
            m = m[:, :, 0]
        if m.shape[:2] != img.shape[:2]:
            raise DataError(
                f"The mask of {where[0].lower()}{where[1:]} is {m.shape[0]}x{m.shape[1]} but the image is "
                f"{img.shape[0]}x{img.shape[1]}; masks must have the image's size."
            )
        images.append(img)
        masks.append((m > 0).astype(np.uint8))
    if items is None and masks and not any(bool(m.any()) for m in masks):
        raise DataError(f"Every mask in {root / 'masks'} is empty: a segmenter cannot learn without a lesion.")
    # Evaluation needs the source masks, nothing needs the source images: drop them (memory).
    return segmentation_set_from_arrays(images, masks, spec or InputSpec(), pre, source=str(root), keep_images=False)


def load_detection_folder(
    root: Path | str,
    spec: InputSpec | None = None,
    pre: Preprocessing = XRAY_PREPROCESSING,
    annotations: str = "annotations.json",
    labels: Sequence[str] | None = None,
    items: Collection[str] | None = None,
) -> tuple[DetectionSet, list[str]]:
    """Load ``root/images/*`` with COCO boxes from ``root/<annotations>``.

    Returns the set and the label names (COCO categories by id, or ``labels``).
    ``items``: load only these image file names (one side of a split).

    Raises
    ------
    DataError
        For an empty or malformed COCO file, an image it names that is
        missing, a box outside its image, or an item of ``items`` that the
        COCO file does not list.
    """
    root = Path(root)
    coco = _read_coco(root / annotations)
    ann_path = root / annotations
    cats = sorted(coco.get("categories") or [{"id": 1, "name": "nodule"}], key=lambda c: c["id"])
    names = list(labels) if labels else [str(c["name"]) for c in cats]
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    by_image = _annotations_by_image(coco, ann_path)
    _check_coco_consistency(coco, by_image, cat_index, ann_path)
    want = check_items(root, items, [str(e.get("file_name", "")) for e in coco["images"] if isinstance(e, dict)])
    images, boxes, classes = [], [], []
    for j, entry in enumerate(coco["images"]):
        try:
            if want is not None and str(entry["file_name"]) not in want:
                continue
            img_path = root / "images" / entry["file_name"]
            img = load_item(img_path, f"Image {j} (counting from 0) of {ann_path}")
            b, c = [], []
            for k, a in by_image.get(entry["id"], []):
                b.append(_coco_box(a["bbox"], k, img.shape, ann_path))
                c.append(cat_index.get(a.get("category_id", cats[0]["id"]), 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"COCO annotation file {ann_path} is malformed: {exc!r}.") from exc
        images.append(img)
        boxes.append(np.asarray(b, np.float32).reshape(-1, 4))
        classes.append(np.asarray(c, np.int64))
    # Nothing reads a user set's source images (boxes and geometries suffice): do not keep them.
    ds = detection_set_from_arrays(images, boxes, spec or InputSpec(), pre, classes=classes, keep_source=False,
                                   source=str(root))
    return ds, names


def _annotations_by_image(coco: Mapping[str, Any], ann_path: Path) -> dict[Any, list[tuple[int, dict]]]:
    """``(index, annotation)`` pairs of the COCO file, grouped by ``image_id``.

    Raises
    ------
    DataError
        If ``annotations`` is not a list of objects with an ``image_id``
        (the error names the annotation's index in the list).
    """
    anns = coco.get("annotations") or []
    if not isinstance(anns, list):
        raise DataError(f"COCO annotation file {ann_path} is malformed: 'annotations' is not a list.")
    by_image: dict[Any, list[tuple[int, dict]]] = {}
    for k, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a:
            raise DataError(
                f"COCO annotation file {ann_path} is malformed: annotation {k} (counting from 0) "
                "is not an object with an 'image_id'."
            )
        by_image.setdefault(a["image_id"], []).append((k, a))
    return by_image


def _check_coco_consistency(
    coco: Mapping[str, Any], by_image: Mapping[Any, list[tuple[int, dict]]], cat_index: Mapping[Any, int],
    ann_path: Path,
) -> None:
    """Refuse what would train on wrong truth without a word.

    An image listed twice (by id or file name: two truths for one image),
    an annotation whose ``image_id`` names no image (its image would be
    taken as free of findings) or whose ``category_id`` is not a category
    (it became the first class), and a file without any annotation (a
    detector cannot learn from images without a single box). Errors give
    indices, never file names.
    """
    entries = [e for e in coco["images"] if isinstance(e, dict)]
    ids = [e.get("id") for e in entries]
    names = [str(e.get("file_name", "")) for e in entries]
    for label, values in (("id", ids), ("file_name", names)):
        seen: dict[Any, int] = {}
        for j, v in enumerate(values):
            if v in seen:
                raise DataError(
                    f"COCO annotation file {ann_path}: images {seen[v]} and {j} (counting from 0) have the same "
                    f"{label}; one image must have one truth."
                )
            seen[v] = j
    known = set(ids)
    for image_id, anns in by_image.items():
        if image_id not in known:
            raise DataError(
                f"Annotation {anns[0][0]} (counting from 0) in {ann_path} names an image_id that no image has; "
                "its image would be taken as free of findings."
            )
        for k, a in anns:
            if "category_id" in a and a["category_id"] not in cat_index:
                raise DataError(
                    f"Annotation {k} (counting from 0) in {ann_path} has a category_id that is not among the "
                    "file's categories."
                )
    if not by_image:
        raise DataError(f"COCO annotation file {ann_path} holds no annotation: a detector cannot learn without boxes.")


def _coco_box(bbox: Any, k: int, shape: tuple[int, ...], ann_path: Path) -> list[float]:
    """COCO ``[x, y, w, h]`` of annotation ``k`` as ``[x0, y0, x1, y1]``, checked against the image.

    Raises
    ------
    DataError
        If the box is not four finite numbers or lies outside the
        ``shape[1] x shape[0]`` image (the error names the annotation's index).
    """
    if isinstance(bbox, (str, bytes)) or len(bbox) != 4:
        raise DataError(f"Annotation {k} (counting from 0) in {ann_path} has a bbox that is not [x, y, w, h].")
    x, y, bw, bh = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, bw, bh)):
        raise DataError(
            f"Annotation {k} (counting from 0) in {ann_path} has a non-finite bbox value (NaN or infinity)."
        )
    h, w = shape[0], shape[1]
    if bw <= 0 or bh <= 0 or x < 0 or y < 0 or x + bw > w + 0.5 or y + bh > h + 0.5:
        raise DataError(f"Box {list(bbox)} of annotation {k} in {ann_path} lies outside its {w}x{h} image.")
    return [x, y, x + bw, y + bh]


def _read_coco(ann_path: Path) -> dict[str, Any]:
    """The parsed COCO file, with at least one image listed."""
    if not ann_path.is_file():
        raise DataError(f"COCO annotation file {ann_path} does not exist.")
    text = ann_path.read_text(encoding="utf-8").strip()
    if not text:
        raise DataError(f"COCO annotation file {ann_path} is empty.")
    try:
        coco = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"COCO annotation file {ann_path} is not valid JSON: {exc}.") from exc
    if not isinstance(coco, dict) or not coco.get("images"):
        raise DataError(f"COCO annotation file {ann_path} lists no images; it is empty.")
    return coco


def folder_items(root: Path | str, task: str, annotations: str = "annotations.json") -> list[str]:
    """The items of a user's data folder, sorted: image file names in ``images/``
    (segmentation), listed in the COCO file (detection), or ``<label>/<file>``
    names and CSV paths (classification, :mod:`trainer.classification_data`)."""
    root = Path(root)
    if task == "classification":
        from trainer.classification_data import classification_items  # it builds on this module

        return classification_items(root)
    if task == "segmentation":
        return refuse_aliases(root, [p.name for p in _find_images(root / "images")], root / "images")
    coco = _read_coco(root / annotations)
    try:
        names = sorted(str(e["file_name"]) for e in coco["images"])
    except (KeyError, TypeError) as exc:
        raise DataError(f"COCO annotation file {root / annotations} is malformed: {exc!r}.") from exc
    return refuse_aliases(root, names, root / "images")


def refuse_aliases(root: Path, items: Sequence[str], folder: Path) -> list[str]:
    """``items`` (names under ``folder``), after checking no two different names are the same file.

    Names are compared by resolved real path (``./a.png`` and ``a.png``, or a
    symbolic link and its target, are one file), so :func:`split_items` can
    never put one file on both sides of a split. The error gives positions
    in the sorted listing, not names (file names can hold patient names).

    Raises
    ------
    DataError
        If two different item names resolve to the same file.
    """
    seen: dict[str, tuple[int, str]] = {}
    for k, item in enumerate(items):
        key = os.path.realpath(folder / item)
        first = seen.setdefault(key, (k, item))
        if first[1] != item:
            raise DataError(
                f"{root} names the same image file twice under different names (items {first[0]} and {k} "
                "of its sorted listing, counting from 0); a file must appear once."
            )
    return list(items)


def split_items(items: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split item names into ``(train, heldout)``: a seeded ``fraction`` held out (at least one).

    The split depends only on the sorted names, ``fraction`` and ``seed``, so it
    can be made again from what a checkpoint records.

    Raises
    ------
    DataError
        If ``fraction`` is not in (0, 1) or the split would leave either side empty.

    Examples
    --------
    >>> split_items(["a.png", "b.png", "c.png", "d.png"], 0.25, seed=1)
    (['b.png', 'c.png', 'd.png'], ['a.png'])
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"The held-out fraction {fraction} is not between 0 and 1.")
    names = sorted(set(items))
    n_held = max(1, int(round(fraction * len(names))))
    if n_held >= len(names):
        raise DataError(
            f"Holding out {fraction:g} of {len(names)} item(s) leaves nothing to train on; "
            "give more data or a separate held-out folder."
        )
    order = np.random.default_rng(seed).permutation(len(names))
    held = sorted(names[i] for i in order[:n_held])
    keep = sorted(names[i] for i in order[n_held:])
    return keep, held
