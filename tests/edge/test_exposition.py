"""``/metrics`` through prometheus_client's exposition: Prometheus text by default, OpenMetrics when the
scraper asks for it (``Accept``), gzip when it accepts it (``Accept-Encoding``); basic auth and the error
boundary still come first."""

from __future__ import annotations

import base64
import gzip
import http.client
from pathlib import Path
from typing import Iterator

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from edge.ops import health
from edge.ops.health import HealthServer
from tests.edge._prometheus import PrometheusServer

OPENMETRICS = "application/openmetrics-text"
# The Accept header Prometheus 2.x scrapes with: OpenMetrics preferred, the text format as a fallback.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def _registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Counter("medge_test_events", "A test counter.", ["kind"], registry=reg).labels(kind="a").inc(7)
    Gauge("medge_test_depth", "A test gauge.", registry=reg).set(3)
    return reg


def _get(port: int, headers: dict[str, str], path: str = "/metrics") -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        # skip_accept_encoding: http.client would otherwise add "Accept-Encoding: identity".
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        assert int(resp.headers["Content-Length"]) == len(body)
        return resp.status, body, {k.lower(): v for k, v in resp.headers.items()}
    finally:
        conn.close()


def _samples(families) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in families for s in fam.samples}


def test_plain_text_by_default() -> None:
    reg = _registry()
    with HealthServer("127.0.0.1", 0, reg, ready=lambda: True) as srv:
        for headers in ({}, {"Accept": "text/plain"}, {"Accept": "*/*"}):
            status, body, got = _get(srv.port, headers)
            assert status == 200, headers
            assert got["content-type"].startswith("text/plain; version=0.0.4"), headers
            assert "content-encoding" not in got, headers
            assert not body.rstrip().endswith(b"# EOF"), headers
            text = body.decode()
            assert text == generate_latest(reg).decode(), headers
            samples = _samples(parse_text(text))
            assert samples[("medge_test_events_total", (("kind", "a"),))] == 7.0
            assert samples[("medge_test_depth", ())] == 3.0


@pytest.mark.parametrize("accept", [OPENMETRICS, f"{OPENMETRICS}; version=1.0.0", PROMETHEUS_ACCEPT])
def test_openmetrics_when_the_scraper_asks_for_it(accept: str) -> None:
    with HealthServer("127.0.0.1", 0, _registry(), ready=lambda: True) as srv:
        status, body, got = _get(srv.port, {"Accept": accept})
    assert status == 200
    assert got["content-type"].startswith("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert body.endswith(b"# EOF\n")
    samples = _samples(parse_openmetrics(body.decode()))  # the strict parser: fails on any OpenMetrics error
    assert samples[("medge_test_events_total", (("kind", "a"),))] == 7.0
    assert samples[("medge_test_depth", ())] == 3.0
    # The server's own counter of handler failures is exposed too, at 0.
    assert samples[("medge_internal_errors_total", (("component", "http"),))] == 0.0


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
def test_gzip_when_the_scraper_accepts_it(accept: str) -> None:
    with HealthServer("127.0.0.1", 0, _registry(), ready=lambda: True) as srv:
        plain = _get(srv.port, {"Accept": accept} if accept else {})
        for encoding in ("gzip", "gzip, deflate", "deflate;q=1.0, GZIP;q=0.5"):
            headers = {"Accept-Encoding": encoding, **({"Accept": accept} if accept else {})}
            status, body, got = _get(srv.port, headers)
            assert status == 200 and got["content-encoding"] == "gzip", encoding
            assert body[:2] == b"\x1f\x8b"  # the gzip magic number
            assert got["content-type"] == plain[2]["content-type"]
            assert gzip.decompress(body) == plain[1], encoding
        # An encoding other than gzip gets the identity body.
        status, body, got = _get(srv.port, {"Accept-Encoding": "br, deflate", **({"Accept": accept} if accept else {})})
        assert status == 200 and "content-encoding" not in got and body == plain[1]


def test_probes_are_never_negotiated() -> None:
    headers = {"Accept": OPENMETRICS, "Accept-Encoding": "gzip"}
    with HealthServer("127.0.0.1", 0, _registry(), ready=lambda: False) as srv:
        assert _get(srv.port, headers, "/healthz")[:2] == (200, b"ok\n")
        status, body, got = _get(srv.port, headers, "/readyz")
    assert status == 503 and body == b"not ready\n" and "content-encoding" not in got
    assert got["content-type"] == "text/plain; charset=utf-8"


def test_basic_auth_comes_before_negotiation(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(b"secret words", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "htpasswd").write_text(f"prom:{hashed}\n")
    good = "Basic " + base64.b64encode(b"prom:secret words").decode()
    headers = {"Accept": OPENMETRICS, "Accept-Encoding": "gzip"}
    with HealthServer("127.0.0.1", 0, _registry(), ready=lambda: True,
                      basic_auth_file=str(tmp_path / "htpasswd")) as srv:
        status, body, got = _get(srv.port, headers)
        assert status == 401 and body == b"unauthorized\n" and "content-encoding" not in got
        status, body, got = _get(srv.port, {**headers, "Authorization": good})
    assert status == 200 and got["content-encoding"] == "gzip"
    assert gzip.decompress(body).endswith(b"# EOF\n")


def test_a_failing_collector_still_answers_500_under_negotiation() -> None:
    class _FailsOnce:
        failed = False

        def collect(self) -> Iterator[GaugeMetricFamily]:
            if not self.failed:
                self.failed = True
                raise RuntimeError("collector broke")
            yield GaugeMetricFamily("medge_test_value", "A test gauge.", value=1)

    reg = CollectorRegistry()
    reg.register(_FailsOnce())  # type: ignore[arg-type]
    headers = {"Accept": OPENMETRICS, "Accept-Encoding": "gzip"}
    with HealthServer("127.0.0.1", 0, reg, ready=lambda: True) as srv:
        status, body, got = _get(srv.port, headers)
        assert status == 500 and body.startswith(b"internal error") and "content-encoding" not in got
        status, body, got = _get(srv.port, headers)
    assert status == 200 and got["content-encoding"] == "gzip"
    samples = _samples(parse_openmetrics(gzip.decompress(body).decode()))
    assert samples[("medge_test_value", ())] == 1.0
    assert samples[("medge_internal_errors_total", (("component", "http"),))] == 1.0


@pytest.mark.peer("prometheus", "promtool")
def test_a_real_prometheus_negotiates_openmetrics_and_gzip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What the server chose for each scrape, recorded around the two exposition functions it calls.
    formats: list[str] = []
    gzipped: list[bool] = []
    choose, accepted = health.choose_encoder, health.gzip_accepted

    def recording_choose(accept: str):  # type: ignore[no-untyped-def]
        encoder, ctype = choose(accept)
        formats.append(ctype)
        return encoder, ctype

    def recording_accepted(accept_encoding: str) -> bool:
        gzipped.append(accepted(accept_encoding))
        return gzipped[-1]

    monkeypatch.setattr(health, "choose_encoder", recording_choose)
    monkeypatch.setattr(health, "gzip_accepted", recording_accepted)
    with HealthServer("127.0.0.1", 0, _registry(), ready=lambda: True) as srv:
        config = (
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            f"scrape_configs:\n  - job_name: medge\n    static_configs:\n      - targets: ['127.0.0.1:{srv.port}']\n"
        )
        with PrometheusServer(config, tmp_path / "prometheus") as prom:
            prom.wait_for(lambda: prom.query("medge_test_events_total") != [], what="a first scrape")
            events = prom.query("medge_test_events_total")
            depth = prom.query("medge_test_depth")
            up = prom.query('up{job="medge"}')
    assert [(r["metric"]["kind"], float(r["value"][1])) for r in events] == [("a", 7.0)]
    assert [float(r["value"][1]) for r in depth] == [3.0]
    assert [float(r["value"][1]) for r in up] == [1.0]
    assert formats and all(ctype.startswith("application/openmetrics-text") for ctype in formats), formats
    assert gzipped and all(gzipped), gzipped
