"""Light synthetic image sources for the demo, ``medge send`` and ``medge bench``.

``edge`` never imports the trainer, so this module carries its own small
generators: an ultrasound-like probe (sector scan, speckle, a slowly moving
hypoechoic lesion) and X-ray-like frames (a chest-like background with ribs
and a few bright nodules). They are made to exercise the pipeline and look
plausible in a report, not to be realistic. All randomness is seeded.

:class:`Radiographs` is different: its frames are the synthetic chest
radiographs the bundled X-ray models were trained on
(:func:`edge.tools.synthetic_xray.make_xray`, the trainer's own generator,
which lives in ``edge`` for this), so what the models say about them is what
their held-out metrics lead one to expect; the demo streams those.

A probe pre-renders a short loop of frames (``loop`` frames, default 32) so
that streaming at 30-60 fps costs the client almost no CPU; the loop is
continuous (the lesion's path is periodic).

Examples
--------
>>> probe = UltrasoundProbe(height=120, width=160, seed=1, loop=4)
>>> f = probe.frame(0)
>>> f.shape, f.dtype
((120, 160), dtype('uint8'))
>>> probe.truth(0).shape
(120, 160)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["UltrasoundProbe", "XrayFrames", "Radiographs", "make_source"]


def _to_dtype(x: np.ndarray, dtype: str, full_scale: float | None = None) -> np.ndarray:
    """Map [0, 1] floats to uint8 / uint16 (12-bit) / int16 / float32.

    With ``full_scale``, every dtype carries ``x * full_scale`` (an 8-bit
    B-mode image sent as uint16 or float32 keeps its 0..255 values, which is
    what a model with a fixed 8-bit mapping expects; docs/protocol.md).
    """
    x = np.clip(x, 0.0, 1.0)
    if full_scale is not None and dtype in ("uint8", "uint16", "int16", "float32"):
        return np.round(x * full_scale).astype(dtype)
    if dtype == "uint8":
        return (x * 255.0 + 0.5).astype(np.uint8)
    if dtype == "uint16":
        return (x * 4095.0 + 0.5).astype(np.uint16)
    if dtype == "int16":
        return (x * 4095.0 - 1024.0).astype(np.int16)
    if dtype == "float32":
        return x.astype(np.float32)
    raise ValueError(f"dtype {dtype!r} is not one of uint8, uint16, int16, float32.")


@dataclass
class UltrasoundProbe:
    """Sector-scan frames with speckle and a moving dark (hypoechoic) lesion.

    Parameters
    ----------
    height, width : int
        Frame size in pixels (a probe's B-mode image, e.g. 480 x 640).
    dtype : str
        ``uint8`` (typical B-mode) or ``uint16``/``int16``/``float32``, each
        holding the 8-bit values 0..255.
    seed : int
        Seed of all randomness.
    loop : int
        Number of distinct frames rendered; frame ``i`` is ``i % loop``.
    """

    height: int = 480
    width: int = 640
    dtype: str = "uint8"
    seed: int = 0
    loop: int = 32
    _frames: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _truth: list[np.ndarray] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.height < 16 or self.width < 16:
            raise ValueError(f"Frame size {self.height}x{self.width} is too small (>= 16x16).")
        rng = np.random.default_rng(self.seed)
        h, w = self.height, self.width
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        apex_x, apex_y = w / 2.0, -0.08 * h
        r = np.hypot(xx - apex_x, yy - apex_y)
        theta = np.arctan2(xx - apex_x, yy - apex_y)
        r0, r1 = 0.12 * h, 1.06 * h
        half = math.radians(38.0)
        sector = (r >= r0) & (r <= r1) & (np.abs(theta) <= half)
        depth = np.clip((r - r0) / (r1 - r0), 0, 1)
        # Tissue echogenicity: smooth texture, a darker fat layer, bright fascia lines.
        tissue = np.exp(0.25 * self._smooth_noise(rng, h, w, 48) + 0.12 * self._smooth_noise(rng, h, w, 12))
        tissue *= np.where(depth < 0.03, 2.2, 1.0) * np.where((depth >= 0.03) & (depth < 0.12), 0.5, 1.0)
        for d0 in (0.2, 0.45, 0.8):
            tissue *= 1 + 1.2 * np.exp(-(((depth - d0) / 0.005) ** 2))
        tissue *= 1 + 0.15 * np.sin(2 * np.pi * (depth * 30 + 0.3 * theta))
        # Speckle: low-passed complex Gaussian -> Rayleigh envelope, laterally elongated.
        fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
        fx = np.fft.fftfreq(w).astype(np.float32)[None, :]
        lowpass = np.exp(-2 * np.pi**2 * ((fy * 0.9) ** 2 + (fx * 2.1) ** 2))
        speckles = []
        for _ in range(4):
            z = rng.standard_normal((h, w)) + 1j * rng.standard_normal((h, w))
            sp = np.abs(np.fft.ifft2(np.fft.fft2(z) * lowpass)).astype(np.float32)
            speckles.append(sp / float(sp.mean()))
        atten = 10 ** ((-8.0 * depth) / 20)  # residual attenuation after TGC
        # Lesion path: a slow ellipse inside the sector, periodic over the loop.
        cy0, cx0 = 0.5 * h, 0.5 * w
        ay, ax = 0.08 * h, 0.14 * w
        ry, rx = 0.09 * h * rng.uniform(0.9, 1.2), 0.07 * w * rng.uniform(0.9, 1.2)
        for i in range(self.loop):
            ph = 2 * math.pi * i / self.loop
            cy, cx = cy0 + ay * math.sin(ph), cx0 + ax * math.cos(ph)
            rho = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
            lesion = rho < 1.0
            ramp = np.clip((1.0 - rho) * min(ry, rx) / 3.0, 0, 1)  # soft margin, a few pixels
            echo = tissue * (1 - ramp) + tissue * 0.25 * ramp  # hypoechoic
            # posterior acoustic enhancement below the lesion
            below = ((xx - cx) / rx) ** 2 < 1.0
            echo = echo * np.where(below & (yy > cy + ry), 1.3, 1.0)
            env = echo * speckles[i % len(speckles)] * atten + 0.01
            db = 20 * np.log10(env)
            top = float(np.percentile(db[sector], 99.5))
            img = np.clip((db - (top - 50.0)) / 50.0, 0, 1)
            img = np.where(sector, img, 0.0)
            # B-mode is 8-bit: every dtype carries the 0..255 values (what the ultrasound model reads).
            self._frames.append(_to_dtype(img, self.dtype, full_scale=255.0))
            self._truth.append((lesion & sector).astype(np.uint8))

    @staticmethod
    def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
        """Bilinearly upsampled coarse Gaussian noise, features about ``cell`` pixels wide."""
        gh, gw = h // cell + 2, w // cell + 2
        g = rng.standard_normal(size=(gh, gw)).astype(np.float32)
        ys = np.arange(h, dtype=np.float32) / cell
        xs = np.arange(w, dtype=np.float32) / cell
        y0, x0 = ys.astype(int), xs.astype(int)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        a = g[y0][:, x0]
        b = g[y0][:, x0 + 1]
        c = g[y0 + 1][:, x0]
        d = g[y0 + 1][:, x0 + 1]
        return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (read-only view; the loop repeats)."""
        f = self._frames[i % self.loop]
        f.flags.writeable = False
        return f

    def truth(self, i: int) -> np.ndarray:
        """Ground-truth lesion mask of frame ``i`` (uint8 0/1)."""
        return self._truth[i % self.loop]


@dataclass
class _LoopedRadiographs:
    """The parameters of a radiograph source, and frame, boxes and label of rendered frame ``i % loop``."""

    height: int = 512
    width: int = 512
    dtype: str = "uint16"
    seed: int = 0
    loop: int = 8
    nodules: Sequence[int] | None = None
    _frames: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    _boxes: list[list[tuple[float, float, float, float]]] = field(default_factory=list, init=False, repr=False)

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (read-only; the loop repeats)."""
        f = self._frames[i % self.loop]
        f.flags.writeable = False
        return f

    def truth(self, i: int) -> list[tuple[float, float, float, float]]:
        """Nodule boxes of frame ``i`` in pixels."""
        return self._boxes[i % self.loop]

    def label(self, i: int) -> bool:
        """Whether frame ``i`` holds a nodule (the known label of a present/absent classifier)."""
        return bool(self._boxes[i % self.loop])


@dataclass
class XrayFrames(_LoopedRadiographs):
    """Chest-X-ray-like frames (dark lung fields, bright ribs) with a few nodules.

    ``truth(i)`` returns the nodule boxes as ``(x0, y0, x1, y1)`` tuples.
    Defaults to 512 x 512 ``uint16`` (12-bit values), like a downsampled DX.

    Parameters
    ----------
    height, width : int
        Frame size in pixels (>= 32 each).
    dtype : str
        ``uint16`` (12-bit values), ``uint8``, ``int16`` or ``float32``.
    seed : int
        Seed of all randomness.
    loop : int
        Number of distinct frames rendered; frame ``i`` is ``i % loop``.
    nodules : sequence of int, optional
        The number of nodules of each rendered frame, repeated over the loop
        (frame ``j`` gets ``nodules[j % len(nodules)]``, each in 0..8; 0 is a
        frame without a finding, a known negative for a classifier). By
        default each frame draws 1 to 3 (the frames every earlier version
        rendered, pixel for pixel).

    Examples
    --------
    >>> xr = XrayFrames(64, 64, seed=1, loop=4, nodules=(0, 1))
    >>> [xr.label(i) for i in range(4)]
    [False, True, False, True]
    >>> xr.truth(0)
    []
    """


    def __post_init__(self) -> None:
        if self.height < 32 or self.width < 32:
            raise ValueError(f"Frame size {self.height}x{self.width} is too small (>= 32x32).")
        if self.nodules is not None:
            self.nodules = _nodule_counts(self.nodules)
        rng = np.random.default_rng(self.seed)
        h, w = self.height, self.width
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        yn, xn = yy / h, xx / w
        body = np.exp(-(((xn - 0.5) / 0.42) ** 6)) * 0.75 + 0.1
        lungs = np.zeros((h, w), np.float32)
        for cx in (0.3, 0.7):
            lungs += np.exp(-(((xn - cx) / 0.15) ** 2 + ((yn - 0.5) / 0.3) ** 4))
        base = body - 0.45 * np.clip(lungs, 0, 1)
        ribs = np.zeros((h, w), np.float32)
        for k in range(9):
            y_c = 0.18 + k * 0.085
            curve = y_c + 0.06 * ((xn - 0.5) * 2) ** 2
            ribs += np.exp(-(((yn - curve) / 0.012) ** 2)) * np.clip(lungs, 0, 1)
        base = base + 0.12 * ribs
        for j in range(self.loop):
            img = base.copy()
            boxes = []
            count = int(rng.integers(1, 4)) if self.nodules is None else self.nodules[j % len(self.nodules)]
            for _ in range(count):
                cx = rng.choice([rng.uniform(0.2, 0.4), rng.uniform(0.6, 0.8)]) * w
                cy = rng.uniform(0.3, 0.7) * h
                rad = rng.uniform(0.015, 0.035) * min(h, w)
                img += 0.25 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (rad / 1.5) ** 2)))
                boxes.append((float(cx - rad), float(cy - rad), float(cx + rad), float(cy + rad)))
            img += rng.normal(0, 0.02, size=(h, w)).astype(np.float32)
            self._frames.append(_to_dtype(img, self.dtype))
            self._boxes.append(boxes)



#: Most nodules one synthetic X-ray frame may hold.
MAX_XRAY_NODULES = 8
#: Most pixels one :class:`Radiographs` renders over its loop (bounded before allocating).
MAX_RADIOGRAPH_PIXELS = 64 * 512 * 512


@dataclass
class Radiographs(_LoopedRadiographs):
    """Synthetic chest radiographs from the generator the bundled X-ray models were trained on.

    Frame ``j`` is :func:`edge.tools.synthetic_xray.make_xray` drawn from
    ``sample_rng(seed, j)`` (so with the default ``uint16`` it is the very
    image sample ``j`` of the trainer's synthetic set with that seed and
    nodule count): body, lungs, ribs, clavicles, heart, vessel texture,
    detector blur and noise, nodules with irregular margins.
    ``truth(i)`` returns the nodule boxes as ``(x0, y0, x1, y1)`` tuples.

    Parameters
    ----------
    height, width : int
        Frame size in pixels (32 to 4096 each; the generator's default is 512 x 512).
    dtype : str
        ``uint16`` (the generator's 12-bit values, unchanged), ``uint8``,
        ``int16`` or ``float32`` (the same image rescaled, as :class:`XrayFrames`).
    seed : int
        Seed of all randomness.
    loop : int
        Number of distinct frames rendered (about 0.1-0.2 s each at 512 x 512
        on one core); frame ``i`` is ``i % loop``.
    nodules : sequence of int, optional
        Nodules asked for in each rendered frame, repeated over the loop
        (each in 0..8; 0 is a frame without a finding, a known negative for
        a classifier). By default the generator draws 0-4. A nodule that
        finds no free place in the lungs is left out (rare), so ``truth`` and
        ``label`` are what the frame holds.

    Examples
    --------
    >>> xr = Radiographs(64, 64, seed=1, loop=2, nodules=(0, 1))
    >>> xr.frame(0).dtype, xr.label(0), len(xr.truth(1)) <= 1
    (dtype('uint16'), False, True)
    """


    def __post_init__(self) -> None:
        from edge.tools.synthetic_xray import make_xray, sample_rng

        if not (32 <= self.height <= 4096 and 32 <= self.width <= 4096):
            raise ValueError(f"Frame size {self.height}x{self.width} is not within 32..4096 per side.")
        if not 1 <= self.loop or self.loop * self.height * self.width > MAX_RADIOGRAPH_PIXELS:
            raise ValueError(f"loop {self.loop} of {self.height}x{self.width} frames is not within 1 frame and "
                             f"{MAX_RADIOGRAPH_PIXELS} pixels.")
        if self.dtype not in ("uint16", "uint8", "int16", "float32"):
            raise ValueError(f"dtype {self.dtype!r} is not one of uint8, uint16, int16, float32.")
        if self.nodules is not None:
            self.nodules = _nodule_counts(self.nodules)
        for j in range(self.loop):
            count = None if self.nodules is None else self.nodules[j % len(self.nodules)]
            img, boxes = make_xray(sample_rng(self.seed, j), (self.height, self.width), nodules=count)
            frame = img if self.dtype == "uint16" else _to_dtype(img.astype(np.float32) / 4095.0, self.dtype)
            self._frames.append(frame)
            self._boxes.append([(float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in boxes])



def _nodule_counts(nodules: Sequence[int]) -> tuple[int, ...]:
    """``nodules`` as a non-empty tuple of ints in 0..MAX_XRAY_NODULES; ``ValueError`` otherwise."""
    counts = tuple(nodules)
    if not counts or len(counts) > 4096:
        raise ValueError(f"nodules has {len(counts)} entries (1..4096 expected).")
    for c in counts:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c <= MAX_XRAY_NODULES:
            raise ValueError(f"Nodule count {c!r} is not an integer in 0..{MAX_XRAY_NODULES}.")
    return tuple(int(c) for c in counts)


def make_source(kind: str, height: int, width: int, dtype: str, seed: int = 0, loop: int = 32):
    """``ultrasound`` -> :class:`UltrasoundProbe`, ``xray`` -> :class:`XrayFrames`."""
    if kind == "ultrasound":
        return UltrasoundProbe(height, width, dtype, seed, loop)
    if kind == "xray":
        return XrayFrames(height, width, dtype, seed, min(loop, 8))
    raise ValueError(f"Synthetic source kind {kind!r} is not 'ultrasound' or 'xray'.")
