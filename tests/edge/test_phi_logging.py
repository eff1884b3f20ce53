"""No patient identifiers in the daemon's log, including what pydicom, highdicom and pynetdicom log.

A real ``medge serve`` process receives US instances whose patient data
used to provoke the libraries' value-quoting warnings and errors: a
PatientName without a caret (highdicom: ``The string "<name>" is unlikely
to represent ...``), an invalid PatientBirthDate (pydicom: ``Invalid value
for VR DA: '<date>'``, and a ValueError quoting it in the result builder).
After the daemon has processed them, none of the marker values may appear
in its log. The units below pin down the log guards of ``edge.cli``: third-
party warnings and pydicom/highdicom records keep their place but lose their
text, logged exceptions lose third-party messages, and at debug level
pynetdicom does not dump query data sets. ``test_phi_canary`` runs the whole
daemon at debug level with a canary in every text element.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind

from edge.cli import _quiet_dicom_identifiers, _WarningsToLog, _WithholdDicomLibraryText
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


def test_debug_level_keeps_pynetdicom_from_dumping_query_identifiers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At ``--log-level DEBUG`` pynetdicom's INFO records reach the log; its C-FIND data set dumps must not."""
    for switch in ("LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS"):
        monkeypatch.setattr(_config, switch, getattr(_config, switch))  # restored after the test
    find = PatientRootQueryRetrieveInformationModelFind

    def answer(event):  # type: ignore[no-untyped-def]
        match = Dataset()
        match.QueryRetrieveLevel = "PATIENT"
        match.PatientName = "ZQXFOUND^NAME"
        yield 0xFF00, match

    scp = AE(ae_title="FINDSCP")
    scp.add_supported_context(find)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, answer)])

    def query() -> list[int]:
        scu = AE(ae_title="FINDSCU")
        scu.add_requested_context(find)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="FINDSCP")
        assert assoc.is_established
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "PATIENT"
        identifier.PatientName = "ZQXQUERY*"
        statuses = [int(status.Status) for status, _ in assoc.send_c_find(identifier, find)]
        assoc.release()
        return statuses

    try:
        with caplog.at_level(logging.DEBUG, logger="pynetdicom"):
            assert query() == [0xFF00, 0x0000]
            # pynetdicom's default: both identifiers, values included (why medge turns it off).
            assert "ZQXQUERY" in caplog.text and "ZQXFOUND" in caplog.text
            caplog.clear()
            _quiet_dicom_identifiers()
            assert query() == [0xFF00, 0x0000]
    finally:
        server.shutdown()
    assert "Find" in caplog.text  # the exchange itself is still logged
    assert "ZQXQUERY" not in caplog.text and "ZQXFOUND" not in caplog.text


def test_logged_exceptions_keep_their_frames_and_lose_third_party_messages() -> None:
    """pynetdicom's ``LOGGER.exception(exc)`` (pydicom could not encode a data set) and any ``exc_info`` record."""
    from edge.errors import DataError

    def formatted(logger: str, log: Callable[[logging.Logger, BaseException], None], exc: BaseException) -> str:
        try:
            raise exc
        except BaseException as caught:  # noqa: BLE001 - the exception under test
            record_of: list[logging.LogRecord] = []
            handler = logging.Handler()
            handler.emit = record_of.append  # type: ignore[method-assign]
            handler.addFilter(_WithholdDicomLibraryText())
            lg = logging.getLogger(logger)
            lg.addHandler(handler)
            try:
                log(lg, caught)
            finally:
                lg.removeHandler(handler)
        assert len(record_of) == 1
        return logging.Formatter("%(name)s: %(message)s").format(record_of[0])

    leaky = ValueError("Unable to convert 'ZQXDOB-1970' to 'DA' object")
    text = formatted("pynetdicom.dsutils", lambda lg, e: lg.exception(e), leaky)
    assert "ZQXDOB" not in text and "builtins.ValueError (message withheld" in text
    assert "Traceback (most recent call last)" in text and "in formatted" in text  # where it happened is kept
    text = formatted("edge.daemon", lambda lg, e: lg.error("Closing the DICOM side failed.", exc_info=e), leaky)
    assert "ZQXDOB" not in text and text.startswith("edge.daemon: Closing the DICOM side failed.\nTraceback")
    ours = DataError("Data set is truncated: unpack requires a buffer of 4 bytes.")
    text = formatted("pynetdicom.events", lambda lg, e: lg.exception(e), ours)
    assert text.count("Data set is truncated") == 2  # medge's own messages carry no patient data: kept


def test_pynetdicom_records_that_quote_values_are_withheld_and_its_association_records_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defect 7: pynetdicom's UID validation warning quotes the value (here a SOP Instance UID with a name)."""
    from pynetdicom.utils import set_uid

    handler = logging.Handler()
    seen: list[logging.LogRecord] = []
    handler.emit = seen.append  # type: ignore[method-assign]
    handler.addFilter(_WithholdDicomLibraryText())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="pynetdicom"):
            set_uid("CANARY.ZELDA.PID8675309", "Affected SOP Instance UID")
            logging.getLogger("pynetdicom.assoc").info("Association Accepted")
            logging.getLogger("pynetdicom.acse").error("Reason: %s", "Calling AE title not recognised")
    finally:
        root.removeHandler(handler)
    text = [logging.Formatter("%(name)s: %(message)s").format(r) for r in seen if r.name.startswith("pynetdicom")]
    assert len(text) == 3, text
    assert not [r for r in seen if "ZELDA" in r.getMessage()]
    assert "ZELDA" not in text[0] and "PID8675309" not in text[0]
    assert text[0].startswith("pynetdicom.utils: pynetdicom.utils WARNING at utils:") and "withheld" in text[0]
    assert text[1] == "pynetdicom.assoc: Association Accepted"
    assert text[2] == "pynetdicom.acse: Reason: Calling AE title not recognised"
