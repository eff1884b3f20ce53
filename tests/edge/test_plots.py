"""Latency plots: a real matplotlib figure of the asked size with both panels drawn; without the
``plots`` extra the plot is skipped with one warning naming it, never a crash."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.tools.plots import PALETTE, PLOTS_EXTRA, latency_figure, save_latency_plot

pytest.importorskip("matplotlib", reason="the plots extra (pip install 'medge[plots]') is not installed")


def _series() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"probe-1": 2.0 + rng.gamma(4.0, 0.5, 2000), "xray-1": 4.0 + rng.gamma(6.0, 0.5, 1500)}


def _pixels_of(rgb: np.ndarray, color: tuple[int, int, int]) -> int:
    return int(np.all(rgb == np.asarray(color, np.uint8), axis=-1).sum())


def test_the_latency_plot_is_a_matplotlib_png_of_the_asked_size(tmp_path: Path) -> None:
    path = save_latency_plot(_series(), tmp_path / "latency.png", title="test run", size=(900, 400))
    assert path == tmp_path / "latency.png"
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically: no temp file left
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (900, 400)
        assert im.info.get("Software", "").startswith("Matplotlib")  # matplotlib wrote it, not Pillow
        rgb = np.asarray(im.convert("RGB"))
    # Not blank: both series' colours fill bars (left half) and CDF lines (right half).
    left, right = rgb[:, :450], rgb[:, 450:]
    for color in PALETTE[:2]:
        assert _pixels_of(left, color) > 500, color  # histogram bars
        assert _pixels_of(right, color) > 100, color  # CDF line
    assert _pixels_of(rgb, PALETTE[2]) == 0  # no third series drawn
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20  # text, axes, grid: anti-aliased detail
    assert (rgb == 255).all(axis=-1).mean() > 0.5  # on a white background


def test_the_figure_keeps_its_default_size_and_an_empty_run_still_draws() -> None:
    assert latency_figure(_series()).size == (1000, 420)
    empty = np.asarray(latency_figure({"zmq": np.array([])}, title="nothing").convert("RGB"))
    assert empty.shape == (420, 1000, 3)
    assert (empty < 128).any()  # the "no samples" note and title are drawn
    assert not any(_pixels_of(empty, c) for c in PALETTE[:2])  # and no data


def test_without_matplotlib_the_plot_is_skipped_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    caplog.set_level(logging.WARNING, logger="edge.tools.plots")
    assert save_latency_plot(_series(), tmp_path / "latency.png") is None
    assert not (tmp_path / "latency.png").exists()
    (record,) = caplog.records
    assert PLOTS_EXTRA in record.getMessage() and "matplotlib" in record.getMessage()
    assert "\n" not in record.getMessage()
