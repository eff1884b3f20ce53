"""Shutdown, crash and a full disk never lose an accepted DICOM instance (issue 10, items 3, 9, 11).

Real processes, not patched internals: a ``medge serve`` child on the tiny
fixture models (:func:`edge.tools.daemon_process.write_demo_config`, :class:`edge.tools.daemon_process.DaemonProcess`),
DCMTK ``storescu`` as the modality and DCMTK ``storescp`` as the PACS,
started and stopped by each test. What "acknowledged" means is read from
``storescu -v``: the files whose C-STORE got ``Received Store Response
(Success)``. A result "at the PACS" is a file in ``storescp``'s folder
whose references (``ReferencedSOPInstanceUID`` anywhere in it) name the
source; ``storescp`` names files by SOP Instance UID, so a resend of a
result (derived UIDs) replaces its file instead of adding one.

The DCMTK tools run with ``TCP_NODELAY=1``: without it each C-STORE on
loopback waits ~40 ms on Nagle's algorithm against delayed ACKs (100
instances: 9 s instead of 0.3 s).

The last test counts frame decodes in an in-process pipeline (item 11):
that is a property of the code path, which a child process cannot show.
"""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from edge.tools.daemon_process import DaemonProcess, free_port, write_demo_config
from tests.edge import dicom_factory as f
from tests.edge.test_dicom_outbox import poll, wait_port

STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"
PACS_AET = "MEDGEPACS"  # write_demo_config's destination AE title
DESTINATION = "demo-pacs"  # ... and its name (the outbox folder)

pytestmark = pytest.mark.skipif(
    not (Path(STORESCU).exists() and Path(STORESCP).exists()), reason="DCMTK is not installed (apt-get install dcmtk)"
)


def _dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


# --------------------------------------------------------------------------- peers
class Pacs:
    """DCMTK ``storescp`` on a fixed free port, writing what it receives to ``folder``; down until started."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self._refs: dict[str, tuple[float, set[str]]] = {}

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [STORESCP, "-od", str(self.folder), "-aet", PACS_AET, str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_dcmtk_env(),
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def results(self) -> dict[str, set[str]]:
        """Result SOP Instance UID -> the source SOP Instance UIDs it references (files being written are skipped)."""
        out: dict[str, set[str]] = {}
        for p in self.files():
            stamp = p.stat().st_mtime
            cached = self._refs.get(p.name)
            if cached is None or cached[0] != stamp:
                try:
                    ds = dcmread(p)
                except (InvalidDicomError, OSError, EOFError, ValueError):
                    continue  # storescp is still writing it
                cached = self._refs[p.name] = (stamp, _references(ds))
            out[p.name] = cached[1]
        return out

    def covered(self) -> set[str]:
        """Every source UID some result at the PACS references."""
        return set().union(*self.results().values())


def _references(ds: Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID in ``ds``, at any depth (SEG, SR and SC reference their sources so)."""
    found: set[str] = set()
    for elem in ds.iterall():
        if elem.keyword == "ReferencedSOPInstanceUID" and elem.value:
            found.add(str(elem.value))
    return found


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")


def storescu_args(port: int, files: list[Path]) -> list[str]:
    return [STORESCU, "-v", "-aet", "MODALITY", "-aec", "MEDGE", "127.0.0.1", str(port), *map(str, files)]


def acknowledged(output: str) -> tuple[set[Path], list[str]]:
    """From ``storescu -v`` output: the files answered Success, and every response status text in order."""
    ok: set[Path] = set()
    statuses: list[str] = []
    current: Path | None = None
    for line in output.splitlines():
        m = _SENDING.search(line)
        if m:
            current = Path(m.group(1).strip())
            continue
        m = _RESPONSE.search(line)
        if m:
            statuses.append(m.group(1))
            if m.group(1) == "Success" and current is not None:
                ok.add(current)
            current = None
    return ok, statuses


def storescu(port: int, files: list[Path]) -> tuple[set[Path], list[str]]:
    r = subprocess.run(storescu_args(port, files), capture_output=True, text=True, timeout=120, env=_dcmtk_env())
    return acknowledged(r.stdout + r.stderr)


# --------------------------------------------------------------------------- the appliance
class Appliance:
    """One configuration and spool; :meth:`start` runs a fresh ``medge serve`` child on it each time."""

    def __init__(self, root: Path, engines: Path, pacs_port: int, spool: Path | None = None) -> None:
        self.root = root
        self.spool = spool or root / "spool"
        self.ports = {k: free_port() for k in ("ingest", "publish", "metrics", "dicom")}
        self.config = write_demo_config(
            root / "medge.toml", engines_dir=engines, spool_dir=self.spool, models=["tiny-seg"], ports=self.ports,
            dicom=True, precision="fp32", routes={"US": "tiny-seg"}, results_port=pacs_port, results_aet=PACS_AET,
        )
        self.runs = 0
        self.proc: DaemonProcess | None = None

    @property
    def dicom_port(self) -> int:
        return self.ports["dicom"]

    def start(self) -> DaemonProcess:
        self.runs += 1
        self.proc = DaemonProcess(self.config, self.ports["metrics"], self.root / f"daemon{self.runs}.log")
        self.proc.wait_ready(60.0)
        return self.proc

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a power cut does (no shutdown code runs)."""
        assert self.proc is not None
        self.proc.proc.kill()
        self.proc.proc.wait(10)
        self.proc.stop()  # closes its log

    def log(self) -> str:
        return "\n".join((self.root / f"daemon{i}.log").read_text("utf-8", "replace") for i in range(1, self.runs + 1))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
            text = resp.read().decode("utf-8")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    # what is where on disk
    def instances(self) -> list[Path]:
        return sorted((self.spool / "dicom" / "instances").glob("*.dcm"))

    def attempts(self) -> list[Path]:
        return sorted((self.spool / "dicom" / "instances").glob("*.attempts"))

    def saved_results(self) -> list[Path]:
        return sorted((self.spool / "dicom" / "results").glob("*.npz"))

    def failed(self) -> list[str]:
        d = self.spool / "dicom" / "failed"
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def failed_reasons(self) -> str:
        d = self.spool / "dicom" / "failed"
        return "\n".join(p.read_text() for p in sorted(d.glob("*.reason.txt"))) if d.is_dir() else ""

    def pending(self) -> list[Path]:
        return sorted((self.spool / "outbox" / "pending" / DESTINATION).glob("*.dcm"))

    def dead_letters(self) -> list[str]:
        d = self.spool / "outbox" / "dead-letter" / DESTINATION
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def phantom(rng: np.random.Generator, n: int, lesion_every: int = 1) -> np.ndarray:
    """``n`` 64x64 uint8 frames: a flat background, and a bright square on every ``lesion_every``-th frame.

    tiny-seg thresholds each frame at the middle of its own range, so a
    frame gives one region or none; speckle would give thousands, and an
    SR of a cine with that many regions takes minutes to make.
    """
    frames = np.full((n, 64, 64), 20, dtype=np.uint8)
    for i in range(0, n, lesion_every):
        y, x = rng.integers(4, 36, 2)
        frames[i, y : y + 24, x : x + 24] = 230
    return frames


def us_series(folder: Path, n: int, seed: int, study_uid: str | None = None) -> dict[str, Path]:
    """``n`` single-frame 64x64 US instances of one series: SOP Instance UID -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    images = phantom(np.random.default_rng(seed), n)
    study, series = study_uid or generate_uid(), generate_uid()
    out: dict[str, Path] = {}
    for i, image in enumerate(images):
        ds = f.make_us_single(image, study)
        ds.SeriesInstanceUID, ds.InstanceNumber = series, i + 1
        out[str(ds.SOPInstanceUID)] = f.save(ds, folder / f"{seed}-{i:03d}.dcm")
    return out


def uids_of(files: set[Path], series: dict[str, Path]) -> set[str]:
    by_path = {p: uid for uid, p in series.items()}
    return {by_path[p] for p in files}


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    peer = Pacs(tmp_path / "pacs")
    yield peer
    peer.stop()


@pytest.fixture
def appliance(tmp_path: Path, fixture_engines: Path, pacs: Pacs) -> Iterator[Appliance]:
    app = Appliance(tmp_path, fixture_engines, pacs.port)
    yield app
    if app.proc is not None and app.proc.exit_code is None:
        app.kill()


# --------------------------------------------------------------------------- SIGTERM (items 3 and 5)
def test_sigterm_with_instances_in_flight_quarantines_nothing_and_the_restart_delivers_each_once(
    appliance: Appliance, pacs: Pacs, tmp_path: Path
) -> None:
    app = appliance
    study = generate_uid()
    first = us_series(tmp_path / "src1", 4, seed=1, study_uid=study)
    second = us_series(tmp_path / "src2", 3, seed=2, study_uid=study)
    cine = f.make_us_multiframe(phantom(np.random.default_rng(3), 400, lesion_every=100), study)
    cine.SeriesInstanceUID = dcmread(next(iter(second.values())), stop_before_pixels=True).SeriesInstanceUID
    second[str(cine.SOPInstanceUID)] = f.save(cine, tmp_path / "src2" / "cine.dcm")

    app.start()  # the PACS is down
    ack1, _ = storescu(app.dicom_port, list(first.values()))
    assert ack1 == set(first.values())
    # The first series is finalised: its results wait in the outbox for the PACS.
    poll(lambda: len(app.pending()) == len(first) and not app.instances(), 60, "the first series' results pending")
    ack2, _ = storescu(app.dicom_port, list(second.values()))
    assert ack2 == set(second.values())
    # SIGTERM while the 400-frame cine is in inference (its attempt is counted on disk while it runs).
    poll(lambda: bool(app.attempts()), 30, "an instance in inference")
    assert app.proc is not None and app.proc.stop() == 0  # SIGTERM; a clean exit
    assert app.failed() == [], app.failed_reasons()
    left = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in app.instances()}
    assert str(cine.SOPInstanceUID) in left and left <= set(second)  # accepted, kept for the next start
    assert app.attempts() == []  # a shutdown is not the instance's fault: its attempt is taken back
    assert len(app.pending()) == len(first) and pacs.files() == []

    pacs.start()
    app.start()
    everything = set(first) | set(second)
    poll(lambda: pacs.covered() >= everything and not app.instances() and not app.pending(), 90,
         "every acknowledged instance's result at the PACS")
    assert app.proc is not None and app.proc.stop() == 0
    # One SEG per single-frame instance and one SR for the cine: each exactly once (distinct UIDs = files).
    results = pacs.results()
    assert len(results) == len(first) + len(second) and sorted(len(r) for r in results.values()) == [1] * len(results)
    assert app.failed() == [] and app.dead_letters() == [] and app.saved_results() == []
    assert "Recovered" in app.log()


# --------------------------------------------------------------------------- kill -9
def test_kill_9_while_receiving_inferring_and_sending_loses_no_acknowledged_instance(
    appliance: Appliance, pacs: Pacs, tmp_path: Path
) -> None:
    app = appliance
    rng = random.Random(1010)  # seeded: the same kill points every run
    series = us_series(tmp_path / "src", 100, seed=10)
    files = list(series.values())
    kill_receiving, kill_inferring, kill_sending = rng.randint(15, 60), rng.randint(5, 25), rng.randint(5, 60)

    # 1. Killed while receiving: storescu loses its association part-way. This storescu keeps Nagle's
    #    algorithm on (~50 ms per instance), so the rest of the series is still on its way at the kill.
    app.start()  # the PACS is down until step 3
    slow_env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    sender = subprocess.Popen(storescu_args(app.dicom_port, files), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=slow_env)
    poll(lambda: len(app.instances()) >= kill_receiving, 60, "instances being received")
    app.kill()
    out, _ = sender.communicate(timeout=60)
    ack, statuses = acknowledged(out)
    assert 0 < len(ack) < len(files) and set(statuses) == {"Success"}, "the kill was meant to land mid-association"

    # 2. Killed while inferring: the modality resends what was not acknowledged; kill once more results are saved.
    app.start()
    saved_before = len(app.saved_results())
    resent, _ = storescu(app.dicom_port, [p for p in files if p not in ack])
    assert resent == set(files) - ack
    ack |= resent
    poll(lambda: len(app.saved_results()) >= saved_before + kill_inferring and bool(app.attempts()), 60,
         "an instance in inference")
    app.kill()
    assert app.failed() == [], app.failed_reasons()

    # 3. Killed while sending to a PACS that was down and comes up.
    app.start()
    poll(lambda: not app.instances() and len(app.pending()) == len(files), 90, "all results in the outbox")
    pacs.start()
    poll(lambda: len(pacs.files()) >= kill_sending, 60, "results reaching the PACS")
    app.kill()
    assert 0 < len(pacs.files()) < len(files), "the kill was meant to land while results were being sent"

    # 4. A last, undisturbed run finishes the work. No instance reaches [dicom] max_attempts (3), as at most
    #    two of these kills land while one instance is being processed: nothing may be a dead letter.
    app.start()
    poll(lambda: pacs.covered() >= uids_of(ack, series) and not app.pending(), 60, "every result at the PACS")
    assert app.proc is not None and app.proc.stop() == 0
    assert ack == set(files)
    assert pacs.covered() == set(series)  # no result references anything else
    assert len(pacs.results()) == len(files)  # resent results replaced their own copies: one per source
    assert app.failed() == [] and app.dead_letters() == [], app.failed_reasons()
    assert app.instances() == [] and app.attempts() == [] and app.saved_results() == []


# --------------------------------------------------------------------------- a full disk (item 9)
def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                           capture_output=True, text=True, timeout=30)
    except OSError as exc:
        pytest.skip(f"cannot run mount to make a small file system: {exc}")
    if r.returncode != 0:
        pytest.skip(f"mounting a {size} tmpfs is not permitted here (needs root): {r.stderr.strip()}")


@pytest.fixture
def small_disks(tmp_path: Path) -> Iterator[Path]:
    """A spool folder whose ``dicom/`` and ``outbox/`` are two 16 MiB tmpfs, to fill one at a time.

    Skipped where mounting is not permitted (it needs root).
    """
    spool = tmp_path / "spool"
    mounted: list[Path] = []
    try:
        for part in ("dicom", "outbox"):
            _mount_tmpfs(spool / part, "16m")
            mounted.append(spool / part)
        yield spool
    finally:
        for where in mounted:
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(path: Path) -> int:
    """Write ``path`` until its file system is full (ENOSPC); returns the bytes written."""
    size, chunk = 0, 1 << 20
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while chunk:
            try:
                size += os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)
    return size


def test_a_full_disk_is_transient_results_wait_and_receipt_answers_out_of_resources(
    small_disks: Path, fixture_engines: Path, pacs: Pacs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDGE_DICOM__SPOOL_MIN_FREE_MB", "0")  # the disk itself runs out, not the reserve
    monkeypatch.setenv("MEDGE_DICOM__SERIES_IDLE_S", "2.0")  # the disk is filled well within this
    app = Appliance(tmp_path, fixture_engines, pacs.port, spool=small_disks)
    series = us_series(tmp_path / "src", 5, seed=20)
    late = us_series(tmp_path / "late", 1, seed=21)
    retries = ("medge_dicom_transient_retries_total", (("stage", "results"),))
    pacs.start()
    app.start()
    try:
        ack, _ = storescu(app.dicom_port, list(series.values()))
        assert ack == set(series.values())
        # 1. The outbox's disk is full: writing the series' results hits ENOSPC. The series is put back and
        #    tried again every series_idle_s (counted); nothing is failed, the instances stay.
        outbox_filler = small_disks / "outbox" / "filler"
        fill(outbox_filler)
        poll(lambda: app.metrics()[retries] >= 2, 30, "the finaliser trying twice to write to a full outbox")
        assert "cannot be written yet" in app.log()
        assert len(app.instances()) == len(series) and app.failed() == [] and pacs.files() == []
        # 2. The spool's disk is full too: a new instance is refused (0xA700), never acknowledged, and
        #    nothing of it is left; the waiting series keeps being retried.
        dicom_filler = small_disks / "dicom" / "filler"
        fill(dicom_filler)
        tried = app.metrics()[retries]
        refused, statuses = storescu(app.dicom_port, list(late.values()))
        assert refused == set() and statuses == ["Refused: OutOfResources"]
        assert list((small_disks / "dicom" / "tmp").iterdir()) == []
        poll(lambda: app.metrics()[retries] >= tried + 2, 30, "more tries on the full disks")
        m = app.metrics()
        assert m[("medge_dicom_store_failures_total", (("status", "0xA700"),))] == 1
        assert sum(v for (name, _), v in m.items() if name == "medge_dicom_processing_failures_total") == 0
        assert len(app.instances()) == len(series) and app.failed() == [] and pacs.files() == []
        # 3. Space returns: the waiting series goes out, its instances leave the spool; the modality's resend
        #    of the refused instance is taken and processed.
        outbox_filler.unlink()
        dicom_filler.unlink()
        poll(lambda: pacs.covered() >= set(series) and not app.instances() and not app.pending(), 60,
             "the results after space returned")
        again, _ = storescu(app.dicom_port, list(late.values()))
        assert again == set(late.values())
        poll(lambda: pacs.covered() >= set(series) | set(late) and not app.instances(), 60, "the late result")
        assert len(pacs.results()) == len(series) + len(late)
        assert app.failed() == [] and app.dead_letters() == [] and app.saved_results() == []
        assert app.proc is not None and app.proc.stop() == 0
    finally:
        if app.proc is not None and app.proc.exit_code is None:
            app.kill()


# --------------------------------------------------------------------------- item 11: one decode per processed frame
@pytest.mark.parametrize("overlay", [False, True], ids=["no-overlay", "overlay"])
def test_a_cine_with_stride_2_decodes_each_processed_frame_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overlay: bool
) -> None:
    import edge.ingest.dicom.pipeline as pipeline_module
    from edge.config import DicomRoute
    from edge.egress.dicom.outbox import Outbox
    from edge.egress.dicom.common import SourceResult
    from edge.egress.dicom.sc import make_overlay
    from edge.ingest.dicom.part10 import instance_info_from_file
    from edge.ingest.dicom.pixels import decode_frame, frame_to_array
    from edge.ingest.dicom.routing import Router
    from edge.ingest.dicom.spool import Spool
    from tests.edge.test_dicom_scp import INFOS

    cine = f.make_us_multiframe(phantom(np.random.default_rng(5), 40))
    decoded: Counter[int] = Counter()

    def counting(ds: Dataset, index: int) -> np.ndarray:
        decoded[index] += 1
        return decode_frame(ds, index)

    monkeypatch.setattr(pipeline_module, "decode_frame", counting)
    reg = CollectorRegistry()
    spool = Spool(tmp_path / "dicom", min_free_bytes=0)
    outbox = Outbox(tmp_path / "outbox", [], reg)
    pipe = pipeline_module.DicomPipeline(
        spool, f.FakeService(), Router([DicomRoute(modality="US", model="us-lesion-seg")]), outbox,
        INFOS.__getitem__, reg, frame_stride=2, series_idle_s=0.05, overlay=overlay,
    )
    src = f.save(cine, tmp_path / "cine.dcm")
    path = spool.store_instance(str(cine.SOPInstanceUID), [src.read_bytes()])
    pipe.start()
    try:
        info = instance_info_from_file(path)
        pipe.enqueue(pipeline_module.WorkItem(path, info, "us-lesion-seg", source="test"))
        assert pipe.wait_idle(60)
    finally:
        pipe.close()
        outbox.close()
    processed = list(range(0, 40, 2))
    assert decoded == Counter({i: 1 for i in processed})  # every 2nd frame, each decoded exactly once
    written = [dcmread(p) for p in sorted(outbox.unsent_dir.glob("*.dcm"))]
    overlays = [d for d in written if "Secondary Capture" in d.SOPClassUID.name]
    assert len(written) - len(overlays) == 1  # the cine's SR
    if not overlay:
        assert overlays == []
        return
    # The first 16 processed frames get an overlay, drawn on the frames the worker decoded: the same pixels
    # as an overlay made from a fresh decode of the source.
    assert len(overlays) == pipeline_module.OVERLAY_MAX_FRAMES
    sr = next(d for d in written if d not in overlays)
    assert str(cine.SOPInstanceUID) in _references(sr)
    source = dcmread(src)
    result = SourceResult(source, [i + 1 for i in processed], None, [[] for _ in processed])
    by_frame = {int(o.SourceImageSequence[0].ReferencedFrameNumber): o for o in overlays}
    assert sorted(by_frame) == [i + 1 for i in processed[: pipeline_module.OVERLAY_MAX_FRAMES]]
    for idx in (0, 7, 15):
        number = processed[idx] + 1
        mask = f.FakeService.expected(frame_to_array(source, decode_frame(source, number - 1)), "us-lesion-seg")
        result.masks = np.stack([mask] * len(processed))
        want = make_overlay(source, frame_to_array(source, decode_frame(source, number - 1)), result, idx,
                            INFOS["us-lesion-seg"])
        assert by_frame[number].pixel_array.tobytes() == want.pixel_array.tobytes(), f"frame {number}"


def test_overlay_frames_are_saved_losslessly_and_read_back_one_instance_at_a_time(tmp_path: Path) -> None:
    from edge.ingest.dicom.spool import InstanceResult, Spool

    spool = Spool(tmp_path / "dicom", min_free_bytes=0)
    cases = {
        "ct-hu": np.array([[-1024.0, 0.0], [1.0, 3071.0]], dtype=np.float32),  # integers: stored as int16
        "fraction": np.array([[0.5, 1.25], [-3.75, 1e6]], dtype=np.float32),  # kept as float32
        "rgb": np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3),
        "us-u8": np.array([[0.0, 255.0], [7.0, 8.0]], dtype=np.float32),  # stored as uint8
    }
    for name, frame in cases.items():
        p = spool.store_instance(f"1.2.{len(name)}.{ord(name[0])}", [b"x"])
        spool.save_result(p, InstanceResult("m", "1", "segmentation", [1], display=frame[None]))
        assert spool.load_result(p).display is None  # the finaliser's series load does not hold the frames
        back = spool.load_display(p)
        assert back is not None and back.dtype == frame.dtype and np.array_equal(back[0], frame), name
    q = spool.store_instance("1.9", [b"x"])
    spool.save_result(q, InstanceResult("m", "1", "segmentation", [1]))
    assert spool.load_display(q) is None  # saved without frames (overlays off): the finaliser decodes


def test_an_instance_finalised_before_its_resend_was_opened_is_done_not_failed(tmp_path: Path) -> None:
    """A resend queued while its series was being written finds its file gone: its result is in the outbox."""
    import edge.ingest.dicom.pipeline as pipeline_module
    from edge.config import DicomRoute
    from edge.egress.dicom.outbox import Outbox
    from edge.ingest.dicom.part10 import instance_info_from_file
    from edge.ingest.dicom.routing import Router
    from edge.ingest.dicom.spool import Spool
    from tests.edge.test_dicom_scp import INFOS

    reg = CollectorRegistry()
    spool = Spool(tmp_path / "dicom", min_free_bytes=0)
    outbox = Outbox(tmp_path / "outbox", [], reg)
    pipe = pipeline_module.DicomPipeline(
        spool, f.FakeService(), Router([DicomRoute(modality="US", model="us-lesion-seg")]), outbox,
        INFOS.__getitem__, reg, series_idle_s=0.05,
    )
    (src,) = us_series(tmp_path / "src", 1, seed=30).values()
    path = spool.store_instance(str(dcmread(src).SOPInstanceUID), [src.read_bytes()])
    info = instance_info_from_file(path)
    spool.remove_instances([path])  # what the finaliser does once the series' results are in the outbox
    pipe.start()
    try:
        pipe.enqueue(pipeline_module.WorkItem(path, info, "us-lesion-seg", source="test"))
        assert pipe.wait_idle(30)
    finally:
        pipe.close()
        outbox.close()
    assert list(spool.failed_dir.iterdir()) == [] and list(spool.instances_dir.iterdir()) == []
    assert sum(reg.get_sample_value("medge_dicom_processing_failures_total", {"reason": r}) or 0
               for r in pipeline_module.FAILURE_REASONS) == 0
