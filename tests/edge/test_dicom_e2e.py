"""End to end with the bundled models: DCMTK storescu -> our SCP -> models -> SEG/SR -> DCMTK storescp (PACS).

The results that reach the PACS must be dciodvfy-clean and must say exactly
what the ZeroMQ path answers for the same pixels (decoded by the same
pixel pipeline, sent to the same scheduler), and a restart must finish work that was spooled but not
processed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import highdicom as hd
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread

from edge.config import DicomDestination, load_config
from edge.egress.dicom.outlines import mask_outlines
from edge.inference.manifest import default_engines_dir
from edge.ingest.dicom.pixels import iter_frames
from edge.ingest.dicom.scp import DicomIngest
from tests.conftest import peer_path, wait_until
from tests.edge import dicom_factory as f
from tests.edge.test_dicom_outbox import wait_port
from tests.edge.test_dicom_results import _rois, dciodvfy
from tests.edge.test_dicom_units import _inside

STORESCU, STORESCP = peer_path("storescu") or "storescu", peer_path("storescp") or "storescp"
BUNDLED = ("us-lesion-seg", "xray-nodule-det")

pytestmark = [
    pytest.mark.skipif(
        not all((default_engines_dir() / n / "manifest.json").is_file() for n in BUNDLED),
        reason="the bundled engines are not built yet (trainer)",
    ),
    pytest.mark.peer("storescu", "storescp", "dciodvfy"),
]


@pytest.fixture(scope="module")
def service() -> Iterator[object]:
    """The real scheduler in front of the bundled models (ONNX Runtime, CPU)."""
    from edge.inference.model import ModelRegistry
    from edge.scheduler import Scheduler

    cfg = load_config(None, env={})
    models = ModelRegistry.from_config(cfg, warmup=False)
    sched = Scheduler(models, cfg.scheduler).start()
    yield sched
    sched.close()
    models.close()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp as the PACS, writing what it receives to a folder."""
    port, out = f.free_port(), tmp_path / "pacs"
    out.mkdir()
    proc = subprocess.Popen([STORESCP, "-od", str(out), "-aet", "PACS", "-uf", str(port)])
    wait_port(port)
    yield port, out
    proc.terminate()
    proc.wait(10)


def e2e_config(tmp_path: Path, pacs_port: int, **dicom):
    base = load_config(None, env={})
    dest = (DicomDestination(name="pacs", host="127.0.0.1", port=pacs_port, ae_title="PACS"),)
    return f.dicom_config(tmp_path, base=base, destinations=dest, **dicom)


def storescu(port: int, files: list[Path]) -> None:
    r = subprocess.run(
        [STORESCU, "-aet", "MODALITY", "-aec", "MEDGE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr


def pacs_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def wait_files(folder: Path, n: int, timeout_s: float = 60.0) -> None:
    """Wait until the PACS folder holds ``n`` objects. Read them only once the outbox is idle: storescp
    answers a C-STORE after writing its file, so then every file is complete and any extra one is there."""
    wait_until(lambda: len(pacs_files(folder)) >= n, timeout_s, what=f"{n} objects in the PACS folder")


def make_sources(folder: Path) -> dict[str, list[Path]]:
    from trainer.data import make_ultrasound, make_xray, sample_rng

    cine = np.stack([make_ultrasound(sample_rng(11, i))[0] for i in range(4)])
    xray = make_xray(sample_rng(12, 0))[0]
    return {
        "us": [f.save(f.make_us_multiframe(cine), folder / "us_cine.dcm")],
        "ct": [f.save(d, folder / f"ct{i}.dcm") for i, d in enumerate(f.make_ct_series(3, 128, seed=3))],
        "cr": [f.save(f.make_cr(xray), folder / "cr.dcm")],
        "dx": [f.save(f.make_dx(xray), folder / "dx.dcm")],
    }


@pytest.fixture(scope="module")
def zmq_endpoint(service) -> Iterator[str]:
    """The ZeroMQ ingest in front of the same scheduler: the reference the DICOM results must match."""
    from edge.config import ZmqConfig
    from edge.ingest.zmq import ZmqServer

    server = ZmqServer(ZmqConfig(ingest="tcp://127.0.0.1:*", publish="tcp://127.0.0.1:*"), service).start()
    yield server.ingest_endpoint
    server.close()


def expected(zmq_endpoint: str, path: Path, model: str, stride: int = 1) -> dict[int, object]:
    """What the ZeroMQ path answers for each processed frame of a source file (same pixel pipeline)."""
    from edge.tools.zmq_client import ZmqClient
    from edge.types import Box

    out: dict[int, object] = {}
    with ZmqClient(zmq_endpoint) as client:
        for number, image in iter_frames(dcmread(path), stride=stride):
            rep = client.request(np.ascontiguousarray(image, dtype=np.float32), model=model, timeout_s=30)
            assert rep.status == "ok", rep.header
            if rep.mask is not None:
                out[number] = rep.mask
            else:
                out[number] = [Box(**{k: b[k] for k in ("label", "score", "x0", "y0", "x1", "y1")}) for b in rep.boxes]
    return out


def test_storescu_to_pacs_with_bundled_models(service, zmq_endpoint, pacs, tmp_path: Path) -> None:
    port, pacs_dir = pacs
    cfg = e2e_config(tmp_path, port, frame_stride=2, secondary_capture=True)
    src = make_sources(tmp_path / "src")
    with DicomIngest(cfg, service, CollectorRegistry(), cfg.spool_dir).start() as ing:
        storescu(ing.port, [p for paths in src.values() for p in paths])
        # SEG (CT series), SR (cine), SR (CR), SR (DX) + SC overlays: 3 CT + 2 cine frames + CR + DX
        wait_files(pacs_dir, 4 + 3 + 2 + 2)
        assert ing.pipeline.wait_idle(30) and ing.outbox.wait_idle(30)
        received = pacs_files(pacs_dir)
        assert ing.spool.pending_instances() == []
    by_kind: dict[str, list] = {}
    for p in received:
        ds = dcmread(p)
        dciodvfy(ds, tmp_path, p.name)
        assert "NOT FOR CLINICAL USE" in ds.SeriesDescription
        by_kind.setdefault(ds.Modality, []).append(ds)
    assert sorted((k, len(v)) for k, v in by_kind.items()) == [("OT", 7), ("SEG", 1), ("SR", 3)]

    # CT series -> one SEG whose frames are the service's masks for the same slices.
    seg = hd.seg.Segmentation.from_dataset(by_kind["SEG"][0])
    for path in src["ct"]:
        ds = dcmread(path, stop_before_pixels=True)
        want = expected(zmq_endpoint, path, "us-lesion-seg")[1]
        got = seg.get_pixels_by_source_instance([str(ds.SOPInstanceUID)], segment_numbers=[1])[0, ..., 0]
        assert np.array_equal(got, want)

    srs = {str(ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID): ds for ds in by_kind["SR"]}
    # CR and DX -> SR whose ROIs are the service's boxes, score as certainty.
    for key in ("cr", "dx"):
        path = src[key][0]
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        boxes = expected(zmq_endpoint, path, "xray-nodule-det")[1]
        rois = _rois(srs[uid])
        print(f"{key}: {len(boxes)} box(es) from the ZeroMQ path, {len(rois)} ROI(s) in the SR")
        assert len(rois) == len(boxes)
        for (_uid, _fr, poly, score), b in zip(rois, boxes):
            # The ZeroMQ reply rounds to 2 decimals (coordinates) and 4 (score).
            assert np.allclose([poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max()],
                               [b.x0, b.y0, b.x1, b.y1], atol=0.01)
            assert score == pytest.approx(100 * b.score, abs=0.02)

    # Cine -> SR with per-frame outlines that rasterise to the service's masks (regions >= 9 pixels).
    path = src["us"][0]
    uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    masks = expected(zmq_endpoint, path, "us-lesion-seg", stride=2)
    rois = _rois(srs[uid])
    h, w = next(iter(masks.values())).shape
    yy, xx = np.mgrid[0:h, 0:w]
    print(f"cine: frames {sorted(masks)}, mask pixels {[int(m.sum()) for m in masks.values()]}, {len(rois)} ROI(s)")
    for number, mask in masks.items():
        cover = np.zeros((h, w), bool)
        for _uid, frames, poly, _score in rois:
            if frames == [number]:
                cover |= _inside(poly, xx + 0.5, yy + 0.5)
        want = np.zeros((h, w), bool)
        for poly in mask_outlines(mask, min_pixels=9):
            want |= _inside(poly, xx + 0.5, yy + 0.5)
        assert np.array_equal(cover, want), f"frame {number}"
        assert (cover & (mask > 0)).sum() >= 0.95 * (mask > 0).sum() or mask.sum() < 50


def test_restart_processes_instances_spooled_before_a_crash(service, pacs, tmp_path: Path) -> None:
    port, pacs_dir = pacs
    cfg = e2e_config(tmp_path, port)
    src = make_sources(tmp_path / "src")
    files = src["cr"] + src["ct"]
    first = DicomIngest(cfg, service, CollectorRegistry(), cfg.spool_dir)
    first.pipeline.start = lambda: None  # "crash" before anything is processed
    first.pipeline.recover = lambda: 0
    first.start()
    storescu(first.port, files)
    first.close()
    assert len(first.spool.pending_instances()) == len(files)  # durable before success
    assert list(pacs_dir.iterdir()) == []
    reg = CollectorRegistry()
    with DicomIngest(cfg, service, reg, cfg.spool_dir).start() as second:
        wait_files(pacs_dir, 2)  # SR for the CR, SEG for the CT series
        assert second.pipeline.wait_idle(30) and second.outbox.wait_idle(30)
        received = pacs_files(pacs_dir)
        assert second.spool.pending_instances() == []
    assert sorted(dcmread(p).Modality for p in received) == ["SEG", "SR"]
