"""``medge bench engine|zmq|dicom``: the tools run, their statistics are sane, failures are handled.

No timing assertions (shared 2-core machines): the agreement of the engine
mode with a plain ONNX Runtime loop is measured by benchmarks/engine_vs_raw.py.
Where a judgement (stable or not) must come out one way, the peer makes it
so (a stability bound no positive numbers can miss; a peer whose latency
grows with every request).
"""

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edge
from edge.cli import main
from edge.commands.bench import parse_sweep
from edge.tools.daemon_process import free_port
from edge.tools.endpoints import parse_frame, resolve_client_endpoints
from edge.tools.results import (
    ABOVE_NOISE,
    NEGATIVE_OVERHEAD,
    NOISE_UNKNOWN,
    WITHIN_NOISE,
    describe_overhead,
    format_table,
    overhead_verdict,
    summarize_ms,
    within_percentage,
)

from ._daemon import running_daemon
from ._fake_router import FakeRouter


@pytest.fixture(scope="module")
def results_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def daemon(fixture_engines: Path, tmp_path_factory: pytest.TempPathFactory, results_port: int):
    workdir = tmp_path_factory.mktemp("daemon")
    with running_daemon(fixture_engines, workdir, ["tiny-seg", "tiny-det"],
                        dicom=True, routes={"US": "tiny-seg", "DX": "tiny-det"},
                        results_port=results_port) as d:
        d.config = workdir / "medge.toml"  # running_daemon writes the daemon's config there
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


def test_bench_engine_imports_no_dicom_stack(fixture_engines: Path) -> None:
    """Engine mode on a GPU box must not need (or pay for) pydicom/pynetdicom: run it in a fresh interpreter."""
    code = (
        "import sys\n"
        "from edge.cli import main\n"
        f"rc = main(['bench', 'engine', '--model', 'tiny-seg', '--engines-dir', {str(fixture_engines)!r},\n"
        "           '--warmup-s', '0', '--iterations', '3', '--no-progress'])\n"
        "loaded = sorted(m for m in ('pydicom', 'pynetdicom', 'highdicom') if m in sys.modules)\n"
        "print('RC', rc, 'LOADED', ','.join(loaded) or '-')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(edge.__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RC 0 LOADED -" in out.stdout, out.stdout[-2000:]


def test_bench_engine_passes_cache_dir_device_and_the_daemons_max_batch(fixture_engines: Path, tmp_path: Path,
                                                                          capsys, monkeypatch) -> None:
    import edge.inference.model as model_mod

    seen: list[dict] = []
    real = model_mod.load_model

    def spy(name, **kwargs):
        seen.append(kwargs)
        return real(name, **kwargs)

    monkeypatch.setattr(model_mod, "load_model", spy)
    monkeypatch.delenv("MEDGE_CACHE_DIR", raising=False)
    base = ["bench", "engine", "--model", "tiny-seg", "--engines-dir", str(fixture_engines), "--warmup-s", "0",
            "--iterations", "3", "--no-progress"]
    assert main([*base, "--cache-dir", str(tmp_path / "plans"), "--device", "1", "--batch", "2"]) == 0
    assert seen[-1]["cache_dir"] == tmp_path / "plans" and seen[-1]["device_id"] == 1
    assert seen[-1]["max_batch"] == 4  # the daemon's default [scheduler] max_batch, so its plan is the one timed
    assert "engine cache: " + str(tmp_path / "plans") + " (from --cache-dir)" in capsys.readouterr().out
    cfg = tmp_path / "medge.toml"
    cfg.write_text(f"cache_dir = {json.dumps(str(tmp_path / 'daemon-plans'))}\n[scheduler]\nmax_batch = 6\n")
    assert main([*base, "--config", str(cfg), "--batch", "8"]) == 0
    assert seen[-1]["cache_dir"] == tmp_path / "daemon-plans" and seen[-1]["device_id"] == 0
    assert seen[-1]["max_batch"] == 8  # never below --batch
    assert main([*base, "--config", str(cfg)]) == 0
    assert seen[-1]["max_batch"] == 6
    assert f"(from --config {cfg}), max batch 6, CUDA device 0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*base, "--device", "-1"])


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
    # Every overhead carries its window-to-window noise and the label that follows from it.
    noise, verdict = step["overhead_noise_ms"], step["overhead_verdict"]
    assert noise["windows"] >= 4
    for key in ("vs_raw_infer", "vs_raw_pipeline"):
        for q in ("p50", "p99"):
            assert noise[key][q] is not None and noise[key][q] >= 0
            assert verdict[key][q] == overhead_verdict(step["overhead_ms"][key][q], noise[key][q])
            assert describe_overhead(step["overhead_ms"][key][q], noise[key][q], None, verdict[key][q]) in text
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
               "--plot", str(tmp_path / "d.png"), "--cv-warn", "0"])
    text = capsys.readouterr().out
    assert rc == 0, text
    s = json.loads(out.read_text())["summary"]
    assert s["stored"] == 3 and s["failed"] == 0
    assert s["instances_with_result"] == 3 and s["results_received"] >= 1
    _sane(s["store_ms"])
    _sane(s["store_to_result_ms"])
    _valid_png(tmp_path / "d.png")
    # Like the other modes: mean, p95 and CV in the table, and the CV warning (any spread exceeds 0 %).
    header = next(line for line in text.splitlines() if "median" in line).split()
    assert {"mean", "p95", "cv"} <= set(header)
    for what, key in (("C-STORE", "store_ms"), ("store-to-result", "store_to_result_ms")):
        assert s[key]["p95_ms"] <= s[key]["p99_ms"] and s[key]["cv"] > 0
        assert f"WARNING: {what} latency is unstable: coefficient of variation {s[key]['cv'] * 100:.1f}%" in text


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


# ------------------------------------------------------------------ judgements: stability, overhead noise
def test_stability_rule_and_overhead_labels() -> None:
    assert within_percentage([10.0, 10.9, 9.2], 10.0)
    assert not within_percentage([10.0, 12.0, 9.0], 10.0)  # 12 is 16 % above the mean 10.33
    assert not within_percentage([10.0, None, 10.0], 50.0)  # a window with no reply is never stable
    assert not within_percentage([0.0, 0.0, 0.0], 10.0)  # no throughput at all is not a stable measurement
    assert overhead_verdict(-0.01, 5.0) == overhead_verdict(-3.0, 0.1) == NEGATIVE_OVERHEAD
    assert overhead_verdict(0.2, 0.3) == WITHIN_NOISE
    assert overhead_verdict(0.4, 0.3) == ABOVE_NOISE
    assert overhead_verdict(0.4, None) == NOISE_UNKNOWN
    negative = describe_overhead(-0.7, 0.2, 2.0)
    assert "negative: measurement noise, not a speed-up" in negative and "target" not in negative
    assert "within noise" in describe_overhead(0.1, 0.2, 0.5) and "target" not in describe_overhead(0.1, 0.2, 0.5)
    assert describe_overhead(0.6, 0.1, 0.5).endswith("target <= 0.5 ms: NOT met")


def test_bench_zmq_stability_loop_stops_when_windows_agree(daemon, tmp_path: Path, capsys) -> None:
    """P = 1000 %: any three positive windows agree, so the loop must stop at exactly three."""
    out = tmp_path / "stable.json"
    rc = main(["bench", "zmq", "--config", str(daemon.config), "--model", "tiny-seg", "--frame", "96x96",
               "--warmup-s", "0", "--stability-percentage", "1000", "--measurement-interval-s", "0.3",
               "--stability-windows", "3", "--max-windows", "6", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc = json.loads(out.read_text())
    summ = doc["steps"][0]["summary"]
    st = summ["stability"]
    assert st["stable"] is True and st["windows"] == 3 and st["percentage"] == 1000
    assert [w["reported"] for w in st["per_window"]] == [True, True, True]
    assert all(w["p50_ms"] > 0 and w["fps"] > 0 for w in st["per_window"])
    assert summ["ok"] == len(doc["samples"]) > 3
    assert f"endpoint: {daemon.endpoint} (from --config {daemon.config})" in text
    assert "stable: the last 3 of 3 windows" in text


class _SlowingRouter(FakeRouter):
    """Answers each request 0.3 ms later than the one before: latency drifts up and never settles."""

    @property  # type: ignore[override]
    def delay_s(self) -> float:
        return 0.001 + 0.0003 * self.received

    @delay_s.setter
    def delay_s(self, value: float) -> None:  # FakeRouter.__init__ assigns it; the drift wins
        pass


def test_bench_zmq_stability_loop_gives_up_and_says_so(tmp_path: Path, capsys) -> None:
    out = tmp_path / "drift.json"
    with _SlowingRouter() as peer:
        rc = main(["bench", "zmq", "--endpoint", peer.endpoint, "--frame", "64x64", "--warmup-s", "0",
                   "--stability-percentage", "5", "--measurement-interval-s", "0.25", "--stability-windows", "3",
                   "--max-windows", "4", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text  # not stable is reported, not a failure
    doc = json.loads(out.read_text())
    summ = doc["steps"][0]["summary"]
    st = summ["stability"]
    assert st["stable"] is False and st["windows"] == 4
    p50s = [w["p50_ms"] for w in st["per_window"]]
    assert p50s == sorted(p50s) and p50s[-1] > 2 * p50s[0]  # the peer did drift
    assert [w["reported"] for w in st["per_window"]] == [False, True, True, True]
    first_seq = min(s["seq"] for s in doc["samples"])
    assert summ["ok"] == len(doc["samples"]) and first_seq == 0  # a fresh client per window: seq restarts
    assert "NOT stable within 5% after 4 windows" in text
    assert "  NO" in next(line for line in text.splitlines() if line.strip().startswith("0 "))


def test_bench_zmq_rejects_a_stability_it_could_never_judge(capsys) -> None:
    rc = main(["bench", "zmq", "--endpoint", "tcp://127.0.0.1:1", "--stability-percentage", "10",
               "--stability-windows", "5", "--max-windows", "3"])
    assert rc == 1
    assert "--max-windows 3 is below --stability-windows 5" in capsys.readouterr().err


# ------------------------------------------------------------------ endpoints: flag > MEDGE_* > --config > default
def test_endpoint_resolution_order(tmp_path: Path) -> None:
    cfg = tmp_path / "medge.toml"
    cfg.write_text('[zmq]\ningest = "tcp://*:7001"\n[dicom]\nport = 7104\nae_title = "SCANNER2"\n')
    none = resolve_client_endpoints(None, env={})
    assert (none.zmq_ingest.value, none.zmq_ingest.origin) == ("tcp://127.0.0.1:5555", "default")
    assert (none.dicom_port.value, none.dicom_port.origin) == (11112, "default")
    filed = resolve_client_endpoints(cfg, env={"MEDGE_SPOOL_DIR": "/not/read/by/clients"})
    assert filed.zmq_ingest.value == "tcp://127.0.0.1:7001"  # the daemon's wildcard bind, reached on loopback
    assert filed.zmq_ingest.origin == f"--config {cfg}"
    assert filed.dicom_line() == f"SCANNER2@127.0.0.1:7104 (host from default; port from --config {cfg}; " \
                                 f"AE title from --config {cfg})"
    env = {"MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:7002", "MEDGE_DICOM__PORT": "7105"}
    envd = resolve_client_endpoints(cfg, env=env)
    assert (envd.zmq_ingest.value, envd.zmq_ingest.origin) == ("tcp://127.0.0.1:7002", "MEDGE_ZMQ__INGEST")
    assert (envd.dicom_port.value, envd.dicom_port.origin) == (7105, "MEDGE_DICOM__PORT")
    assert envd.dicom_ae_title.value == "SCANNER2"
    flag = resolve_client_endpoints(cfg, env=env, endpoint="tcp://127.0.0.1:7003", port=7106)
    assert (flag.zmq_ingest.value, flag.zmq_ingest.origin) == ("tcp://127.0.0.1:7003", "--endpoint")
    assert (flag.dicom_port.value, flag.dicom_port.origin) == (7106, "--port")


def test_bench_dicom_config_env_and_flag(daemon, tmp_path: Path, capsys, monkeypatch) -> None:
    """--config reaches the daemon's SCP; MEDGE_DICOM__PORT overrides the file; --port overrides both."""
    def bench(*extra: str) -> tuple[int, str, str]:
        rc = main(["bench", "dicom", "--config", str(daemon.config), "--synthetic", "1", "--frame", "64x64",
                   "--timeout-s", "5", *extra])
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, out, _ = bench()
    assert rc == 0, out
    assert f"endpoint: MEDGE@127.0.0.1:{daemon.dicom_port} (host from default; port from --config" in out
    monkeypatch.setenv("MEDGE_DICOM__PORT", str(free_port()))
    rc, out, err = bench()
    assert rc == 3 and "port from MEDGE_DICOM__PORT" in out and "association" in err
    rc, out, _ = bench("--port", str(daemon.dicom_port))
    assert rc == 0 and "port from --port" in out


def test_bench_engine_takes_engines_dir_from_config_and_env(fixture_engines: Path, tmp_path: Path, capsys,
                                                            monkeypatch) -> None:
    cfg = tmp_path / "medge.toml"
    cfg.write_text(f"engines_dir = {json.dumps(str(fixture_engines))}\n")
    args = ["bench", "engine", "--model", "tiny-seg", "--warmup-s", "0", "--iterations", "3"]
    assert main([*args, "--config", str(cfg)]) == 0
    assert f"engines folder: {fixture_engines} (from --config {cfg})" in capsys.readouterr().out
    cfg.write_text(f"engines_dir = {json.dumps(str(tmp_path / 'elsewhere'))}\n")
    monkeypatch.setenv("MEDGE_ENGINES_DIR", str(fixture_engines))
    assert main([*args, "--config", str(cfg)]) == 0
    assert "(from MEDGE_ENGINES_DIR)" in capsys.readouterr().out


def test_bench_modules_share_helpers_without_an_import_cycle() -> None:
    """bench_dicom, endpoints, results and send never import edge.commands.bench or edge.tools.bench,
    nor any private name of another module."""
    root = Path(edge.__file__).parent
    bench = ("commands/bench", "tools/bench", "tools/bench_zmq")
    for name in (*bench, "tools/bench_dicom", "tools/endpoints", "tools/results", "commands/send", "tools/loadgen"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edge"):
                if name not in bench:
                    assert node.module not in ("edge.commands.bench", "edge.tools.bench"), \
                        f"edge/{name}.py imports {node.module}"
                    assert not (node.module in ("edge", "edge.commands", "edge.tools")
                                and any(a.name == "bench" for a in node.names))
                if name in ("tools/bench", "tools/bench_zmq"):
                    assert node.module != "edge.commands.bench", f"edge/{name}.py imports edge.commands.bench"
                if name == "tools/bench":  # bench_zmq imports the shared helpers from bench, never the reverse
                    assert node.module != "edge.tools.bench_zmq", "edge/tools/bench.py imports edge.tools.bench_zmq"
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"edge/{name}.py imports private {private} from {node.module}"
