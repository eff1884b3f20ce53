#!/usr/bin/env python3
"""INT8 vs FP32 latency of a bundled engine on ONNX Runtime CPU, batch 1, in one run.

Both sessions are created in this process and timed interleaved (FP32, INT8,
FP32, INT8, ...) on the same preprocessed synthetic frame, so machine noise
hits both alike; the script prints the medians and their ratio and can write
a JSON record (machine, date, versions) to ``benchmarks/results/``.

Usage::

    python benchmarks/int8_speed.py                       # us-lesion-seg, 300 runs
    python benchmarks/int8_speed.py --runs 500 --out benchmarks/results/int8_speed.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent

from edge.fileio import atomic_write_text  # noqa: E402
from edge.inference.manifest import Manifest  # noqa: E402
from edge.inference.preprocess import preprocess  # noqa: E402
from edge.tools.results import machine_info  # noqa: E402


def _frame(task: str) -> np.ndarray:
    from trainer.data import make_ultrasound, make_xray, sample_rng

    rng = sample_rng(4242, 0)
    return make_ultrasound(rng)[0] if task == "segmentation" else make_xray(rng)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default=str(ROOT / "engines" / "us-lesion-seg"))
    p.add_argument("--runs", type=int, default=300, help="timed runs per precision")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT default)")
    p.add_argument("--out", default=None, help="write the JSON record here")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=ONNX",
                   help="also time this ONNX file in the same interleaved loop (e.g. int8sym=/tmp/sym.onnx)")
    args = p.parse_args(argv)

    man = Manifest.load(args.engine)
    x, _ = preprocess(_frame(man.task), man.input, man.preprocessing)
    batch = x[None].astype(np.float32)
    sessions = {}
    for prec in ("fp32", "int8"):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if args.threads:
            so.intra_op_num_threads = args.threads
        path = man.artifact_path(prec, verify=True)
        sessions[prec] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for spec in args.extra:
        label, _, path = spec.partition("=")
        sessions[label] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = man.input.name
    for _ in range(args.warmup):
        for s in sessions.values():
            s.run(None, {name: batch})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {name: batch})
            times[k].append(time.perf_counter() - t0)
    stats = {
        k: {
            "p50_ms": float(np.median(v) * 1e3),
            "p90_ms": float(np.percentile(v, 90) * 1e3),
            "min_ms": float(np.min(v) * 1e3),
        }
        for k, v in times.items()
    }
    ratio = stats["fp32"]["p50_ms"] / stats["int8"]["p50_ms"]
    extra = {k: {**stats[k], "speedup_vs_fp32": round(stats["fp32"]["p50_ms"] / stats[k]["p50_ms"], 3)}
             for k in stats if k not in ("fp32", "int8")}
    record = {
        "what": f"{man.name} ONNX Runtime CPU, batch 1, input {list(man.input.size)}, median of {args.runs} interleaved runs",
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {**machine_info(), "nice": os.nice(0)},
        "threads": args.threads or "ort-default",
        "int8_activations": man.training.get("quantization", {}).get("activations", "?"),
        "fp32": stats["fp32"],
        "int8": stats["int8"],
        "speedup_int8_vs_fp32": round(ratio, 3),
    }
    if extra:
        record["extra"] = extra
    print(f"{man.name}: FP32 p50 {stats['fp32']['p50_ms']:.2f} ms, INT8 p50 {stats['int8']['p50_ms']:.2f} ms "
          f"-> INT8 is {ratio:.2f}x faster (batch 1, {args.runs} runs each)")
    for k, v in extra.items():
        print(f"  {k}: p50 {v['p50_ms']:.2f} ms ({v['speedup_vs_fp32']:.2f}x vs FP32)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(record, indent=2) + "\n", durable=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
