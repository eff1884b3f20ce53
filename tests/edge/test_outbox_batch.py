"""One outbox batch's per-object outcomes, and the outbox's files (:mod:`edge.egress.dicom.outbox_files`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from edge.egress.dicom.outbox import Destination, Outbox
from edge.egress.dicom.outbox_files import (
    DEAD_LETTER_DIR,
    PENDING_DIR,
    TMP_DIR,
    UNSENT_DIR,
    attempts_path,
    charge_attempt,
    dated_objects,
    reason_path,
    result_bytes,
)
from tests.edge import dicom_factory as f
from tests.edge.test_dicom_outbox import FAST, ScriptedSCP, metric, results


def test_one_batch_dead_letters_unreadable_and_unsupported_objects_and_sends_the_rest(tmp_path: Path) -> None:
    scp = ScriptedSCP([])  # accepts SR and SEG only
    reg = CollectorRegistry()
    sr = results(1)[0]
    dx = f.make_dx(np.zeros((8, 8), np.uint16))  # DX Image Storage: a SOP class the peer does not take
    dest = Destination("pacs", "127.0.0.1", scp.port, "SCRIPTED")
    try:
        with Outbox(tmp_path / "outbox", [dest], reg, policy=FAST, start=False) as ob:
            ob.put(sr)
            ob.put(dx)
            garbage = ob.pending_root / "pacs" / "garbage.dcm"
            garbage.write_bytes(b"not a DICOM file")
            ob.start()
            assert ob.wait_idle(20)
            dead = {p.name: reason_path(p).read_text(encoding="utf-8") for p in ob.dead_letters("pacs")}
    finally:
        scp.close()
    assert scp.stored == [str(sr.SOPInstanceUID)]
    assert dead["garbage.dcm"] == "unreadable outbox file: InvalidDicomError\n"
    assert dead[f"{dx.SOPInstanceUID}.dcm"] == (
        f"destination accepts no presentation context for SOP class {dx.SOPClassUID}\n"
    )
    assert len(dead) == 2
    assert metric(reg, "medge_outbox_sent_total", destination="pacs") == 1
    assert metric(reg, "medge_outbox_dead_letter_total", destination="pacs") == 2
    assert metric(reg, "medge_outbox_failures_total", destination="pacs") == 1  # an unreadable file is no failure of the peer


def test_charge_attempt_keeps_only_refusals_within_the_window(tmp_path: Path) -> None:
    obj = tmp_path / PENDING_DIR / "pacs" / "1.2.3.dcm"
    obj.parent.mkdir(parents=True)
    (tmp_path / TMP_DIR).mkdir()
    now = time.time()
    attempts_path(obj).write_text(json.dumps([now - 7200, now - 10]), encoding="utf-8")
    assert charge_attempt(obj, 3600, tmp_path / TMP_DIR) == 2  # the one two hours ago is dropped
    kept = json.loads(attempts_path(obj).read_text(encoding="utf-8"))
    assert len(kept) == 2 and min(kept) == now - 10
    attempts_path(obj).write_text("{half-written", encoding="utf-8")
    assert charge_attempt(obj, 3600, tmp_path / TMP_DIR) == 1  # an unreadable record starts again


def test_result_bytes_counts_result_objects_only(tmp_path: Path) -> None:
    files = {
        f"{PENDING_DIR}/a/1.dcm": 10,
        f"{PENDING_DIR}/b/1.dcm": 20,
        f"{DEAD_LETTER_DIR}/a/2.dcm": 40,
        f"{UNSENT_DIR}/3.dcm": 80,
        f"{PENDING_DIR}/a/1.attempts.json": 1000,  # not results
        f"{DEAD_LETTER_DIR}/a/2.reason.txt": 2000,
        f"{TMP_DIR}/x.dcm": 4000,
    }
    for rel, size in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\0" * size)
    assert result_bytes(tmp_path) == 150


def test_dated_objects_lists_oldest_first_and_nothing_for_a_missing_folder(tmp_path: Path) -> None:
    now = time.time()
    for i, name in enumerate(["c.dcm", "a.dcm", "b.dcm"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (now - 100 * i, now - 100 * i))  # c newest, b oldest
    (tmp_path / "a.attempts.json").write_text("[]", encoding="utf-8")
    assert [name for _, name, _ in dated_objects(tmp_path)] == ["b.dcm", "a.dcm", "c.dcm"]
    assert dated_objects(tmp_path / "missing") == []
