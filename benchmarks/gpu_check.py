#!/usr/bin/env python3
"""The prepared GPU check: one command on a machine with an NVIDIA GPU, one results file.

Run it as ``benchmarks/gpu_check.sh`` (which picks the Python and bounds the
time) or directly. It writes ``benchmarks/results/gpu-check-<host>-<date>.json``
and ``.md`` (``--out-dir`` elsewhere), rewritten after every section, so
that a run cut short still leaves what it measured.

Sections, in order (``gpu``: needs a GPU library; each says ``skipped: <why>``
where its library or a GPU is missing, and an error in one is recorded and
the run goes on):

``versions``
    Platform, driver and GPUs (NVML), CUDA runtime/driver and cuda-python,
    TensorRT, ONNX Runtime and its providers, nvidia-ml-py.
``nvml`` (gpu)
    The ``medge_gpu_*`` gauges through medge's own collector
    (:func:`edge.ops.nvml.gpu_collector`), the ``gpu`` label method and the
    gauges each GPU supports.
``cuda_roundtrip`` (gpu)
    cuda-python: pinned host and device buffers, a non-blocking stream,
    H2D and D2H copies timed by CUDA events, data checked after the round trip.
``ort_parity`` (gpu)
    ONNX Runtime's CUDA provider vs its CPU provider on every artifact of
    every bundled model: which provider really ran, max abs difference of
    the raw outputs, Dice (segmentation) or box agreement (detection) after
    the daemon's post-processing, on held-out-like frames.
``tensorrt`` (gpu)
    Per model and precision (fp32, fp16, int8), in a child process: build
    time, cached-load time, TensorRT vs ONNX Runtime fp32 parity, batch 1
    vs batch 4 (``gpu_check_jobs.py trt``).
``tensorrt_race`` (gpu)
    Two processes load the same model on one empty cache folder at the same
    moment: both must succeed, one plan must be left, no temp files.
``bench_engine`` (gpu)
    ``medge bench engine --backend tensorrt --precision P`` per model and
    precision, on the plans built above.
``doctor``
    ``medge doctor``'s GPU checks (:func:`edge.tools.gpu_probe.gpu_checks`)
    for a configuration with both models on ``backend = "auto"`` and this
    run's engine cache.

``--quick`` shortens everything (4 frames, 1 s benches, one model in the
race); ``--budget-s`` (default 450) skips the sections that would start
after it, so ``gpu_check.sh`` finishes within about 8 minutes.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for _p in (ROOT, HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402

from edge.tools.gpu_probe import cuda_versions, gpu_checks, package_version  # noqa: E402
from edge.tools.results import atomic_write_text, machine_info, write_json  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")


class Skipped(Exception):
    """A section that cannot run here; the message says why."""


class Run:
    """What the sections share: options, the deadline, the work folder, the results so far."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.quick = bool(args.quick)
        self.work = work
        self.cache_dir = work / "engine-cache"
        self.deadline = time.monotonic() + float(args.budget_s)
        self.frames = 4 if self.quick else int(args.frames)
        self.results: dict[str, Any] = {}

    def left_s(self) -> float:
        """Seconds left before the budget runs out."""
        return self.deadline - time.monotonic()

    def models(self) -> list[str]:
        """The bundled models (or ``--models``), by name."""
        from edge.inference.manifest import discover

        found = sorted(discover(self.args.engines_dir))
        return [m for m in found if not self.args.models or m in self.args.models]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


# ---------------------------------------------------------------------------- sections
def versions(run: Run) -> dict[str, Any]:
    """Software and hardware versions (never skipped)."""
    from edge.ops.nvml import nvml_status

    doc: dict[str, Any] = {"machine": machine_info(), "python": platform.python_version(),
                           "medge": package_version("medge"), "cuda": cuda_versions()}
    nv, why = nvml_status()
    if nv is None:
        doc["nvml"] = f"skipped: {why}"
    else:
        try:
            drv = nv.nvmlSystemGetDriverVersion()
            doc["driver"] = drv.decode() if isinstance(drv, bytes) else str(drv)
            doc["nvml_cuda_driver"] = int(nv.nvmlSystemGetCudaDriverVersion())
        except nv.NVMLError as exc:
            doc["nvml"] = f"error: {exc}"
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "onnxruntime", "onnxruntime-gpu",
                 "nvidia-ml-py", "cuda-python", "cuda-bindings"):
        doc.setdefault("packages", {})[dist] = package_version(dist)
    try:
        import onnxruntime as ort

        doc["onnxruntime_providers"] = list(ort.get_available_providers())
    except ImportError as exc:
        doc["onnxruntime_providers"] = f"skipped: {exc}"
    return doc


def nvml(run: Run) -> dict[str, Any]:
    """The GPU gauges as ``/metrics`` shows them, through medge's collector."""
    from prometheus_client import CollectorRegistry, generate_latest

    from edge.ops.jetson import JetsonGpuCollector
    from edge.ops.nvml import NvmlCollector, gpu_collector, nvml_status

    collector = gpu_collector()
    if collector is None:
        _, why = nvml_status()
        raise Skipped(f"{why or 'NVML lists no GPU'}; no Jetson GPU load file either")
    reg = CollectorRegistry()
    reg.register(collector)
    text = generate_latest(reg).decode()
    doc: dict[str, Any] = {"exposition": [ln for ln in text.splitlines() if ln and not ln.startswith("#")]}
    if isinstance(collector, NvmlCollector):
        doc.update(kind="nvml", label_method=collector.label_method, labels=collector.labels,
                   supported=collector.supported())
    elif isinstance(collector, JetsonGpuCollector):
        doc.update(kind="jetson-sysfs", load=str(collector.files.load), temperature=str(collector.files.temperature))
    return doc


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as exc:
            raise Skipped(f"cuda-python is not installed ({exc})") from exc
    return cudart


def _ok(cudart: Any, result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA call failed: {getattr(err, 'name', err)}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def cuda_roundtrip(run: Run) -> dict[str, Any]:
    """Pinned host -> device -> pinned host on a non-blocking stream, timed with events, data checked."""
    cudart = _cudart()
    v = cuda_versions()
    if not v["devices"]:
        raise Skipped(f"no CUDA device ({v['error'] or 'count 0'})")
    nbytes = (4 if run.quick else 64) << 20
    _ok(cudart, cudart.cudaSetDevice(0))
    stream = _ok(cudart, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
    events = [_ok(cudart, cudart.cudaEventCreate()) for _ in range(3)]
    src = _ok(cudart, cudart.cudaMallocHost(nbytes))
    dst = _ok(cudart, cudart.cudaMallocHost(nbytes))
    dev = _ok(cudart, cudart.cudaMalloc(nbytes))
    try:
        a = np.ctypeslib.as_array(ctypes.cast(int(src), ctypes.POINTER(ctypes.c_uint8)), shape=(nbytes,))
        b = np.ctypeslib.as_array(ctypes.cast(int(dst), ctypes.POINTER(ctypes.c_uint8)), shape=(nbytes,))
        a[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        h2d_ms, d2h_ms = [], []
        for _ in range(3 if run.quick else 10):
            b[:] = 0
            _ok(cudart, cudart.cudaEventRecord(events[0], stream))
            _ok(cudart, cudart.cudaMemcpyAsync(dev, src, nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
            _ok(cudart, cudart.cudaEventRecord(events[1], stream))
            _ok(cudart, cudart.cudaMemcpyAsync(dst, dev, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
            _ok(cudart, cudart.cudaEventRecord(events[2], stream))
            _ok(cudart, cudart.cudaStreamSynchronize(stream))
            h2d_ms.append(float(_ok(cudart, cudart.cudaEventElapsedTime(events[0], events[1]))))
            d2h_ms.append(float(_ok(cudart, cudart.cudaEventElapsedTime(events[1], events[2]))))
        same = bool(np.array_equal(a, b))
    finally:
        for free, ptr in ((cudart.cudaFreeHost, src), (cudart.cudaFreeHost, dst), (cudart.cudaFree, dev)):
            free(ptr)
        for ev in events:
            cudart.cudaEventDestroy(ev)
        cudart.cudaStreamDestroy(stream)
    gbps = lambda ms: round(nbytes / (ms / 1e3) / 1e9, 2)  # noqa: E731
    return {"bytes": nbytes, "data_intact": same, "h2d_ms_best": round(min(h2d_ms), 4),
            "d2h_ms_best": round(min(d2h_ms), 4), "h2d_gb_per_s": gbps(min(h2d_ms)),
            "d2h_gb_per_s": gbps(min(d2h_ms)), "status": "ok" if same else "fail"}


def ort_parity(run: Run) -> dict[str, Any]:
    """CUDA provider vs CPU provider on every artifact of every bundled model."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise Skipped(f"onnxruntime does not import ({exc})") from exc
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise Skipped(f"onnxruntime has no CUDA provider (providers: {', '.join(ort.get_available_providers())}; "
                      "install onnxruntime-gpu)")
    from gpu_check_jobs import RawOrtSession, compare_results, heldout_frames, raw_diff

    from edge.inference.manifest import Manifest
    from edge.inference.model import LoadedModel

    rows = []
    for name in run.models():
        manifest = Manifest.load(Path(run.args.engines_dir or _engines()) / name)
        frames, source = heldout_frames(manifest.task, run.frames)
        for key in sorted(manifest.artifacts):
            path = manifest.artifact_path(key, verify=True)
            prec = "int8" if key.startswith("int8") else key
            gpu_be = RawOrtSession(path, ["CUDAExecutionProvider", "CPUExecutionProvider"], prec)
            row: dict[str, Any] = {"model": name, "artifact": key, "providers": gpu_be.active,
                                   "cuda_active": gpu_be.active[:1] == ["CUDAExecutionProvider"]}
            if row["cuda_active"]:  # else the session fell back to the CPU: nothing to compare
                cpu = LoadedModel(manifest, RawOrtSession(path, ["CPUExecutionProvider"], prec))
                gpu = LoadedModel(manifest, gpu_be)
                row.update(raw_max_abs_diff=raw_diff(cpu, gpu, frames), frames=source,
                           agreement=compare_results(manifest.task, cpu.run(frames), gpu.run(frames)))
            rows.append(row)
    ok = all(r["cuda_active"] for r in rows)
    return {"rows": rows, "status": "ok" if ok else "fail"}


def _engines() -> Path:
    from edge.inference.manifest import default_engines_dir

    return default_engines_dir()


def _require_tensorrt() -> None:
    from edge.inference.backends.tensorrt import tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        raise Skipped(why)


def _child_env(run: Run) -> dict[str, str]:
    env = dict(os.environ)
    if run.args.engines_dir:
        env["MEDGE_ENGINES_DIR"] = str(Path(run.args.engines_dir).resolve())
    return env


def _child(run: Run, args: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    """Run a ``gpu_check_jobs.py`` child; its JSON, or what went wrong."""
    try:
        res = subprocess.run(_py(str(HERE / "gpu_check_jobs.py"), *args, "--out", str(out)), capture_output=True,
                             text=True, timeout=max(5.0, timeout_s), env=_child_env(run), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout_s:.0f} s"}
    doc = json.loads(out.read_text()) if out.is_file() else {"status": "error", "error": f"exit {res.returncode}"}
    doc["exit"] = res.returncode
    doc["log_tail"] = res.stderr.splitlines()[-12:]
    return doc


def tensorrt(run: Run) -> dict[str, Any]:
    """Build time, cached load, parity and batch agreement per model and precision (child processes)."""
    _require_tensorrt()
    rows = []
    for name in run.models():
        for prec in PRECISIONS:
            if run.left_s() < 30:
                rows.append({"model": name, "precision": prec, "status": "skipped: time budget spent"})
                continue
            _log(f"  tensorrt {name} {prec}")
            doc = _child(run, ["trt", name, prec, "--cache-dir", str(run.cache_dir), "--frames", str(run.frames)],
                         run.work / f"trt-{name}-{prec}.json", min(240.0, run.left_s()))
            rows.append({"model": name, "precision": prec, **doc})
    return {"rows": rows, "status": "ok" if all(r.get("status") == "ok" for r in rows) else "fail"}


def tensorrt_race(run: Run) -> dict[str, Any]:
    """Two processes, one empty cache folder, the same plan, at the same moment."""
    _require_tensorrt()
    name = run.models()[0]
    cache = run.work / "race-cache"
    cache.mkdir()
    go = run.work / "race.go"
    env = _child_env(run)
    procs = []
    ready = [run.work / f"race-{i}.ready" for i in range(2)]
    for i in range(2):
        out = run.work / f"race-{i}.json"
        cmd = _py(str(HERE / "gpu_check_jobs.py"), "race", name, "fp16", "--cache-dir", str(cache),
                  "--go", str(go), "--ready", str(ready[i]), "--out", str(out))
        # stderr to a file: a pipe nobody reads while the other racer builds could fill and stall it
        log = open(run.work / f"race-{i}.log", "w+", encoding="utf-8")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT),
                      out, log))
    end = time.monotonic() + 60.0
    while not all(r.exists() for r in ready) and time.monotonic() < end and all(p.poll() is None for p, _, _ in procs):
        time.sleep(0.05)  # both interpreters have imported TensorRT and wait for the start file
    go.touch()
    racers = []
    for proc, out, log in procs:
        try:
            proc.wait(timeout=max(10.0, min(300.0, run.left_s())))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        err = log.read()
        log.close()
        doc = json.loads(out.read_text()) if out.is_file() else {"status": "error"}
        lines = [ln for ln in err.splitlines()  # log records only (the child's format), not traceback lines
                 if re.match(r"\d{4}-\d\d-\d\d ", ln) and re.search(r"(?i)build|wait|cache|lock", ln)]
        racers.append({**doc, "exit": proc.returncode, "log": lines[-8:],
                       "built": any(re.search(r"(?i)\bbuilding\b", ln) for ln in lines)})
    plans = sorted(p.name for p in cache.glob("*.plan"))
    leftovers = sorted(p.name for p in cache.iterdir() if p.suffix not in (".plan", ".json", ".lock"))
    ok = all(r.get("status") == "ok" for r in racers) and len(plans) == 1 and not leftovers
    return {"model": name, "precision": "fp16", "racers": racers, "plans": plans, "leftover_files": leftovers,
            "builders_by_log": sum(r["built"] for r in racers), "status": "ok" if ok else "fail"}


def bench_engine(run: Run) -> dict[str, Any]:
    """``medge bench engine --backend tensorrt`` per model and precision, on this run's cache."""
    _require_tensorrt()
    rows = []
    for name in run.models():
        for prec in PRECISIONS:
            if run.left_s() < 20:
                rows.append({"model": name, "precision": prec, "status": "skipped: time budget spent"})
                continue
            out = run.work / f"bench-{name}-{prec}.json"
            cmd = _py("-m", "edge.cli", "--log-level", "WARNING", "bench", "engine", "--model", name,
                      "--backend", "tensorrt", "--precision", prec, "--cache-dir", str(run.cache_dir),
                      "--max-batch", "4", "--warmup-s", "0.5", "--duration-s", "1" if run.quick else "3",
                      "--no-progress", "--json", str(out))
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=min(180.0, run.left_s()), cwd=ROOT,
                                     env=_child_env(run))
            except subprocess.TimeoutExpired:
                rows.append({"model": name, "precision": prec, "status": "error: timed out"})
                continue
            row: dict[str, Any] = {"model": name, "precision": prec, "exit": res.returncode}
            if res.returncode == 0 and out.is_file():
                summary = json.loads(out.read_text())["summary"]
                row.update(status="ok", latency_ms=summary["latency_ms"], throughput=summary["throughput"],
                           stages_ms=summary["stages_ms"])
            else:
                row.update(status="error", stderr_tail=res.stderr.splitlines()[-6:])
            rows.append(row)
    return {"rows": rows, "status": "ok" if all(r["status"] == "ok" for r in rows) else "fail"}


def doctor(run: Run) -> dict[str, Any]:
    """``medge doctor``'s GPU checks with both models on backend auto and this run's engine cache."""
    from edge.config import load_config

    toml = run.work / "doctor.toml"
    lines = [f"cache_dir = {json.dumps(str(run.cache_dir))}"]
    if run.args.engines_dir:
        lines.append(f"engines_dir = {json.dumps(str(run.args.engines_dir))}")
    for name in run.models():
        lines += ["[[models]]", f"name = {json.dumps(name)}", 'backend = "auto"', 'precision = "auto"']
    toml.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = load_config(toml)
    return {"checks": [c.__dict__ for c in gpu_checks(cfg)]}


#: name, function, needs a GPU library
SECTIONS: list[tuple[str, Callable[[Run], dict[str, Any]], bool]] = [
    ("versions", versions, False),
    ("nvml", nvml, True),
    ("cuda_roundtrip", cuda_roundtrip, True),
    ("ort_parity", ort_parity, True),
    ("tensorrt", tensorrt, True),
    ("tensorrt_race", tensorrt_race, True),
    ("bench_engine", bench_engine, True),
    ("doctor", doctor, False),
]


# ---------------------------------------------------------------------------- the run
def run_section(run: Run, name: str, fn: Callable[[Run], dict[str, Any]], gpu: bool) -> dict[str, Any]:
    """One section inside its error boundary: ok / fail / skipped: why / error: what."""
    t0 = time.monotonic()
    if run.left_s() <= 0:
        doc: dict[str, Any] = {"status": "skipped: time budget spent"}
    else:
        try:
            doc = fn(run)
            doc.setdefault("status", "ok")
        except Skipped as exc:
            doc = {"status": f"skipped: {exc}"}
        except Exception as exc:  # the run's error boundary: one section's failure never ends the run
            doc = {"status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                   "traceback": traceback.format_exc().splitlines()[-12:]}
    doc["gpu"] = gpu
    doc["seconds"] = round(time.monotonic() - t0, 2)
    return doc


def result_paths(out_dir: Path) -> tuple[Path, Path]:
    """``gpu-check-<host>-<date>.json`` and ``.md`` in ``out_dir``."""
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", socket.gethostname()).strip("-")[:40] or "host"
    stem = f"gpu-check-{host}-{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d')}"
    return out_dir / f"{stem}.json", out_dir / f"{stem}.md"


def markdown(doc: dict[str, Any]) -> str:
    """The human summary: one line per section, then the tables that matter."""
    out = [f"# GPU check, {doc['started_utc']}", "", f"`{' '.join(doc['command'])}`", "",
           "| section | status | seconds |", "| --- | --- | ---: |"]
    for name, sec in doc["sections"].items():
        out.append(f"| {name} | {sec['status']} | {sec['seconds']} |")
    secs = doc["sections"]
    for r in secs.get("ort_parity", {}).get("rows", []):
        agree = r.get("agreement") or {}
        out.append(f"- ORT CUDA vs CPU {r['model']} {r['artifact']}: providers {r['providers']}, "
                   f"max abs {r.get('raw_max_abs_diff')}, {agree.get('metric')} min {agree.get('min')}")
    for r in secs.get("tensorrt", {}).get("rows", []):
        out.append(f"- TensorRT {r['model']} {r['precision']}: {r.get('status')}, build {r.get('build_s')} s, "
                   f"cached load {r.get('cached_load_s')} s, vs ORT fp32 {r.get('agreement_vs_ort_fp32')}, "
                   f"batch 1 vs 4 {r.get('batch1_vs_batch4_max_abs_diff')} {r.get('error', '')}")
    for r in secs.get("bench_engine", {}).get("rows", []):
        lat = r.get("latency_ms") or {}
        out.append(f"- bench engine {r['model']} {r['precision']}: {r['status']}, p50 {lat.get('median_ms')} ms, "
                   f"p99 {lat.get('p99_ms')} ms")
    for c in secs.get("doctor", {}).get("checks", []):
        out.append(f"- doctor [{c['status']}] {c['name']}: {c['detail']}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every section; write the results file after each. Exit 0 unless the results cannot be written."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Sections: see the module docstring.")
    p.add_argument("--out-dir", type=Path, default=HERE / "results", help="where the results file goes")
    p.add_argument("--engines-dir", type=Path, default=None, help="engines folder (default: the bundled one)")
    p.add_argument("--models", nargs="*", default=None, help="only these models (default: every bundled model)")
    p.add_argument("--frames", type=int, default=16, help="held-out-like frames per comparison (default 16)")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no section after this (default 450)")
    p.add_argument("--quick", action="store_true", help="short everything (smoke run, not for the record)")
    p.add_argument("--only", nargs="*", default=None, help="run only these sections (names as above)")
    args = p.parse_args(argv)
    json_path, md_path = result_paths(args.out_dir)
    doc: dict[str, Any] = {"tool": "benchmarks/gpu_check.py", "command": [Path(sys.argv[0]).name, *(argv or sys.argv[1:])],
                           "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "quick": bool(args.quick), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="medge-gpu-check-") as tmp:
        run = Run(args, Path(tmp))
        for name, fn, gpu in SECTIONS:
            if args.only and name not in args.only:
                continue
            _log(f"{name} ...")
            doc["sections"][name] = run_section(run, name, fn, gpu)
            _log(f"{name}: {doc['sections'][name]['status']}")
            write_json(json_path, doc)
            atomic_write_text(md_path, markdown(doc))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
