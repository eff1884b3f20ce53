"""Synthetic chest radiographs: the generator the bundled X-ray models were trained on.

:func:`make_xray` draws one chest-radiograph-like image (512 x 512 uint16,
12 bits stored) with body, lung fields, ribs, clavicles, spine, heart,
vessel texture, quantum noise and 0-4 nodules of varied size and contrast,
and their boxes ``[M, 4]`` (x0, y0, x1, y1 in source pixels).
:func:`make_classification_xray` is the classifier's present / absent
sample on it. Sample ``i`` of a set with seed ``s`` is drawn from
:func:`sample_rng` ``(s, i)`` (``numpy.random.default_rng([s, i])``), so it
does not depend on the set size and gives the same pixels on every machine.

numpy only (and :func:`edge.inference.preprocess.resize_float`), so both
sides use it: the trainer builds its synthetic training, validation and
held-out sets from it (``trainer.data``, ``trainer.classification_data``
import it from here), and the demo streams the same radiographs to the
models (:class:`edge.tools.synthetic.Radiographs`), not a look-alike. The
smooth-field, blur and blob helpers are shared with the trainer's
ultrasound generator.

Any change to the pixels drawn for a seed changes every synthetic set:
bump ``trainer.data.GENERATOR_VERSION`` (it invalidates cached sets).

Examples
--------
>>> img, boxes = make_xray(sample_rng(0, 1), (128, 128))
>>> img.shape, img.dtype, boxes.shape[1]
((128, 128), dtype('uint16'), 4)
>>> img, boxes = make_classification_xray(sample_rng(0, 6), positive=True, shape=(128, 128))
>>> len(boxes) >= 1
True
"""

from __future__ import annotations

import numpy as np

from edge.errors import DataError
from edge.inference.preprocess import resize_float

__all__ = [
    "XRAY_SHAPE",
    "MAX_NODULES",
    "PRESENT_COUNTS",
    "PRESENT_P",
    "sample_rng",
    "smooth_field",
    "gauss_lowpass",
    "blur",
    "irregular_blob",
    "make_xray",
    "make_classification_xray",
]

#: Default radiograph size (height, width).
XRAY_SHAPE = (512, 512)
#: Most nodules one radiograph may be asked for.
MAX_NODULES = 8
#: Sides :func:`make_xray` accepts; its working memory is about 90 bytes per pixel (1.5 GB at 4096 x 4096).
MIN_SIDE, MAX_SIDE = 16, 4096
#: A present case's nodule count: the generator's own distribution of 1-4 given at least one.
PRESENT_COUNTS = np.array([1, 2, 3, 4])
PRESENT_P = np.array([0.35, 0.25, 0.15, 0.10]) / 0.85


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for sample ``index`` of the set with ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


# ----------------------------------------------------------------- helpers
def smooth_field(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with features about ``cell`` pixels wide."""
    h, w = shape
    lo = rng.standard_normal((max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    f = resize_float(lo, h + 2 * cell, w + 2 * cell)[cell : cell + h, cell : cell + w]
    sd = float(f.std())
    return (f - float(f.mean())) / (sd if sd > 1e-6 else 1.0)


def gauss_lowpass(shape: tuple[int, int], sigma_y: float, sigma_x: float) -> np.ndarray:
    """Frequency response of a Gaussian blur (for :func:`numpy.fft.rfft2` spectra)."""
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    return np.exp(-2.0 * np.pi**2 * ((fy * sigma_y) ** 2 + (fx * sigma_x) ** 2)).astype(np.float32)


def blur(img: np.ndarray, sigma_y: float, sigma_x: float) -> np.ndarray:
    """Gaussian blur by FFT (wraps at the borders; used on fields padded or periodic)."""
    spec = np.fft.rfft2(img) * gauss_lowpass(img.shape, sigma_y, sigma_x)
    return np.fft.irfft2(spec, s=img.shape).astype(np.float32)


def irregular_blob(
    rng: np.random.Generator,
    yy: np.ndarray,
    xx: np.ndarray,
    cy: float,
    cx: float,
    ry: float,
    rx: float,
    irregularity: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius map and border radius of a rotated ellipse with a wavy border.

    Returns ``(rho, border)``: a pixel is inside where ``rho < border``.
    """
    ang = rng.uniform(0, np.pi)
    c, s = np.cos(ang), np.sin(ang)
    dx, dy = xx - cx, yy - cy
    u = (c * dx + s * dy) / rx
    v = (-s * dx + c * dy) / ry
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    border = np.ones_like(rho)
    for k in range(2, 9):
        amp = irregularity * rng.uniform(0.2, 1.0) / k**0.8
        border += amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    if rng.random() < 0.3:  # a few spiculated / microlobulated margins
        k = int(rng.integers(10, 18))
        border += irregularity * 0.35 * np.maximum(np.cos(k * phi + rng.uniform(0, 2 * np.pi)), 0) ** 3
    return rho.astype(np.float32), border.astype(np.float32)


# ------------------------------------------------------------------ X-ray
def _xray_anatomy(rng: np.random.Generator, shape: tuple[int, int], u: np.ndarray,
                  v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The attenuation (line integral) map of trunk, lungs, heart, spine, ribs and clavicles.

    Returns the map, the lung fields' mask and their thickness (for the vessel texture).
    """
    cxn = 0.5 + rng.uniform(-0.03, 0.03)
    # Body: a wide rounded trunk with shoulders; thickness profile across x.
    bw = rng.uniform(0.40, 0.47)
    trunk = np.clip(1 - ((u - cxn) / bw) ** 2, 0, None)
    body = np.sqrt(trunk) * np.clip((v + 0.05) / 0.15, 0, 1)
    mu = 1.2 * body

    # Lungs: two superellipses with a domed diaphragm and straight-ish mediastinal edge.
    lungs = np.zeros(shape, dtype=np.float32)
    lung_mask = np.zeros(shape, dtype=bool)
    heart_side = 1.0  # patient's left = image right
    for side in (-1.0, 1.0):
        lx = cxn + side * rng.uniform(0.17, 0.21)
        ly = rng.uniform(0.44, 0.5)
        ax, ay = rng.uniform(0.12, 0.15), rng.uniform(0.27, 0.32)
        if side == heart_side:
            ax *= 0.92
        p = rng.uniform(2.2, 3.0)
        rho = (np.abs((u - lx) / ax) ** p + np.abs((v - ly) / ay) ** p) ** (1 / p)
        rho = rho + 0.04 * smooth_field(rng, shape, 64)
        inside = rho < 1
        lung_mask |= inside
        lungs += np.clip((1 - rho) * 6, 0, 1) * np.sqrt(np.clip(1 - rho**2, 0, 1))
    mu = mu - 0.75 * lungs * rng.uniform(0.85, 1.1)

    # Heart and mediastinum; spine with vertebral bodies.
    hx, hy = cxn + rng.uniform(0.04, 0.08), rng.uniform(0.63, 0.7)
    heart = np.clip(1 - ((u - hx) / rng.uniform(0.13, 0.17)) ** 2 - ((v - hy) / rng.uniform(0.11, 0.14)) ** 2, 0, None)
    mu = mu + 0.55 * np.sqrt(heart)
    med = np.exp(-(((u - cxn) / rng.uniform(0.05, 0.07)) ** 2)) * np.clip((v - 0.1) / 0.2, 0, 1)
    mu = mu + 0.35 * med
    spine = np.exp(-(((u - cxn) / 0.03) ** 4))
    vert = 0.8 + 0.2 * np.cos(2 * np.pi * v * rng.uniform(11, 14))
    mu = mu + 0.3 * spine * vert
    mu = mu + _xray_ribs(rng, shape, u, v, cxn, bw) * body
    return _xray_clavicles(rng, mu, u, v, cxn), lung_mask, lungs


def _xray_ribs(rng: np.random.Generator, shape: tuple[int, int], u: np.ndarray, v: np.ndarray, cxn: float,
               bw: float) -> np.ndarray:
    """Ribs: arcs from the spine outwards and down; cortex brighter than the core (weighted)."""
    rib = np.zeros(shape, dtype=np.float32)
    n_ribs = int(rng.integers(9, 11))
    y_first = rng.uniform(0.13, 0.17)
    gap = rng.uniform(0.062, 0.072)
    for side in (-1.0, 1.0):
        dxs = np.clip(side * (u - cxn), 0, None)
        for i in range(n_ribs):
            y0 = y_first + i * gap
            curve = y0 - 0.25 * dxs + rng.uniform(1.0, 1.4) * dxs**2 * (1 + 0.4 * i / n_ribs)
            half_t = rng.uniform(0.010, 0.014)
            d = np.abs(v - curve) / half_t
            lateral = (dxs > 0.02) & (dxs < bw * 0.98)
            band = np.where(lateral & (d < 1), 0.6 + 0.4 * d**4, 0)
            rib += band.astype(np.float32)
    return rng.uniform(0.18, 0.28) * rib


def _xray_clavicles(rng: np.random.Generator, mu: np.ndarray, u: np.ndarray, v: np.ndarray,
                    cxn: float) -> np.ndarray:
    """``mu`` with the two clavicles added."""
    for side in (-1.0, 1.0):
        dxs = side * (u - cxn)
        curve = rng.uniform(0.12, 0.15) - 0.12 * dxs + 0.9 * np.clip(dxs - 0.2, 0, None) ** 2
        d = np.abs(v - curve) / rng.uniform(0.013, 0.017)
        mu = mu + 0.3 * ((d < 1) & (dxs > 0.03) & (dxs < 0.32)) * (0.7 + 0.3 * d**2)
    return mu


def _xray_vessels(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Vessel / interstitial texture (applied inside the lungs)."""
    return np.abs(smooth_field(rng, shape, 6)) * np.clip(smooth_field(rng, shape, 24), 0, None)


def _xray_nodules(rng: np.random.Generator, shape: tuple[int, int], yy: np.ndarray, xx: np.ndarray,
                  mu: np.ndarray, lung_mask: np.ndarray, count: int | None = None) -> list[list[float]]:
    """Nodules inside the lung fields (added to ``mu`` in place): spherical-projection profile,
    varied size and contrast. Returns their boxes.

    ``count`` overrides the drawn number of nodules (the draw is still made, so
    the default stream is unchanged)."""
    h, w = shape
    boxes: list[list[float]] = []
    n_nod = int(rng.choice([0, 1, 2, 3, 4], p=[0.15, 0.35, 0.25, 0.15, 0.10]))
    if count is not None:
        n_nod = int(count)
    ys, xs = np.nonzero(lung_mask)
    for _ in range(n_nod if ys.size else 0):
        for _attempt in range(20):
            j = int(rng.integers(ys.size))
            ny, nx = float(ys[j]), float(xs[j])
            rad = float(rng.uniform(6, 22))
            ok = all(
                (nx - (b[0] + b[2]) / 2) ** 2 + (ny - (b[1] + b[3]) / 2) ** 2 > (rad + (b[2] - b[0]) / 2 + 4) ** 2
                for b in boxes
            )
            margin = int(rad)
            if ok and margin <= ny < h - margin and margin <= nx < w - margin and lung_mask[int(ny), int(nx)]:
                break
        else:
            continue
        contrast = float(rng.uniform(0.2, 0.5))
        y_lo, y_hi = int(max(0, ny - 2 * rad)), int(min(h, ny + 2 * rad + 1))
        x_lo, x_hi = int(max(0, nx - 2 * rad)), int(min(w, nx + 2 * rad + 1))
        sub_y, sub_x = yy[y_lo:y_hi, x_lo:x_hi], xx[y_lo:y_hi, x_lo:x_hi]
        rho, border = irregular_blob(rng, sub_y, sub_x, ny, nx, rad * rng.uniform(0.8, 1.0), rad, 0.08)
        q = np.clip(1 - (rho / border) ** 2, 0, 1)
        mu[y_lo:y_hi, x_lo:x_hi] += contrast * np.sqrt(q)
        inside = rho < border
        iy, ix = np.nonzero(inside)
        boxes.append(
            [x_lo + ix.min(), y_lo + iy.min(), x_lo + ix.max() + 1, y_lo + iy.max() + 1]
        )
    return boxes


def _xray_detector(rng: np.random.Generator, shape: tuple[int, int], mu: np.ndarray) -> np.ndarray:
    """Detector: blur (focal spot + scatter), exposure, quantum + electronic noise; 12-bit float image."""
    mu = blur(np.pad(mu, 16, mode="edge"), 1.2, 1.2)[16:-16, 16:-16]
    mu = mu + 0.08 * blur(np.pad(mu, 32, mode="edge"), 20, 20)[32:-32, 32:-32]
    exposure = rng.uniform(0.9, 1.2)
    signal = 1 - np.exp(-exposure * np.clip(mu + 0.15, 0, None))  # brighter = more attenuation
    photons = rng.uniform(3000, 8000)
    noisy = signal + rng.standard_normal(shape).astype(np.float32) * np.sqrt(np.clip(1 - signal, 1e-3, 1) / photons)
    noisy = blur(np.pad(noisy, 4, mode="edge"), 0.6, 0.6)[4:-4, 4:-4]
    lo, hi = rng.uniform(0.0, 0.05), rng.uniform(0.92, 1.0)
    return np.clip((noisy - lo) / (hi - lo), 0, 1) * 4095


def make_xray(
    rng: np.random.Generator, shape: tuple[int, int] = XRAY_SHAPE, nodules: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic chest radiograph (PA view) and its nodule boxes.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness (see :func:`sample_rng`).
    shape : tuple of int
        Image ``(height, width)``.
    nodules : int, optional
        How many nodules to place (0 for none); by default 0-4, drawn. A
        nodule that finds no free place in the lungs is left out, so the
        boxes returned are the truth.

    Returns
    -------
    image : numpy.ndarray
        ``uint16`` ``[H, W]``, 12 bits stored, brighter = more attenuation
        (MONOCHROME2).
    boxes : numpy.ndarray
        ``float32`` ``[M, 4]`` nodule boxes (x0, y0, x1, y1), ``M`` in 0..4
        (at most ``nodules`` when given).
    """
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in shape)
            or not all(MIN_SIDE <= d <= MAX_SIDE for d in shape)):
        raise DataError(f"shape {shape!r} is not (height, width) with each side in {MIN_SIDE}..{MAX_SIDE}.")
    if nodules is not None and not 0 <= nodules <= MAX_NODULES:
        raise DataError(f"nodules {nodules} is not in 0..{MAX_NODULES}.")
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Each stage draws from rng in turn: the order of the calls is the order of the draws.
    mu, lung_mask, lungs = _xray_anatomy(rng, shape, xx / w, yy / h)
    mu = mu + 0.05 * _xray_vessels(rng, shape) * lungs
    boxes = _xray_nodules(rng, shape, yy, xx, mu, lung_mask, nodules)
    img = _xray_detector(rng, shape, mu)
    return img.astype(np.uint16), np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def make_classification_xray(
    rng: np.random.Generator, positive: bool, shape: tuple[int, int] = XRAY_SHAPE
) -> tuple[np.ndarray, np.ndarray]:
    """One radiograph with 1-4 nodules (``positive``) or none, and its nodule boxes.

    The count of a positive is drawn from :data:`PRESENT_COUNTS` with
    :data:`PRESENT_P` first, then :func:`make_xray` draws the image. A
    positive image whose nodules all failed to find a place in the lungs
    (rare) comes back with no boxes: the label is ``len(boxes) > 0``.
    """
    count = int(rng.choice(PRESENT_COUNTS, p=PRESENT_P)) if positive else 0
    return make_xray(rng, shape, nodules=count)
