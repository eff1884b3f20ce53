"""The shipped Prometheus rules and Grafana dashboard, and a real Prometheus scraping a live daemon.

* ``ops/prometheus/medge.rules.yml`` passes ``promtool check rules`` and its
  unit tests (``medge.rules.test.yml``, ``promtool test rules``), which test
  every alert both firing and quiet.
* Every query of ``ops/grafana/medge.json`` is valid PromQL and names only
  metrics that a live daemon (DICOM on) exposes, or that the NVML collector
  defines.
* Debian's ``prometheus`` scrapes a live daemon every 0.5 s while a client
  streams a first burst with drops and refusals; ``increase()`` of drops and
  failures through the HTTP API equals what the client was told, exactly.
"""

from __future__ import annotations

import collections
import json
import math
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from edge.ops.nvml import NvmlCollector
from edge.tools.daemon_process import free_port
from edge.tools.zmq_client import ZmqClient
from tests.conftest import peer_path
from tests.edge._daemon import running_daemon
from tests.edge._prometheus import PrometheusServer

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "prometheus" / "medge.rules.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "medge.rules.test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "medge.json"

PROMTOOL = peer_path("promtool") or "promtool"
needs_promtool = pytest.mark.peer("promtool")
needs_prometheus = pytest.mark.peer("prometheus", "promtool")

#: a metric name in a PromQL expression; a recording rule's ``level:name:op`` is not one
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])((?:medge|process)_[A-Za-z0-9_]+)\b(?!\s*[=!]~?)")


# ------------------------------------------------------------------------------------------ rules
@needs_promtool
def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    unit = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def _alert_cases() -> dict[str, set[str]]:
    """For each alert name in the unit tests: ``firing`` and/or ``quiet`` (an empty ``exp_alerts``)."""
    cases: dict[str, set[str]] = collections.defaultdict(set)
    name = ""
    for line in RULE_TESTS.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*alertname:\s*(\w+)\s*$", line)
        if m:
            name = m.group(1)
            continue
        m = re.match(r"\s*exp_alerts:\s*(\[\])?\s*$", line)
        if m and name:
            cases[name].add("quiet" if m.group(1) else "firing")
            name = ""
    return cases


def test_every_shipped_alert_is_unit_tested_firing_and_quiet() -> None:
    alerts = re.findall(r"^\s*- alert:\s*(\w+)\s*$", RULES.read_text(encoding="utf-8"), re.M)
    assert len(alerts) >= 8 and len(set(alerts)) == len(alerts)
    for wanted in ("MedgeNotReady", "MedgeFramesDropped", "MedgeRequestsFailing", "MedgeLatencyP99OverBudget",
                   "MedgeOutboxBacklog", "MedgeOutboxOldestResultAge", "MedgeGpuHot"):
        assert wanted in alerts
    cases = _alert_cases()
    assert {a: cases.get(a, set()) for a in alerts} == {a: {"firing", "quiet"} for a in alerts}


# -------------------------------------------------------------------------------------- dashboard
def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [v for k, v in _walk(dash["panels"]) if k == "expr"]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if var["type"] == "query":
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def _as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, so promtool can parse it."""
    m = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr.strip())
    if m:  # a variable query: its series selector is PromQL
        expr = m.group(1)
    return expr.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$model", ".*")


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    kinds = {p["type"] for p in dash["panels"]}
    assert {"timeseries", "heatmap", "stat"} <= kinds
    text = "\n".join(dashboard_queries())
    for needle in ("histogram_quantile(0.5, sum by (le, source, model) (rate(medge_end_to_end_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le, source, model) (rate(medge_end_to_end_seconds_bucket",
                   "medge_frames_received_total", "medge_frames_dropped_total", "medge_requests_failed_total",
                   "medge_outbox_pending", "medge_outbox_oldest_age_seconds", "medge_gpu_temperature_celsius",
                   "medge_ready", "medge_dicom_store_to_result_seconds_bucket"):
        assert needle in text, needle
    heatmap = next(p for p in dash["panels"] if p["type"] == "heatmap")
    assert heatmap["targets"][0]["format"] == "heatmap" and "_bucket" in heatmap["targets"][0]["expr"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 25
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, q in enumerate(queries):
        lines += [f"      - record: dashboard_query_{i}", f"        expr: {json.dumps(_as_promql(q))}"]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def exposed_names(exposition: str) -> set[str]:
    """Every name a query may use for the families of a Prometheus text exposition.

    Families without a sample yet (a histogram no destination has observed)
    count: their ``# TYPE`` line is there. A histogram ``h`` is queried as
    ``h_bucket``, ``h_sum`` and ``h_count``.
    """
    names: set[str] = set()
    for line in exposition.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)$", line)
        if m:
            names.add(m.group(1))
            if m.group(2) == "histogram":
                names.update(m.group(1) + s for s in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))  # type: ignore[union-attr]
    return names


def test_exposed_names_strip_nothing_a_query_cannot_use() -> None:
    text = "# TYPE a_seconds histogram\n# TYPE b_total counter\nb_total 0.0\n# TYPE c gauge\n"
    assert exposed_names(text) == {"a_seconds", "a_seconds_bucket", "a_seconds_sum", "a_seconds_count", "b_total", "c"}
    assert _METRIC.findall('sum by (le) (rate(medge_x_bucket{instance=~"$instance"}[5m])) / medge_y') == [
        "medge_x_bucket", "medge_y"]
    assert _METRIC.findall("source_model:medge_end_to_end_seconds:p99_5m > 0.1") == []


@pytest.fixture(scope="module")
def dicom_daemon_metrics(fixture_engines: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The /metrics text of a fresh daemon with both models, DICOM on and one destination."""
    with running_daemon(fixture_engines, tmp_path_factory.mktemp("daemon"), ["tiny-seg", "tiny-det"], dicom=True,
                        routes={"US": "tiny-seg"}, results_port=free_port()) as d:
        with urllib.request.urlopen(d.metrics_url, timeout=5) as resp:
            return resp.read().decode()


def test_every_dashboard_query_names_a_metric_the_daemon_exposes(dicom_daemon_metrics: str) -> None:
    live = exposed_names(dicom_daemon_metrics) | set(NvmlCollector.METRIC_NAMES)  # no GPU here: NVML's names from code
    used = {name for q in dashboard_queries() for name in _METRIC.findall(q)}
    assert len(used) >= 25
    assert sorted(used - live) == []


# ------------------------------------------------------------------------------ real Prometheus
def _scalar(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def _stream_burst(endpoint: str) -> tuple[collections.Counter, int]:
    """The first traffic of a fresh daemon: drops, refusals; returns (what the client was told, replies)."""
    rng = np.random.default_rng(11)
    big = rng.integers(0, 256, size=(1024, 1024), dtype=np.uint8)
    small = rng.integers(0, 256, size=(64, 64), dtype=np.uint8)
    sent = 0
    with ZmqClient(endpoint) as client:
        assert client.wait_connected(10)
        for i in range(120):  # one live stream far faster than the model: newest wins, the rest are dropped
            client.send(big, req_id=f"live-{i}", model="tiny-seg", stream="probe-1", want=["boxes"])
            sent += 1
        for i in range(5):
            client.send(small, req_id=f"unknown-{i}", model="no-such-model", stream="probe-2")
            sent += 1
        for i in range(4):
            client.socket.send_multipart([b'{"v": 1, "id": "bad', b""])  # not JSON
            sent += 1
        for i in range(3):
            for s in range(40):  # many streams at once: the queue may fill up (overloaded)
                client.send(big, req_id=f"many-{s}-{i}", model="tiny-seg", stream=f"cart-{s}", want=["boxes"])
                sent += 1
        told: collections.Counter = collections.Counter()
        deadline = time.monotonic() + 60
        replies = 0
        while replies < sent:
            rep = client.recv(max(0.0, deadline - time.monotonic()))
            assert rep is not None, f"only {replies} of {sent} replies within 60 s: {told}"
            replies += 1
            told[rep.error_code or rep.status] += 1
    return told, sent


@needs_prometheus
def test_prometheus_sees_every_drop_and_refusal_of_the_first_burst(fixture_engines: Path, tmp_path: Path) -> None:
    with running_daemon(fixture_engines, tmp_path / "daemon", ["tiny-seg"]) as d:
        target = d.metrics_url.split("/")[2]
        config = "\n".join([
            "global:",
            "  scrape_interval: 500ms",
            "  scrape_timeout: 500ms",
            "scrape_configs:",
            "  - job_name: medge",
            "    static_configs:",
            f"      - targets: ['{target}']",
        ]) + "\n"
        with PrometheusServer(config, tmp_path / "prometheus") as prom:
            # the counters exist at 0 before any traffic, and Prometheus has a sample of that
            prom.wait_for(lambda: len(prom.query('medge_frames_dropped_total{model="tiny-seg"}')) == 2,
                          what="a first scrape holding the drop counters at 0")
            assert _scalar(prom.query("sum(medge_frames_dropped_total) + sum(medge_requests_failed_total)")) == 0
            t_before = _scalar(prom.query('timestamp(medge_frames_received_total{source="zmq"})'))

            told, sent = _stream_burst(d.endpoint)
            t_told = time.time()
            assert told["dropped"] > 0 and told["ok"] > 0, told
            assert told["unknown_model"] == 5 and told["bad_header"] == 4, told

            def last_scrape() -> float:
                return _scalar(prom.query('timestamp(medge_frames_received_total{source="zmq"})'))

            prom.wait_for(lambda: last_scrape() > t_told + 0.1, what="a scrape after the burst")
            t_last = last_scrape()
            # evaluated at the last scrape, over a window that starts before the burst: the first
            # sample in it is the 0, so increase() neither misses nor extrapolates anything
            window = f"{math.ceil(t_last - t_before) + 2}s"
            dropped = _scalar(prom.query(f"sum(increase(medge_frames_dropped_total[{window}]))", at=t_last))
            failed = {
                r["metric"]["code"]: float(r["value"][1])
                for r in prom.query(f"sum by (code) (increase(medge_requests_failed_total[{window}]))", at=t_last)
            }
            accepted = _scalar(prom.query(f"sum(increase(medge_frames_received_total[{window}]))", at=t_last))
            answered = _scalar(prom.query(f"sum(increase(medge_end_to_end_seconds_count[{window}]))", at=t_last))

    errors = {code: n for code, n in told.items() if code not in ("ok", "dropped")}
    assert dropped == told["dropped"]
    assert {c: n for c, n in failed.items() if n} == errors
    assert set(failed) >= {"bad_header", "unknown_model", "overloaded", "internal"}  # every code at 0 from the start
    assert accepted == told["ok"] + told["dropped"]
    assert answered == told["ok"]
    assert sum(told.values()) == sent
