"""Outlines of mask regions as polygons, and results drawn on pixels.

One implementation of both, used by the daemon's results and by the tools:

- :func:`mask_outlines`: the closed outer outline of each region of a
  binary mask, on pixel corners (what a TID 1500 SR's ``POLYLINE`` SCOORDs
  carry); :func:`largest_outlines` keeps an SR small;
  :func:`box_polygon` is a box as a closed rectangle;
- drawing on an RGB uint8 image, in place: :func:`tint` (a mask blended
  with a colour), :func:`mask_boundary` (the mask's pixels that touch the
  outside, to draw an outline on pixels), :func:`draw_boxes`;
  :func:`to_display_uint8` scales any image to 8 bits for display;
- :func:`draw_overlay`: the secondary-capture overlay's pixels (grayscale
  background, mask tinted red, boxes outlined green). The demo's and the
  benchmarks' PNG figures (:mod:`edge.tools.plots`) draw with the same
  functions.

Only numpy: no highdicom, no Pillow, so the tools can import it cheaply.

Examples
--------
>>> import numpy as np
>>> m = np.zeros((5, 6), np.uint8); m[1:4, 1:5] = 1
>>> rgb = draw_overlay(np.arange(30).reshape(5, 6), m, [{"x0": 0, "y0": 0, "x1": 2, "y1": 2}])
>>> rgb.shape, rgb.dtype, rgb[3, 3].tolist(), rgb[0, 1].tolist()
((5, 6, 3), dtype('uint8'), [255, 92, 92], [0, 255, 0])
>>> int(mask_boundary(m > 0).sum())  # 10 of the 12 pixels of the 4x3 block touch its outside
10
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "mask_outlines",
    "largest_outlines",
    "box_polygon",
    "to_display_uint8",
    "tint",
    "mask_boundary",
    "draw_boxes",
    "draw_overlay",
]

MAX_REGIONS = 32  # per frame and label
MAX_VERTICES = 2000  # per outline

# Directions as (dx, dy) in image coordinates (x right, y down); index order is clockwise.
_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))


def mask_outlines(mask: np.ndarray, min_pixels: int = 1) -> list[np.ndarray]:
    """Closed outer outlines of the regions of a binary mask, on pixel corners.

    Each outline is a float ``[N, 2]`` array of (column, row) vertices, with
    the first vertex repeated at the end, traced clockwise along pixel edges
    (4-connected regions; holes are not outlined). Rasterising an outline
    gives the region back exactly when it has no holes.

    Examples
    --------
    >>> m = np.zeros((4, 5), np.uint8); m[1:3, 1:4] = 1
    >>> mask_outlines(m)[0].tolist()
    [[1.0, 1.0], [4.0, 1.0], [4.0, 3.0], [1.0, 3.0], [1.0, 1.0]]
    """
    fg = np.pad(np.asarray(mask) > 0, 1)
    inner = fg[1:-1, 1:-1]
    if not inner.any():
        return []
    edges: dict[tuple[int, int], list[int]] = {}
    rows, cols = np.nonzero(inner)
    # (start-vertex offset, direction) of each pixel's boundary edge, when its neighbour is background.
    checks = (
        (~fg[:-2, 1:-1], (0, 0), 0),  # top: (c, r) -> (c+1, r), east
        (~fg[1:-1, 2:], (1, 0), 1),  # right: (c+1, r) -> (c+1, r+1), south
        (~fg[2:, 1:-1], (1, 1), 2),  # bottom: (c+1, r+1) -> (c, r+1), west
        (~fg[1:-1, :-2], (0, 1), 3),  # left: (c, r+1) -> (c, r), north
    )
    for open_side, (ox, oy), d in checks:
        sel = open_side[rows, cols]
        for r, c in zip(rows[sel].tolist(), cols[sel].tolist()):
            edges.setdefault((c + ox, r + oy), []).append(d)
    outlines: list[np.ndarray] = []
    while edges:
        # Start where only one edge leaves, so the walk closes exactly when it comes back.
        start = next((k for k, o in edges.items() if len(o) == 1), next(iter(edges)))
        pts = [start]
        v, d = start, -1
        while True:
            outs = edges[v]
            if d >= 0 and len(outs) > 1:
                # Diagonal touch: turn right first, which keeps 4-connected regions apart.
                d = next((d + t) % 4 for t in (1, 0, 3) if (d + t) % 4 in outs)
            else:
                d = outs[0]
            outs.remove(d)
            if not outs:
                del edges[v]
            v = (v[0] + _DIRS[d][0], v[1] + _DIRS[d][1])
            if v == start:
                break
            pts.append(v)
        arr = np.asarray(pts + [start], dtype=np.float64)
        x, y = arr[:, 0], arr[:, 1]
        area = 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))
        if area >= min_pixels:  # clockwise in image coordinates: an outer boundary, not a hole
            outlines.append(_drop_collinear(arr))
    return outlines


def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    """Remove vertices that lie on a straight run; keeps the closing vertex."""
    ring = pts[:-1]
    prev = np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0)
    cross = (ring[:, 0] - prev[:, 0]) * (nxt[:, 1] - ring[:, 1]) - (ring[:, 1] - prev[:, 1]) * (nxt[:, 0] - ring[:, 0])
    kept = ring[cross != 0]
    return np.vstack([kept, kept[:1]])


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])))


def largest_outlines(outlines: list[np.ndarray]) -> list[np.ndarray]:
    """At most ``MAX_REGIONS`` outlines (largest first), each at most ``MAX_VERTICES`` vertices.

    Keeps every SR small and every GraphicData far below the 64 KiB an
    explicit-VR ``FL`` element can hold.
    """
    keep = sorted(outlines, key=_area, reverse=True)[:MAX_REGIONS]
    out = []
    for poly in keep:
        if len(poly) > MAX_VERTICES:
            step = int(np.ceil((len(poly) - 1) / (MAX_VERTICES - 1)))
            ring = poly[:-1][::step]
            poly = np.vstack([ring, ring[:1]])
        out.append(poly)
    return out


def box_polygon(box: Mapping[str, float], cols: int, rows: int) -> np.ndarray:
    """A box (``x0 y0 x1 y1``, pixels) as a closed rectangle clipped to the image, at least one pixel wide."""
    x0 = float(np.clip(box["x0"], 0, cols))
    x1 = float(np.clip(box["x1"], 0, cols))
    y0 = float(np.clip(box["y0"], 0, rows))
    y1 = float(np.clip(box["y1"], 0, rows))
    if x1 <= x0:
        x1 = min(float(cols), x0 + 1.0)
    if y1 <= y0:
        y1 = min(float(rows), y0 + 1.0)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)



# --------------------------------------------------------------------------- drawing on pixels
def to_display_uint8(image: np.ndarray, *, stretch_uint8: bool = True) -> np.ndarray:
    """``image`` (any dtype, any shape) min-max scaled to uint8; a flat image is black.

    With ``stretch_uint8=False`` an image that is uint8 already is returned
    as it is.
    """
    a = np.asarray(image)
    if a.dtype == np.uint8 and not stretch_uint8:
        return a
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return ((a - lo) / (hi - lo) * 255.0).astype(np.uint8)


def tint(rgb: np.ndarray, mask: np.ndarray, color: Sequence[int], alpha: float | Sequence[float]) -> np.ndarray:
    """Blend the ``mask`` pixels of ``rgb`` (uint8 ``[H, W, 3]``) with ``color``, in place.

    ``alpha`` is the colour's weight, one for all channels or one per channel.
    """
    m = np.asarray(mask, dtype=bool)
    a = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (3,))
    px = rgb[m].astype(np.float64)
    rgb[m] = (px * (1.0 - a) + np.asarray(color, dtype=np.float64) * a).clip(0, 255).astype(np.uint8)
    return rgb


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of a boolean mask with a 4-neighbour outside it (the image border is not outside)."""
    m = np.asarray(mask, dtype=bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def draw_boxes(rgb: np.ndarray, boxes: Iterable[Mapping[str, float]], color: Sequence[int],
               width: int = 1) -> np.ndarray:
    """Outline each box (``x0 y0 x1 y1``, pixels, clipped to the image) on ``rgb``, in place.

    Lines are ``width`` pixels wide, drawn inwards from the box's edge.
    """
    h, w = rgb.shape[:2]
    for b in boxes:
        x0, x1 = int(np.clip(b["x0"], 0, w - 1)), int(np.clip(b["x1"], 0, w - 1))
        y0, y1 = int(np.clip(b["y0"], 0, h - 1)), int(np.clip(b["y1"], 0, h - 1))
        for k in range(max(1, int(width))):
            xa, xb, ya, yb = x0 + k, x1 - k, y0 + k, y1 - k
            if k and (xa > xb or ya > yb):
                break
            rgb[ya : yb + 1, [xa, xb]] = color
            rgb[[ya, yb], xa : xb + 1] = color
    return rgb


def draw_overlay(image: np.ndarray, mask: np.ndarray | None, boxes: Iterable[Mapping[str, float]]) -> np.ndarray:
    """RGB uint8 image: ``image`` as a stretched grayscale, ``mask`` tinted red, boxes outlined green.

    What a secondary-capture overlay shows (:func:`edge.egress.dicom.sc.make_overlay`).
    """
    g = np.asarray(image, dtype=np.float32)
    if g.ndim == 3:
        g = g.mean(axis=2)
    rgb = np.repeat(to_display_uint8(g)[..., None], 3, axis=2)
    if mask is not None:
        tint(rgb, np.asarray(mask) > 0, (255, 0, 0), (1.0, 0.5, 0.5))
    draw_boxes(rgb, boxes, (0, 255, 0))
    return rgb
