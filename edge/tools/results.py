"""Latency statistics and result files for ``medge bench`` / ``medge send``.

Pure numpy; no printing. Percentiles use linear interpolation
(``numpy.percentile`` default), the same definition trtexec and
perf_analyzer use for their summaries closely enough for comparison.

Judgements printed beside the numbers:

- **noise**: the coefficient of variation (CV = standard deviation / mean)
  of the samples; above ``--cv-warn`` a run is noise-dominated and
  :func:`cv_warning` says so, as ``trtexec`` does;
- **stability** (``bench zmq --stability-percentage``, after perf_analyzer):
  :func:`within_percentage` holds when each of the last windows' values lies
  within P % of their mean;
- **overheads** (``--compare-raw``): :func:`overhead_verdict` labels a
  difference that is negative, or smaller than the window-to-window noise,
  instead of letting it pass for a measured overhead.

Examples
--------
>>> s = summarize_ms([1.0, 2.0, 3.0, 4.0])
>>> s["count"], s["median_ms"], s["max_ms"]
(4, 2.5, 4.0)
>>> within_percentage([10.0, 10.5, 9.8], 10.0), within_percentage([10.0, 14.0, 9.0], 10.0)
(True, False)
>>> overhead_verdict(-0.2, 0.1), overhead_verdict(0.05, 0.1), overhead_verdict(0.4, 0.1)
('negative: measurement noise, not a speed-up', 'within noise', 'above noise')
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from edge.fileio import atomic_write

__all__ = [
    "cpu_model",
    "PERCENTILES",
    "summarize_ms",
    "coefficient_of_variation",
    "stats_row",
    "cv_warning",
    "within_percentage",
    "NEGATIVE_OVERHEAD",
    "WITHIN_NOISE",
    "ABOVE_NOISE",
    "NOISE_UNKNOWN",
    "overhead_verdict",
    "describe_overhead",
    "format_table",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "write_csv",
    "write_outputs",
    "machine_info",
]

_log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 95, 99)


def coefficient_of_variation(values_ms: Sequence[float] | np.ndarray) -> float:
    """Standard deviation over mean (0 for fewer than two samples)."""
    a = np.asarray(values_ms, dtype=np.float64)
    if a.size < 2 or a.mean() <= 0:
        return 0.0
    return float(a.std(ddof=1) / a.mean())


def summarize_ms(values_ms: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """min / mean / median / p90 / p95 / p99 / max / std / cv of latencies in ms.

    An empty input gives ``{"count": 0}`` and NaN-free output (no keys but count).
    """
    a = np.asarray(values_ms, dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    p50, p90, p95, p99 = np.percentile(a, PERCENTILES)
    return {
        "count": int(a.size),
        "min_ms": round(float(a.min()), 4),
        "mean_ms": round(float(a.mean()), 4),
        "median_ms": round(float(p50), 4),
        "p90_ms": round(float(p90), 4),
        "p95_ms": round(float(p95), 4),
        "p99_ms": round(float(p99), 4),
        "max_ms": round(float(a.max()), 4),
        "std_ms": round(float(a.std(ddof=1)) if a.size > 1 else 0.0, 4),
        "cv": round(coefficient_of_variation(a), 4),
    }


def stats_row(name: str, s: Mapping[str, Any]) -> dict[str, Any]:
    """One table row of a :func:`summarize_ms` summary (n, min, mean, median, p90, p95, p99, max, cv)."""
    return {"": name, "n": s.get("count", 0), "min": s.get("min_ms"), "mean": s.get("mean_ms"),
            "median": s.get("median_ms"), "p90": s.get("p90_ms"), "p95": s.get("p95_ms"),
            "p99": s.get("p99_ms"), "max": s.get("max_ms"), "cv": s.get("cv")}


def cv_warning(name: str, s: Mapping[str, Any], limit: float) -> str | None:
    """The warning for a noise-dominated run (CV above ``limit``), or ``None``."""
    cv = s.get("cv")
    if cv is not None and cv > limit:
        return (f"WARNING: {name} latency is unstable: coefficient of variation {cv * 100:.1f}% "
                f"> {limit * 100:.0f}% (shared or busy machine? longer run? pinned clocks?)")
    return None


def within_percentage(values: Sequence[float | None], percentage: float) -> bool:
    """Whether every value lies within ``percentage`` % of the values' mean (a missing value: no).

    perf_analyzer's stability rule, applied to the last few measurement
    windows' p50 latency and throughput.
    """
    if not values or any(v is None or not np.isfinite(v) for v in values):
        return False
    a = np.asarray(values, dtype=np.float64)
    m = float(a.mean())
    if m <= 0:
        return False
    return bool(np.all(np.abs(a - m) <= percentage / 100.0 * m))


NEGATIVE_OVERHEAD = "negative: measurement noise, not a speed-up"
WITHIN_NOISE = "within noise"
ABOVE_NOISE = "above noise"
NOISE_UNKNOWN = "noise not estimated"


def overhead_verdict(overhead_ms: float, noise_ms: float | None) -> str:
    """How to read an overhead (end to end minus raw): one of the four labels above.

    Negative: the daemon cannot be faster than the model alone, so the
    figure is noise. Smaller than ``noise_ms`` (the window-to-window standard
    deviation of the same difference): within noise. ``noise_ms`` ``None``:
    not enough windows to tell.
    """
    if overhead_ms < 0:
        return NEGATIVE_OVERHEAD
    if noise_ms is None or not np.isfinite(noise_ms):
        return NOISE_UNKNOWN
    return WITHIN_NOISE if overhead_ms <= noise_ms else ABOVE_NOISE


def describe_overhead(value_ms: float, noise_ms: float | None, target_ms: float | None = None,
                      verdict: str | None = None) -> str:
    """An overhead as an operator should read it: the figure, its label, and the target only where it means something.

    >>> describe_overhead(-0.3, 0.2, 2.0)
    '-0.300 ms: negative: measurement noise, not a speed-up (±0.200 ms between windows)'
    >>> describe_overhead(0.3, 0.05, 0.5)
    '+0.300 ms (±0.050 ms between windows); target <= 0.5 ms: met'
    """
    verdict = verdict or overhead_verdict(value_ms, noise_ms)
    spread = f"±{noise_ms:.3f} ms between windows" if noise_ms is not None else NOISE_UNKNOWN
    if verdict in (NEGATIVE_OVERHEAD, WITHIN_NOISE):
        return f"{value_ms:+.3f} ms: {verdict} ({spread})"
    text = f"{value_ms:+.3f} ms ({spread})"
    if verdict == ABOVE_NOISE and target_ms is not None:
        text += f"; target <= {target_ms:g} ms: " + ("met" if value_ms <= target_ms else "NOT met")
    return text


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain fixed-width text table (header + one line per row)."""
    if not rows:
        return "(no rows)"
    cols = list(columns) if columns is not None else list(rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` (creating its folder) with :func:`edge.fileio.atomic_write`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, data)


def atomic_write_text(path: Path | str, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable.")


def write_json(path: Path | str, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON (numpy scalars and arrays allowed)."""
    return atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def write_csv(path: Path | str, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Atomically write ``rows`` (dicts) as CSV with the given columns."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return atomic_write_text(path, buf.getvalue())


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's word elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_names() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()] if out.returncode == 0 else []


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU (if any) and library versions of this machine."""
    from importlib import metadata

    versions: dict[str, str] = {"python": platform.python_version()}
    for dist in ("medge", "onnxruntime", "onnxruntime-gpu", "numpy", "pyzmq", "pydicom",
                 "pynetdicom", "tensorrt", "pillow", "torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import zmq

        versions["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    mem_bytes = 0
    try:
        mem_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "cpu_usable": usable,
        "memory_bytes": int(mem_bytes),
        "gpus": _gpu_names(),
        "versions": versions,
    }


# ---------------------------------------------------------------------------- result files
def write_outputs(doc: dict[str, Any], rows: Sequence[dict[str, Any]], columns: Sequence[str],
                  series: Mapping[str, np.ndarray], title: str, *, json_path: Path | None = None,
                  csv_path: Path | None = None, plot_path: Path | None = None) -> list[Path]:
    """Write the requested result files atomically; return their paths.

    ``doc`` goes to ``json_path``, ``rows`` (with ``columns``) to
    ``csv_path``, and a latency histogram + CDF of ``series`` to
    ``plot_path`` (PNG). A ``None`` path is skipped.
    """
    written: list[Path] = []
    if json_path:
        written.append(write_json(json_path, doc))
    if csv_path:
        written.append(write_csv(csv_path, rows, columns))
    if plot_path:
        from edge.tools.plots import save_latency_plot

        plotted = save_latency_plot(series, plot_path, title=title)  # None without the plots extra
        if plotted is not None:
            written.append(plotted)
    return written
