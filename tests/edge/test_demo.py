"""``medge demo``: a short run writes a complete report with ok frames and no errors.

Also the pieces of its classification part: the labelled X-ray source, the
ROC arithmetic, the heatmap overlay and the choice of the classifier.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.cli import main
from edge.inference.manifest import default_engines_dir
from edge.tools.demo_classification import resolve_classifier
from edge.tools.plots import overlay_heatmap
from edge.tools.roc import operating_point, roc_auc, roc_points
from edge.tools.synthetic import Radiographs, XrayFrames
from edge.tools.synthetic_xray import make_xray, sample_rng


def _check_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= 64


def _check_report(report: Path) -> dict:
    for name in ("overlay_segmentation.png", "overlay_detection.png", "latency.png"):
        _check_png(report / name)
    summary = json.loads((report / "summary.json").read_text())
    assert summary["frames"]["ok"] > 0
    assert summary["frames"]["errors"] == 0 and summary["frames"]["timeouts"] == 0
    assert summary["aborted"] is None
    assert summary["daemon"]["exit_status"] == 0
    assert summary["latency_ms"]["median_ms"] > 0
    md = (report / "report.md").read_text()
    assert "latency.png" in md and "overlay_segmentation.png" in md
    return summary


def _check_classification(report: Path, summary: dict, model: str) -> dict:
    """The classification stream's ROC, CAM overlay, summary section and report text."""
    for name in ("roc_classification.png", "overlay_classification.png"):
        _check_png(report / name)
    c = summary["classification"]
    assert summary["models"]["classification"] == model and c["model"] == model
    assert 0 < c["n"] <= c["ok_replies"]
    assert c["positives"] > 0 and c["negatives"] > 0 and c["positives"] + c["negatives"] == c["n"]
    assert isinstance(c["auc"], float) and 0.0 <= c["auc"] <= 1.0
    assert c["decisions"]["positive"] + c["decisions"]["negative"] == c["n"] == sum(c["confusion"].values())
    for rate in ("sensitivity", "specificity"):
        assert 0.0 <= c[rate] <= 1.0
    assert c["cam_frame"]["stream"] == "xray-cam-1" and isinstance(c["cam_frame"]["decision"], bool)
    assert {"xray-cls-1", "xray-cam-1"} <= set(summary["latency_ms_by_stream"])
    md = (report / "report.md").read_text()
    assert "roc_classification.png" in md and "overlay_classification.png" in md and f"AUC {c['auc']}" in md
    return c


def test_demo_on_fixture_models(fixture_engines_with_cls: Path, tmp_path: Path, capsys) -> None:
    report = tmp_path / "report"
    rc = main(["demo", "--duration-s", "3", "--fps", "30", "--engines-dir", str(fixture_engines_with_cls),
               "--seg-model", "tiny-seg", "--det-model", "tiny-det", "--cls-model", "tiny-cls",
               "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = _check_report(report)
    assert summary["frames"]["ok"] >= 60  # 3 s at 30 fps, plus the X-ray streams
    assert "p50_ms" in out  # the live table
    assert "xray-cls-1 -> tiny-cls" in out
    _check_classification(report, summary, "tiny-cls")
    d = summary["dicom"]
    if d["status"] == "ran":  # the DICOM side is part of this build: results must come back
        assert d["stored"] == d["sent"] and d["instances_without_result"] == 0
        assert d["cr"] == {"model": "tiny-cls", "result": "SR"}  # the CR went to the classifier


@pytest.mark.skipif(not (default_engines_dir() / "us-lesion-seg" / "manifest.json").is_file()
                    or not (default_engines_dir() / "xray-nodule-det" / "manifest.json").is_file(),
                    reason="bundled engines not built (make engines)")
def test_demo_on_bundled_models_without_dicom(tmp_path: Path, capsys) -> None:
    """What `make demo` runs, shortened."""
    report = tmp_path / "report"
    rc = main(["demo", "--duration-s", "3", "--no-dicom", "--report", str(report)])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = _check_report(report)
    models = summary["models"]
    assert (models["segmentation"], models["detection"]) == ("us-lesion-seg", "xray-nodule-det")
    assert summary["dicom"]["status"].startswith("skipped")
    if (default_engines_dir() / "xray-nodule-cls" / "manifest.json").is_file():
        c = _check_classification(report, summary, "xray-nodule-cls")
        # The frames are the classifier's training generator's: it tells them apart (before, on frames of
        # a look-alike simulator, the demo could call every frame positive).
        assert c["confusion"]["tp"] > 0 and c["confusion"]["tn"] > 0
    else:  # skipped with a note
        assert models["classification"] is None
        assert summary["classification"]["status"].startswith("classification stream skipped")


def test_resolve_classifier_skips_absent_and_non_classification_models(fixture_engines_with_cls: Path,
                                                                         capsys) -> None:
    plan, note = resolve_classifier(fixture_engines_with_cls, "tiny-cls")
    assert plan is not None and note == ""
    assert plan.label == "nodule" and 0.0 < plan.threshold < 1.0
    for name, why in (("no-such-model", "no model"), ("tiny-det", "not a classification model")):
        plan, note = resolve_classifier(fixture_engines_with_cls, name)
        assert plan is None and why in note
        assert note in capsys.readouterr().out


def test_xray_frames_nodules_give_known_labels() -> None:
    xr = XrayFrames(96, 96, "uint16", seed=4, loop=6, nodules=(0, 1, 2))
    assert [xr.label(i) for i in range(7)] == [False, True, True, False, True, True, False]
    assert [len(xr.truth(i)) for i in range(3)] == [0, 1, 2]
    # The background is the same in every frame: a nodule adds brightness only near its box.
    diff = xr.frame(1).astype(np.int32) - xr.frame(0).astype(np.int32)
    x0, y0, x1, y1 = (int(round(v)) for v in xr.truth(1)[0])
    assert diff[max(0, y0):y1, max(0, x0):x1].mean() > 20 + abs(diff).mean()
    default = XrayFrames(96, 96, "uint16", seed=4, loop=3)
    assert all(default.label(i) for i in range(3))  # without ``nodules``: 1 to 3 each, as before
    for bad in ((), (9,), (-1,), (True,), (1.5,)):
        with pytest.raises(ValueError):
            XrayFrames(64, 64, nodules=bad)


def test_radiographs_are_the_training_generator_with_known_labels() -> None:
    xr = Radiographs(96, 96, "uint16", seed=4, loop=4, nodules=(0, 1, 2, 0))
    for j in range(4):  # frame j is sample j of the seed, as the trainer draws it
        img, boxes = make_xray(sample_rng(4, j), (96, 96), nodules=(0, 1, 2, 0)[j])
        assert np.array_equal(xr.frame(j), img) and xr.truth(j) == [tuple(map(float, b)) for b in boxes]
    assert [xr.label(i) for i in (0, 3, 4)] == [False, False, False] and not xr.frame(0).flags.writeable
    assert xr.label(1) == bool(xr.truth(1)) and len(xr.truth(2)) <= 2
    raw = Radiographs(96, 96, "uint16", seed=4, loop=1, nodules=(1,)).frame(0).astype(np.float32) / 4095.0
    as8 = Radiographs(96, 96, "uint8", seed=4, loop=1, nodules=(1,)).frame(0)
    f32 = Radiographs(96, 96, "float32", seed=4, loop=1, nodules=(1,)).frame(0)
    assert np.array_equal(f32, raw) and np.array_equal(as8, (raw * 255.0 + 0.5).astype(np.uint8))  # rescaled
    drawn = Radiographs(64, 64, seed=5, loop=2)  # without ``nodules``: the generator's own 0-4
    assert drawn.truth(1) == [tuple(map(float, b)) for b in make_xray(sample_rng(5, 1), (64, 64))[1]]
    for bad in ({"nodules": (9,)}, {"height": 16}, {"width": 5000}, {"loop": 0}, {"dtype": "int8"},
                {"loop": 10_000}):
        with pytest.raises(ValueError):
            Radiographs(**{"height": 64, "width": 64, **bad})


def test_roc_auc_is_the_mann_whitney_statistic_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(2, 30))
        scores = np.round(rng.random(n), 1)  # many ties
        labels = np.arange(n) % 2 == 0
        pos, neg = scores[labels][:, None], scores[~labels][None, :]
        expected = ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)
        assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    fpr, tpr, thr = roc_points([0.2, 0.2, 0.9], [False, True, True])
    assert fpr.tolist() == [0.0, 0.0, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0] and thr[0] == np.inf
    assert roc_auc([0.1, 0.9], [True, True]) is None
    with pytest.raises(ValueError):
        roc_points([0.1, 0.9], [False, False])
    with pytest.raises(ValueError):
        roc_auc([0.1, float("nan")], [True, False])
    op = operating_point([True, True, False, False, True], [True, False, False, True, True])
    assert (op["sensitivity"], op["specificity"]) == (pytest.approx(2 / 3), 0.5)
    assert operating_point([True], [True])["specificity"] is None


def test_overlay_heatmap_reddens_where_the_map_is_hot() -> None:
    image = np.full((40, 50), 1000, np.uint16)
    image[0, 0] = 0  # not flat: min-max scaling keeps the gray
    heat = np.zeros((40, 50), np.uint8)
    heat[10:20, 10:20] = 255
    rgb = np.asarray(overlay_heatmap(image, heat, threshold=0.5)).astype(int)
    hot, cold = rgb[15, 15], rgb[30, 40]
    assert hot[0] - hot[1] > 100 and abs(cold[0] - cold[1]) <= 1
    assert tuple(rgb[10, 15]) == (255, 230, 40)  # the threshold's edge
    with pytest.raises(ValueError):
        overlay_heatmap(image, heat[:10])
