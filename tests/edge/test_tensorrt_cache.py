"""The TensorRT engine cache (edge/inference/engine_cache.py) with injected build and load functions: no GPU.

Two real processes race for one plan (one builds, the other waits on the
lock and loads the same bytes); a folder that refuses writes still serves
the plan from memory; a corrupt plan is rebuilt once; stale plans of the
same model are cleaned; the key covers every input. Synchronisation is by
events and the cache's own progress hook, never by sleeping.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from edge.errors import BackendUnavailableError, EngineBuildError
from edge.inference import engine_cache
from edge.inference.engine_cache import (
    KEEP_OTHER,
    EngineKey,
    PlanCache,
    PlanRejected,
    engine_cache_key,
    engine_cache_path,
)

KEY = EngineKey(gpu_name="NVIDIA RTX A6000", compute_capability=(8, 6), trt_version="10.3.0", precision="fp16",
                onnx_sha256="ab" * 32, max_batch=8, input_chw=(1, 256, 256), device_id=0)


def _load(data: bytes) -> bytes:
    if not data.startswith(b"PLAN"):
        raise PlanRejected("not a plan")
    return data


def _race_worker(cache_dir: str, role: str, started: Any, waiting: Any, release: Any, out: Any) -> None:
    """One process of the two-builder race (module level: spawned children import it)."""
    built: list[str] = []

    def build() -> bytes:
        built.append(role)
        started.set()
        if not release.wait(60):
            raise RuntimeError("the test never released the build")
        return b"PLAN-" + role.encode() + os.urandom(8)

    def progress(phase: str) -> None:
        if phase == "waiting":
            waiting.set()

    try:
        res = PlanCache(cache_dir, heartbeat_s=3600).load_or_build("m", KEY, build, _load, progress)
        out.put((role, bool(built), res.value, res.source))
    except BaseException as exc:  # report, so the parent fails with the reason instead of a timeout
        out.put((role, None, repr(exc).encode(), "error"))


def test_two_processes_one_builds_the_other_waits_and_loads_the_same_bytes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    started, waiting, release = ctx.Event(), ctx.Event(), ctx.Event()
    out = ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(str(tmp_path), role, started, waiting, release, out))
             for role in ("first", "second")]
    try:
        procs[0].start()
        assert started.wait(120), "the first process never started building"
        procs[1].start()
        assert waiting.wait(120), "the second process never found the lock held"
        release.set()
        results = {r[0]: r for r in (out.get(timeout=120), out.get(timeout=120))}
    finally:
        release.set()
        for p in procs:
            p.join(60)
    assert results["first"][1] is True and results["first"][3] == "built", results
    assert results["second"][1] is False and results["second"][3] == "cache", results  # it did not build
    assert results["second"][2] == results["first"][2]
    plan = engine_cache_path(tmp_path, "m", KEY)
    assert plan.read_bytes() == results["first"][2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([plan.name, plan.with_suffix(".json").name,
                                                                 plan.with_suffix(".lock").name])  # no temp file


def test_a_lock_held_too_long_is_a_clear_error(tmp_path: Path) -> None:
    plan = engine_cache_path(tmp_path, "m", KEY)
    fd = os.open(plan.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)  # another holder (flock is per open)
    phases: list[str] = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(BackendUnavailableError, match="held the lock"):
            PlanCache(tmp_path, lock_wait_s=0).load_or_build("m", KEY, lambda: b"PLAN", _load, phases.append)
    finally:
        os.close(fd)
    assert phases == ["waiting"]


def test_a_corrupt_plan_is_removed_and_rebuilt_once(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    builds: list[bytes] = []

    def build() -> bytes:
        builds.append(b"PLAN-1")
        return b"PLAN-1"

    plan = engine_cache_path(tmp_path, "m", KEY)
    plan.write_bytes(b"\x00truncated")
    res = cache.load_or_build("m", KEY, build, _load, lambda phase: None)
    assert (res.source, res.value, res.written) == ("rebuilt", b"PLAN-1", True) and plan.read_bytes() == b"PLAN-1"
    assert cache.load_or_build("m", KEY, build, _load, lambda phase: None).source == "cache" and len(builds) == 1
    plan.write_bytes(b"junk")
    with pytest.raises(EngineBuildError, match="cannot load"):  # a fresh plan that fails too: no loop
        cache.load_or_build("m", KEY, lambda: b"junk too", _load, lambda phase: None)


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC])
def test_a_refused_write_keeps_the_plan_in_memory_and_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture, err: int) -> None:
    def refuse(path: Any, data: Any, **kw: Any) -> Path:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(engine_cache, "atomic_write", refuse)
    monkeypatch.setattr(PlanCache, "_warned", set())
    cache = PlanCache(tmp_path / f"cache-{err}")
    with caplog.at_level(logging.DEBUG, logger="edge.inference.engine_cache"):
        for _ in range(2):
            res = cache.load_or_build("m", KEY, lambda: b"PLAN-mem", _load, lambda phase: None)
            assert (res.value, res.source, res.written) == (b"PLAN-mem", "built", False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "serving it from memory" in r.message]
    assert len(warnings) == 1 and errno.errorcode[err] in warnings[0].message
    assert not list((tmp_path / f"cache-{err}").glob("*.plan"))


def test_a_cache_folder_that_cannot_exist_still_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(PlanCache, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="edge.inference.engine_cache"):
        res = PlanCache(blocker / "cache").load_or_build("m", KEY, lambda: b"PLAN-x", _load, lambda phase: None)
    assert (res.value, res.written) == (b"PLAN-x", False)
    assert any("cannot be created or locked" in r.message for r in caplog.records)


def test_stale_plans_of_the_model_are_cleaned_after_a_write(tmp_path: Path) -> None:
    cache = PlanCache(tmp_path)
    old = [dataclasses.replace(KEY, trt_version=f"10.{i}.99") for i in range(KEEP_OTHER + 2)]
    for i, key in enumerate(old):  # oldest first
        p = engine_cache_path(tmp_path, "m", key)
        p.write_bytes(b"PLAN-old")
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    other_model = engine_cache_path(tmp_path, "m-v2", old[0])
    other_model.write_bytes(b"PLAN-other")
    busy = engine_cache_path(tmp_path, "m", old[0])  # the oldest, but another process holds its lock
    fd = os.open(busy.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = cache.load_or_build("m", KEY, lambda: b"PLAN-new", _load, lambda phase: None)
    finally:
        os.close(fd)
    left = {p.name for p in tmp_path.glob("*.plan")}
    newest = {engine_cache_path(tmp_path, "m", k).name for k in old[-KEEP_OTHER:]}
    assert left == {res.path.name, other_model.name, busy.name} | newest
    assert not engine_cache_path(tmp_path, "m", old[1]).with_suffix(".lock").exists()


def test_the_heartbeat_reports_while_a_build_runs(tmp_path: Path) -> None:
    """progress("building") at once, then every heartbeat_s: the build returns once the hook was called again."""
    calls: list[str] = []
    again = threading.Event()

    def progress(phase: str) -> None:
        calls.append(phase)
        if len(calls) >= 2:
            again.set()
        if len(calls) == 3:
            raise RuntimeError("a broken hook must not break the build")

    def build() -> bytes:
        assert again.wait(30), "the heartbeat never ticked"
        return b"PLAN-hb"

    res = PlanCache(tmp_path, heartbeat_s=0.01).load_or_build("m", KEY, build, _load, progress)
    assert res.value == b"PLAN-hb" and calls[:2] == ["building", "building"]


def test_the_key_covers_every_input_and_ignores_cosmetics() -> None:
    base = KEY.digest()
    assert base == engine_cache_key(**dataclasses.asdict(KEY)) and len(base) == 64
    variants = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": (9, 0), "trt_version": "11.4.0.106",
                "precision": "int8", "onnx_sha256": "cd" * 32, "max_batch": 4, "input_chw": (1, 128, 128),
                "device_id": 1}
    digests = {dataclasses.replace(KEY, **{k: v}).digest() for k, v in variants.items()}
    assert base not in digests and len(digests) == len(variants)
    assert dataclasses.replace(KEY, gpu_name=" NVIDIA RTX A6000 ", onnx_sha256="AB" * 32).digest() == base
    assert engine_cache_path("/c", "us-lesion-seg", KEY).name == f"us-lesion-seg-fp16-sm86-{base[:16]}.plan"
