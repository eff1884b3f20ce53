"""Re-sending results: unsent/ re-queued at start, ``medge outbox status|requeue``, gauges that follow each object.

The peer is DCMTK's storescp (a real C-STORE SCP writing what it receives);
dead letters are made by a scripted pynetdicom SCP that refuses them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pynetdicom.association import Association

from edge.cli import main
from edge.egress.dicom.outbox import Destination, Outbox, RetryPolicy
from tests.edge import dicom_factory as f
from tests.edge.test_dicom_outbox import STORESCP, ScriptedSCP, metric, results, wait_port

FAST = RetryPolicy(retry_base_s=0.05, retry_max_s=0.3, max_attempts=50, attempt_window_s=3600)

needs_storescp = pytest.mark.peer("storescp")


@contextmanager
def storescp(folder: Path) -> Iterator[int]:
    """A DCMTK storescp (AE title PACS) writing into ``folder``; yields its port."""
    folder.mkdir(parents=True, exist_ok=True)
    port = f.free_port()
    proc = subprocess.Popen([STORESCP, "-od", str(folder), "-aet", "PACS", "-uf", str(port)])
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def received(folder: Path) -> list[str]:
    """SOP Instance UIDs of what a storescp wrote, sorted (a duplicate shows twice)."""
    return sorted(str(dcmread(p).SOPInstanceUID) for p in folder.iterdir())


def write_config(path: Path, spool: Path, destinations: dict[str, int]) -> Path:
    lines = [f"spool_dir = {json.dumps(str(spool))}"]
    for name, port in destinations.items():
        lines += ["[[dicom.destinations]]", f"name = {json.dumps(name)}", 'host = "127.0.0.1"', f"port = {port}", 'ae_title = "PACS"']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def dcm_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.dcm"))


@needs_storescp
def test_unsent_results_are_requeued_at_start_and_arrive_once_at_each_destination(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "outbox"
    objs = results(3)
    with Outbox(root, [], CollectorRegistry(), policy=FAST) as ob:  # no destination yet: unsent/
        for o in objs:
            ob.put(o)
    names = dcm_files(root / "unsent")
    assert len(names) == 3
    # A re-queue cut short by a crash: linked into the first destination, still in unsent/.
    (root / "pending" / "a").mkdir(parents=True)
    os.link(root / "unsent" / names[0], root / "pending" / "a" / names[0])
    caplog.set_level(logging.INFO, logger="edge.egress.dicom.outbox")
    reg = CollectorRegistry()
    with storescp(tmp_path / "pacs-a") as port_a, storescp(tmp_path / "pacs-b") as port_b:
        dests = [Destination("a", "127.0.0.1", port_a, "PACS"), Destination("b", "127.0.0.1", port_b, "PACS")]
        with Outbox(root, dests, reg, policy=FAST, start=False) as ob:
            assert dcm_files(root / "unsent") == []
            assert dcm_files(root / "pending" / "a") == dcm_files(root / "pending" / "b") == names
            assert metric(reg, "medge_outbox_pending", destination="a") == 3
            assert ob.stored_bytes() == ob.stored_bytes(recount=True)
            ob.start()
            assert ob.wait_idle(20)
            assert ob.stored_bytes() == 0
    want = sorted(str(o.SOPInstanceUID) for o in objs)
    assert received(tmp_path / "pacs-a") == want and received(tmp_path / "pacs-b") == want  # each exactly once
    assert metric(reg, "medge_outbox_sent_total", destination="a") == metric(reg, "medge_outbox_sent_total", destination="b") == 3
    log = [r.getMessage() for r in caplog.records if r.name == "edge.egress.dicom.outbox"]
    assert any("Re-queued 3 result object(s)" in m for m in log), log
    assert not any("MEDGE^TEST" in m or "MEDGE-TEST-1" in m for m in log)  # counts only, no patient data


@needs_storescp
def test_cli_requeue_dead_letter_is_sent_by_a_running_outbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "spool" / "outbox"
    objs = results(2)
    refusing = ScriptedSCP([0xA900, 0xA900])  # data set does not match SOP class: permanent, dead letters
    try:
        with Outbox(root, [Destination("pacs", "127.0.0.1", refusing.port, "SCRIPTED")], CollectorRegistry(), policy=FAST) as ob:
            for o in objs:
                ob.put(o)
            assert ob.wait_idle(20)
    finally:
        refusing.close()
    dead = root / "dead-letter" / "pacs"
    assert len(dcm_files(dead)) == 2 and len(list(dead.glob("*.reason.txt"))) == 2
    # A stale attempts record: the re-queue gives the object a fresh count.
    stale = root / "pending" / "pacs" / (dcm_files(dead)[0][: -len(".dcm")] + ".attempts.json")
    stale.write_text(json.dumps([time.time()] * 5), encoding="utf-8")
    reg = CollectorRegistry()
    with storescp(tmp_path / "pacs") as port:
        cfg = write_config(tmp_path / "medge.toml", tmp_path / "spool", {"pacs": port})
        with Outbox(root, [Destination("pacs", "127.0.0.1", port, "PACS")], reg, policy=FAST) as ob:
            # The outbox runs (idle) while the command moves files under it: it must find them without a wake.
            assert main(["outbox", "requeue", "--config", str(cfg), "--dead-letter"]) == 0
            out = capsys.readouterr().out
            assert "re-queued 2 dead letter(s) of pacs" in out
            assert dcm_files(dead) == [] and list(dead.iterdir()) == []  # reasons gone with their objects
            assert not stale.exists()
            assert ob.wait_idle(20)
    assert received(tmp_path / "pacs") == sorted(str(o.SOPInstanceUID) for o in objs)
    assert metric(reg, "medge_outbox_sent_total", destination="pacs") == 2
    assert metric(reg, "medge_outbox_dead_letter_total", destination="pacs") == 0


def test_cli_status_counts_pending_oldest_age_dead_letters_and_unsent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "spool" / "outbox"
    a, b, c = results(3)
    port = f.free_port()  # nobody listens; the outboxes below never start their senders
    with Outbox(root, [Destination("pacs", "127.0.0.1", port, "PACS")], CollectorRegistry(), start=False) as ob:
        ob.put(a)
        (old,) = ob.put(b)
    past = time.time() - 600
    os.utime(old, (past, past))
    with Outbox(root, [], CollectorRegistry(), start=False) as ob:
        ob.put(c)  # unsent
    # A dead letter, and a folder left by a destination that is no longer configured.
    dead = root / "dead-letter" / "pacs"
    (dead / "1.2.3.dcm").write_bytes(old.read_bytes())
    (root / "pending" / "retired").mkdir()
    (root / "pending" / "retired" / "1.2.4.dcm").write_bytes(old.read_bytes())
    cfg = write_config(tmp_path / "medge.toml", tmp_path / "spool", {"pacs": port})

    assert main(["outbox", "status", "--config", str(cfg), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    rows = {r["destination"]: r for r in st["destinations"]}
    assert st["unsent"] == 1
    assert rows["pacs"]["configured"] and rows["pacs"]["pending"] == 2 and rows["pacs"]["dead_letters"] == 1
    assert 600 <= rows["pacs"]["oldest_age_s"] < 660
    assert not rows["retired"]["configured"] and rows["retired"]["pending"] == 1

    assert main(["outbox", "status", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "unsent: 1" in text and "10 min" in text and "not configured" in text


def test_requeue_refuses_an_unknown_destination_and_a_config_without_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "spool" / "outbox"
    with Outbox(root, [], CollectorRegistry(), start=False) as ob:
        ob.put(results(1)[0])
    cfg = write_config(tmp_path / "medge.toml", tmp_path / "spool", {"pacs": f.free_port()})
    assert main(["outbox", "requeue", "--config", str(cfg), "--destination", "nowhere"]) == 1
    err = capsys.readouterr().err
    assert "'nowhere' is not in the configuration" in err and "configured: pacs" in err
    bare = write_config(tmp_path / "bare.toml", tmp_path / "spool", {})
    assert main(["outbox", "requeue", "--config", str(bare)]) == 1
    assert "no [[dicom.destinations]]" in capsys.readouterr().err
    assert len(dcm_files(root / "unsent")) == 1 and not (root / "pending" / "nowhere").exists()  # nothing moved


@needs_storescp
def test_pending_and_oldest_age_gauges_follow_each_sent_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 5
    root = tmp_path / "outbox"
    objs = results(n)
    unreachable = Destination("pacs", "127.0.0.1", f.free_port(), "PACS")
    with Outbox(root, [unreachable], CollectorRegistry(), start=False) as ob:
        paths = [ob.put(o)[0] for o in objs]
    now = time.time()
    for i, p in enumerate(paths):  # written 500, 400, ..., 100 s ago: sent in that order
        os.utime(p, (now - 100 * (n - i), now - 100 * (n - i)))

    samples: list[tuple[float, float]] = []
    real_send = Association.send_c_store
    reg = CollectorRegistry()

    def spy(self: Association, dataset, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Runs in the sender thread just before each C-STORE: everything before it has been answered.
        samples.append(
            (
                metric(reg, "medge_outbox_pending", destination="pacs"),
                metric(reg, "medge_outbox_oldest_age_seconds", destination="pacs"),
            )
        )
        return real_send(self, dataset, *args, **kwargs)

    monkeypatch.setattr(Association, "send_c_store", spy)
    with storescp(tmp_path / "pacs") as port:
        with Outbox(root, [Destination("pacs", "127.0.0.1", port, "PACS")], reg, policy=FAST, start=False) as ob:
            assert metric(reg, "medge_outbox_pending", destination="pacs") == n
            assert 500 <= metric(reg, "medge_outbox_oldest_age_seconds", destination="pacs") < 560
            ob.start()
            assert ob.wait_idle(20)
            assert metric(reg, "medge_outbox_pending", destination="pacs") == 0
            assert metric(reg, "medge_outbox_oldest_age_seconds", destination="pacs") == 0
    assert [s[0] for s in samples] == [n - i for i in range(n)]  # one less after each object, not per batch
    for i, (_, age) in enumerate(samples):
        assert 100 * (n - i) <= age < 100 * (n - i) + 60, samples
    assert received(tmp_path / "pacs") == sorted(str(o.SOPInstanceUID) for o in objs)


def test_gauges_exist_at_zero_for_every_configured_destination(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    dests = [Destination(name, "127.0.0.1", f.free_port(), "PACS") for name in ("a", "b")]
    with Outbox(tmp_path / "outbox", dests, reg, start=False):
        for name in ("a", "b"):
            for m in ("medge_outbox_pending", "medge_outbox_oldest_age_seconds", "medge_outbox_sent_total",
                      "medge_outbox_failures_total", "medge_outbox_dead_letter_total"):
                assert reg.get_sample_value(m, {"destination": name}) == 0.0, (m, name)


def test_a_config_without_spool_dir_needs_the_units_spool_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # medge@us1: the spool comes from StateDirectory=, which the operator's shell does not have.
    spool = tmp_path / "var-lib-medge-us1"
    with Outbox(spool / "outbox", [], CollectorRegistry(), start=False) as ob:
        ob.put(results(1)[0])
    cfg = tmp_path / "us1.toml"
    cfg.write_text('[[dicom.destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = 11112\nae_title = "PACS"\n')
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".medge" / "outbox").mkdir(parents=True)  # a stray default spool must not be used silently
    for var in ("MEDGE_SPOOL_DIR", "STATE_DIRECTORY"):
        monkeypatch.delenv(var, raising=False)
    assert main(["outbox", "status", "--config", str(cfg)]) == 1
    assert "--spool-dir" in capsys.readouterr().err
    assert main(["outbox", "status", "--config", str(cfg), "--spool-dir", str(spool), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unsent"] == 1
    monkeypatch.setenv("STATE_DIRECTORY", str(spool))  # what the unit's own environment holds
    assert main(["outbox", "status", "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unsent"] == 1


def test_requeue_refuses_another_user_than_the_outbox_owner(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "spool" / "outbox"
    with Outbox(root, [], CollectorRegistry(), start=False) as ob:
        ob.put(results(1)[0])
    cfg = write_config(tmp_path / "medge.toml", tmp_path / "spool", {"pacs": f.free_port()})
    owner = root.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)  # e.g. root through sudo, the daemon being medge
    assert main(["outbox", "requeue", "--config", str(cfg)]) == 1
    assert "sudo -u" in capsys.readouterr().err
    assert len(dcm_files(root / "unsent")) == 1 and not (root / "pending" / "pacs").exists()  # nothing moved
    monkeypatch.setattr(os, "geteuid", lambda: owner)
    assert main(["outbox", "requeue", "--config", str(cfg)]) == 0
    assert len(dcm_files(root / "pending" / "pacs")) == 1


def test_receipt_times_of_objects_removed_by_hand_are_forgotten(tmp_path: Path) -> None:
    # medge_dicom_store_to_result_seconds keeps each pending object's receipt time in memory;
    # an object an operator deletes must not keep its entry for the life of the process.
    port = f.free_port()  # nobody listens: nothing is ever sent
    with Outbox(tmp_path / "outbox", [Destination("pacs", "127.0.0.1", port, "PACS")], CollectorRegistry(),
                policy=FAST, start=False) as ob:
        paths = [p for o in results(3) for p in ob.put(o, stored_at=time.time())]
        assert len(ob._stored_at) == 3
        paths[0].unlink()
        ob._relist(ob.destinations[0])
        assert sorted(k[1] for k in ob._stored_at) == sorted(p.name for p in paths[1:])
