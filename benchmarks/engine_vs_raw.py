#!/usr/bin/env python3
"""Does ``medge bench engine`` add overhead? Compare it with a plain ONNX Runtime loop.

For one model and precision, alternately (``--rounds`` times each, every run
a fresh process, so neither side inherits the other's warm caches):

- **tool**: ``medge bench engine --model M --precision P --json ...``;
- **raw**: a plain Python loop over ``onnxruntime.InferenceSession.run`` on
  the same artifact and the same preprocessed input tensor, with the same
  session options the daemon's backend uses (intra-op threads = usable
  cores, one inter-op thread, sequential execution, no spinning);
- **raw-default** (informational): the same loop with ONNX Runtime's default
  session options (spinning threads), to show what session options alone do.

The medians of the pooled samples must agree within ``--tolerance``
(default 5 %). Exit status 0 when they do, 1 when not.

Usage::

    python benchmarks/engine_vs_raw.py --model us-lesion-seg --precision fp32 --duration-s 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

_RAW_LOOP = r"""
import json, os, sys, time
import numpy as np
import onnxruntime as ort
path, x_path, duration_s, warmup_s, default_opts = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"
x = np.load(x_path)
if default_opts:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
else:
    so = ort.SessionOptions()
    so.intra_op_num_threads = len(os.sched_getaffinity(0))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
feed = {name: x}
end = time.perf_counter() + warmup_s
sess.run(None, feed)
while time.perf_counter() < end:
    sess.run(None, feed)
out = []
end = time.perf_counter() + duration_s
while True:
    t0 = time.perf_counter_ns()
    sess.run(None, feed)
    t1 = time.perf_counter_ns()
    out.append((t1 - t0) / 1e6)
    if time.perf_counter() >= end:
        break
json.dump(out, sys.stdout)
"""


def _prepare_input(model: str, precision: str, engines_dir: Path | None, frame: tuple[int, int],
                   workdir: Path) -> tuple[Path, Path]:
    """The artifact path and the exact input tensor ``medge bench engine`` times (saved as .npy)."""
    sys.path.insert(0, str(ROOT)) if str(ROOT) not in sys.path else None
    from edge.inference.manifest import Manifest, default_engines_dir
    from edge.tools.bench import input_frame

    m = Manifest.load((engines_dir or default_engines_dir()) / model)
    art = m.artifact_path(precision, verify=True)
    from edge.inference.preprocess import preprocess

    x, _ = preprocess(input_frame(m.task, frame), m.input, m.preprocessing)
    xp = workdir / f"{model}-{precision}-input.npy"
    np.save(xp, np.ascontiguousarray(x[None], dtype=np.float32))
    return art, xp


def _run_tool(model: str, precision: str, engines_dir: Path | None, duration_s: float, warmup_s: float,
              workdir: Path, k: int) -> list[float]:
    out = workdir / f"tool-{k}.json"
    cmd = [sys.executable, "-m", "edge.cli", "--log-level", "WARNING", "bench", "engine", "--model", model,
           "--precision", precision, "--duration-s", str(duration_s), "--warmup-s", str(warmup_s),
           "--no-progress", "--json", str(out)]
    if engines_dir:
        cmd += ["--engines-dir", str(engines_dir)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["samples_ms"]


def _run_raw(art: Path, x_path: Path, duration_s: float, warmup_s: float, default_opts: bool) -> list[float]:
    res = subprocess.run([sys.executable, "-c", _RAW_LOOP, str(art), str(x_path), str(duration_s), str(warmup_s),
                          "1" if default_opts else "0"], check=True, capture_output=True, text=True)
    return json.loads(res.stdout)


def compare(model: str, precision: str = "fp32", *, engines_dir: Path | None = None, duration_s: float = 4.0,
            warmup_s: float = 1.0, rounds: int = 3, frame: tuple[int, int] = (480, 640),
            tolerance: float = 0.05, with_default: bool = True) -> dict[str, Any]:
    """Run the alternating comparison; return medians, ratio and whether it passes."""
    from edge.tools.results import summarize_ms

    with tempfile.TemporaryDirectory(prefix="medge-evr-") as tmp:
        work = Path(tmp)
        art, xp = _prepare_input(model, precision, engines_dir, frame, work)
        tool: list[float] = []
        raw: list[float] = []
        raw_default: list[float] = []
        per_round = []
        for k in range(rounds):
            t = _run_tool(model, precision, engines_dir, duration_s, warmup_s, work, k)
            r = _run_raw(art, xp, duration_s, warmup_s, False)
            tool += t
            raw += r
            per_round.append({"tool_median_ms": round(float(np.median(t)), 4),
                              "raw_median_ms": round(float(np.median(r)), 4)})
            if with_default:
                raw_default += _run_raw(art, xp, duration_s, warmup_s, True)
    st, sr = summarize_ms(tool), summarize_ms(raw)
    ratio = st["median_ms"] / sr["median_ms"]
    out = {"model": model, "precision": precision, "rounds": rounds, "duration_s_each": duration_s,
           "tool_ms": st, "raw_ms": sr, "per_round": per_round,
           "median_ratio_tool_over_raw": round(ratio, 4), "tolerance": tolerance,
           "passes": bool(abs(ratio - 1.0) <= tolerance)}
    if with_default:
        out["raw_default_session_options_ms"] = summarize_ms(raw_default)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="us-lesion-seg")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--engines-dir", type=Path, default=None)
    p.add_argument("--duration-s", type=float, default=4.0)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    t0 = time.time()
    res = compare(a.model, a.precision, engines_dir=a.engines_dir, duration_s=a.duration_s,
                  warmup_s=a.warmup_s, rounds=a.rounds, tolerance=a.tolerance)
    print(f"{a.model} {a.precision}: medge bench engine median {res['tool_ms']['median_ms']:.3f} ms "
          f"(n={res['tool_ms']['count']}), plain InferenceSession.run loop {res['raw_ms']['median_ms']:.3f} ms "
          f"(n={res['raw_ms']['count']}): ratio {res['median_ratio_tool_over_raw']:.3f} "
          f"({'within' if res['passes'] else 'OUTSIDE'} {a.tolerance * 100:.0f}%); "
          f"ORT default options: {res['raw_default_session_options_ms']['median_ms']:.3f} ms; "
          f"{time.time() - t0:.0f} s")
    if a.json:
        from edge.tools.results import write_json

        write_json(a.json, res)
    return 0 if res["passes"] else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
