"""``medge bench engine|zmq|dicom``: the tools run, their statistics are sane, failures are handled.

No timing assertions (shared 2-core machines): the agreement of the engine
mode with a plain ONNX Runtime loop is measured by benchmarks/engine_vs_raw.py.
"""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.bench import parse_frame, parse_sweep
from edge.benchstats import format_table, summarize_ms
from edge.cli import main
from edge.demo import free_port

from ._daemon import running_daemon
from ._fake_router import FakeRouter


@pytest.fixture(scope="module")
def results_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def daemon(fixture_engines: Path, tmp_path_factory: pytest.TempPathFactory, results_port: int):
    with running_daemon(fixture_engines, tmp_path_factory.mktemp("daemon"), ["tiny-seg", "tiny-det"],
                        dicom=True, routes={"US": "tiny-seg", "DX": "tiny-det"},
                        results_port=results_port) as d:
        yield d


def _valid_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100


def _sane(s: dict) -> None:
    assert s["count"] > 0
    assert 0 < s["min_ms"] <= s["median_ms"] <= s["p90_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["min_ms"] <= s["mean_ms"] <= s["max_ms"]
    assert s["cv"] >= 0


# ------------------------------------------------------------------ helpers
def test_summarize_known_values() -> None:
    s = summarize_ms(np.arange(1, 101, dtype=float))
    assert s["count"] == 100 and s["min_ms"] == 1 and s["max_ms"] == 100
    assert s["median_ms"] == 50.5 and s["p99_ms"] == pytest.approx(99.01)
    assert summarize_ms([]) == {"count": 0}
    assert "median" in format_table([{"median": 1.0}])


def test_argument_parsers_reject_nonsense() -> None:
    import argparse

    assert parse_frame("480x640") == (480, 640)
    assert parse_sweep("concurrency=1,2,4,8") == ("concurrency", [1, 2, 4, 8])
    for bad in ("480", "0x10", "axb"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_frame(bad)
    for bad in ("batch=1,2", "rate=", "streams=0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_sweep(bad)


# ------------------------------------------------------------------ engine
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_bench_engine_reports_sane_stats(fixture_engines: Path, tmp_path: Path, capsys, precision: str) -> None:
    out = tmp_path / "engine.json"
    rc = main(["bench", "engine", "--model", "tiny-seg", "--engines-dir", str(fixture_engines),
               "--precision", precision, "--batch", "2", "--warmup-s", "0.1", "--iterations", "60",
               "--json", str(out), "--csv", str(tmp_path / "e.csv"), "--plot", str(tmp_path / "e.png")])
    text = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out.read_text())
    assert len(doc["samples_ms"]) == 60
    _sane(doc["summary"]["latency_ms"])
    assert doc["summary"]["throughput"]["inferences_per_s"] > 0
    assert doc["config"]["input_shape"] == [2, 1, 64, 64] and doc["config"]["precision"] == precision
    assert doc["machine"]["cpu_count"] >= 1 and "onnxruntime" in doc["machine"]["versions"]
    assert "median" in text and "throughput" in text and "not available" in text  # no CUDA events on CPU
    with open(tmp_path / "e.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 60
    _valid_png(tmp_path / "e.png")


def test_bench_engine_unknown_model_is_a_clear_error(fixture_engines: Path, capsys) -> None:
    rc = main(["bench", "engine", "--model", "nope", "--engines-dir", str(fixture_engines), "--iterations", "5"])
    assert rc == 1
    assert "No model 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------ zmq
def test_bench_zmq_compare_raw(daemon, fixture_engines: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "zmq.json"
    rc = main(["bench", "zmq", "--endpoint", daemon.endpoint, "--model", "tiny-seg",
               "--engines-dir", str(fixture_engines), "--frame", "128x160", "--concurrency", "1",
               "--duration-s", "1.2", "--warmup-s", "0.2", "--compare-raw", "--metrics-url", daemon.metrics_url,
               "--json", str(out), "--csv", str(tmp_path / "z.csv"), "--plot", str(tmp_path / "z.png")])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out.read_text())
    step = doc["steps"][0]["summary"]
    assert step["ok"] > 10 and step["errors"] == 0 and step["dropped"] == 0
    _sane(step["latency_ms"])
    _sane(step["raw_infer_ms"])
    assert {"queue", "preprocess", "infer", "postprocess"} <= set(step["server_stages_ms"])
    o = step["overhead_ms"]["vs_raw_infer"]
    assert o["p50"] == pytest.approx(step["latency_ms"]["median_ms"] - step["raw_infer_ms"]["median_ms"], abs=1e-3)
    assert "OVERHEAD (zmq - raw infer)" in text
    assert step["mean_batch"] == pytest.approx(1.0)  # concurrency 1: never more than one frame waits
    assert step["paired_overhead_ms"]["count"] == step["ok"] and step["paired_overhead_ms"]["p50"] > 0
    assert doc["aborted"] is None and len(doc["samples"]) == step["ok"]
    with open(tmp_path / "z.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == step["ok"] and rows[0]["status"] == "ok"
    _valid_png(tmp_path / "z.png")


def test_bench_zmq_sweep_one_row_per_step(daemon, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep.json"
    rc = main(["bench", "zmq", "--endpoint", daemon.endpoint, "--model", "tiny-det", "--frame", "96x96",
               "--rate", "25", "--sweep", "streams=1,2", "--duration-s", "0.8", "--warmup-s", "0",
               "--metrics-url", daemon.metrics_url, "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [s["step"]["streams"] for s in doc["steps"]] == [1, 2]
    oks = [s["summary"]["ok"] for s in doc["steps"]]
    assert oks[1] > oks[0] > 5  # twice the streams, about twice the frames


def test_bench_zmq_daemon_down(tmp_path: Path, capsys) -> None:
    out = tmp_path / "down.json"
    rc = main(["bench", "zmq", "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--duration-s", "1",
               "--connect-timeout-s", "0.5", "--json", str(out)])
    assert rc == 3
    assert "no daemon is accepting connections" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["aborted"] and doc["samples"] == []


def test_bench_zmq_daemon_dies_mid_run_keeps_partial_results(tmp_path: Path, capsys) -> None:
    fake = FakeRouter(delay_s=0.001)
    timer = threading.Timer(1.5, fake.close)
    timer.start()
    out = tmp_path / "partial.json"
    try:
        rc = main(["bench", "zmq", "--endpoint", fake.endpoint, "--concurrency", "2", "--frame", "96x128", "--duration-s", "20",
                   "--warmup-s", "0.2", "--reply-timeout-s", "0.8", "--json", str(out)])
    finally:
        timer.join()
    err = capsys.readouterr().err
    assert rc == 3
    assert "stopped answering" in err and "partial results kept" in err
    doc = json.loads(out.read_text())
    assert doc["aborted"]
    statuses = {s["status"] for s in doc["samples"]}
    assert "ok" in statuses and len(doc["samples"]) > 10


# ------------------------------------------------------------------ dicom
def test_bench_dicom_store_to_result(daemon, results_port: int, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dicom.json"
    rc = main(["bench", "dicom", "--port", str(daemon.dicom_port), "--synthetic", "3", "--frame", "120x160",
               "--results-port", str(results_port), "--results-timeout-s", "20", "--json", str(out),
               "--plot", str(tmp_path / "d.png")])
    text = capsys.readouterr().out
    assert rc == 0, text
    s = json.loads(out.read_text())["summary"]
    assert s["stored"] == 3 and s["failed"] == 0
    assert s["instances_with_result"] == 3 and s["results_received"] >= 1
    _sane(s["store_ms"])
    _sane(s["store_to_result_ms"])
    _valid_png(tmp_path / "d.png")


def test_bench_dicom_daemon_down(tmp_path: Path, capsys) -> None:
    out = tmp_path / "down.json"
    rc = main(["bench", "dicom", "--port", str(free_port()), "--synthetic", "2", "--json", str(out)])
    assert rc == 3
    assert "association" in capsys.readouterr().err
    assert json.loads(out.read_text())["summary"]["stored"] == 0


def test_bench_dicom_peer_aborts_mid_run(tmp_path: Path, capsys) -> None:
    """An SCP that accepts two instances and then aborts the association."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import UltrasoundImageStorage

    count = [0]

    def on_store(event):
        count[0] += 1
        if count[0] > 2:
            event.assoc.abort()
            return 0xA700
        return 0x0000

    ae = AE(ae_title="MEDGE")
    ae.add_supported_context(UltrasoundImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    out = tmp_path / "abort.json"
    try:
        rc = main(["bench", "dicom", "--port", str(server.server_address[1]), "--synthetic", "6",
                   "--frame", "64x64", "--timeout-s", "5", "--json", str(out)])
    finally:
        server.shutdown()
    assert rc == 3
    s = json.loads(out.read_text())["summary"]
    assert s["stored"] == 2 and s["attempted"] == 3 and s["aborted"]
