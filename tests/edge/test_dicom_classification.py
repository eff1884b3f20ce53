"""Classification results as DICOM: the TID 1500 SR, the CAM overlay, the spool, the pipeline.

Built on explicit inputs (no model): the SR of classified frames passes
dciodvfy and reads back with ``highdicom.sr.srread`` to the same decision,
certainty, threshold and image references; the overlay draws the class
activation map; the spool keeps classes and maps and still loads a result
saved before classification existed; and the pipeline, over the real SCP
with DCMTK's ``storescu`` and ``storescp``, asks the service for the map
only when overlays are on.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any, Iterator

import highdicom as hd
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from edge.egress.dicom.classification import ClassifiedSource, ClassifierInfo
from edge.egress.dicom.results import build_results
from edge.egress.dicom.sc import make_overlay
from edge.errors import DataError
from edge.ingest.dicom.spool import InstanceResult, Spool
from edge.types import ClassScore, InferenceResult
from tests.conftest import peer_path, wait_until
from tests.edge import dicom_factory as f
from tests.edge.test_dicom_outbox import wait_port
from tests.edge.test_dicom_results import dciodvfy, roundtrip

CLS = ClassifierInfo("xray-nodule-cls", "1.2", "classification", ("nodule",), True, threshold=0.42)
ALGORITHM_PARAMETERS = "111002"  # DCM: Algorithm Parameters (TID 4019)


def read_groups(sr: Dataset, tmp_path: Path, name: str) -> list[dict[str, Any]]:
    """Each TID 1501 group of a classification SR, read back with highdicom.sr.srread."""
    path = tmp_path / f"{name}.sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    doc = hd.sr.srread(path)
    out = []
    for g in doc.content.get_image_measurement_groups():
        (qe,) = g.get_qualitative_evaluations()
        (certainty,) = g.get_measurements(name=codes.DCM.CertaintyOfFinding)
        (image,) = g.source_images
        params = [
            str(item.TextValue)
            for item in g[0].ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == ALGORITHM_PARAMETERS
        ]
        out.append({
            "id": g.tracking_identifier,
            "finding": g.finding_type,
            "concept": qe.name,
            "value": qe.value,
            "certainty": float(certainty.value),
            "unit": certainty.unit,
            "params": params,
            "uid": image.referenced_sop_instance_uid,
            "frames": image.referenced_frame_numbers,
        })
    return out


def evidence(sr: Dataset) -> set[tuple[str, str, str]]:
    """(study, series, instance) of every SR evidence item."""
    return {
        (str(study.StudyInstanceUID), str(series.SeriesInstanceUID), str(sop.ReferencedSOPInstanceUID))
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def classified(ds: Dataset, frames: list[int], scores: list[float], threshold: float | None = 0.42,
               label: str = "nodule") -> ClassifiedSource:
    thr = 0.5 if threshold is None else threshold
    return ClassifiedSource(ds, frames, classes=[[{"label": label, "score": s}] for s in scores],
                            decisions=[s >= thr for s in scores], threshold=threshold)


# --------------------------------------------------------------------------- the SR
def test_sr_of_a_dx_series_says_present_or_absent_per_instance(tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    a = roundtrip(f.make_dx(np.full((64, 64), 900, np.uint16), study_uid=study))
    b = roundtrip(f.make_dx(np.full((64, 64), 800, np.uint16), study_uid=study))
    b.SeriesInstanceUID, b.InstanceNumber = a.SeriesInstanceUID, 2
    (sr,) = build_results([classified(a, [1], [0.873]), classified(b, [1], [0.12])], CLS)
    assert dciodvfy(sr, tmp_path, "dx_cls_sr") == []
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.StudyInstanceUID == study and sr.SeriesInstanceUID != a.SeriesInstanceUID
    assert "NOT FOR CLINICAL USE" in sr.SeriesDescription
    assert evidence(sr) == {(study, str(a.SeriesInstanceUID), str(d.SOPInstanceUID)) for d in (a, b)}
    groups = read_groups(sr, tmp_path, "dx")
    assert [(g["uid"], g["frames"]) for g in groups] == [(str(a.SOPInstanceUID), None), (str(b.SOPInstanceUID), None)]
    assert [g["value"] for g in groups] == [codes.SCT.Present, codes.SCT.Absent]
    assert [g["certainty"] for g in groups] == [87.3, 12.0]
    for g in groups:
        assert g["finding"] == codes.SCT.Nodule and g["concept"] == codes.SCT.Nodule
        assert g["unit"] == codes.UCUM.Percent
        assert g["params"] == ["decision threshold 0.4200: Present when the calibrated probability is at or above it"]
    # Same inputs, same UIDs (processing again after a crash is a resend, not a duplicate).
    (again,) = build_results([classified(a, [1], [0.873]), classified(b, [1], [0.12])], CLS)
    assert again.SOPInstanceUID == sr.SOPInstanceUID


def test_sr_of_a_cine_has_one_group_per_processed_frame(tmp_path: Path) -> None:
    cine = np.stack([np.full((48, 64), 10 * i, np.uint8) for i in range(5)])
    us = roundtrip(f.make_us_multiframe(cine))
    (sr,) = build_results([classified(us, [1, 3, 5], [0.2, 0.6, 0.42])], CLS)
    dciodvfy(sr, tmp_path, "us_cine_cls_sr")
    groups = read_groups(sr, tmp_path, "cine")
    assert [g["frames"] for g in groups] == [[1], [3], [5]]
    assert {g["uid"] for g in groups} == {str(us.SOPInstanceUID)}
    assert [g["value"] for g in groups] == [codes.SCT.Absent, codes.SCT.Present, codes.SCT.Present]  # at = present
    assert [g["id"] for g in groups] == ["nodule frame 1", "nodule frame 3", "nodule frame 5"]


def test_sr_of_a_two_label_model_reports_the_top_label_and_no_unknown_threshold(tmp_path: Path) -> None:
    cr = roundtrip(f.make_cr(np.full((64, 64), 500, np.uint16)))
    info = ClassifierInfo("chest-cls", "1", "classification", ("normal", "mass"), False)  # threshold unknown
    src = ClassifiedSource(cr, [1], classes=[[{"label": "mass", "score": 0.7}, {"label": "normal", "score": 0.3}]],
                           decisions=[True])
    (sr,) = build_results([src], info)
    dciodvfy(sr, tmp_path, "cr_cls_sr")
    (g,) = read_groups(sr, tmp_path, "cr")
    assert g["finding"] == codes.SCT.Mass and g["value"] == codes.SCT.Present and g["certainty"] == 70.0
    assert g["params"] == []  # no threshold known: none is stated
    assert "NOT FOR CLINICAL USE" not in sr.SeriesDescription


def test_sr_refuses_sources_without_a_classification() -> None:
    dx = roundtrip(f.make_dx(np.full((32, 32), 5, np.uint16)))
    from edge.egress.dicom.common import SourceResult

    with pytest.raises(DataError, match="classification of every source"):
        build_results([SourceResult(dx, [1])], CLS)
    with pytest.raises(DataError, match="no classification"):
        build_results([ClassifiedSource(dx, [1])], CLS)
    with pytest.raises(DataError, match="not a label and a probability"):
        build_results([classified(dx, [1], [1.5])], CLS)


# --------------------------------------------------------------------------- the overlay
def test_cam_overlay_shows_the_map_and_says_the_decision(tmp_path: Path) -> None:
    img = np.full((64, 80), 1000, np.uint16)
    dx = roundtrip(f.make_dx(img))
    heat = np.zeros((64, 80), np.uint8)
    heat[20:40, 30:50] = 230  # hot square, above the threshold (0.42 * 255 = 107)
    heat[0:10, 0:10] = 60  # warm, below it
    src = classified(dx, [1], [0.91])
    src.heatmaps = heat[None]
    sc = make_overlay(dx, img, src, 0, CLS)
    dciodvfy(sc, tmp_path, "dx_cam_sc")
    rgb = roundtrip(sc, stop_before_pixels=False).pixel_array
    assert rgb.shape == (64, 80, 3)
    assert rgb[30, 40, 0] > rgb[30, 40, 1] + 100  # hot: red
    assert 0 < int(rgb[5, 5, 0]) - int(rgb[5, 5, 1]) < int(rgb[30, 40, 0]) - int(rgb[30, 40, 1])  # warm: less red
    assert rgb[55, 70, 0] == rgb[55, 70, 1] == rgb[55, 70, 2]  # cold: grey
    assert tuple(rgb[20, 40]) == (255, 255, 0) and tuple(rgb[30, 40]) != (255, 255, 0)  # the threshold's edge
    assert not np.any(np.all(rgb[0:10, 0:10] == (255, 255, 0), axis=-1))  # below the threshold: no edge
    assert sc.ImageComments.startswith("nodule: Present, certainty of finding 91.0 % (decision threshold 0.4200).")
    assert "NOT FOR CLINICAL USE" in sc.ImageComments
    assert sc.DerivationDescription == "Class activation map of nodule by xray-nodule-cls 1.2 drawn over the source image"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == dx.SOPInstanceUID
    src.heatmaps = None
    with pytest.raises(DataError, match="no class activation map"):
        make_overlay(dx, img, src, 0, CLS)
    src.heatmaps = np.zeros((1, 32, 32), np.uint8)
    with pytest.raises(DataError, match="not the frame's size"):
        make_overlay(dx, img, src, 0, CLS)


# --------------------------------------------------------------------------- the spool
def _old_format_result(spool: Spool, path: Path) -> None:
    """A result file as medge wrote it before classification (meta without classes; masks; no maps)."""
    meta = {"model": "us-lesion-seg", "model_version": "1.0", "task": "segmentation", "frames": [1],
            "boxes": [[]]}
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), masks=np.ones((1, 4, 4), np.uint8))
    spool.result_path(path).write_bytes(buf.getvalue())


def test_spool_keeps_classes_and_maps_and_loads_older_results(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    new = spool.store_instance("1.2.3.4", [b"x"])
    maps = np.arange(2 * 6 * 8, dtype=np.uint8).reshape(2, 6, 8)
    classes = [[{"label": "nodule", "score": 0.81}], [{"label": "nodule", "score": 0.05}]]
    spool.save_result(new, InstanceResult("cls", "2", "classification", [1, 3], boxes=[[], []], classes=classes,
                                          decisions=[True, False], threshold=0.4, heatmaps=maps))
    back = spool.load_result(new)
    assert back is not None and back.task == "classification" and back.frames == [1, 3]
    assert back.classes == classes and back.decisions == [True, False] and back.threshold == 0.4
    assert back.heatmaps is None  # read only for the overlays
    assert np.array_equal(spool.load_heatmaps(new), maps)
    old = spool.store_instance("1.2.3.5", [b"x"])
    _old_format_result(spool, old)
    prev = spool.load_result(old)
    assert prev is not None and prev.task == "segmentation" and prev.masks is not None and prev.masks.shape == (1, 4, 4)
    assert prev.classes is None and prev.decisions is None and prev.threshold is None
    assert spool.load_heatmaps(old) is None and spool.load_display(old) is None
    # A segmentation result saved now has the old layout: no classification keys in its meta.
    seg = spool.store_instance("1.2.3.6", [b"x"])
    spool.save_result(seg, InstanceResult("s", "1", "segmentation", [1], masks=np.zeros((1, 2, 2), np.uint8),
                                          boxes=[[]]))
    with np.load(spool.result_path(seg)) as z:
        assert sorted(json.loads(bytes(z["meta"]))) == ["boxes", "frames", "model", "model_version", "task"]


# --------------------------------------------------------------------------- the pipeline
class FakeClassifier:
    """A classification service: ``nodule`` with probability 0.9 when the frame has a bright spot, else 0.1.

    With ``want={"heatmap"}`` the map is the frame's brightness above its median (uint8), at its size
    (``maps=False``: a model without a ``cam`` output, no map). Records the ``want`` of every call.
    """

    def __init__(self, maps: bool = True) -> None:
        self.maps = maps
        self.wants: list[frozenset[str]] = []

    def models(self) -> list[str]:
        return ["xray-nodule-cls"]

    def infer(self, image: np.ndarray, *, model: str, source: str, timeout_s: float = 30.0,
              want: frozenset[str] = frozenset()) -> InferenceResult:
        self.wants.append(frozenset(want))
        g = np.asarray(image, dtype=np.float32)
        spot = float(g.max()) > 2.0 * float(np.median(g))
        p = 0.9 if spot else 0.1
        heat = None
        if "heatmap" in want and self.maps:
            heat = (np.clip(g - np.median(g), 0, None) / max(1.0, float(g.max() - np.median(g))) * 255).astype(np.uint8)
        return InferenceResult(status="ok", model=model, model_version="7", task="classification",
                               classes=[ClassScore("nodule", p)], decision=p >= 0.5, heatmap=heat)


STORESCU, STORESCP = peer_path("storescu") or "storescu", peer_path("storescp") or "storescp"


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp as the PACS, writing what it receives to a folder."""
    port, out = f.free_port(), tmp_path / "pacs"
    out.mkdir()
    proc = subprocess.Popen([STORESCP, "-od", str(out), "-aet", "PACS", "-uf", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    yield port, out
    proc.terminate()
    proc.wait(10)


def storescu(port: int, files: list[Path]) -> None:
    r = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "MEDGE", "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def chest_sources(folder: Path) -> dict[str, Path]:
    """A DX with a bright spot (positive) and a CR without (negative), one study."""
    study = "1.2.826.0.1.3680043.8.498.77"
    spot = np.full((64, 64), 800, np.uint16)
    spot[20:30, 34:44] = 3500
    return {"dx": f.save(f.make_dx(spot, study_uid=study), folder / "dx.dcm"),
            "cr": f.save(f.make_cr(np.full((64, 64), 700, np.uint16), study_uid=study), folder / "cr.dcm")}


@pytest.mark.peer("storescu", "storescp", "dciodvfy")
@pytest.mark.parametrize(("overlay", "maps"), [(False, True), (True, True), (True, False)],
                         ids=["sr-only", "with-cam-overlay", "model-without-map"])
def test_pipeline_turns_classified_dx_and_cr_into_sr_and_overlays(overlay: bool, maps: bool, pacs,
                                                                  tmp_path: Path) -> None:
    from edge.config import DicomDestination, DicomRoute
    from edge.ingest.dicom.scp import DicomIngest

    port, pacs_dir = pacs
    routes = (DicomRoute(modality="DX", model="xray-nodule-cls"), DicomRoute(modality="CR", model="xray-nodule-cls"))
    dest = (DicomDestination(name="pacs", host="127.0.0.1", port=port, ae_title="PACS"),)
    cfg = f.dicom_config(tmp_path, routes=routes, destinations=dest, secondary_capture=overlay)
    svc = FakeClassifier(maps=maps)
    src = chest_sources(tmp_path / "src")
    drawn = overlay and maps  # a frame without a map gets no overlay
    want_files = 2 + (2 if drawn else 0)  # one SR per series (DX, CR) + one overlay per instance
    with DicomIngest(cfg, svc, CollectorRegistry(), cfg.spool_dir, model_info=lambda name: CLS).start() as ing:
        storescu(ing.port, [src["dx"], src["cr"]])
        wait_until(lambda: len([p for p in pacs_dir.iterdir() if p.is_file()]) >= want_files, 60, what="results")
        assert ing.pipeline.wait_idle(30) and ing.outbox.wait_idle(30)
        assert ing.spool.pending_instances() == []
    assert svc.wants == [frozenset({"heatmap"}) if overlay else frozenset()] * 2  # the map only when drawn
    received = [dcmread(p) for p in sorted(pacs_dir.iterdir()) if p.is_file()]
    assert sorted(ds.Modality for ds in received) == (["OT", "OT"] if drawn else []) + ["SR", "SR"]
    by_source = {}
    for ds in received:
        dciodvfy(ds, tmp_path, f"{ds.Modality}_{ds.SOPInstanceUID}")
        if ds.Modality == "SR":
            (g,) = read_groups(ds, tmp_path, str(ds.SOPInstanceUID))
            by_source[g["uid"]] = g
    for key, value, certainty in (("dx", codes.SCT.Present, 90.0), ("cr", codes.SCT.Absent, 10.0)):
        source = dcmread(src[key], stop_before_pixels=True)
        g = by_source[str(source.SOPInstanceUID)]
        assert (g["value"], g["certainty"], g["frames"]) == (value, certainty, None)
        assert g["params"] == ["decision threshold 0.4200: Present when the calibrated probability is at or above it"]
    if drawn:
        dx_uid = dcmread(src["dx"], stop_before_pixels=True).SOPInstanceUID
        (dx_sc,) = [ds for ds in received
                    if ds.Modality == "OT" and ds.SourceImageSequence[0].ReferencedSOPInstanceUID == dx_uid]
        assert dx_sc.ImageComments.startswith("nodule: Present, certainty of finding 90.0 %")
        rgb = dx_sc.pixel_array
        assert rgb[25, 38, 0] > rgb[25, 38, 1] + 100 and rgb[55, 5, 0] == rgb[55, 5, 1]  # the spot is red


# --------------------------------------------------------------------------- UIDs follow the content
def test_another_threshold_gives_other_result_uids_and_the_same_one_the_same() -> None:
    """Defect 4: a result made at another decision threshold (or model version) never reuses a UID."""
    import dataclasses

    img = np.full((64, 80), 1000, np.uint16)
    dx = roundtrip(f.make_dx(img))
    heat = np.zeros((1, 64, 80), np.uint8)
    heat[0, 20:40, 30:50] = 230

    def results(model: ClassifierInfo, threshold: float) -> tuple[Dataset, Dataset]:
        src = classified(dx, [1], [0.0625], threshold=threshold)
        src.heatmaps = heat
        (sr,) = build_results([src], model)
        return sr, make_overlay(dx, img, src, 0, model)

    low = dataclasses.replace(CLS, threshold=0.0625)
    high = dataclasses.replace(CLS, threshold=0.99)
    sr_low, sc_low = results(low, 0.0625)
    sr_high, sc_high = results(high, 0.99)
    sr_again, sc_again = results(low, 0.0625)
    sr_v2, sc_v2 = results(dataclasses.replace(low, version="1.3"), 0.0625)
    assert sr_again.SOPInstanceUID == sr_low.SOPInstanceUID and sc_again.SOPInstanceUID == sc_low.SOPInstanceUID
    assert len({str(d.SOPInstanceUID) for d in (sr_low, sr_high, sr_v2, sc_low, sc_high, sc_v2)}) == 6
    assert sr_high.SeriesInstanceUID != sr_low.SeriesInstanceUID and sc_high.SeriesInstanceUID != sc_low.SeriesInstanceUID
    assert sr_again.SeriesInstanceUID == sr_low.SeriesInstanceUID
