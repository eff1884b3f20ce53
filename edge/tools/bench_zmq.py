"""The measuring behind ``medge bench zmq`` (see :mod:`edge.commands.bench`).

End to end through a running daemon, like ``perf_analyzer``, with sweeps,
``--compare-raw`` (interleaved blocks of the raw backend in this process,
timed by :func:`edge.tools.bench.bench_engine_samples`) and
``--stability-percentage``. It prints a human table and writes the requested
result files (:func:`edge.tools.bench.write_files`); the exit statuses are
those of :mod:`edge.tools.endpoints`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.errors import MedgeError
from edge.ops.curve import curve_from_args
from edge.tools.bench import BenchProgress, bench_engine_samples, input_frame, load_bench_model, write_files
from edge.tools.endpoints import EXIT_FAILURES, EXIT_OK, EXIT_UNREACHABLE, Setting, resolve_client_endpoints
from edge.tools.results import (
    NEGATIVE_OVERHEAD,
    NOISE_UNKNOWN,
    WITHIN_NOISE,
    cv_warning,
    describe_overhead,
    format_table,
    machine_info,
    overhead_verdict,
    summarize_ms,
    within_percentage,
)

__all__ = ["run_zmq", "scrape_metrics"]

_log = logging.getLogger(__name__)

# What the daemon may add around the model at batch 1 on loopback (docs/benchmarking.md).
_OVERHEAD_TARGETS_MS = {"p50": 0.5, "p99": 2.0}
# Table marks beside an overhead that is not a measured overhead.
_OVERHEAD_MARKS = {NEGATIVE_OVERHEAD: " (neg)", WITHIN_NOISE: " (noise)", NOISE_UNKNOWN: " (?)"}


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
    from edge.tools.loadgen import StreamSpec

    return [StreamSpec(name=f"bench-{k}", source=source, model=model, rate_fps=step["rate"],
                       concurrency=step["concurrency"], window=window, want=want)
            for k in range(int(step["streams"]))]


@dataclass
class _Window:
    """One measurement window: the daemon run and, with ``--compare-raw``, the raw runs just before it."""

    load: Any  # edge.tools.loadgen.LoadResult
    raw_ms: np.ndarray | None = None
    pipeline_ms: np.ndarray | None = None

    @property
    def p50_ms(self) -> float | None:
        lat = self.load.latencies_ms()
        return float(np.percentile(lat, 50)) if lat.size else None

    @property
    def fps(self) -> float:
        ok = int(self.load.latencies_ms().size)
        return ok / self.load.wall_s if self.load.wall_s > 0 else 0.0


@dataclass
class _RawSide:
    """The model loaded in this process for ``--compare-raw`` and its input."""

    model: Any
    frame: np.ndarray
    x: np.ndarray


def _measure_window(args: argparse.Namespace, endpoint: str, specs: list, raw: _RawSide | None,
                    window_s: float, prog: BenchProgress) -> _Window:
    from edge.tools.loadgen import run_load

    raw_ms = pipe_ms = None
    if raw is not None:  # raw first, then the daemon: both see the same machine state
        raw_ms, _, _ = bench_engine_samples(raw.model.backend.infer, raw.x, warmup_s=0.05,
                                            duration_s=window_s / 2, iterations=None)
        pipe_ms = _time_pipeline(raw.model, raw.frame, window_s / 2)
        prog.update()
    load = run_load(endpoint, specs, duration_s=window_s, reply_timeout_s=args.reply_timeout_s,
                    connect_timeout_s=args.connect_timeout_s, keep_last=False, curve=curve_from_args(args),
                    on_tick=lambda t: prog.update(f"sent {t.sent} ok {t.ok}"))
    return _Window(load, raw_ms, pipe_ms)


def _measure_step(args: argparse.Namespace, endpoint: str, specs: list, raw: _RawSide | None,
                  prog: BenchProgress) -> tuple[list[_Window], dict[str, Any] | None]:
    """The windows one step reports, and the stability record (``None`` without ``--stability-percentage``).

    Fixed mode: ``--duration-s`` in one window, or in ~1 s windows with
    ``--compare-raw`` (interleaved raw and daemon blocks). Stability mode:
    windows of ``--measurement-interval-s`` until the last
    ``--stability-windows`` agree within P % on p50 and throughput, or
    ``--max-windows``; those last windows are reported.
    """
    pct = args.stability_percentage
    if pct is None:
        n = max(4, int(args.duration_s)) if raw is not None else 1
        window_s, max_n, need = args.duration_s / n, n, n
    else:
        window_s, max_n, need = args.measurement_interval_s, args.max_windows, args.stability_windows
    windows: list[_Window] = []
    stable = False
    while len(windows) < max_n:
        windows.append(_measure_window(args, endpoint, specs, raw, window_s, prog))
        if windows[-1].load.aborted:
            break
        if pct is not None and len(windows) >= need:
            last = windows[-need:]
            stable = within_percentage([w.p50_ms for w in last], pct) and within_percentage(
                [w.fps for w in last], pct)
            if stable:
                break
    used = windows[-need:]
    if pct is None:
        return used, None
    first_used = len(windows) - len(used)
    return used, {
        "percentage": pct, "stable": stable, "windows": len(windows), "stability_windows": need,
        "max_windows": max_n, "window_s": window_s,
        "per_window": [{"p50_ms": None if w.p50_ms is None else round(w.p50_ms, 4), "fps": round(w.fps, 2),
                        "reported": i >= first_used} for i, w in enumerate(windows)],
    }


def _overhead_noise_ms(windows: list[_Window]) -> dict[str, Any]:
    """Window-to-window standard deviation of each overhead (the run-to-run noise of that difference).

    Also ``windows``: how many windows had replies and raw samples to compare.
    """
    diffs: dict[str, dict[str, list[float]]] = {"vs_raw_infer": {"p50": [], "p99": []},
                                                 "vs_raw_pipeline": {"p50": [], "p99": []}}
    for w in windows:
        lat = w.load.latencies_ms()
        if not lat.size or w.raw_ms is None or not w.raw_ms.size or w.pipeline_ms is None:
            continue
        e2e = np.percentile(lat, [50, 99])
        for key, ref in (("vs_raw_infer", w.raw_ms), ("vs_raw_pipeline", w.pipeline_ms)):
            r = np.percentile(ref, [50, 99])
            diffs[key]["p50"].append(float(e2e[0] - r[0]))
            diffs[key]["p99"].append(float(e2e[1] - r[1]))
    out: dict[str, Any] = {k: {q: round(float(np.std(v, ddof=1)), 4) if len(v) >= 2 else None
                               for q, v in d.items()} for k, d in diffs.items()}
    out["windows"] = len(diffs["vs_raw_infer"]["p50"])
    return out


def _compare_raw(summ: dict[str, Any], row: dict[str, Any], windows: list[_Window]) -> None:
    """Add the raw side, the overheads, their noise and their verdicts to a step's summary and row."""
    raw = np.concatenate([w.raw_ms for w in windows if w.raw_ms is not None])
    pipe = np.concatenate([w.pipeline_ms for w in windows if w.pipeline_ms is not None])
    rs, ps = summarize_ms(raw), summarize_ms(pipe)
    summ["raw_infer_ms"], summ["raw_pipeline_ms"] = rs, ps
    lat = summ["latency_ms"]
    if not (lat.get("count") and rs.get("count")):
        return
    overhead = {
        "vs_raw_infer": {"p50": round(lat["median_ms"] - rs["median_ms"], 4),
                         "p99": round(lat["p99_ms"] - rs["p99_ms"], 4)},
        "vs_raw_pipeline": {"p50": round(lat["median_ms"] - ps["median_ms"], 4),
                            "p99": round(lat["p99_ms"] - ps["p99_ms"], 4)},
    }
    noise = _overhead_noise_ms(windows)
    summ["overhead_ms"] = overhead
    summ["overhead_noise_ms"] = noise
    summ["overhead_verdict"] = {k: {q: overhead_verdict(v, noise[k][q]) for q, v in d.items()}
                                for k, d in overhead.items()}
    row["raw_p50"], row["raw_p99"] = rs["median_ms"], rs["p99_ms"]
    for q in ("p50", "p99"):
        v = overhead["vs_raw_infer"][q]
        verdict = summ["overhead_verdict"]["vs_raw_infer"][q]
        row[f"ovh_{q}"] = f"{v:+.3f}{_OVERHEAD_MARKS.get(verdict, '')}"


def _step_result(args: argparse.Namespace, step: dict[str, Any], windows: list[_Window],
                 stability: dict[str, Any] | None, before: dict[str, float], after: dict[str, float],
                 raw: _RawSide | None) -> dict[str, Any]:
    merged = _merge([w.load for w in windows])
    summ = merged.summary()
    row = _zmq_row(step, summ)
    row["mean_batch"] = _mean_batch(before, after, args.model) if args.metrics_url else None
    summ["mean_batch"] = row["mean_batch"]
    paired = _paired_overhead_ms(merged)
    if paired is not None:
        summ["paired_overhead_ms"] = paired
    if raw is not None:
        _compare_raw(summ, row, windows)
    if stability is not None:
        summ["stability"] = stability
        row["windows"] = stability["windows"]
        row["stable"] = "yes" if stability["stable"] else "NO"
    raw_ms = [w.raw_ms for w in windows if w.raw_ms is not None]
    pipe_ms = [w.pipeline_ms for w in windows if w.pipeline_ms is not None]
    return {"step": step, "summary": summ, "row": row, "merged": merged,
            "raw_ms": np.concatenate(raw_ms) if raw_ms else None,
            "pipeline_ms": np.concatenate(pipe_ms) if pipe_ms else None}


def _print_compare_raw(r: dict[str, Any]) -> None:
    s = r["summary"]
    o, noise, verdict = s["overhead_ms"], s["overhead_noise_ms"], s["overhead_verdict"]
    lat, rs, ps = s["latency_ms"], s["raw_infer_ms"], s["raw_pipeline_ms"]
    print()
    print(f"[{_step_label(r['step'])}] zmq end-to-end p50 {lat['median_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms")
    print(f"  raw backend.infer (same input, this process): p50 {rs['median_ms']:.3f} ms, p99 {rs['p99_ms']:.3f} ms")
    print(f"  raw pre+infer+post in-process:                 p50 {ps['median_ms']:.3f} ms, p99 {ps['p99_ms']:.3f} ms")
    for key, title, targets in (("vs_raw_infer", "OVERHEAD (zmq - raw infer)", _OVERHEAD_TARGETS_MS),
                                ("vs_raw_pipeline", "transport+queue (zmq - raw pipeline)", {})):
        print(f"  {title}, {noise['windows']} windows:")
        for q in ("p50", "p99"):
            print(f"    {q} " + describe_overhead(o[key][q], noise[key][q], targets.get(q), verdict[key][q]))
    pr = s.get("paired_overhead_ms")
    if pr:
        print(f"  paired, per request (latency - daemon's infer time): p50 {pr['p50']:+.3f} ms, "
              f"p99 {pr['p99']:+.3f} ms (robust to load drift)")


def _print_stability(r: dict[str, Any]) -> None:
    st = r["summary"]["stability"]
    p50s = ", ".join("-" if w["p50_ms"] is None else f"{w['p50_ms']:.3f}" for w in st["per_window"])
    fps = ", ".join(f"{w['fps']:.1f}" for w in st["per_window"])
    head = f"[{_step_label(r['step'])}] "
    if st["stable"]:
        print(f"{head}stable: the last {st['stability_windows']} of {st['windows']} windows of "
              f"{st['window_s']:g} s agree within {st['percentage']:g}% (p50 ms: {p50s}; fps: {fps})")
    else:
        print(f"WARNING: {head}NOT stable within {st['percentage']:g}% after {st['windows']} windows of "
              f"{st['window_s']:g} s (p50 ms: {p50s}; fps: {fps}); the figures are from the last "
              f"{st['stability_windows']} windows (longer --measurement-interval-s? quieter machine?)")


def _print_zmq_report(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    rows = [r["row"] for r in results]
    if rows:
        cols = ["step", "streams", "rate", "conc", "sent", "ok", "dropped", "errors", "timeouts", "skipped",
                "fps", "p50", "p90", "p99", "max", "q_p50", "pre_p50", "inf_p50", "post_p50", "mean_batch"]
        if args.stability_percentage is not None:
            cols += ["windows", "stable"]
        if args.compare_raw:
            cols += ["raw_p50", "raw_p99", "ovh_p50", "ovh_p99"]
        print()
        print("client latency (ms) and daemon stages (p50, ms, from the replies' timing_us):")
        print(format_table(rows, cols))
        if args.compare_raw:
            print("ovh: zmq - raw infer; (noise): within the window-to-window noise; "
                  "(neg): negative, measurement noise, not a speed-up; (?): noise not estimated")
    for r in results:
        if "overhead_ms" in r["summary"]:
            _print_compare_raw(r)
    for r in results:
        if "stability" in r["summary"]:
            _print_stability(r)
    for r in results:
        warn = cv_warning(_step_label(r["step"]), r["summary"]["latency_ms"], args.cv_warn)
        if warn:
            print(warn)


def _zmq_raw_side(args: argparse.Namespace) -> tuple[_RawSide | None, np.ndarray]:
    """The in-process model for ``--compare-raw`` (or ``None``) and the frame to send (by the model's task)."""
    model_obj = None
    task = None
    if args.compare_raw:
        if not args.model:
            raise MedgeError("--compare-raw needs --model (the model the daemon serves) to load the raw backend.")
        model_obj = load_bench_model(args, max_batch=1)
        task = model_obj.task
    elif args.model:
        try:
            from edge.inference.manifest import Manifest, default_engines_dir

            task = Manifest.load((args.engines_dir or default_engines_dir()) / args.model).task
        except MedgeError:
            task = None
    frame = input_frame(task or "segmentation", args.frame, args.dtype, args.source)
    if model_obj is None:
        return None, frame
    done = False
    try:
        x = np.ascontiguousarray(model_obj.preprocess(frame)[0][None], dtype=np.float32)
        done = True
    finally:
        if not done:
            model_obj.close()
    return _RawSide(model_obj, frame, x), frame


def run_zmq(args: argparse.Namespace) -> int:
    """``medge bench zmq``: end to end through a running daemon; the exit status of ``medge bench``."""
    from edge.tools.loadgen import ArraySource, run_load

    if args.stability_percentage is not None and args.max_windows < args.stability_windows:
        raise MedgeError(f"--max-windows {args.max_windows} is below --stability-windows "
                         f"{args.stability_windows}: stability could never be judged.")
    eps = resolve_client_endpoints(args.config, endpoint=args.endpoint, engines_dir=args.engines_dir)
    endpoint = eps.zmq_ingest.value
    print(f"endpoint: {eps.zmq_line()}")
    args.engines_dir = eps.engines_dir.value
    want = [w.strip() for w in args.want.split(",")] if args.want else None
    raw, frame = _zmq_raw_side(args)
    source = ArraySource([frame])
    steps = _zmq_steps(args)
    results: list[dict[str, Any]] = []
    aborted: str | None = None
    per_step_s = (args.duration_s if args.stability_percentage is None
                  else args.max_windows * args.measurement_interval_s)
    total_s = len(steps) * (per_step_s + args.warmup_s) * (2 if raw is not None else 1)
    prog = BenchProgress(total_s, not args.no_progress, "zmq ")
    if eps.zmq_curve and curve_from_args(args) is None:
        print("note: the daemon's settings require CURVE ([zmq] curve_server_key): "
              "pass --curve-server-key and --curve-client-key")
    how = (f"{len(steps)} step(s) of {args.duration_s:g} s" if args.stability_percentage is None else
           f"{len(steps)} step(s), windows of {args.measurement_interval_s:g} s until the last "
           f"{args.stability_windows} agree within {args.stability_percentage:g}% (at most {args.max_windows})")
    print(f"medge bench zmq: model {args.model or '(daemon default)'}, frame "
          f"{args.frame[0]}x{args.frame[1]} {args.dtype}, {how}" + (", with --compare-raw" if raw else ""))
    try:
        for step in steps:
            specs = _specs(step, source, args.model, args.window, want)
            if args.warmup_s > 0:
                warm = run_load(endpoint, specs, duration_s=args.warmup_s, reply_timeout_s=args.reply_timeout_s,
                                connect_timeout_s=args.connect_timeout_s, keep_last=False,
                                curve=curve_from_args(args))
                if warm.aborted:
                    aborted = warm.aborted
                    break
            before = scrape_metrics(args.metrics_url) if args.metrics_url else {}
            windows, stability = _measure_step(args, endpoint, specs, raw, prog)
            after = scrape_metrics(args.metrics_url) if args.metrics_url else {}
            results.append(_step_result(args, step, windows, stability, before, after, raw))
            aborted = results[-1]["merged"].aborted
            if aborted:
                break
    finally:
        prog.done()
        if raw is not None:
            raw.model.close()
    _print_zmq_report(args, results)
    _write_zmq_files(args, eps.zmq_ingest, results, aborted)
    if aborted:
        print(f"medge bench zmq: error: {aborted}; partial results kept"
              + (f" in {args.json}" if args.json else ""), file=sys.stderr)
        return EXIT_UNREACHABLE
    failed = sum(r["summary"]["errors"] + r["summary"]["timeouts"] for r in results)
    return EXIT_FAILURES if failed else EXIT_OK


def _write_zmq_files(args: argparse.Namespace, endpoint: Setting, results: list[dict[str, Any]],
                     aborted: str | None) -> None:
    series: dict[str, np.ndarray] = {}
    all_samples: list[dict[str, Any]] = []
    for si, r in enumerate(results):
        series[_step_label(r["step"])] = r["merged"].latencies_ms()
        for smp in r["merged"].samples:
            all_samples.append(dict(smp.to_dict(), step=si))
    raw = [r["raw_ms"] for r in results if r["raw_ms"] is not None]
    pipe = [r["pipeline_ms"] for r in results if r["pipeline_ms"] is not None]
    if raw:
        series["raw infer"] = np.concatenate(raw)
    doc = {"tool": "medge bench zmq", "machine": machine_info(),
           "config": {"endpoint": endpoint.value, "endpoint_from": endpoint.origin, "model": args.model, "frame": list(args.frame),
                      "dtype": args.dtype, "duration_s": args.duration_s, "warmup_s": args.warmup_s,
                      "window": args.window, "sweep": list(args.sweep) if args.sweep else None,
                      "compare_raw": args.compare_raw, "precision": args.precision, "backend": args.backend,
                      "stability_percentage": args.stability_percentage,
                      "measurement_interval_s": args.measurement_interval_s,
                      "stability_windows": args.stability_windows, "max_windows": args.max_windows},
           "steps": [{"step": r["step"], "summary": r["summary"]} for r in results],
           "aborted": aborted,
           "samples": all_samples}
    if args.compare_raw and raw:
        doc["raw_samples_ms"] = [round(float(v), 4) for v in np.concatenate(raw)]
        doc["raw_pipeline_samples_ms"] = [round(float(v), 4) for v in np.concatenate(pipe)]
    cols_csv = ["step", "stream", "seq", "t_send_s", "latency_ms", "status", "code",
                "queue_us", "preprocess_us", "infer_us", "postprocess_us", "total_us"]
    csv_rows = []
    for d in all_samples:
        row = {k: d.get(k) for k in cols_csv[:7]}
        for st in ("queue", "preprocess", "infer", "postprocess", "total"):
            row[f"{st}_us"] = d["timing_us"].get(st)
        csv_rows.append(row)
    write_files(args, doc, csv_rows, cols_csv, series, f"medge bench zmq: {args.model or 'default model'}")


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
    from edge.tools.loadgen import LoadResult

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
