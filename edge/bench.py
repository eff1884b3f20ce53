"""``medge bench engine|zmq|dicom``: latency benchmarks in the style of trtexec and perf_analyzer.

- ``engine``: the raw backend on a preprocessed input (only ``backend.infer``
  is inside the timed region), like ``trtexec``: min / mean / median / p90 /
  p95 / p99 / max, coefficient of variation (warned about when high) and
  throughput; on TensorRT also H2D / compute / D2H from CUDA events.
- ``zmq``: end to end through a running daemon, like ``perf_analyzer``:
  client latency percentiles, achieved rate, drops, errors and the daemon's
  stage breakdown (``timing_us``); ``--sweep`` runs one row per step;
  ``--compare-raw`` also times the raw backend on the same input in this
  process (interleaved blocks, so both see the same machine) and prints the
  daemon's overhead at p50 and p99.
- ``dicom``: C-STORE throughput into the daemon's SCP and, with
  ``--results-port``, store-to-result latency per instance (a local storage
  SCP receives the daemon's SEG/SR).

Every mode writes a human table to stdout and optionally ``--json`` (raw
samples and summary), ``--csv`` and ``--plot`` (latency histogram + CDF,
PNG). A daemon that is down or stops mid-run ends the run with a clear
message, the partial results written, and exit status 3.

Exit status: 0 success; 1 the run finished but some requests failed;
2 bad arguments; 3 the daemon was unreachable or stopped mid-run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge.benchstats import format_table, machine_info, summarize_ms, write_csv, write_json
from edge.errors import MedgeError
from edge.zmq_auth import add_curve_arguments, curve_from_args

__all__ = ["configure_parser", "run", "EXIT_OK", "EXIT_FAILURES", "EXIT_UNREACHABLE",
           "parse_frame", "parse_sweep", "bench_engine_samples", "scrape_metrics"]

_log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


# ---------------------------------------------------------------------------- parsing helpers
def parse_frame(text: str) -> tuple[int, int]:
    """``"480x640"`` -> ``(480, 640)`` (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"frame size {text!r} is not HxW, e.g. 480x640") from exc
    if h < 16 or w < 16 or h * w > 8192 * 8192:
        raise argparse.ArgumentTypeError(f"frame size {text!r} is out of range (16..8192 per side)")
    return h, w


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``"concurrency=1,2,4,8"`` -> ``("concurrency", [1, 2, 4, 8])``; also ``rate=`` and ``streams=``."""
    try:
        key, values = text.split("=", 1)
        vals = [float(v) for v in values.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"sweep {text!r} is not KEY=V1,V2,... ") from exc
    key = key.strip()
    if key not in ("concurrency", "rate", "streams") or not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(
            f"sweep {text!r}: KEY must be concurrency, rate or streams and values > 0")
    return key, vals


def _positive_float(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return v


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return v


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", type=Path, metavar="FILE", help="write raw samples + summary as JSON")
    g.add_argument("--csv", type=Path, metavar="FILE", help="write per-sample rows as CSV")
    g.add_argument("--plot", type=Path, metavar="FILE.png", help="write a latency histogram + CDF (PNG)")
    g.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    g.add_argument("--cv-warn", type=float, default=0.10, metavar="RATIO",
                   help="warn when the coefficient of variation exceeds this (default 0.10)")


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("model (engine mode, and the raw side of --compare-raw)")
    g.add_argument("--model", required=required, help="model name under the engines folder (e.g. us-lesion-seg)")
    g.add_argument("--engines-dir", type=Path, default=None, help="engines folder (default: the bundled engines/)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16", "auto"])
    g.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "auto"])
    g.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                   help="ONNX Runtime execution provider (default cpu)")
    g.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads (0: one per usable core, as the daemon)")
    g.add_argument("--spin-us", type=int, default=1000, metavar="US",
                   help="ONNX Runtime intra-op spin after each parallel section, as the daemon's "
                        "[[models]] spin_us (default 1000; 0: no spinning)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``engine``, ``zmq`` and ``dicom`` modes to ``parser``."""
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True)

    pe = sub.add_parser("engine", help="raw backend latency/throughput (trtexec style)",
                        description="Time only backend.infer on a preprocessed input, like trtexec.")
    _add_model_args(pe, required=True)
    pe.add_argument("--batch", type=_positive_int, default=1)
    pe.add_argument("--frame", type=parse_frame, default=(480, 640), metavar="HxW",
                    help="size of the synthetic source frame that is preprocessed once (default 480x640)")
    pe.add_argument("--warmup-s", type=float, default=1.0)
    g = pe.add_mutually_exclusive_group()
    g.add_argument("--duration-s", type=_positive_float, default=None, help="timed run length (default 5 s)")
    g.add_argument("--iterations", type=_positive_int, default=None)
    _add_output_args(pe)

    pz = sub.add_parser("zmq", help="end-to-end through a running daemon (perf_analyzer style)",
                        description="Stream synthetic frames to a running daemon and measure latency.")
    pz.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    add_curve_arguments(pz)
    g = pz.add_mutually_exclusive_group()
    g.add_argument("--rate", type=_positive_float, default=None, metavar="FPS",
                   help="open loop: frames per second per stream")
    g.add_argument("--concurrency", type=_positive_int, default=None, metavar="N",
                   help="closed loop: requests outstanding per stream (default 1)")
    pz.add_argument("--streams", type=_positive_int, default=1, metavar="K")
    pz.add_argument("--window", type=_positive_int, default=8,
                    help="rate mode: most requests in flight per stream; later frames are skipped")
    pz.add_argument("--frame", type=parse_frame, default=(480, 640), metavar="HxW")
    pz.add_argument("--dtype", default="uint8", choices=["uint8", "uint16", "int16", "float32"])
    pz.add_argument("--source", default="auto", choices=["auto", "ultrasound", "xray"],
                    help="synthetic frames (auto: by the model's task, else ultrasound)")
    pz.add_argument("--duration-s", type=_positive_float, default=10.0, help="per step (default 10)")
    pz.add_argument("--warmup-s", type=float, default=1.0, help="unrecorded warm-up before each step")
    pz.add_argument("--sweep", type=parse_sweep, default=None, metavar="KEY=V1,V2",
                    help="concurrency=1,2,4,8 | rate=10,30,60 | streams=1,2,4,8: one row per step")
    pz.add_argument("--compare-raw", action="store_true",
                    help="also time the raw backend on the same input in this process; print the overhead")
    pz.add_argument("--metrics-url", default=None,
                    help="daemon /metrics URL: adds the mean batch size per step (e.g. http://127.0.0.1:9108/metrics)")
    pz.add_argument("--reply-timeout-s", type=_positive_float, default=5.0)
    pz.add_argument("--connect-timeout-s", type=_positive_float, default=3.0)
    pz.add_argument("--want", default=None, help="comma-separated 'want' list sent in the header")
    _add_model_args(pz, required=False)
    _add_output_args(pz)

    pd = sub.add_parser("dicom", help="C-STORE throughput and store-to-result latency",
                        description="Send DICOM instances to the daemon's SCP; optionally receive its results.")
    from edge import benchdicom

    benchdicom.configure_parser(pd)
    _add_output_args(pd)


# ---------------------------------------------------------------------------- progress
class _Progress:
    """A one-line progress bar on stderr (a line every 5 s when stderr is not a terminal)."""

    def __init__(self, total_s: float, enabled: bool, label: str = "") -> None:
        self.total_s = total_s
        self.enabled = enabled and total_s >= 2.0
        self.tty = sys.stderr.isatty()
        self.label = label
        self.t0 = time.monotonic()
        self._last = 0.0

    def update(self, extra: str = "") -> None:
        if not self.enabled:
            return
        el = time.monotonic() - self.t0
        if not self.tty and el - self._last < 5.0:
            return
        self._last = el
        frac = min(1.0, el / self.total_s) if self.total_s else 1.0
        bar = "#" * int(frac * 30)
        line = f"{self.label}[{bar:<30}] {frac * 100:3.0f}% {el:5.1f}/{self.total_s:.0f} s {extra}"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- outputs
def _write_outputs(args: argparse.Namespace, doc: dict[str, Any], rows: list[dict[str, Any]],
                   columns: Sequence[str], series: dict[str, np.ndarray], title: str) -> None:
    if args.json:
        write_json(args.json, doc)
        print(f"wrote {args.json}")
    if args.csv:
        write_csv(args.csv, rows, columns)
        print(f"wrote {args.csv}")
    if args.plot:
        from edge.drawing import latency_figure, save_png

        save_png(latency_figure(series, title=title), args.plot)
        print(f"wrote {args.plot}")


def _stats_row(name: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"": name, "n": s.get("count", 0), "min": s.get("min_ms"), "mean": s.get("mean_ms"),
            "median": s.get("median_ms"), "p90": s.get("p90_ms"), "p95": s.get("p95_ms"),
            "p99": s.get("p99_ms"), "max": s.get("max_ms"), "cv": s.get("cv")}


def _cv_warning(name: str, s: dict[str, Any], limit: float) -> str | None:
    cv = s.get("cv")
    if cv is not None and cv > limit:
        return (f"WARNING: {name} latency is unstable: coefficient of variation {cv * 100:.1f}% "
                f"> {limit * 100:.0f}% (shared or busy machine? longer run? pinned clocks?)")
    return None


# ---------------------------------------------------------------------------- engine mode
def _input_frame(task: str, frame: tuple[int, int], dtype: str = "uint8", kind: str = "auto") -> np.ndarray:
    from edge.simulate import UltrasoundProbe, XrayFrames

    if kind == "auto":
        kind = "xray" if task == "detection" else "ultrasound"
    h, w = frame
    if kind == "xray":
        return XrayFrames(h, w, dtype, seed=0, loop=1).frame(0)
    return UltrasoundProbe(h, w, dtype, seed=0, loop=1).frame(0)


def _load(args: argparse.Namespace, max_batch: int):
    from edge.models import load_model

    return load_model(args.model, engines_dir=args.engines_dir, precision=args.precision,
                      backend=args.backend, provider=args.provider, max_batch=max_batch,
                      intra_op_threads=args.threads, spin_us=args.spin_us, warmup_iterations=0)


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


def _run_engine(args: argparse.Namespace) -> int:
    duration_s = args.duration_s if (args.duration_s or args.iterations) else 5.0
    model = _load(args, max_batch=args.batch)
    with model:
        frame = _input_frame(model.task, args.frame)
        x, _ = model.preprocess(frame)
        batch = np.ascontiguousarray(np.repeat(x[None], args.batch, axis=0), dtype=np.float32)
        be = model.backend
        timings = (lambda: be.last_timings_ms) if hasattr(be, "last_timings_ms") else None
        total_s = (args.warmup_s + (duration_s or 0.0))
        prog = _Progress(total_s, not args.no_progress, "engine ")
        lat, stages, wall = bench_engine_samples(be.infer, batch, warmup_s=args.warmup_s,
                                           duration_s=duration_s if not args.iterations else None,
                                           iterations=args.iterations, stage_timings=timings,
                                           on_progress=prog.update)
        prog.done()
        label = getattr(model, "backend_label", be.name)
        info = {"model": model.name, "version": model.version, "task": model.task,
                "backend": label, "precision": model.precision, "batch": args.batch,
                "input_shape": list(batch.shape), "source_frame": list(args.frame),
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
    rows = [_stats_row("latency (ms)", s)]
    for k, v in stage_summary.items():
        rows.append(_stats_row(f"  {k} (ms)", v))
    print(format_table(rows))
    print()
    print(f"throughput: {thr['inferences_per_s']:.1f} inferences/s ({thr['batches_per_s']:.1f} batches/s)")
    if stage_summary:
        print("H2D / compute / D2H from CUDA events (TensorRT backend).")
    else:
        print("H2D / compute / D2H: not available (the backend exposes no CUDA-event timings; "
              "only the TensorRT backend does).")
    warn = _cv_warning("engine", s, args.cv_warn)
    if warn:
        print(warn)
    doc = {"tool": "medge bench engine", "machine": machine_info(), "config": info,
           "summary": {"latency_ms": s, "throughput": thr, "stages_ms": stage_summary, "wall_s": round(wall, 3)},
           "samples_ms": [round(float(v), 4) for v in lat],
           "stage_samples_ms": stages}
    rows_csv = [{"iteration": i, "latency_ms": round(float(v), 4)} for i, v in enumerate(lat)]
    _write_outputs(args, doc, rows_csv, ["iteration", "latency_ms"],
                   {f"{info['model']} {info['precision']} b{args.batch}": lat},
                   f"medge bench engine: {info['model']} ({info['backend']} {info['precision']}, batch {args.batch})")
    return EXIT_OK


# ---------------------------------------------------------------------------- zmq mode
def scrape_metrics(url: str, timeout_s: float = 2.0) -> dict[str, float]:
    """Sum of each ``name{labels}`` sample on a Prometheus text endpoint (empty on failure)."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - user-given URL
            text = resp.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError):
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            key = smp.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items())) + "}"
            out[key] = float(smp.value)
    return out


def _mean_batch(before: dict[str, float], after: dict[str, float], model: str | None) -> float | None:
    s = c = 0.0
    for key, v in after.items():
        if key.startswith("medge_batch_size_sum{") and (model is None or f"model={model}" in key):
            s += v - before.get(key, 0.0)
        elif key.startswith("medge_batch_size_count{") and (model is None or f"model={model}" in key):
            c += v - before.get(key, 0.0)
    return round(s / c, 3) if c > 0 else None


def _zmq_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {"streams": args.streams, "rate": args.rate, "concurrency": args.concurrency}
    if base["rate"] is None and base["concurrency"] is None:
        base["concurrency"] = 1
    if args.sweep is None:
        return [base]
    key, values = args.sweep
    steps = []
    for i, v in enumerate(values):
        st = dict(base, index=i)
        if key == "rate":
            st["rate"], st["concurrency"] = float(v), None
        elif key == "concurrency":
            st["concurrency"], st["rate"] = int(v), None
        else:
            st["streams"] = int(v)
        steps.append(st)
    return steps


def _specs(step: dict[str, Any], source, model: str | None, window: int, want) -> list:
    from edge.loadgen import StreamSpec

    return [StreamSpec(name=f"bench-{k}", source=source, model=model, rate_fps=step["rate"],
                       concurrency=step["concurrency"], window=window, want=want)
            for k in range(int(step["streams"]))]


def _run_zmq(args: argparse.Namespace) -> int:
    from edge.loadgen import ArraySource, LoadResult, run_load

    want = [w.strip() for w in args.want.split(",")] if args.want else None
    model_obj = None
    task = None
    if args.compare_raw:
        if not args.model:
            raise MedgeError("--compare-raw needs --model (the model the daemon serves) to load the raw backend.")
        model_obj = _load(args, max_batch=1)
        task = model_obj.task
    elif args.model:
        try:
            from edge.manifest import Manifest, default_engines_dir

            task = Manifest.load((args.engines_dir or default_engines_dir()) / args.model).task
        except MedgeError:
            task = None
    frame = _input_frame(task or "segmentation", args.frame, args.dtype, args.source)
    source = ArraySource([frame])
    steps = _zmq_steps(args)
    results: list[dict[str, Any]] = []
    all_samples: list[dict[str, Any]] = []
    series: dict[str, np.ndarray] = {}
    aborted: str | None = None
    raw_lat: list[np.ndarray] = []
    pipe_lat: list[np.ndarray] = []
    total_s = len(steps) * (args.duration_s + args.warmup_s) * (2 if args.compare_raw else 1)
    prog = _Progress(total_s, not args.no_progress, "zmq ")
    print(f"medge bench zmq: {args.endpoint}, model {args.model or '(daemon default)'}, frame "
          f"{args.frame[0]}x{args.frame[1]} {args.dtype}, {len(steps)} step(s) of {args.duration_s:g} s"
          + (", with --compare-raw" if args.compare_raw else ""))
    try:
        x_raw = None
        if model_obj is not None:
            x_raw = np.ascontiguousarray(model_obj.preprocess(frame)[0][None], dtype=np.float32)
        for si, step in enumerate(steps):
            specs = _specs(step, source, args.model, args.window, want)
            if args.warmup_s > 0:
                warm = run_load(args.endpoint, specs, duration_s=args.warmup_s, reply_timeout_s=args.reply_timeout_s,
                                connect_timeout_s=args.connect_timeout_s, keep_last=False,
                                curve=curve_from_args(args))
                if warm.aborted:
                    aborted = warm.aborted
                    break
            before = scrape_metrics(args.metrics_url) if args.metrics_url else {}
            # Interleave raw and zmq blocks so both see the same machine state.
            blocks = max(4, int(args.duration_s)) if model_obj is not None else 1  # ~1 s blocks
            parts: list[LoadResult] = []
            step_raw: list[np.ndarray] = []
            step_pipe: list[np.ndarray] = []
            for b in range(blocks):
                if model_obj is not None:
                    r, _, _ = bench_engine_samples(model_obj.backend.infer, x_raw, warmup_s=0.05,
                                                duration_s=args.duration_s / blocks / 2, iterations=None)
                    step_raw.append(r)
                    step_pipe.append(_time_pipeline(model_obj, frame, args.duration_s / blocks / 2))
                    prog.update()
                res = run_load(args.endpoint, specs, duration_s=args.duration_s / blocks,
                               reply_timeout_s=args.reply_timeout_s, connect_timeout_s=args.connect_timeout_s,
                               on_tick=lambda t: prog.update(f"sent {t.sent} ok {t.ok}"), keep_last=False,
                               curve=curve_from_args(args))
                parts.append(res)
                if res.aborted:
                    aborted = res.aborted
                    break
            after = scrape_metrics(args.metrics_url) if args.metrics_url else {}
            merged = _merge(parts)
            summ = merged.summary()
            row = _zmq_row(step, summ)
            row["mean_batch"] = _mean_batch(before, after, args.model) if args.metrics_url else None
            summ["mean_batch"] = row["mean_batch"]
            paired = _paired_overhead_ms(merged)
            if paired is not None:
                summ["paired_overhead_ms"] = paired
            if step_raw:
                raw = np.concatenate(step_raw)
                pipe = np.concatenate(step_pipe)
                raw_lat.append(raw)
                pipe_lat.append(pipe)
                rs, ps = summarize_ms(raw), summarize_ms(pipe)
                summ["raw_infer_ms"], summ["raw_pipeline_ms"] = rs, ps
                lat = summ["latency_ms"]
                if lat.get("count") and rs.get("count"):
                    summ["overhead_ms"] = {
                        "vs_raw_infer": {"p50": round(lat["median_ms"] - rs["median_ms"], 4),
                                         "p99": round(lat["p99_ms"] - rs["p99_ms"], 4)},
                        "vs_raw_pipeline": {"p50": round(lat["median_ms"] - ps["median_ms"], 4),
                                            "p99": round(lat["p99_ms"] - ps["p99_ms"], 4)},
                    }
                    row["raw_p50"], row["raw_p99"] = rs["median_ms"], rs["p99_ms"]
                    row["ovh_p50"] = summ["overhead_ms"]["vs_raw_infer"]["p50"]
                    row["ovh_p99"] = summ["overhead_ms"]["vs_raw_infer"]["p99"]
            results.append({"step": step, "summary": summ, "row": row})
            label = _step_label(step)
            series[label] = merged.latencies_ms()
            for smp in merged.samples:
                d = smp.to_dict()
                d["step"] = si
                all_samples.append(d)
            if aborted:
                break
    finally:
        prog.done()
        if model_obj is not None:
            model_obj.close()
    rows = [r["row"] for r in results]
    if rows:
        cols = ["step", "streams", "rate", "conc", "sent", "ok", "dropped", "errors", "timeouts", "skipped",
                "fps", "p50", "p90", "p99", "max", "q_p50", "pre_p50", "inf_p50", "post_p50", "mean_batch"]
        if args.compare_raw:
            cols += ["raw_p50", "raw_p99", "ovh_p50", "ovh_p99"]
        print()
        print("client latency (ms) and daemon stages (p50, ms, from the replies' timing_us):")
        print(format_table(rows, cols))
    if args.compare_raw and results and "overhead_ms" in results[-1]["summary"]:
        for r in results:
            o = r["summary"].get("overhead_ms")
            if not o:
                continue
            lat, rs, ps = r["summary"]["latency_ms"], r["summary"]["raw_infer_ms"], r["summary"]["raw_pipeline_ms"]
            print()
            print(f"[{_step_label(r['step'])}] zmq end-to-end p50 {lat['median_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms")
            print(f"  raw backend.infer (same input, this process): p50 {rs['median_ms']:.3f} ms, p99 {rs['p99_ms']:.3f} ms")
            print(f"  raw pre+infer+post in-process:                 p50 {ps['median_ms']:.3f} ms, p99 {ps['p99_ms']:.3f} ms")
            print(f"  OVERHEAD (zmq - raw infer):    p50 {o['vs_raw_infer']['p50']:+.3f} ms, "
                  f"p99 {o['vs_raw_infer']['p99']:+.3f} ms   (targets <= 0.5 / <= 2 ms)")
            print(f"  transport+queue (zmq - raw pipeline): p50 {o['vs_raw_pipeline']['p50']:+.3f} ms, "
                  f"p99 {o['vs_raw_pipeline']['p99']:+.3f} ms")
            pr = r["summary"].get("paired_overhead_ms")
            if pr:
                print(f"  paired, per request (latency - daemon's infer time): p50 {pr['p50']:+.3f} ms, "
                      f"p99 {pr['p99']:+.3f} ms (robust to load drift)")
    for r in results:
        warn = _cv_warning(_step_label(r["step"]), r["summary"]["latency_ms"], args.cv_warn)
        if warn:
            print(warn)
    if raw_lat:
        series["raw infer"] = np.concatenate(raw_lat)
    doc = {"tool": "medge bench zmq", "machine": machine_info(),
           "config": {"endpoint": args.endpoint, "model": args.model, "frame": list(args.frame),
                      "dtype": args.dtype, "duration_s": args.duration_s, "warmup_s": args.warmup_s,
                      "window": args.window, "sweep": list(args.sweep) if args.sweep else None,
                      "compare_raw": args.compare_raw, "precision": args.precision, "backend": args.backend},
           "steps": [{"step": r["step"], "summary": r["summary"]} for r in results],
           "aborted": aborted,
           "samples": all_samples}
    if args.compare_raw and raw_lat:
        doc["raw_samples_ms"] = [round(float(v), 4) for v in np.concatenate(raw_lat)]
        doc["raw_pipeline_samples_ms"] = [round(float(v), 4) for v in np.concatenate(pipe_lat)]
    cols_csv = ["step", "stream", "seq", "t_send_s", "latency_ms", "status", "code",
                "queue_us", "preprocess_us", "infer_us", "postprocess_us", "total_us"]
    csv_rows = []
    for d in all_samples:
        row = {k: d.get(k) for k in cols_csv[:7]}
        for st in ("queue", "preprocess", "infer", "postprocess", "total"):
            row[f"{st}_us"] = d["timing_us"].get(st)
        csv_rows.append(row)
    _write_outputs(args, doc, csv_rows, cols_csv, series, f"medge bench zmq: {args.model or 'default model'}")
    if aborted:
        print(f"medge bench zmq: error: {aborted}; partial results kept"
              + (f" in {args.json}" if args.json else ""), file=sys.stderr)
        return EXIT_UNREACHABLE
    failed = sum(r["summary"]["errors"] + r["summary"]["timeouts"] for r in results)
    return EXIT_FAILURES if failed else EXIT_OK


def _paired_overhead_ms(res) -> dict[str, float] | None:
    """Per request: client latency minus the daemon's own ``infer`` time for that request.

    Both numbers come from the same request, so machine-load drift cancels;
    at batch 1 this is the serving overhead (transport, queue, pre/post).
    """
    d = [s.latency_us / 1000.0 - s.timing_us["infer"] / 1000.0 for s in res.samples
         if s.status == "ok" and s.latency_us is not None and isinstance(s.timing_us.get("infer"), (int, float))]
    if not d:
        return None
    p50, p99 = np.percentile(d, [50, 99])
    return {"p50": round(float(p50), 4), "p99": round(float(p99), 4), "count": len(d)}


def _time_pipeline(model, frame: np.ndarray, duration_s: float) -> np.ndarray:
    """Latency (ms) of the daemon's in-process work on one frame: pre + infer + post."""
    out = []
    end = time.perf_counter() + duration_s
    while True:
        t0 = time.perf_counter_ns()
        model.run([frame])
        out.append(time.perf_counter_ns() - t0)
        if time.perf_counter() >= end:
            break
    return np.asarray(out, dtype=np.float64) / 1e6


def _merge(parts):
    from edge.loadgen import LoadResult

    samples, ticks = [], []
    sent = skipped = 0
    wall = 0.0
    aborted = None
    for p in parts:
        samples += p.samples
        ticks += p.ticks
        sent += p.sent
        skipped += p.skipped
        wall += p.wall_s
        aborted = aborted or p.aborted
    return LoadResult(samples, ticks, sent, skipped, wall, aborted)


def _step_label(step: dict[str, Any]) -> str:
    mode = f"rate {step['rate']:g} fps" if step.get("rate") else f"concurrency {step['concurrency']}"
    return f"{step['streams']} stream(s), {mode}"


def _zmq_row(step: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    lat = s["latency_ms"]
    st = s["server_stages_ms"]

    def p50(name: str):
        return st.get(name, {}).get("median_ms")

    return {"step": step.get("index", 0), "streams": step["streams"], "rate": step.get("rate"),
            "conc": step.get("concurrency"), "sent": s["sent"], "ok": s["ok"], "dropped": s["dropped"],
            "errors": s["errors"], "timeouts": s["timeouts"], "skipped": s["skipped"],
            "fps": s["achieved_fps"], "p50": lat.get("median_ms"), "p90": lat.get("p90_ms"),
            "p99": lat.get("p99_ms"), "max": lat.get("max_ms"), "q_p50": p50("queue"),
            "pre_p50": p50("preprocess"), "inf_p50": p50("infer"), "post_p50": p50("postprocess")}


# ---------------------------------------------------------------------------- entry
def run(args: argparse.Namespace) -> int:
    """Run the chosen mode; see the module docstring for the exit status."""
    if args.mode == "engine":
        return _run_engine(args)
    if args.mode == "zmq":
        return _run_zmq(args)
    from edge import benchdicom

    return benchdicom.run(args)

