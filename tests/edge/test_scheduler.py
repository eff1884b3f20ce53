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
from edge.inference.manifest import Manifest
from edge.inference.model import LoadedModel, ModelRegistry
from edge.ops.metrics import Metrics
from edge.scheduler import Scheduler
from edge.types import InferenceResult
from tests.conftest import wait_until


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
        self.entered = threading.Event()  # set when a batch reaches the backend

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.entered.set()
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
        assert backend.entered.wait(10)  # frame 0 is now inside the (blocked) backend
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
        assert backend.entered.wait(10)  # the warm frame holds the (blocked) backend
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
            time.sleep(0.01)  # frames arrive spread over time: what max_delay_us must gather
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
        assert backend.entered.wait(10)  # frame 0 holds the (blocked) backend, out of the queue
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


# ------------------------------------------------------------------ hardening: bounds, fairness, boundaries
def _wait_until(cond, timeout_s: float = 10.0) -> None:
    """Poll ``cond`` with a deadline (no fixed sleeps)."""
    wait_until(cond, timeout_s, interval_s=0.002)


class Order:
    """Records the order in which callbacks are called, by label."""

    def __init__(self) -> None:
        self.labels: list[str] = []
        self.results: dict[str, InferenceResult] = {}
        self.lock = threading.Lock()

    def cb(self, label: str):
        def _cb(res: InferenceResult) -> None:
            with self.lock:
                self.labels.append(label)
                self.results[label] = res

        return _cb


def _occupy(sched: Scheduler, backend: SlowBackend, order: Order) -> None:
    """Hold the (gated) worker inside the backend with one live frame labelled ``busy``."""
    backend.gate.clear()
    sched.submit(IMG, model=None, source="zmq", stream="busy", callback=order.cb("busy"))
    assert backend.entered.wait(10)


def test_queue_is_bounded_in_bytes(fixture_engines: Path) -> None:
    """queue_max_mb: a live frame that does not fit sheds its own stream's oldest frame or is
    refused ``overloaded`` (never another stream's frame); an oversized frame fits an empty queue."""
    backend = SlowBackend(0.0, max_batch=1)
    reg = CollectorRegistry()
    order = Order()
    quarter = np.zeros((512, 512), np.uint8)  # 256 KiB: four fill the 1 MiB bound
    cfg = SchedulerConfig(queue_size=64, queue_max_mb=1, max_batch=1, stream_backlog=10)
    with Scheduler(_registry(fixture_engines, backend), cfg, Metrics(reg, process=False)) as sched:
        _occupy(sched, backend, order)
        for i in range(4):
            sched.submit(quarter, model=None, source="zmq", stream="a", callback=order.cb(f"a{i}"))
        with pytest.raises(ProtocolError) as info:  # stream b has nothing to shed
            sched.submit(quarter, model=None, source="zmq", stream="b", callback=order.cb("b0"))
        assert info.value.code == "overloaded" and "1 MiB" in info.value.message
        sched.submit(quarter, model=None, source="zmq", stream="a", callback=order.cb("a4"))  # sheds a0
        assert order.labels == ["a0"] and order.results["a0"].status == "dropped"
        with pytest.raises(ProtocolError):  # larger than the bound, into a non-empty queue
            sched.submit(np.zeros((2048, 1024), np.uint8), model=None, source="zmq", stream="c", callback=order.cb("c0"))
        backend.gate.set()
        _wait_until(lambda: sched.pending() == 0)
        assert [order.results[k].status for k in ("busy", "a1", "a2", "a3", "a4")] == ["ok"] * 5
        assert "b0" not in order.results and "c0" not in order.results
        # a single frame larger than the whole bound is still accepted into an empty queue
        big = sched.infer(np.zeros((2048, 1024), np.uint8), model="tiny-seg", source="dicom")
        assert big.status == "ok"
    assert _metric(reg, "medge_frames_dropped_total", model="tiny-seg", reason="stream_backlog") == 1
    assert _metric(reg, "medge_frames_received_total", source="zmq", model="tiny-seg") == 6


def test_nonlive_waits_for_byte_room(fixture_engines: Path) -> None:
    """A DICOM frame is never refused or shed for bytes: it waits until the queue has room."""
    backend = SlowBackend(0.0, max_batch=1)
    order = Order()
    quarter = np.zeros((512, 512), np.uint8)
    cfg = SchedulerConfig(queue_size=64, queue_max_mb=1, max_batch=1, stream_backlog=10)
    got: list[InferenceResult] = []
    with Scheduler(_registry(fixture_engines, backend), cfg) as sched:
        _occupy(sched, backend, order)
        for i in range(4):
            sched.submit(quarter, model=None, source="zmq", stream=f"s{i}", callback=order.cb(f"s{i}"))
        t = threading.Thread(target=lambda: got.append(sched.infer(quarter, model="tiny-seg", source="dicom")))
        t.start()
        t.join(0.3)  # a negative check: it must still be waiting for room
        assert t.is_alive() and sched.pending() == 5
        backend.gate.set()
        t.join(10)
    assert not t.is_alive() and got[0].status == "ok"
    assert all(r.status == "ok" for r in order.results.values())


def test_live_frames_are_never_queued_behind_dicom(fixture_engines: Path) -> None:
    """Two queues per model, live first: frames of live streams run before DICOM frames that were
    queued earlier for the same model."""
    backend = SlowBackend(0.0, max_batch=1)
    order = Order()
    cfg = SchedulerConfig(queue_size=64, max_batch=1, stream_backlog=4)
    with Scheduler(_registry(fixture_engines, backend), cfg) as sched:
        _occupy(sched, backend, order)
        for i in range(6):  # a DICOM cine, queued first
            sched.submit(IMG, model=None, source="dicom", stream="dicom", callback=order.cb(f"N{i}"), live=False)
        for i in range(3):
            sched.submit(IMG, model=None, source="zmq", stream=f"probe-{i}", callback=order.cb(f"L{i}"))
        backend.gate.set()
        _wait_until(lambda: sched.pending() == 0)
    assert order.labels == ["busy", "L0", "L1", "L2", "N0", "N1", "N2", "N3", "N4", "N5"]
    assert all(r.status == "ok" for r in order.results.values())


def test_dicom_is_not_starved_by_live_streams(fixture_engines: Path) -> None:
    """Anti-starvation: at most NONLIVE_EVERY live batches run ahead of a waiting DICOM frame."""
    from edge.scheduler import NONLIVE_EVERY

    backend = SlowBackend(0.0, max_batch=1)
    order = Order()
    cfg = SchedulerConfig(queue_size=64, max_batch=1, stream_backlog=4)
    n_live = NONLIVE_EVERY + 2
    with Scheduler(_registry(fixture_engines, backend), cfg) as sched:
        _occupy(sched, backend, order)
        sched.submit(IMG, model=None, source="dicom", stream="dicom", callback=order.cb("N0"), live=False)
        for i in range(n_live):
            sched.submit(IMG, model=None, source="zmq", stream=f"probe-{i}", callback=order.cb(f"L{i}"))
        backend.gate.set()
        _wait_until(lambda: sched.pending() == 0)
    live = [f"L{i}" for i in range(n_live)]
    assert order.labels == ["busy", *live[:NONLIVE_EVERY], "N0", *live[NONLIVE_EVERY:]]


def test_worker_survives_an_unexpected_exception(fixture_engines: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's error boundary: a failure outside the backend (here a malformed result) answers
    the batch ``internal``, is counted once in medge_internal_errors_total, and the worker serves on."""
    backend = SlowBackend(0.0, max_batch=1)
    registry = _registry(fixture_engines, backend)
    model = registry.get("tiny-seg")
    real_run = model.run
    calls: list[int] = []

    def broken_once(images):
        calls.append(len(images))
        return [None] * len(images) if len(calls) == 1 else real_run(images)

    monkeypatch.setattr(model, "run", broken_once)
    reg = CollectorRegistry()
    sink = Collector()
    with Scheduler(registry, SchedulerConfig(max_batch=1), Metrics(reg, process=False)) as sched:
        assert sched.healthy()
        sched.submit(IMG, model=None, source="zmq", stream="a", callback=sink.cb(0))
        sink.wait(1)
        sched.submit(IMG, model=None, source="zmq", stream="a", callback=sink.cb(1))
        sink.wait(2)
        assert sched.healthy()
    assert sink.results[0].status == "error" and sink.results[0].error_code == "internal"
    assert sink.results[1].status == "ok"
    assert _metric(reg, "medge_internal_errors_total", component="scheduler") == 1
    assert _metric(reg, "medge_requests_failed_total", source="zmq", code="internal") == 1
    assert sched.accepted == sched.answered == 2


def test_raising_callback_is_counted_and_the_worker_serves_on(fixture_engines: Path) -> None:
    backend = SlowBackend(0.0, max_batch=1)
    reg = CollectorRegistry()
    sink = Collector()

    def broken(res: InferenceResult) -> None:
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    with Scheduler(_registry(fixture_engines, backend), SchedulerConfig(max_batch=1), Metrics(reg, process=False)) as sched:
        sched.submit(IMG, model=None, source="zmq", stream="a", callback=broken)
        sched.submit(IMG, model=None, source="zmq", stream="a", callback=sink.cb(1))
        sink.wait(1)
        assert sched.pending() == 0 and sched.healthy()
    assert _metric(reg, "medge_replies_lost_total", reason="internal") == 1
    assert _metric(reg, "medge_internal_errors_total", component="result_callback") == 1


def test_healthy_reflects_the_workers(fixture_engines: Path) -> None:
    sched = Scheduler(_registry(fixture_engines, SlowBackend(0.0)), SchedulerConfig())
    assert not sched.healthy()  # not started
    sched.start()
    assert sched.healthy()
    sched.close(timeout_s=1.0)
    assert not sched.healthy()
