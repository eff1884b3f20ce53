"""No patient identifiers in the daemon's log, including what pydicom and highdicom warn about.

A real ``medge serve`` process receives US instances whose patient data
provokes the libraries' value-quoting warnings and errors: a PatientName
without a caret (highdicom: ``The string "<name>" is unlikely to represent
...``), an invalid PatientBirthDate (pydicom: ``Invalid value for VR DA:
'<date>'``, and later a ValueError quoting it in the result builder). After
the daemon has processed them, none of the marker values may appear in its
log, and the log must still say that something was withheld.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from pathlib import Path

import numpy as np
from pynetdicom import AE

from edge.cli import _WarningsToLog, _WithholdDicomLibraryText
from tests.edge import dicom_factory as f
from tests.edge._daemon import running_daemon

MARKERS = {
    "PatientName": "ZQXNAME WITHOUTCARET",
    "PatientBirthDate": "ZQXDOB-1970",
    "PatientID": "ZQXPID-0042",
    "AccessionNumber": "ZQXACC77",
    "ReferringPhysicianName": "ZQXREFDOC",
}


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_library_warnings_and_errors_do_not_leak_patient_data(fixture_engines: Path, tmp_path: Path) -> None:
    with running_daemon(fixture_engines, tmp_path / "d", ["tiny-seg"], dicom=True, routes={"US": "tiny-seg"}) as d:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(f.US)
        assoc = ae.associate("127.0.0.1", d.dicom_port, ae_title="MEDGE")
        assert assoc.is_established
        statuses = []
        for variant in range(3):
            img = np.zeros((64, 64), np.uint8)
            img[16:48, 16:48] = 200
            ds = f.make_us_single(img)
            ds.PatientName = MARKERS["PatientName"] + f" {variant}"  # a new name each time: no de-dup by text
            ds.PatientID = MARKERS["PatientID"]
            ds.AccessionNumber = MARKERS["AccessionNumber"]
            ds.ReferringPhysicianName = MARKERS["ReferringPhysicianName"]
            if variant == 2:
                ds.PatientBirthDate = MARKERS["PatientBirthDate"]
            st = assoc.send_c_store(ds)
            statuses.append(int(st.Status))
        assoc.release()
        assert statuses == [0, 0, 0]
        # Wait until all three are through the pipeline (a result or a failure each), polling with a deadline.
        deadline = time.monotonic() + 60
        done = 0.0
        while time.monotonic() < deadline:
            done = _metric(d.metrics_url, "medge_dicom_results_total") + _metric(
                d.metrics_url, "medge_dicom_processing_failures_total"
            )
            if done >= 3:
                break
            time.sleep(0.1)
        assert done >= 3, d.proc.log_tail(30)
    log = d.proc.log_path.read_text(encoding="utf-8", errors="replace")
    for attr, value in MARKERS.items():
        assert value.split()[0] not in log, f"{attr} leaked into the daemon's log:\n{log[-3000:]}"


def test_warning_routing_withholds_third_party_text(caplog) -> None:  # type: ignore[no-untyped-def]
    """What ``medge`` does with a library's warning or log record that quotes a value."""
    show = _WarningsToLog()
    with caplog.at_level(logging.DEBUG):
        for _ in range(2):
            show('The string "ZQXNAME WITHOUTCARET" is unlikely to represent the intended person name',
                 UserWarning, "/x/lib/python3.11/site-packages/highdicom/base.py", 199)
        show("our own text", UserWarning, "/work/edge/scheduler.py", 10)
    assert "ZQXNAME" not in caplog.text
    first, second, ours = caplog.records[-3:]
    assert "withheld" in first.getMessage() and "highdicom/base.py:199" in first.getMessage()
    assert first.levelno == logging.WARNING and second.levelno == logging.DEBUG  # once per place
    assert "our own text" in ours.getMessage()

    record = logging.LogRecord("pydicom", logging.WARNING, "valuerep.py", 440,
                               "Invalid value for VR DA: %r", ("ZQXDOB-1970",), None)
    assert _WithholdDicomLibraryText().filter(record)
    assert "ZQXDOB" not in record.getMessage() and "withheld" in record.getMessage()
    mine = logging.LogRecord("edge.scheduler", logging.WARNING, "scheduler.py", 1, "kept %s", ("text",), None)
    _WithholdDicomLibraryText().filter(mine)
    assert mine.getMessage() == "kept text"
