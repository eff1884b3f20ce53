"""Metrics and health: contract names, buckets, build info, series at 0 from the start, promtool, probes."""

from __future__ import annotations

import ast
import logging
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

import edge
from edge import __version__
from edge.egress.zmq import ERROR_CODES
from edge.ops.boundary import ErrorBoundary
from edge.ops.health import HealthServer
from edge.ops.metrics import (
    DICOM_BUCKETS_S,
    DROP_REASONS,
    LATENCY_BUCKETS_S,
    MODEL_FAILURE_CODES,
    Metrics,
    REPLY_LOST_REASONS,
    STAGES,
    metrics_for,
    zeroed,
)
from edge.tools.daemon_process import free_port
from edge.tools.dicom_scu import send_paths
from tests.conftest import peer_path, wait_until
from tests.edge import dicom_factory as f
from tests.edge._daemon import running_daemon

PROMTOOL = peer_path("promtool") or "promtool"


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def _populated() -> CollectorRegistry:
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.frames_received.labels(source="zmq", model="us-lesion-seg").inc(3)
    m.frames_dropped.labels(model="us-lesion-seg", reason="stream_backlog").inc()
    m.requests_failed.labels(source="zmq", code="bad_shape").inc()
    m.observe_stages("us-lesion-seg", {"queue": 12, "preprocess": 340, "infer": 9100, "postprocess": 800, "egress": 40})
    m.end_to_end_seconds.labels(source="zmq", model="us-lesion-seg").observe(0.0105)
    m.batch_size.labels(model="us-lesion-seg").observe(1)
    m.queue_depth.labels(model="us-lesion-seg").set(0)
    m.model_info.labels(model="us-lesion-seg", version="1", backend="onnxruntime", precision="int8", fallback="").set(1)
    metrics_for(reg).dicom.instances_received.labels(calling_ae="SCANNER1").inc()
    outbox = metrics_for(reg).outbox
    outbox.pending.labels(destination="pacs").set(2)
    outbox.sent.labels(destination="pacs").inc()
    outbox.failures.labels(destination="pacs").inc()
    return reg


def test_contract_names_and_types() -> None:
    text = generate_latest(_populated()).decode()
    for name, kind in [
        ("medge_frames_received_total", "counter"),
        ("medge_frames_dropped_total", "counter"),
        ("medge_requests_failed_total", "counter"),
        ("medge_stage_seconds", "histogram"),
        ("medge_end_to_end_seconds", "histogram"),
        ("medge_batch_size", "histogram"),
        ("medge_queue_depth", "gauge"),
        ("medge_model_info", "gauge"),
        ("medge_dicom_instances_received_total", "counter"),
        ("medge_outbox_pending", "gauge"),
        ("medge_outbox_sent_total", "counter"),
        ("medge_outbox_failures_total", "counter"),
    ]:
        base = name.removesuffix("_total")
        assert re.search(rf"^# TYPE {base}(_total)? {kind}$", text, re.M), name
        sample = f"{name}_count" if kind == "histogram" else name
        assert re.search(rf"^{sample}(\{{| )", text, re.M), name
    assert "process_resident_memory_bytes" in text
    assert 'medge_stage_seconds_bucket{le="0.0001",model="us-lesion-seg",stage="preprocess"}' in text


def test_histograms_resolve_sub_millisecond_stages() -> None:
    sub_ms = [b for b in LATENCY_BUCKETS_S if b < 0.001]
    assert len(sub_ms) >= 5 and min(LATENCY_BUCKETS_S) <= 0.00005 and max(LATENCY_BUCKETS_S) >= 5
    reg = CollectorRegistry()
    Metrics(reg, process=False).stage_seconds.labels(model="m", stage="queue").observe(0.00007)
    assert reg.get_sample_value("medge_stage_seconds_bucket", {"model": "m", "stage": "queue", "le": "0.0001"}) == 1
    assert reg.get_sample_value("medge_stage_seconds_bucket", {"model": "m", "stage": "queue", "le": "5e-05"}) == 0


def test_latency_buckets_resolve_1_to_100_ms() -> None:
    for bounds in (LATENCY_BUCKETS_S, DICOM_BUCKETS_S):
        assert list(bounds) == sorted(set(bounds))
    assert 0.001 in LATENCY_BUCKETS_S and 0.1 in LATENCY_BUCKETS_S
    window = [b for b in LATENCY_BUCKETS_S if 0.001 <= b <= 0.1]
    steps = [hi / lo for lo, hi in zip(window, window[1:])]
    assert len(window) >= 15 and max(steps) <= 1.5, steps
    # a DICOM result waits series_idle_s (10 s by default) and possibly a PACS that is down
    assert DICOM_BUCKETS_S[0] <= 0.5 and 10.0 in DICOM_BUCKETS_S and DICOM_BUCKETS_S[-1] >= 3600


def test_build_info_is_one_series_of_software_versions() -> None:
    reg = CollectorRegistry()
    Metrics(reg, process=False, gpu=False)
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    (sample,) = fams["medge_build_info"].samples
    assert sample.value == 1
    assert sample.labels["version"] == __version__
    assert re.fullmatch(r"3\.\d+\.\d+", sample.labels["python"])
    assert re.fullmatch(r"\d+\.\d+.*", sample.labels["onnxruntime"])
    assert set(sample.labels) == {"version", "python", "onnxruntime", "tensorrt", "pyzmq", "pydicom", "pynetdicom"}
    host = socket.gethostname()
    assert all(host not in v for v in sample.labels.values())


def test_store_to_result_histogram_is_shared_and_created_at_zero_per_destination() -> None:
    reg = CollectorRegistry()
    Metrics(reg, process=False, gpu=False)
    metrics_for(reg).outbox.declare_destinations(["pacs", "archive"])
    h = metrics_for(reg).outbox.store_to_result
    assert h is metrics_for(reg).outbox.store_to_result
    for dest in ("pacs", "archive"):
        assert reg.get_sample_value("medge_dicom_store_to_result_seconds_count", {"destination": dest}) == 0
    h.labels(destination="pacs").observe(11.0)  # a series wait of 10 s plus delivery
    le = {"destination": "pacs", "le": "10.0"}
    assert reg.get_sample_value("medge_dicom_store_to_result_seconds_bucket", le) == 0
    assert reg.get_sample_value("medge_dicom_store_to_result_seconds_bucket", {**le, "le": "12.5"}) == 1


def test_zeroed_creates_zero_values_once() -> None:
    reg = CollectorRegistry()
    a = zeroed(Counter("medge_things_total", "Things.", ["reason"], registry=reg), ["x", "y"])
    a.labels(reason="x").inc(2)
    b = zeroed(a, ["x", "y", "z"])
    assert b is a
    got = {r: reg.get_sample_value("medge_things_total", {"reason": r}) for r in ("x", "y", "z")}
    assert got == {"x": 2, "y": 0, "z": 0}


def test_components_on_one_registry_share_its_families_and_fresh_registries_get_their_own() -> None:
    reg, other = CollectorRegistry(), CollectorRegistry()
    log = logging.getLogger("tests.metrics")
    a, b = ErrorBoundary("one", log, reg), ErrorBoundary("two", log, reg)  # registered once, shared
    ErrorBoundary("one", log, other)
    a.report(ValueError("x"))
    b.report(ValueError("x"))
    b.report(ValueError("x"))
    assert reg.get_sample_value("medge_internal_errors_total", {"component": "one"}) == 1
    assert reg.get_sample_value("medge_internal_errors_total", {"component": "two"}) == 2
    assert other.get_sample_value("medge_internal_errors_total", {"component": "one"}) == 0
    # a group is registered on first use only: an error boundary alone brings no DICOM families
    assert reg.get_sample_value("medge_dicom_spool_instances") is None
    assert metrics_for(reg).dicom is metrics_for(reg).dicom
    assert reg.get_sample_value("medge_dicom_spool_instances") == 0
    assert metrics_for(reg).dicom is not metrics_for(other).dicom


#: what a CollectorRegistry keeps to itself (``_names_to_collectors``, ``_collector_to_names``, ...)
_REGISTRY_PRIVATES = frozenset(n for n in dir(CollectorRegistry()) if n.startswith("_") and not n.startswith("__"))


def _private_registry_uses(source: str, filename: str) -> list[str]:
    """``file:line`` of each use of a CollectorRegistry's private attribute (``x._names_to_collectors``, ...).

    ``_lock`` is a common name: it counts only on something named like a
    registry (``registry._lock``, ``self._registry._lock``).
    """
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute):
            name, owner = node.attr, node.value
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "setattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
            name, owner = str(node.args[1].value), node.args[0]
        else:
            continue
        if name not in _REGISTRY_PRIVATES:
            continue
        owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        if name != "_lock" or "registry" in owner_name.lower():
            found.append(f"{filename}:{node.lineno}: {owner_name}.{name}")
    return found


def test_no_edge_module_reads_private_registry_attributes() -> None:
    # the checker itself catches what get_or_create_metric used to do, and leaves other objects' privates alone
    assert "_names_to_collectors" in _REGISTRY_PRIVATES
    assert _private_registry_uses("m = registry._names_to_collectors.get(k)", "x.py") == [
        "x.py:1: registry._names_to_collectors"]
    assert _private_registry_uses("m = getattr(reg, '_collector_to_names')", "x.py") == [
        "x.py:1: reg._collector_to_names"]
    assert _private_registry_uses("m = self.registry._lock", "x.py") == ["x.py:1: registry._lock"]
    assert _private_registry_uses("m = self._lock; n = models._items", "x.py") == []
    root = Path(edge.__file__).parent
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        found += _private_registry_uses(path.read_text(encoding="utf-8"), str(path.relative_to(root.parent)))
    assert found == []


METRICS_HELP = Path(__file__).parent / "data" / "metrics_help.txt"


def _help_snapshot(metrics_text: str) -> list[str]:
    """The ``medge_*`` families of a scrape: HELP and TYPE lines, and each series without its value.

    Histograms by their ``_count`` series (their buckets and ``_sum`` follow
    it); ``_created`` mirrors ``_total``; ``medge_build_info``'s label values
    are versions (masked); ``medge_gpu_*`` exists only where NVML does.
    """
    lines = {raw for raw in metrics_text.splitlines()
             if raw.startswith(("# HELP medge_", "# TYPE medge_")) and not raw.split()[2].startswith("medge_gpu_")}
    for fam in text_string_to_metric_families(metrics_text):
        if not fam.name.startswith("medge_") or fam.name.startswith("medge_gpu_"):
            continue
        for sample in fam.samples:
            if sample.name.endswith(("_bucket", "_created", "_sum")):
                continue
            labels = {k: "*" for k in sample.labels} if fam.name == "medge_build_info" else sample.labels
            lines.add(sample.name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}")
    return sorted(lines)


def _zero_series(metrics_text: str) -> dict[str, dict[frozenset, float]]:
    """``{sample name: {frozenset(labels.items()): value}}`` of a scrape."""
    out: dict[str, dict[frozenset, float]] = {}
    for fam in text_string_to_metric_families(metrics_text):
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def _value(series: dict[str, dict[frozenset, float]], name: str, **labels: str) -> float | None:
    return series.get(name, {}).get(frozenset(labels.items()))


@pytest.fixture(scope="module")
def fresh_exposition(fixture_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One scrape of a daemon that has seen no traffic: two models, ZeroMQ, DICOM with one destination."""
    with running_daemon(fixture_engines, tmp_path_factory.mktemp("fresh"), ["tiny-seg", "tiny-det"], dicom=True,
                        routes={"US": "tiny-seg"}, results_port=free_port()) as d:
        with urllib.request.urlopen(d.metrics_url, timeout=5) as resp:
            return resp.read().decode()


@pytest.fixture(scope="module")
def fresh_scrape(fresh_exposition: str) -> dict[str, dict[frozenset, float]]:
    """:func:`fresh_exposition` as ``{sample name: {labels: value}}``."""
    return _zero_series(fresh_exposition)


def test_names_types_help_and_series_at_start_are_the_ones_operators_saw(fresh_exposition: str) -> None:
    # tests/edge/data/metrics_help.txt was scraped from the daemon before its metrics moved into
    # edge/ops/metrics.py (commit a20ed96, same config as fresh_exposition): a changed help
    # string, type, label or series created at 0 shows here as a diff
    expected = METRICS_HELP.read_text(encoding="utf-8").splitlines()
    got = _help_snapshot(fresh_exposition)
    assert [x for x in expected if x not in got] == [] and [x for x in got if x not in expected] == []
    assert len(expected) > 150 and "# HELP medge_outbox_pending Results waiting in the outbox, by destination." in got


MODELS = ("tiny-seg", "tiny-det")


def test_a_fresh_daemon_exposes_every_zmq_and_model_series_at_zero(fresh_scrape) -> None:
    s = fresh_scrape
    expected: list[tuple[str, dict[str, str]]] = []
    for model in MODELS:
        expected.append(("medge_frames_received_total", {"source": "zmq", "model": model}))
        expected.append(("medge_end_to_end_seconds_count", {"source": "zmq", "model": model}))
        expected.append(("medge_end_to_end_seconds_bucket", {"source": "zmq", "model": model, "le": "0.01"}))
        expected += [("medge_frames_dropped_total", {"model": model, "reason": r}) for r in DROP_REASONS]
        expected += [("medge_stage_seconds_count", {"model": model, "stage": st}) for st in STAGES]
        expected.append(("medge_batch_size_count", {"model": model}))
        expected.append(("medge_queue_depth", {"model": model}))
    expected += [("medge_requests_failed_total", {"source": "zmq", "code": c}) for c in ERROR_CODES]
    expected += [("medge_replies_lost_total", {"reason": r}) for r in REPLY_LOST_REASONS]
    missing = [(n, lab) for n, lab in expected if _value(s, n, **lab) is None]
    assert missing == []
    assert {(n, str(lab)): _value(s, n, **lab) for n, lab in expected} == {(n, str(lab)): 0.0 for n, lab in expected}
    components = {dict(k)["component"] for k in s["medge_internal_errors_total"]}
    assert components >= {"scheduler", "zmq_io", "zmq_reply", "dicom_scp", "dicom_pipeline", "outbox", "http"}
    assert set(s["medge_internal_errors_total"].values()) == {0.0}
    (build,) = s["medge_build_info"].items()
    assert build[1] == 1 and dict(build[0])["version"] == __version__


def test_a_fresh_daemon_exposes_every_dicom_series_at_zero(fresh_scrape) -> None:
    s = fresh_scrape
    expected: list[tuple[str, dict[str, str]]] = []
    for model in MODELS:
        expected.append(("medge_frames_received_total", {"source": "dicom", "model": model}))
        expected.append(("medge_end_to_end_seconds_count", {"source": "dicom", "model": model}))
    expected += [("medge_requests_failed_total", {"source": "dicom", "code": c}) for c in MODEL_FAILURE_CODES]
    for name in ("medge_outbox_sent_total", "medge_outbox_failures_total", "medge_outbox_dead_letter_total",
                 "medge_dicom_store_to_result_seconds_count"):
        expected.append((name, {"destination": "demo-pacs"}))
    expected.append(("medge_dicom_instances_received_total", {"calling_ae": "other"}))
    missing = [(n, lab) for n, lab in expected if _value(s, n, **lab) is None]
    assert missing == []
    assert {(n, str(lab)): _value(s, n, **lab) for n, lab in expected} == {(n, str(lab)): 0.0 for n, lab in expected}
    assert set(s["medge_dicom_processing_failures_total"].values()) == {0.0}
    assert len(s["medge_dicom_processing_failures_total"]) >= 5


@pytest.mark.peer("storescp")
def test_store_to_result_covers_the_series_wait_and_the_delivery_to_the_pacs(fixture_engines: Path, tmp_path: Path) -> None:
    port, received = free_port(), tmp_path / "pacs"
    received.mkdir()
    pacs = subprocess.Popen([peer_path("storescp") or "storescp", "-od", str(received), "-aet", "MEDGEPACS", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, what="storescp to listen")
        image = np.zeros((64, 64), np.uint8)
        image[16:40, 20:44] = 200
        src = f.save(f.make_us_single(image), tmp_path / "in" / "us.dcm")
        with running_daemon(fixture_engines, tmp_path / "d", ["tiny-seg"], dicom=True, routes={"US": "tiny-seg"},
                            results_port=port) as d:

            def scrape() -> dict[str, dict[frozenset, float]]:
                with urllib.request.urlopen(d.metrics_url, timeout=5) as resp:
                    return _zero_series(resp.read().decode())

            t0 = time.time()
            assert send_paths([src], port=d.dicom_port).sent == 1
            wait_until(lambda: _value(scrape(), "medge_outbox_sent_total", destination="demo-pacs") == 1,
                       timeout_s=60, what="the result to reach the PACS")
            elapsed = time.time() - t0
            s = scrape()
    finally:
        pacs.terminate()
        pacs.wait(10)
    assert _value(s, "medge_dicom_store_to_result_seconds_count", destination="demo-pacs") == 1  # observed when sent
    total = _value(s, "medge_dicom_store_to_result_seconds_sum", destination="demo-pacs")
    frame = _value(s, "medge_end_to_end_seconds_sum", source="dicom", model="tiny-seg")
    assert total is not None and frame is not None
    # the demo config's series_idle_s is 1 s: the series wait is inside, and so is the frame's inference
    assert 1.0 <= total <= elapsed
    assert frame < total - 1.0
    assert any(received.iterdir())


def test_each_metrics_instance_is_isolated() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    Metrics(a, process=False).frames_received.labels(source="zmq", model="m").inc()
    Metrics(b, process=False)
    assert b.get_sample_value("medge_frames_received_total", {"source": "zmq", "model": "m"}) is None


@pytest.mark.peer("promtool")
def test_promtool_accepts_the_exposition_over_http() -> None:
    ready = {"v": False}
    with HealthServer("127.0.0.1", 0, _populated(), ready=lambda: ready["v"]) as srv:
        status, body, ctype = _get(srv.url + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        res = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert res.returncode == 0, (res.stdout + res.stderr).decode()


def test_health_and_readiness_probes() -> None:
    ready = {"v": False}
    with HealthServer("127.0.0.1", 0, CollectorRegistry(), ready=lambda: ready["v"]) as srv:
        assert _get(srv.url + "/healthz")[0] == 200
        assert _get(srv.url + "/readyz")[0] == 503
        ready["v"] = True
        assert _get(srv.url + "/readyz")[:2] == (200, b"ready\n")
        assert _get(srv.url + "/nope")[0] == 404
