"""The measuring behind ``medge bench engine`` (see :mod:`edge.commands.bench`), and what the modes share.

- engine mode (:func:`run_engine`): the raw backend on a preprocessed input
  (only ``backend.infer`` is inside the timed region), like ``trtexec``;
- shared with zmq mode (:mod:`edge.tools.bench_zmq`, which uses the raw
  backend for ``--compare-raw``): the timed loop :func:`bench_engine_samples`,
  the model loader, the input frame, the progress line and the result files.

Each mode prints a human table and writes the requested result files
(:func:`edge.tools.results.write_outputs`); the exit statuses are those of
:mod:`edge.tools.endpoints`. DICOM mode is :mod:`edge.tools.bench_dicom`.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge.tools.endpoints import EXIT_OK, resolve_client_endpoints
from edge.tools.progress import Progress, bar
from edge.tools.results import (
    cv_warning,
    format_table,
    machine_info,
    stats_row,
    summarize_ms,
    write_outputs,
)

__all__ = ["run_engine", "bench_engine_samples", "input_frame", "load_bench_model", "write_files", "BenchProgress",
           "daemon_engine_settings"]

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- progress
class BenchProgress:
    """A one-line progress bar on stderr (a line every 5 s when stderr is not a terminal)."""

    def __init__(self, total_s: float, enabled: bool, label: str = "") -> None:
        self.total_s = total_s
        self.label = label
        self.t0 = time.monotonic()
        self._line = Progress(enabled=enabled and total_s >= 2.0)

    def update(self, extra: str = "") -> None:
        """Redraw the line (elapsed share of ``total_s``, then ``extra``)."""
        if not self._line.enabled:
            return
        el = time.monotonic() - self.t0
        frac = min(1.0, el / self.total_s) if self.total_s else 1.0
        self._line.show(f"{self.label}[{bar(frac, 30)}] {frac * 100:3.0f}% {el:5.1f}/{self.total_s:.0f} s {extra}")

    def done(self) -> None:
        """End the line."""
        self._line.close()


# ---------------------------------------------------------------------------- outputs
def write_files(args: argparse.Namespace, doc: dict[str, Any], rows: list[dict[str, Any]],
                 columns: Sequence[str], series: dict[str, np.ndarray], title: str) -> None:
    """Write the result files asked for by ``--json``, ``--csv`` and ``--plot``; say where."""
    for path in write_outputs(doc, rows, columns, series, title, json_path=args.json, csv_path=args.csv,
                              plot_path=args.plot):
        print(f"wrote {path}")


# ---------------------------------------------------------------------------- engine mode
def input_frame(task: str, frame: tuple[int, int], dtype: str = "uint8", kind: str = "auto") -> np.ndarray:
    """The synthetic frame both modes send: ultrasound, or X-ray for detection models (``kind="auto"``)."""
    from edge.tools.synthetic import UltrasoundProbe, XrayFrames

    if kind == "auto":
        kind = "xray" if task in ("detection", "classification") else "ultrasound"
    h, w = frame
    if kind == "xray":
        return XrayFrames(h, w, dtype, seed=0, loop=1).frame(0)
    return UltrasoundProbe(h, w, dtype, seed=0, loop=1).frame(0)


def daemon_engine_settings(args: argparse.Namespace) -> tuple[Path, int, str]:
    """The engine cache folder and max batch the daemon uses for ``--model``, and where they came from.

    Read with the daemon's own loader (``--config``, then ``MEDGE_*``), so
    that a TensorRT plan the daemon built (or ``medge build`` built for it)
    is the one measured, and a plan built here is the one the daemon loads:
    the cache key holds the max batch. ``--cache-dir`` and ``--max-batch``
    override them.
    """
    from edge.config import load_config
    from edge.errors import ConfigError

    cfg = load_config(args.config, check_models=False)
    try:
        max_batch = cfg.model(args.model).max_batch or cfg.scheduler.max_batch
    except ConfigError:  # not a served model: the scheduler's default
        max_batch = cfg.scheduler.max_batch
    origin = f"--config {args.config}" if args.config else "the daemon's defaults and MEDGE_* variables"
    return cfg.engine_cache_dir, int(max_batch), origin


def load_bench_model(args: argparse.Namespace, max_batch: int):
    """The model named by ``--model`` with the backend options of ``args`` (no warm-up).

    ``--cache-dir`` (TensorRT engine cache) and ``--device`` (CUDA ordinal)
    are passed through when given; otherwise :func:`load_model`'s defaults.
    """
    from edge.inference.model import load_model

    extra: dict[str, Any] = {}
    if getattr(args, "cache_dir", None) is not None:
        extra["cache_dir"] = args.cache_dir
    if getattr(args, "device", None) is not None:
        extra["device_id"] = args.device
    return load_model(args.model, engines_dir=args.engines_dir, precision=args.precision,
                      backend=args.backend, provider=args.provider, max_batch=max_batch,
                      intra_op_threads=args.threads, spin_us=args.spin_us, warmup_iterations=0, **extra)


def bench_engine_samples(infer: Callable[[np.ndarray], Any], batch: np.ndarray, *, warmup_s: float,
                         duration_s: float | None, iterations: int | None,
                         stage_timings: Callable[[], dict[str, float]] | None = None,
                         on_progress: Callable[[], None] | None = None,
                         ) -> tuple[np.ndarray, dict[str, list[float]], float]:
    """Time ``infer(batch)`` alone; return latencies (ms), per-call stage timings and the timed wall time (s).

    Nothing but the call sits between the two clock reads. Stage timings
    (TensorRT's CUDA-event H2D/compute/D2H) are read after the clock stops.
    """
    perf = time.perf_counter_ns
    end = perf() + int(max(0.0, warmup_s) * 1e9)
    infer(batch)
    while perf() < end:
        infer(batch)
    samples: list[int] = []
    stages: dict[str, list[float]] = {}
    stop = perf() + int(duration_s * 1e9) if duration_s is not None else None
    n_max = iterations if iterations is not None else (1 << 62)
    next_progress = perf() + 1_000_000_000
    t_start = perf()
    t1 = t_start
    while len(samples) < n_max:
        t0 = perf()
        infer(batch)
        t1 = perf()
        samples.append(t1 - t0)
        if stage_timings is not None:
            for k, v in stage_timings().items():
                stages.setdefault(k, []).append(float(v))
        if stop is not None and t1 >= stop:
            break
        if on_progress is not None and t1 >= next_progress:
            on_progress()
            next_progress = t1 + 1_000_000_000
    return np.asarray(samples, dtype=np.float64) / 1e6, stages, (t1 - t_start) / 1e9


def run_engine(args: argparse.Namespace) -> int:
    """``medge bench engine``: time ``backend.infer`` alone; the exit status of ``medge bench``."""
    duration_s = args.duration_s if (args.duration_s or args.iterations) else 5.0
    engines = resolve_client_endpoints(args.config, engines_dir=args.engines_dir).engines_dir
    args.engines_dir = engines.value
    print(f"engines folder: {engines.value} (from {engines.origin})")
    cache_dir, daemon_max_batch, origin = daemon_engine_settings(args)
    cache_origin = "--cache-dir" if args.cache_dir is not None else origin
    args.cache_dir = args.cache_dir if args.cache_dir is not None else cache_dir
    max_batch = max(args.batch, args.max_batch or daemon_max_batch)
    print(f"engine cache: {args.cache_dir} (from {cache_origin}), max batch {max_batch}, CUDA device {args.device}")
    model = load_bench_model(args, max_batch=max_batch)
    with model:
        frame = input_frame(model.task, args.frame)
        x, _ = model.preprocess(frame)
        batch = np.ascontiguousarray(np.repeat(x[None], args.batch, axis=0), dtype=np.float32)
        be = model.backend
        timings = (lambda: be.last_timings_ms) if hasattr(be, "last_timings_ms") else None
        total_s = (args.warmup_s + (duration_s or 0.0))
        prog = BenchProgress(total_s, not args.no_progress, "engine ")
        lat, stages, wall = bench_engine_samples(be.infer, batch, warmup_s=args.warmup_s,
                                           duration_s=duration_s if not args.iterations else None,
                                           iterations=args.iterations, stage_timings=timings,
                                           on_progress=prog.update)
        prog.done()
        label = getattr(model, "backend_label", be.name)
        info = {"model": model.name, "version": model.version, "task": model.task,
                "backend": label, "precision": model.precision, "batch": args.batch,
                "input_shape": list(batch.shape), "source_frame": list(args.frame), "max_batch": max_batch,
                "device": args.device,
                "threads": getattr(be, "intra_op_threads", None), "spin_us": getattr(be, "spin_us", None)}
    s = summarize_ms(lat)
    total_ms = float(lat.sum())
    thr = {"inferences_per_s": round(len(lat) * args.batch / (total_ms / 1000.0), 2) if total_ms else 0.0,
           "batches_per_s": round(len(lat) / (total_ms / 1000.0), 2) if total_ms else 0.0}
    stage_summary = {k: summarize_ms(v) for k, v in stages.items()}
    print(f"medge bench engine: {info['model']} v{info['version']} ({info['task']}), {info['backend']} "
          f"{info['precision']}, batch {args.batch}, input {info['input_shape']}, threads {info['threads']}"
          + (f", spin {info['spin_us']} us" if info.get("spin_us") is not None else ""))
    print(f"warm-up {args.warmup_s:g} s, timed {len(lat)} iterations in {wall:.2f} s (only backend.infer is timed)")
    print()
    rows = [stats_row("latency (ms)", s)]
    for k, v in stage_summary.items():
        rows.append(stats_row(f"  {k} (ms)", v))
    print(format_table(rows))
    print()
    print(f"throughput: {thr['inferences_per_s']:.1f} inferences/s ({thr['batches_per_s']:.1f} batches/s)")
    if stage_summary:
        print("H2D / compute / D2H from CUDA events (TensorRT backend).")
    else:
        print("H2D / compute / D2H: not available (the backend exposes no CUDA-event timings; "
              "only the TensorRT backend does).")
    warn = cv_warning("engine", s, args.cv_warn)
    if warn:
        print(warn)
    doc = {"tool": "medge bench engine", "machine": machine_info(), "config": info,
           "summary": {"latency_ms": s, "throughput": thr, "stages_ms": stage_summary, "wall_s": round(wall, 3)},
           "samples_ms": [round(float(v), 4) for v in lat],
           "stage_samples_ms": stages}
    rows_csv = [{"iteration": i, "latency_ms": round(float(v), 4)} for i, v in enumerate(lat)]
    write_files(args, doc, rows_csv, ["iteration", "latency_ms"],
                   {f"{info['model']} {info['precision']} b{args.batch}": lat},
                   f"medge bench engine: {info['model']} ({info['backend']} {info['precision']}, batch {args.batch})")
    return EXIT_OK
