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

import time
import urllib.request
from pathlib import Path

import numpy as np
from pynetdicom import AE

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
    assert "withheld" in log  # the warnings were there, and were logged without their text
