"""Metrics and health: contract names, sub-millisecond buckets, promtool, probes."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge.health import HealthServer
from edge.metrics import LATENCY_BUCKETS_S, Metrics

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


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
    m.model_info.labels(model="us-lesion-seg", version="1", backend="onnxruntime", precision="int8").set(1)
    m.dicom_instances_received.labels(calling_ae="SCANNER1").inc()
    m.outbox_pending.labels(destination="pacs").set(2)
    m.outbox_sent.labels(destination="pacs").inc()
    m.outbox_failures.labels(destination="pacs").inc()
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


def test_each_metrics_instance_is_isolated() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    Metrics(a, process=False).frames_received.labels(source="zmq", model="m").inc()
    Metrics(b, process=False)
    assert b.get_sample_value("medge_frames_received_total", {"source": "zmq", "model": "m"}) is None


@pytest.mark.skipif(shutil.which(PROMTOOL) is None, reason="promtool not installed (Debian package prometheus)")
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
