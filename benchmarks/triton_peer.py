#!/usr/bin/env python3
"""Triton beside the daemon: the same ONNX files served by PyTriton, measured in the same run.

PyTriton (``nvidia-pytriton``, which bundles a Triton Inference Server
with its Python backend) serves each bundled model's ONNX artifact through
an ONNX Runtime session with the daemon's session options; a gRPC client
(``tritonclient.grpc``) sends the preprocessed 1x1x256x256 float32 tensor
and waits for all outputs. Its overhead is that round trip minus the raw
ONNX Runtime run, measured in the same alternating blocks as the daemon by
:mod:`native_sizes` (``native_sizes.py --triton`` is the same run). Triton
gets the model-size tensor only: it has no preprocessing, so there is no
native-size column for it.

Set-up (once; about 1 to 2.5 minutes and 450 MB), from the repository root::

    /usr/bin/python3.11 -m venv .venv-triton
    .venv-triton/bin/pip install nvidia-pytriton==0.7.0 onnxruntime

Why a separate venv, and why that Python: PyTriton 0.7.0 pins
``numpy<2`` (the daemon's venv has numpy 2); its wheel is tagged
``manylinux_2_35`` (glibc >= 2.35: Debian 12 has 2.36) and carries Python
backend stubs for 3.11, 3.12 and 3.13 that link the system's
``libpython3.X.so``, so the venv must be made from that same system Python
(Debian 12: ``/usr/bin/python3.11``, 3.11.2). A venv from another 3.11
build (pyenv 3.11.7) fails when the model loads with ``AttributeError:
'_thread.RLock' object has no attribute '_recursion_count'``: that
stdlib runs on the older embedded interpreter. No GPU is needed (Triton
logs that CUDA, NVML and DCGM are unavailable and serves on the CPU).
Another location: ``MEDGE_TRITON_VENV=/path/to/venv``.

Usage::

    python benchmarks/triton_peer.py --quick       # smoke run
    python benchmarks/triton_peer.py               # the recorded run (native_sizes.py --triton)

Only the standard library is imported at the top: the ``--worker`` half
runs inside the Triton venv (numpy 1.x, no ``edge``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 240.0
PREFIX = "medge-triton "
SET_UP = "/usr/bin/python3.11 -m venv .venv-triton && .venv-triton/bin/pip install nvidia-pytriton==0.7.0 onnxruntime"


def venv_python() -> Path | None:
    """The Triton venv's interpreter (``MEDGE_TRITON_VENV`` or ``.venv-triton``), or None when absent."""
    venv = Path(os.environ.get("MEDGE_TRITON_VENV") or ROOT / ".venv-triton")
    py = venv / "bin" / "python"
    return py if py.is_file() else None


# ----------------------------------------------------------------------------- worker (Triton venv)
def _session(path: str, spin_us: int) -> Any:
    """An ONNX Runtime session with the daemon's options (edge/inference/backends/onnxruntime.py)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = len(os.sched_getaffinity(0))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us > 0 else "0")
    if spin_us > 0:
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _bind(triton: Any, name: str, path: str, spin_us: int) -> tuple[str, list[str]]:
    """Serve one ONNX file as model ``name`` (no batching: batch 1, as the daemon is measured)."""
    import numpy as np
    from pytriton.model_config import ModelConfig, Tensor

    sess = _session(path, spin_us)
    inp = sess.get_inputs()[0]
    outs = [o.name for o in sess.get_outputs()]

    def infer(requests: list[Any]) -> list[dict[str, Any]]:
        return [dict(zip(outs, sess.run(outs, {inp.name: r[inp.name]}))) for r in requests]

    triton.bind(
        model_name=name,
        infer_func=infer,
        inputs=[Tensor(name=inp.name, dtype=np.float32, shape=(-1,) * len(inp.shape))],
        outputs=[Tensor(name=o.name, dtype=np.float32, shape=(-1,) * len(o.shape)) for o in sess.get_outputs()],
        config=ModelConfig(batching=False),
    )
    return inp.name, outs


def _round_trips(client: Any, model: str, names: tuple[str, list[str]], x: Any, n: int) -> list[float]:
    """``n`` gRPC inferences of ``x``; milliseconds each."""
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput(names[0], list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outs = [grpcclient.InferRequestedOutput(o) for o in names[1]]
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        client.infer(model, [inp], outputs=outs)
        times.append((time.perf_counter_ns() - t) / 1e6)
    return times


def _say(proto: Any, reply: dict[str, Any]) -> None:
    """One protocol line to the parent."""
    proto.write(PREFIX + json.dumps(reply) + "\n")
    proto.flush()


def worker(models: list[str], spin_us: int) -> int:
    """Serve ``name=path`` models through PyTriton; answer ``run`` commands (JSON lines) on stdin."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from pytriton.triton import Triton, TritonConfig

    ports = json.loads(os.environ["MEDGE_TRITON_PORTS"])
    # the protocol keeps the real stdout; everything else (Triton's server log, its children) goes to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    t0 = time.perf_counter()
    cfg = TritonConfig(http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], log_verbose=0)
    with Triton(config=cfg) as triton:
        names = {}
        for spec in models:
            name, path = spec.split("=", 1)
            names[name] = _bind(triton, name, path, spin_us)
        triton.run()
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}")
        import pytriton

        _say(proto, {"ready_s": round(time.perf_counter() - t0, 2), "pytriton": getattr(pytriton, "__version__", "?")})
        tensors: dict[str, Any] = {}
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "stop":
                break
            try:
                x = tensors.get(cmd["path"])
                if x is None:
                    x = tensors.setdefault(cmd["path"], np.load(cmd["path"]))
                reply = {"ms": _round_trips(client, cmd["model"], names[cmd["model"]], x, int(cmd["n"]))}
            except Exception as exc:  # error boundary: the parent gets the reason, the worker keeps serving
                reply = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            _say(proto, reply)
        client.close()
    return 0


# ----------------------------------------------------------------------------- parent (daemon venv)
class TritonPeer:
    """The worker as a child process in the Triton venv; a :data:`native_sizes.Peer` for model-size cases."""

    def __init__(self, python: Path, engines_dir: Path, models: tuple[str, ...], precision: str, spin_us: int) -> None:
        from edge.inference.manifest import discover
        from edge.tools.daemon_process import free_port

        manifests = discover(engines_dir)
        specs = [f"{m}={manifests[m].artifact_path(precision)}" for m in models]
        self.tmp = tempfile.TemporaryDirectory(prefix="medge-triton-")
        self.log = open(Path(self.tmp.name) / "triton.log", "wb")
        env = {**os.environ, "MEDGE_TRITON_PORTS": json.dumps([free_port(), free_port(), free_port()])}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(python), __file__, "--worker", "--spin-us", str(spin_us), *specs],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=self.tmp.name,
        )
        self.info = self._reply(READY_TIMEOUT_S)
        self.info["start_s"] = round(time.perf_counter() - t0, 2)
        self.paths: dict[int, str] = {}

    def _reply(self, timeout: float) -> dict[str, Any]:
        """The worker's next protocol line (other output is skipped), within ``timeout`` seconds."""
        import select

        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline() if ready else ""
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
            if not line or time.monotonic() > deadline:
                self.log.flush()
                tail = Path(self.log.name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the Triton worker did not answer (exit {self.proc.poll()}):\n{tail}")

    def __call__(self, case: Any, n: int) -> list[float] | None:
        import numpy as np

        if case.native:
            return None  # Triton serves the model-size tensor only (no preprocessing)
        path = self.paths.get(id(case))
        if path is None:
            path = str(Path(self.tmp.name) / f"x{len(self.paths)}.npy")
            np.save(path, case.batch)
            self.paths[id(case)] = path
        self.proc.stdin.write(json.dumps({"op": "run", "model": case.model, "path": path, "n": n}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(120.0)
        if "error" in reply:
            raise RuntimeError(f"Triton round trip failed: {reply['error']}")
        return reply["ms"]

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.tmp.cleanup()


def run_beside(args: argparse.Namespace) -> int:
    """``native_sizes`` with Triton as a peer; exit 2 (and the set-up command) without the venv."""
    import native_sizes as ns

    python = venv_python()
    if python is None:
        print(f"Triton: no venv at {os.environ.get('MEDGE_TRITON_VENV') or ROOT / '.venv-triton'}; set it up with:\n"
              f"  {SET_UP}", file=sys.stderr)
        return 2
    peer = TritonPeer(python, args.engines_dir, ns.MODELS, args.precision, ns.do.SPIN_US)
    print(f"Triton (PyTriton {peer.info.get('pytriton')}) ready in {peer.info['start_s']} s", flush=True)
    try:
        record = ns.run(args, {"triton": peer})
    finally:
        peer.close()
    _print_ratio(record)
    return 0 if record["daemon_exit_status"] == 0 else 1


def _print_ratio(record: dict[str, Any]) -> None:
    """Triton's overhead next to the daemon's, model size, p50 (the issue: medge at least 5x leaner)."""
    for r in record["rows"]:
        o = r["overhead_over_raw_ms"]
        if "triton" not in o:
            continue
        d, t = o["daemon"]["p50_ms"], o["triton"]["p50_ms"]
        head = f"  {r['model']:<16} overhead p50: daemon {d:+.3f} ms, Triton {t:+.3f} ms: "
        if d <= 0 or t <= 0:
            print(head + "n/a (an overhead at or below zero is noise: rerun on a quieter machine)")
            continue
        print(head + f"Triton/daemon {t / d:.1f}x ({'PASS' if t / d >= 5 else 'FAIL'} >= 5x)")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--worker" in argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--worker", action="store_true")
        ap.add_argument("--spin-us", type=int, default=1000)
        ap.add_argument("models", nargs="+", help="name=path.onnx")
        a = ap.parse_args(argv)
        return worker(a.models, a.spin_us)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import native_sizes as ns

    ap = ns.parser()
    ap.description = __doc__.split("\n\n")[0]
    a = ap.parse_args(argv)
    ns.do.SPIN_US = a.spin_us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the children
    if a.quick:
        a.rounds, a.block, a.warmup = 10, 5, 10
    return run_beside(a)


if __name__ == "__main__":
    sys.exit(main())
