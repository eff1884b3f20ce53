"""/readyz tells the truth: a serving loop that died makes the daemon not ready.

Before, readiness was set once at start-up and never cleared: a dead model
worker or a dead ZeroMQ I/O loop left ``/readyz`` at 200 while every request
went unanswered. Here a worker thread is really killed (a BaseException,
which no error boundary may swallow, escapes the model) and the HTTP probe
must turn 503.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq

from edge.config import load_config
from edge.serve import Daemon


class _KillWorker(BaseException):
    """Escapes every ``except Exception`` boundary: the worker thread dies."""


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.fixture
def daemon(fixture_engines: Path) -> Iterator[Daemon]:
    env = {
        "MEDGE_ENGINES_DIR": str(fixture_engines),
        "MEDGE_ZMQ__INGEST": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__PUBLISH": "tcp://127.0.0.1:*",
        "MEDGE_ZMQ__DEFAULT_MODEL": "tiny-seg",
        "MEDGE_METRICS__PORT": "0",
        "MEDGE_DICOM__ENABLED": "false",
    }
    with Daemon(load_config(None, env=env)) as d:
        yield d


def test_dead_worker_makes_readyz_503(daemon: Daemon) -> None:
    assert daemon.health is not None
    url = f"{daemon.health.url}/readyz"
    assert _status(url) == 200
    model = next(m for m in daemon.models if m.name == "tiny-seg")
    died = threading.Event()
    real_run = model.run

    def _explode(images):  # type: ignore[no-untyped-def]
        model.run = real_run  # type: ignore[method-assign]
        died.set()
        raise _KillWorker()

    model.run = _explode  # type: ignore[method-assign]
    old_hook = threading.excepthook
    threading.excepthook = lambda args: None  # the dying thread's traceback is expected here
    try:
        ctx = zmq.Context()
        try:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(daemon.zmq.ingest_endpoint)
            hdr = {"v": 1, "id": 1, "dtype": "uint8", "shape": [8, 8]}
            s.send_multipart([json.dumps(hdr).encode(), np.zeros((8, 8), np.uint8).tobytes()])
            assert died.wait(10)
            deadline = time.monotonic() + 10
            while daemon.scheduler is not None and daemon.scheduler.healthy() and time.monotonic() < deadline:
                time.sleep(0.01)  # polling the thread's state with a deadline, not synchronising on time
        finally:
            ctx.destroy(linger=0)
    finally:
        threading.excepthook = old_hook
    assert daemon.unhealthy() == ["scheduler"]
    assert _status(url) == 503
    assert _status(f"{daemon.health.url}/healthz") == 200  # alive, not ready: the supervisor decides
