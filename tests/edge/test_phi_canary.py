"""A patient-data canary through a real daemon: no identifier leaves in a log line, metric, reply or reason file.

One ``medge serve`` child process at its most verbose log level (``--log-level
DEBUG``: every logger, pynetdicom's association and DIMSE debug output
included, and stderr in the same file) receives, over its SCP, instances
whose every PN, LO, SH and text element (nested sequences included) holds
the canary ``CANARYzq9``, in a study whose UIDs carry the digit pattern
``4242424242``, with malformed values among them: an unparseable date, an
invalid UID with letters, a one-component person name (highdicom warns
with the name in the text). They are routed to the fixture models, turned
into SEG, SR and secondary-capture overlays (a CR goes to the fixture
classifier ``tiny-cls``: a classification TID 1500 SR and a class
activation map overlay, the map asked of the scheduler), and sent to three
destinations: a DCMTK ``storescp`` that stores them, a ``storescp --refuse``
that rejects every association (retried with backoff, results stay
pending), and a scripted SCP that answers ``0xA700`` to every C-STORE (the
results are dead-lettered after ``[outbox] max_attempts``). ZeroMQ frames
go through the same daemon on a named stream with a PUB subscriber.

Then the canary, the UID pattern and the malformed date may appear nowhere
in: the daemon's whole log, ``/metrics``, every ZeroMQ reply and PUB
message, and every file medge wrote for itself under the spool (``failed/``
and dead-letter reason files, attempt and result files). They must appear
in the result objects the PACS received: results copy the patient and
study modules, so the canary really was there to leak.

SOP Instance UIDs do not carry the pattern: they name the spool's files and
appear in medge's log lines and pynetdicom's DIMSE debug output by design
(an operator needs them to find an instance), as do the results' own UIDs.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import highdicom as hd
import numpy as np
import pytest
import zmq
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from edge.tools.daemon_process import free_port
from edge.tools.zmq_client import encode_request
from tests.conftest import peer_path
from tests.conftest import wait_until as _poll  # the one deadline poll of the suite
from tests.edge import dicom_factory as f

STORESCP = peer_path("storescp")  # DCMTK's, never pynetdicom's same-named script in .venv/bin

CANARY = "CANARYzq9"
UID_PATTERN = "4242424242"
BAD_DATE = "1941-11-11" + CANARY  # not a DA value: pydicom warns and later refuses to convert it
STUDY_UID = f"1.2.826.0.1.3680043.10.999.{UID_PATTERN}.1"
#: What must never appear outside the result objects (compared case-insensitively).
NEEDLES = (CANARY, UID_PATTERN, "1941-11-11")

#: Text VRs that hold names, identifiers and free text: every element of these gets the canary.
TEXT_VRS = {"PN": 64, "LO": 64, "SH": 16, "LT": 10240, "ST": 1024, "UT": 10240}


def _identifying_attributes(ds: Dataset) -> None:
    """Add the patient, study, series and equipment elements a modality fills in (values set later)."""
    for kw in ("ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
               "NameOfPhysiciansReadingStudy", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
               "RequestingPhysician", "ResponsiblePerson", "IssuerOfPatientID", "OtherPatientIDs",
               "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StudyDescription",
               "SeriesDescription", "ProtocolName", "MilitaryRank", "BranchOfService", "MedicalAlerts",
               "Allergies", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions",
               "AdmittingDiagnosesDescription", "PerformedProcedureStepDescription", "StationName",
               "EthnicGroup", "Occupation", "PerformedProcedureStepID", "PatientTelephoneNumbers",
               "PatientComments", "AdditionalPatientHistory", "ImageComments", "DerivationDescription"):
        setattr(ds, kw, "x")
    request = Dataset()
    request.RequestedProcedureID = "x"
    request.ScheduledProcedureStepID = "x"
    request.RequestedProcedureDescription = "x"
    ds.RequestAttributesSequence = Sequence([request])
    other_id = Dataset()
    other_id.PatientID = "x"
    other_id.IssuerOfPatientID = "x"
    other_id.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other_id])


def _canary_everywhere(ds: Dataset) -> Dataset:
    """Every PN/LO/SH/LT/ST/UT element, nested ones included, holds the canary (plus a short tag)."""
    _identifying_attributes(ds)
    for elem in ds.iterall():
        if elem.VR not in TEXT_VRS:
            continue
        tag = f"{elem.tag:08X}"[-4:]
        if elem.VR == "PN":
            value = f"{CANARY}^{tag}"
        else:
            value = (CANARY + tag)[: TEXT_VRS[elem.VR]]
        elem.value = value
    ds.PatientName = CANARY + "PATIENT"  # one component: highdicom warns quoting it unless medge repairs it
    return ds


def _uid(*parts: int) -> str:
    return ".".join([STUDY_UID, *map(str, parts)])


def _raw(ds: Dataset, keyword: str, vr: str, value: str) -> None:
    """Set ``keyword`` to ``value`` as encoded bytes, valid or not (pydicom refuses to convert some)."""
    tag = Tag(tag_for_keyword(keyword))
    data = value.encode("latin-1")
    ds[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)


def _series(ds: Dataset, n: int) -> Dataset:
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, _uid(n)
    return _canary_everywhere(ds)


def _instances() -> list[tuple[str, Dataset]]:
    """(what it is, data set): six series of one canary study, each oddity in a series of its own."""
    img = np.zeros((64, 64), np.uint8)
    img[16:40, 20:44] = 220
    xray = np.zeros((64, 64), np.uint16)
    xray[20:36, 24:40] = 4000
    out: list[tuple[str, Dataset]] = []
    with warnings.catch_warnings():  # pydicom warns (quoting them) while the bad values are set here
        warnings.simplefilter("ignore")
        for n in (1, 2):
            ds = _series(f.make_us_single(img), 1)
            ds.InstanceNumber = n
            out.append(("us", ds))
        ds = _series(f.make_us_single(img), 2)
        ds.PatientBirthDate = BAD_DATE
        ds.StudyDate = BAD_DATE
        out.append(("bad dates", ds))
        ds = _series(f.make_us_single(img), 3)
        ds.FrameOfReferenceUID = f"{STUDY_UID}.{CANARY}"  # letters: not a valid UID
        ds.PositionReferenceIndicator = ""
        for keyword, vr, value in (("SeriesNumber", "IS", "1" + CANARY), ("PatientWeight", "DS", "7" + CANARY),
                                   ("PatientAge", "AS", CANARY), ("PatientSex", "CS", CANARY),
                                   ("AcquisitionDateTime", "DT", CANARY)):
            _raw(ds, keyword, vr, value)
        out.append(("bad values", ds))
        ds = _series(f.make_us_single(img), 4)
        ds.SpecificCharacterSet = "ISO_IR " + CANARY.upper()  # unknown: pydicom warns and logs, quoting it
        out.append(("unknown character set", ds))
        ds = _series(f.make_dx(xray), 5)
        out.append(("dx", ds))
        ds = _series(f.make_cr(xray), 7)
        out.append(("cr", ds))  # -> tiny-cls: classification SR and CAM overlay
        ds = _series(f.make_compressed_us(JPEGBaseline8Bit), 6)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([_without_segment(frame, b"\xff\xdb")])  # no quantisation table
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        out.append(("undecodable", ds))
    return out


def _without_segment(codestream: bytes, marker: bytes) -> bytes:
    """``codestream`` without its header segments ``marker`` (e.g. DQT): the header still parses."""
    out, i, sos = bytearray(), 0, codestream.find(b"\xff\xda")
    while (j := codestream.find(marker, i, sos)) >= 0:
        out += codestream[i:j]
        i = j + 2 + int.from_bytes(codestream[j + 2 : j + 4], "big")
    return bytes(out + codestream[i:])


class _RefusingSCP:
    """A storage SCP that answers ``status`` (default 0x0110, processing failure) to every C-STORE.

    A transient refusal that is charged an attempt, so results reach the dead-letter folder (out of
    resources, 0xA7xx, is never charged: it would keep them pending).
    """

    def __init__(self, status: int = 0x0110) -> None:
        self.status = status
        self.refused = 0  # C-STOREs answered (only the SCP's own thread writes it)
        ae = AE(ae_title="BUSYPACS")
        for sop in (SegmentationStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event) -> int:  # noqa: ANN001
        self.refused += 1
        return self.status

    def close(self) -> None:
        self.server.shutdown()


def _write_config(path: Path, engines: Path, spool: Path, ports: dict[str, int]) -> Path:
    """The daemon's TOML: the SCP, US -> tiny-seg, DX -> tiny-det, CR -> tiny-cls, overlays, three destinations."""
    dests = [("pacs", ports["pacs"], "PACS"), ("refusing", ports["refusing"], "REFUSER"),
             ("busy", ports["busy"], "BUSYPACS")]
    lines = [
        f"engines_dir = {json.dumps(str(engines))}",
        f"spool_dir = {json.dumps(str(spool))}",
        "shutdown_timeout_s = 4.0",
        "[zmq]",
        f'ingest = "tcp://127.0.0.1:{ports["ingest"]}"',
        f'publish = "tcp://127.0.0.1:{ports["publish"]}"',
        'default_model = "tiny-seg"',
        "[metrics]",
        'host = "127.0.0.1"',
        f"port = {ports['metrics']}",
        "[dicom]",
        "enabled = true",
        'host = "127.0.0.1"',
        f"port = {ports['dicom']}",
        'ae_title = "MEDGE"',
        "series_idle_s = 0.5",
        "secondary_capture = true",
        "[outbox]",
        "retry_base_s = 0.05",
        "retry_max_s = 0.1",
        "max_attempts = 2",
        "attempt_window_s = 600.0",
        "[[dicom.routes]]",
        'modality = "US"',
        'model = "tiny-seg"',
        "[[dicom.routes]]",
        'modality = "DX"',
        'model = "tiny-det"',
        "[[dicom.routes]]",
        'modality = "CR"',
        'model = "tiny-cls"',
    ]
    for name, port, aet in dests:
        lines += ["[[dicom.destinations]]", f'name = "{name}"', 'host = "127.0.0.1"', f"port = {port}",
                  f'ae_title = "{aet}"']
    for model in ("tiny-seg", "tiny-det", "tiny-cls"):
        lines += ["[[models]]", f'name = "{model}"', 'precision = "fp32"']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback
            return r.status, r.read().decode("utf-8")
    except (urllib.error.URLError, OSError):
        return 0, ""


@contextmanager
def _debug_daemon(config: Path, metrics_port: int, log_path: Path) -> Iterator[subprocess.Popen]:
    """``medge --log-level DEBUG serve``; stdout and stderr both into ``log_path``; SIGTERM at the end."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "--log-level", "DEBUG", "serve", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 60
            while _get(f"http://127.0.0.1:{metrics_port}/readyz")[0] != 200:
                assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, "the daemon was not ready within 60 s"
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _leaks(blob: bytes) -> list[str]:
    low = blob.lower()
    return [n for n in NEEDLES if n.lower().encode() in low]


def _zmq_traffic(ingest: str, publish: str, timeout_s: float = 20.0) -> list[bytes]:
    """Frames through a named stream; every frame of every reply and PUB message, as bytes."""
    ctx = zmq.Context.instance()
    frames: list[bytes] = []
    with ctx.socket(zmq.DEALER) as dealer, ctx.socket(zmq.SUB) as sub:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(publish)
        dealer.connect(ingest)
        img = np.zeros((48, 48), np.uint8)
        img[10:30, 10:30] = 200
        replies, published, sent = 0, 0, 0
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        # Keep sending until the subscriber has seen messages (a SUB joins late), then drain.
        while (published < 3 or replies < sent) and time.monotonic() < deadline:
            if published < 3 and sent - replies < 2:
                model = "tiny-seg" if sent % 2 == 0 else "tiny-det"
                dealer.send_multipart(encode_request(img, req_id=sent, model=model, stream="probe-1",
                                                     want=["mask", "boxes"]))
                sent += 1
            for sock, _ in poller.poll(100):
                msg = sock.recv_multipart()
                frames.extend(msg)
                if sock is dealer:
                    assert json.loads(msg[0])["status"] == "ok", msg[0]
                    replies += 1
                else:
                    assert msg[0].rstrip(b"\0") == b"probe-1"  # the topic: the stream (NUL-terminated)
                    published += 1
        assert published >= 3 and replies == sent, (published, replies, sent)
    return frames


@pytest.mark.peer("storescp")
# Sending the malformed instances from this process makes pydicom warn here too (not the daemon's concern).
@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning", "ignore:Unknown encoding:UserWarning")
def test_no_patient_data_leaves_the_daemon_outside_result_objects(fixture_engines_with_cls: Path,
                                                                  tmp_path: Path) -> None:
    ports = {k: free_port() for k in ("ingest", "publish", "metrics", "dicom", "pacs", "refusing")}
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    instances = _instances()
    with ExitStack() as stack:
        busy = _RefusingSCP()
        stack.callback(busy.close)
        ports["busy"] = busy.port
        for args in (["-od", str(pacs_dir), "-uf", "-aet", "PACS", str(ports["pacs"])],
                     ["--refuse", "-aet", "REFUSER", str(ports["refusing"])]):
            peer = subprocess.Popen([str(STORESCP), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(peer.wait, 10)
            stack.callback(peer.terminate)
        config = _write_config(tmp_path / "medge.toml", fixture_engines_with_cls, tmp_path / "spool", ports)
        log_path = tmp_path / "daemon.log"
        stack.enter_context(_debug_daemon(config, ports["metrics"], log_path))
        metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(f.US, ExplicitVRLittleEndian)
        ae.add_requested_context(f.US, JPEGBaseline8Bit)
        ae.add_requested_context(f.DX, ExplicitVRLittleEndian)
        ae.add_requested_context(f.CR, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", ports["dicom"], ae_title="MEDGE")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(ds).Status) for _, ds in instances]
        assoc.release()
        assert statuses == [0] * len(instances)

        zmq_frames = _zmq_traffic(f"tcp://127.0.0.1:{ports['ingest']}", f"tcp://127.0.0.1:{ports['publish']}")

        def settled() -> bool:
            text = _get(metrics_url)[1]
            made = _metric(text, "medge_dicom_results_total")
            return (
                _metric(text, "medge_dicom_instances_received_total") == len(instances)
                and _metric(text, "medge_dicom_spool_instances") == 0
                and _metric(text, "medge_dicom_processing_failures_total") == 1  # the undecodable one
                and made > 0
                and _metric(text, "medge_outbox_sent_total", destination="pacs") == made
                and _metric(text, "medge_outbox_dead_letter_total", destination="busy") == made
                and _metric(text, "medge_outbox_failures_total", destination="refusing") >= 2
            )

        _poll(settled, 90, "every instance processed, delivered to pacs and dead-lettered at busy")
        metrics_text = _get(metrics_url)[1]

    log = log_path.read_bytes()
    text = log.decode("utf-8", errors="replace")
    spool = tmp_path / "spool"
    # Nowhere outside the result objects.
    leaking_lines = [ln for ln in text.splitlines() if _leaks(ln.encode())]
    assert not _leaks(log), "patient data in the daemon's log:\n" + "\n".join(leaking_lines[:20])
    assert not _leaks(metrics_text.encode()), [ln for ln in metrics_text.splitlines() if _leaks(ln.encode())]
    leaking_frames = [fr[:300] for fr in zmq_frames if _leaks(fr)]
    assert not leaking_frames, leaking_frames
    # The log is the verbose one: medge's and pynetdicom's debug output, both ends of C-STORE, all the trouble.
    for expected in (" DEBUG edge.", " DEBUG pynetdicom", "Received Store Request", "Sending Store Request",
                     "moved to the dead-letter folder", "association rejected", "not processed (decode)"):
        assert expected in text, f"{expected!r} is not in the daemon's log:\n{text[-3000:]}"
    # Third-party warnings and log records arrived through our logger, with their text withheld, not dropped.
    assert re.search(r"WARNING edge\.warnings: UserWarning from pydicom/\S+ \(text withheld", text), text[-3000:]
    assert re.search(r" highdicom\.\S+: .*\(text withheld: it may quote patient data\)", text)
    assert not re.search(r"^\S*Warning: ", text, re.MULTILINE), "a raw Python warning reached stderr"

    own_files = [p for p in spool.rglob("*") if p.is_file() and p.suffix != ".dcm"]
    undecodable = str(instances[-1][1].SOPInstanceUID)
    assert sorted(p.name for p in spool.rglob("failed/*")) == [f"{undecodable}.dcm", f"{undecodable}.reason.txt"]
    assert len([p for p in own_files if "dead-letter" in p.parts and p.name.endswith(".reason.txt")]) > 0
    leaking_files = {str(p.relative_to(spool)): p.read_bytes()[:300] for p in own_files if _leaks(p.read_bytes())}
    assert not leaking_files, leaking_files

    # Each result was refused exactly [outbox] max_attempts = 2 times by busy before its dead letter.
    made = _metric(metrics_text, "medge_dicom_results_total")
    assert busy.refused == 2 * made

    # Sanity: the canary was there to leak (results copy the patient and study modules), in every result.
    received = [p.read_bytes() for p in pacs_dir.iterdir() if p.is_file()]
    assert len(received) == made and all(CANARY.encode() in b and UID_PATTERN.encode() in b for b in received)
    dead = list(spool.rglob("dead-letter/busy/*.dcm"))
    assert len(dead) == len(received) and all(CANARY.encode() in p.read_bytes() for p in dead)
    assert CANARY.encode() in (spool / "dicom" / "failed" / f"{undecodable}.dcm").read_bytes()

    # The classification path ran: the CR's TID 1500 SR (a Present/Absent evaluation with its certainty) and its
    # class activation map overlay reached the PACS, the canary in both (checked above) and in no log line.
    cr_uid = str(next(ds for what, ds in instances if what == "cr").SOPInstanceUID)
    results = [dcmread(p) for p in pacs_dir.iterdir() if p.is_file()]
    cls_sr = [ds for ds in results if ds.Modality == "SR" and "tiny-cls" in ds.SeriesDescription]
    assert len(cls_sr) == 1 and CANARY in str(cls_sr[0].PatientName)
    (group,) = hd.sr.ComprehensiveSR.from_dataset(cls_sr[0]).content.get_image_measurement_groups()
    assert group.source_images[0].referenced_sop_instance_uid == cr_uid
    assert group.get_qualitative_evaluations()[0].value in (codes.SCT.Present, codes.SCT.Absent)
    assert len(group.get_measurements(name=codes.DCM.CertaintyOfFinding)) == 1
    (cam,) = [ds for ds in results if ds.Modality == "OT" and ds.SourceImageSequence[0].ReferencedSOPInstanceUID == cr_uid]
    assert cam.ImageComments.startswith("nodule: ") and CANARY not in cam.ImageComments
