"""Scheduler: queues, micro-batching, per-stream shedding, errors, shutdown."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from edge.config import SchedulerConfig
from edge.errors import ProtocolError
from edge.manifest import Manifest
from edge.metrics import Metrics
from edge.models import LoadedModel, ModelRegistry
from edge.scheduler import Scheduler
from edge.types import InferenceResult


class SlowBackend:
    """A fake backend: sleeps ``delay_s`` per batch (GIL released), records batch sizes."""

    name = "fake"
    precision = "fp32"

    def __init__(self, delay_s: float, max_batch: int = 4, fail: bool = False) -> None:
        self.delay_s = delay_s
        self.max_batch = max_batch
        self.batches: list[int] = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.gate.wait(10)
        self.batches.append(batch.shape[0])
        time.sleep(self.delay_s)
        if self.fail:
            self.fail = False
            raise RuntimeError("simulated backend failure")
        n, _, h, w = batch.shape
        return {"logits": np.zeros((n, 1, h, w), np.float32)}

    def close(self) -> None:
        pass


class Collector:
    """Thread-safe result sink keyed by frame id."""

    def __init__(self) -> None:
        self.results: dict[int, InferenceResult] = {}
        self.calls = 0
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def cb(self, fid: int):
        def _cb(res: InferenceResult) -> None:
            with self.lock:
                assert fid not in self.results, "callback called twice"
                self.results[fid] = res
                self.calls += 1
                self.done.notify_all()

        return _cb

    def wait(self, n: int, timeout: float = 10.0) -> None:
        with self.lock:
            assert self.done.wait_for(lambda: self.calls >= n, timeout), f"{self.calls}/{n} answered"


def _registry(fixture_engines: Path, backend) -> ModelRegistry:
    m = LoadedModel(Manifest.load(fixture_engines / "tiny-seg"), backend)
    return ModelRegistry({"tiny-seg": m})


def _metric(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


IMG = np.zeros((64, 64), np.uint8)


def test_live_stream_backlog_sheds_oldest_and_counts_it(fixture_engines: Path) -> None:
    backend = SlowBackend(0.01, max_batch=1)
    backend.gate.clear()  # hold the worker so a backlog builds up
    reg = CollectorRegistry()
    sink = Collector()
    cfg = SchedulerConfig(queue_size=64, max_batch=1, stream_backlog=3)
    with Scheduler(_registry(fixture_engines, backend), cfg, Metrics(reg, process=False)) as sched:
        sched.submit(IMG, model=None, source="zmq", stream="probe", callback=sink.cb(0))
        time.sleep(0.05)  # frame 0 is now inside the (blocked) backend
        for i in range(1, 11):
            sched.submit(IMG, model="tiny-seg", source="zmq", stream="probe", callback=sink.cb(i))
        # frames 1..7 were shed oldest-first as 4..10 arrived; 8, 9, 10 wait
        sink.wait(7)
        assert sorted(i for i, r in sink.results.items() if r.status == "dropped") == list(range(1, 8))
        backend.gate.set()
        sink.wait(11)
    assert [sink.results[i].status for i in (0, 8, 9, 10)] == ["ok"] * 4
    assert _metric(reg, "medge_frames_dropped_total", model="tiny-seg", reason="stream_backlog") == 7
    assert _metric(reg, "medge_frames_received_total", source="zmq", model="tiny-seg") == 11
    assert sched.accepted == sched.answered == 11


def test_streams_are_shed_independently_and_batched_together(fixture_engines: Path) -> None:
    backend = SlowBackend(0.005, max_batch=4)
    backend.gate.clear()
    reg = CollectorRegistry()
    sink = Collector()
    cfg = SchedulerConfig(queue_size=64, max_batch=4, stream_backlog=2)
    with Scheduler(_registry(fixture_engines, backend), cfg, Metrics(reg, process=False)) as sched:
        sched.submit(IMG, model=None, source="zmq", stream="warm", callback=sink.cb(-1))
        time.sleep(0.05)
        for i in range(6):
            for s in range(3):
                sched.submit(IMG, model=None, source="zmq", stream=f"s{s}", callback=sink.cb(i * 3 + s))
        backend.gate.set()
        sink.wait(19)
    ok = [i for i, r in sink.results.items() if r.status == "ok" and i >= 0]
    # each stream keeps its newest 2 frames: ids 12..17
    assert sorted(ok) == list(range(12, 18))
    assert max(backend.batches) == 4 and sum(backend.batches) == 7  # warm + 6, batched up to max_batch
    assert _metric(reg, "medge_batch_size_count", model="tiny-seg") == len(backend.batches)


def test_max_delay_gathers_a_batch(fixture_engines: Path) -> None:
    backend = SlowBackend(0.0, max_batch=4)
    sink = Collector()
    cfg = SchedulerConfig(max_batch=4, max_delay_us=200_000)
    with Scheduler(_registry(fixture_engines, backend), cfg) as sched:
        for i in range(3):
            sched.submit(IMG, model=None, source="zmq", stream=f"s{i}", callback=sink.cb(i))
            time.sleep(0.01)
        sink.wait(3)
    assert backend.batches == [3]
    assert all(r.timing_us["queue"] >= 150_000 for r in sink.results.values() if r is not sink.results[2])


def test_full_queue_answers_overloaded_and_unknown_model(fixture_engines: Path) -> None:
    backend = SlowBackend(0.0, max_batch=1)
    backend.gate.clear()
    sink = Collector()
    cfg = SchedulerConfig(queue_size=2, max_batch=1, stream_backlog=10)
    with Scheduler(_registry(fixture_engines, backend), cfg) as sched:
        sched.submit(IMG, model=None, source="zmq", stream="a", callback=sink.cb(0))
        time.sleep(0.05)
        sched.submit(IMG, model=None, source="zmq", stream="b", callback=sink.cb(1))
        sched.submit(IMG, model=None, source="zmq", stream="c", callback=sink.cb(2))
        with pytest.raises(ProtocolError) as info:
            sched.submit(IMG, model=None, source="zmq", stream="d", callback=sink.cb(3))
        assert info.value.code == "overloaded"
        with pytest.raises(ProtocolError) as info:
            sched.submit(IMG, model="nope", source="zmq", stream="d", callback=sink.cb(4))
        assert info.value.code == "unknown_model"
        backend.gate.set()
        sink.wait(3)
    assert 3 not in sink.results and 4 not in sink.results


def test_blocking_infer_is_never_shed(fixture_engines: Path) -> None:
    backend = SlowBackend(0.002, max_batch=1)
    cfg = SchedulerConfig(queue_size=2, max_batch=1, stream_backlog=1)
    results: list[InferenceResult] = []
    lock = threading.Lock()
    with Scheduler(_registry(fixture_engines, backend), cfg) as sched:

        def client() -> None:
            res = sched.infer(IMG, model="tiny-seg", source="dicom")
            with lock:
                results.append(res)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert len(results) == 8 and all(r.status == "ok" and r.mask.shape == (64, 64) for r in results)


def test_backend_failure_answers_internal_and_keeps_serving(fixture_engines: Path) -> None:
    backend = SlowBackend(0.0, max_batch=1, fail=True)
    reg = CollectorRegistry()
    sink = Collector()
    with Scheduler(_registry(fixture_engines, backend), SchedulerConfig(max_batch=1), Metrics(reg, process=False)) as sched:
        sched.submit(IMG, model=None, source="zmq", stream="a", callback=sink.cb(0))
        sink.wait(1)
        sched.submit(IMG, model=None, source="zmq", stream="a", callback=sink.cb(1))
        sink.wait(2)
    assert sink.results[0].status == "error" and sink.results[0].error_code == "internal"
    assert sink.results[1].status == "ok"
    assert _metric(reg, "medge_requests_failed_total", source="zmq", code="internal") == 1


def test_close_answers_everything_accepted(fixture_engines: Path) -> None:
    backend = SlowBackend(0.01, max_batch=2)
    sink = Collector()
    sched = Scheduler(_registry(fixture_engines, backend), SchedulerConfig(max_batch=2, stream_backlog=50)).start()
    for i in range(20):
        sched.submit(IMG, model=None, source="zmq", stream="a", callback=sink.cb(i))
    sched.close(timeout_s=0.03)  # too short to run them all: the rest are answered "dropped"
    assert sink.calls == 20 and sched.pending() == 0
    statuses = {r.status for r in sink.results.values()}
    assert "ok" in statuses and "dropped" in statuses
    with pytest.raises(ProtocolError) as info:
        sched.submit(IMG, model=None, source="zmq", stream="a", callback=sink.cb(99))
    assert info.value.code == "overloaded"


def test_real_model_through_the_scheduler(fixture_engines: Path) -> None:
    from edge.config import load_config

    cfg = load_config(None, env={"MEDGE_ENGINES_DIR": str(fixture_engines)})
    reg = CollectorRegistry()
    with ModelRegistry.from_config(cfg) as models, Scheduler(models, cfg.scheduler, Metrics(reg, process=False)) as sched:
        res = sched.infer(np.full((30, 40), 7, np.uint16), model="tiny-seg", source="dicom")
        assert res.status == "ok" and res.mask.shape == (30, 40)
        assert set(res.timing_us) >= {"queue", "preprocess", "infer", "postprocess", "total"}
    assert _metric(reg, "medge_end_to_end_seconds_count", source="dicom", model="tiny-seg") == 1
    assert _metric(reg, "medge_stage_seconds_count", model="tiny-seg", stage="infer") == 1
