"""End to end with a real classifier: DCMTK storescu -> our SCP -> scheduler (tiny-cls) -> SR + CAM overlay -> storescp.

The committed fixture classifier ``tiny-cls`` (``p = sigmoid(20 * (f - 0.1))``,
``f`` the bright share of the min-max normalised input; its class
activation map is the 8 x 8 average of the input, on the same scale) runs
behind the real scheduler on ONNX Runtime (CPU). A DX chest image with a
large bright square (positive), a CR with a small one (negative) and an
ultrasound cine (every second frame processed) go through the real SCP;
what reaches the PACS must be dciodvfy-clean, read back with highdicom to
what the model answers for the same decoded frames (decision exactly, the
probability to 0.02 percentage points: batches may differ in the last bits),
reference the study, series, instance and frame, and the overlays must show
the map of the frame they reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.sr.codedict import codes

from edge.config import DicomDestination, DicomRoute, MedgeConfig, ModelConfig
from edge.egress.dicom.classification import ClassifiedSource, ClassifierInfo
from edge.egress.dicom.sc import make_overlay
from edge.inference.manifest import Manifest
from edge.ingest.dicom.pixels import iter_frames
from edge.ingest.dicom.scp import DicomIngest
from tests.conftest import FIXTURE_ENGINES, wait_until
from tests.edge import dicom_factory as f
from tests.edge.test_dicom_classification import evidence, pacs, read_groups, storescu  # noqa: F401 - pacs: fixture
from tests.edge.test_dicom_results import dciodvfy

MODEL = "tiny-cls"
STUDY = "1.2.826.0.1.3680043.8.498.4711"

pytestmark = [
    pytest.mark.skipif(not (FIXTURE_ENGINES / MODEL / "manifest.json").is_file(), reason="tiny-cls is not committed yet"),
    pytest.mark.peer("storescu", "storescp", "dciodvfy"),
]


@pytest.fixture(scope="module")
def served(fixture_engines_with_cls: Path) -> Iterator[tuple[MedgeConfig, object, object]]:
    """(config, scheduler, model registry): tiny-cls behind the real scheduler, ONNX Runtime CPU."""
    from edge.inference.model import ModelRegistry
    from edge.scheduler import Scheduler

    cfg = MedgeConfig(engines_dir=fixture_engines_with_cls, models=(ModelConfig(name=MODEL, precision="fp32"),))
    models = ModelRegistry.from_config(cfg, warmup=False)
    sched = Scheduler(models, cfg.scheduler).start()
    yield cfg, sched, models
    sched.close()
    models.close()


def classifier_info(cfg: MedgeConfig) -> ClassifierInfo:
    """What the results say about tiny-cls, its decision threshold included (from its manifest)."""
    m = Manifest.load(cfg.model_dir(cfg.model(MODEL)))
    return ClassifierInfo(m.name, m.version, m.task, tuple(m.labels), bool(m.research_only),
                          threshold=m.postprocessing.threshold)


def square(shape: tuple[int, int], side: int, low: int, high: int, dtype: type = np.uint16) -> np.ndarray:
    img = np.full(shape, low, dtype)
    y, x = shape[0] // 4, shape[1] // 4
    img[y : y + side, x : x + side] = high
    return img


def sources(folder: Path) -> dict[str, Path]:
    """DX positive, CR negative (one study), a US cine of 4 frames: 1 negative, 3 positive."""
    dx = f.make_dx(square((64, 64), 32, 800, 3500), study_uid=STUDY)
    cr = f.make_cr(square((64, 64), 8, 700, 3000), study_uid=STUDY)
    cine = np.stack([square((48, 64), s, 20, 200, np.uint8) for s in (6, 30, 6, 30)])
    cine[2] = square((48, 64), 34, 20, 200, np.uint8)  # frame 3: positive
    us = f.make_us_multiframe(cine, study_uid=STUDY)
    return {k: f.save(ds, folder / f"{k}.dcm") for k, ds in (("dx", dx), ("cr", cr), ("us", us))}


def test_classified_series_reach_the_pacs_as_sr_and_cam_overlays(served, pacs, tmp_path: Path) -> None:
    cfg, sched, models = served
    port, pacs_dir = pacs
    info = classifier_info(cfg)
    routes = tuple(DicomRoute(modality=m, model=MODEL) for m in ("DX", "CR", "US"))
    dest = (DicomDestination(name="pacs", host="127.0.0.1", port=port, ae_title="PACS"),)
    dcfg = f.dicom_config(tmp_path, base=cfg, routes=routes, destinations=dest, secondary_capture=True,
                          frame_stride=2)
    src = sources(tmp_path / "src")
    with DicomIngest(dcfg, sched, CollectorRegistry(), dcfg.spool_dir, model_info=lambda name: info).start() as ing:
        storescu(ing.port, list(src.values()))
        # 3 SRs (one per series) + overlays: DX, CR, cine frames 1 and 3.
        wait_until(lambda: len([p for p in pacs_dir.iterdir() if p.is_file()]) >= 7, 120, what="7 results")
        assert ing.pipeline.wait_idle(30) and ing.outbox.wait_idle(30)
        assert ing.spool.pending_instances() == []
    received = [dcmread(p) for p in sorted(pacs_dir.iterdir()) if p.is_file()]
    assert sorted(ds.Modality for ds in received) == ["OT"] * 4 + ["SR"] * 3
    model = models.get(MODEL)
    for key, path in src.items():
        source = dcmread(path)
        uid = str(source.SOPInstanceUID)
        frames = dict(iter_frames(source, stride=2))
        expected = {n: model.run([img], wants=[frozenset({"heatmap"})])[0] for n, img in frames.items()}
        (sr,) = [ds for ds in received if ds.Modality == "SR" and uid in {e[2] for e in evidence(ds)}]
        dciodvfy(sr, tmp_path, f"{key}_sr")
        assert sr.StudyInstanceUID == STUDY and evidence(sr) == {(STUDY, str(source.SeriesInstanceUID), uid)}
        groups = read_groups(sr, tmp_path, key)
        multiframe = key == "us"
        assert [g["frames"] for g in groups] == ([[n] for n in expected] if multiframe else [None])
        for g, (n, r) in zip(groups, expected.items()):
            print(f"{key} frame {n}: p={r.classes[0].score:.4f} decision={r.decision}; SR {g['certainty']} %")
            assert g["uid"] == uid and g["finding"] == codes.SCT.Nodule
            assert g["value"] == (codes.SCT.Present if r.decision else codes.SCT.Absent)
            assert g["certainty"] == pytest.approx(100 * r.classes[0].score, abs=0.02)
            assert g["params"] == [f"decision threshold {info.threshold:.4f}: Present when the calibrated "
                                   "probability is at or above it"]
        assert [r.decision for r in expected.values()] == {"dx": [True], "cr": [False], "us": [False, True]}[key]
        check_overlays(received, source, expected, info, tmp_path, key)


def check_overlays(received: list, source, expected: dict, info: ClassifierInfo, tmp_path: Path, key: str) -> None:
    """Each processed frame's overlay references it and shows the map the model makes for it."""
    uid = str(source.SOPInstanceUID)
    multiframe = int(source.get("NumberOfFrames", 1) or 1) > 1
    overlays = {int(ds.SourceImageSequence[0].get("ReferencedFrameNumber", 1)): ds for ds in received
                if ds.Modality == "OT" and ds.SourceImageSequence[0].ReferencedSOPInstanceUID == uid}
    assert sorted(overlays) == sorted(expected)
    frames = dict(iter_frames(source, stride=2))
    for idx, (n, r) in enumerate(expected.items()):
        sc = overlays[n]
        dciodvfy(sc, tmp_path, f"{key}_sc_{n}")
        assert sc.StudyInstanceUID == STUDY and ("ReferencedFrameNumber" in sc.SourceImageSequence[0]) == multiframe
        word = "Present" if r.decision else "Absent"
        assert sc.ImageComments.startswith(f"nodule: {word}, certainty of finding")
        # The overlay drawn from the model's own map for this frame: equal up to rounding at a few pixels.
        want = make_overlay(source, frames[n], ClassifiedSource(
            source, [n], classes=[[c.to_dict() for c in r.classes]], decisions=[bool(r.decision)],
            heatmaps=r.heatmap[None], threshold=info.threshold), 0, info).pixel_array
        got = sc.pixel_array
        assert got.shape == want.shape
        assert np.mean(np.abs(got.astype(int) - want.astype(int)).max(axis=-1) > 2) < 0.01
        if r.decision:  # the hottest part of the map lies on the bright square
            hot = np.unravel_index(int(np.argmax(r.heatmap)), r.heatmap.shape)
            assert frames[n][hot] == frames[n].max(), (key, n, hot)
