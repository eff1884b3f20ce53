#!/usr/bin/env python3
"""The child processes and comparisons of ``benchmarks/gpu_check.py`` (run by it; not on their own).

Every TensorRT step runs in a child process (``trt`` and ``race`` below), so
that a crash or a hang in TensorRT or CUDA costs that step, not the run:
the parent records the child's exit status and JSON.

``trt MODEL PRECISION --cache-dir DIR --out FILE``
    Through :func:`edge.inference.model.load_model`, as the daemon loads a
    model: the build time (empty cache), the cached-load time, TensorRT vs
    ONNX Runtime fp32 (CPU) on held-out-like frames (max abs difference of
    the raw outputs; Dice of the masks or agreement of the boxes after the
    daemon's post-processing), and batch 1 vs batch 4 on the same frames.
``race MODEL PRECISION --cache-dir DIR --go FILE --out FILE``
    Waits until ``--go`` exists, then loads the model on TensorRT; two of
    these on one empty cache folder are the two-builder race.

Held-out-like frames are the trainer's own held-out generator
(``trainer.data.make_ultrasound``/``make_xray`` with ``HELDOUT_SEED``; numpy
only), falling back to :mod:`edge.tools.synthetic` where the trainer
package is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge.errors import MedgeError  # noqa: E402

__all__ = ["heldout_frames", "compare_results", "max_abs_diff", "dice", "box_agreement", "RawOrtSession"]

MAX_BATCH = 4


# ---------------------------------------------------------------------------- inputs and comparisons
def heldout_frames(task: str, n: int) -> tuple[list[np.ndarray], str]:
    """``n`` source frames like the held-out set's (and where they came from)."""
    try:
        from trainer.data import make_ultrasound, make_xray, sample_rng
        from trainer.evaluate import HELDOUT_SEED

        make = make_xray if task == "detection" else make_ultrasound
        return [make(sample_rng(HELDOUT_SEED, i))[0] for i in range(n)], f"trainer held-out generator, seed {HELDOUT_SEED}"
    except ImportError:
        from edge.tools.synthetic import UltrasoundProbe, XrayFrames

        src = XrayFrames(512, 512, "uint16", seed=1000, loop=n) if task == "detection" else \
            UltrasoundProbe(480, 640, "uint8", seed=1000, loop=n)
        return [src.frame(i) for i in range(n)], "edge.tools.synthetic, seed 1000"


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute difference of each output present in both (as float32)."""
    return {k: float(np.max(np.abs(a[k].astype(np.float32) - b[k].astype(np.float32)))) for k in a if k in b}


def dice(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Dice of two label masks (foreground: non-zero); 1.0 when both are empty."""
    x = np.asarray(a if a is not None else 0) > 0
    y = np.asarray(b if b is not None else 0) > 0
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(x, y).sum()) / total


def _iou(p: Any, q: Any) -> float:
    ix = max(0.0, min(p.x1, q.x1) - max(p.x0, q.x0))
    iy = max(0.0, min(p.y1, q.y1) - max(p.y0, q.y0))
    inter = ix * iy
    union = (p.x1 - p.x0) * (p.y1 - p.y0) + (q.x1 - q.x0) * (q.y1 - q.y0) - inter
    return inter / union if union > 0 else 0.0


def box_agreement(a: Sequence[Any], b: Sequence[Any], iou: float = 0.5) -> float:
    """Boxes matched one to one (same label, IoU >= ``iou``) over the larger count; 1.0 when both are empty."""
    if not a and not b:
        return 1.0
    used: set[int] = set()
    matched = 0
    for p in a:
        best = max(((j, _iou(p, q)) for j, q in enumerate(b) if j not in used and q.label == p.label),
                   key=lambda t: t[1], default=(None, 0.0))
        if best[0] is not None and best[1] >= iou:
            used.add(best[0])
            matched += 1
    return matched / max(len(a), len(b))


def compare_results(task: str, ref: Sequence[Any], got: Sequence[Any]) -> dict[str, Any]:
    """Dice (segmentation) or box agreement (detection) per frame: min and mean."""
    if task == "segmentation":
        scores = [dice(r.mask, g.mask) for r, g in zip(ref, got)]
        name = "dice"
    else:
        scores = [box_agreement(r.boxes, g.boxes) for r, g in zip(ref, got)]
        name = "box_agreement"
    return {"metric": name, "min": round(min(scores), 4) if scores else None,
            "mean": round(float(np.mean(scores)), 4) if scores else None, "frames": len(scores)}


class RawOrtSession:
    """One ONNX file on one ONNX Runtime provider list, shaped as an :class:`edge.types.Backend`."""

    name = "onnxruntime"

    def __init__(self, path: Path, providers: list[str], precision: str) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.precision = precision
        self.max_batch = MAX_BATCH
        inp = self.session.get_inputs()[0]
        self._input = inp.name
        self._dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self.active = list(self.session.get_providers())

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``[N, C, H, W]``; outputs as float32."""
        outs = self.session.run(None, {self._input: batch.astype(self._dtype, copy=False)})
        names = [o.name for o in self.session.get_outputs()]
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(names, outs)}

    def close(self) -> None:
        """Nothing to free explicitly."""


def batched(model: Any, frames: Sequence[np.ndarray]) -> np.ndarray:
    """The preprocessed ``[N, C, H, W]`` float32 batch of ``frames``."""
    return np.stack([model.preprocess(f)[0] for f in frames]).astype(np.float32)


def raw_diff(ref: Any, got: Any, frames: Sequence[np.ndarray]) -> dict[str, float]:
    """Max abs difference of the raw outputs, over ``frames`` in batches of :data:`MAX_BATCH`."""
    worst: dict[str, float] = {}
    for start in range(0, len(frames), MAX_BATCH):
        x = batched(ref, frames[start:start + MAX_BATCH])
        for k, v in max_abs_diff(ref.infer(x), got.infer(x)).items():
            worst[k] = max(worst.get(k, 0.0), v)
    return {k: float(f"{v:.6g}") for k, v in worst.items()}


def batch_agreement(model: Any, frames: Sequence[np.ndarray]) -> dict[str, float]:
    """Max abs difference between one batch of 4 and the same 4 frames one by one."""
    x = batched(model, frames[:MAX_BATCH])
    together = model.infer(x)
    worst: dict[str, float] = {}
    for i in range(x.shape[0]):
        alone = model.infer(x[i:i + 1])
        for k, v in max_abs_diff({k: together[k][i:i + 1] for k in together}, alone).items():
            worst[k] = max(worst.get(k, 0.0), v)
    return {k: float(f"{v:.6g}") for k, v in worst.items()}


# ---------------------------------------------------------------------------- child jobs
def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 3)


def _load_trt(model: str, precision: str, cache_dir: Path) -> Any:
    from edge.inference.model import load_model

    return load_model(model, backend="tensorrt", precision=precision, cache_dir=cache_dir, max_batch=MAX_BATCH)


def trt_job(model: str, precision: str, cache_dir: Path, frames_n: int) -> dict[str, Any]:
    """Build, cached load, parity with ONNX Runtime fp32 on the CPU, batch 1 vs 4."""
    from edge.inference.model import load_model

    out: dict[str, Any] = {"model": model, "precision": precision}
    first, out["build_s"] = _timed(lambda: _load_trt(model, precision, cache_dir))
    first.close()
    plans = sorted(p.name for p in cache_dir.glob(f"{model}-*.plan"))
    out["plans"] = plans
    trt_model, out["cached_load_s"] = _timed(lambda: _load_trt(model, precision, cache_dir))
    with trt_model, load_model(model, backend="onnxruntime", provider="cpu", precision="fp32",
                               max_batch=MAX_BATCH) as ref:
        frames, source = heldout_frames(ref.task, frames_n)
        out["frames"] = {"n": len(frames), "source": source}
        out["backend"] = getattr(trt_model, "backend_label", "tensorrt")
        out["raw_max_abs_diff_vs_ort_fp32"] = raw_diff(ref, trt_model, frames)
        out["agreement_vs_ort_fp32"] = compare_results(ref.task, ref.run(frames), trt_model.run(frames))
        out["batch1_vs_batch4_max_abs_diff"] = batch_agreement(trt_model, frames)
        timings = getattr(trt_model.backend, "last_timings_ms", None)
        out["last_cuda_event_timings_ms"] = dict(timings) if timings else None
    return out


def race_job(model: str, precision: str, cache_dir: Path, go: Path, deadline_s: float,
             ready: Path | None = None) -> dict[str, Any]:
    """Say ``ready`` (imports done), wait for ``go`` (both racers start together), then load on TensorRT."""
    import edge.inference.model  # noqa: F401  (imported before the start, so both racers start even)

    try:
        import tensorrt  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        pass  # load_model says why
    if ready is not None:
        ready.touch()
    end = time.monotonic() + deadline_s
    while not go.exists():
        if time.monotonic() > end:
            raise TimeoutError("the start signal never came")
        time.sleep(0.01)
    existed = any(cache_dir.glob(f"{model}-*.plan"))
    t0 = time.time()
    loaded, load_s = _timed(lambda: _load_trt(model, precision, cache_dir))
    loaded.close()
    return {"pid": os.getpid(), "plan_existed_at_start": existed, "start_unix": round(t0, 3), "load_s": load_s}


def main(argv: list[str] | None = None) -> int:
    """Run one child job; its JSON goes to ``--out`` (an error is recorded there too)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=["trt", "race"])
    p.add_argument("model")
    p.add_argument("precision", choices=["fp32", "fp16", "int8"])
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--go", type=Path, default=None, help="race: start when this file exists")
    p.add_argument("--ready", type=Path, default=None, help="race: created once the imports are done")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.job == "trt":
            doc = trt_job(args.model, args.precision, args.cache_dir, max(MAX_BATCH, min(args.frames, 256)))
        else:
            doc = race_job(args.model, args.precision, args.cache_dir, args.go or args.out.with_suffix(".go"), 120.0,
                           ready=args.ready)
        doc["status"] = "ok"
    except (MedgeError, RuntimeError, OSError, ValueError, TypeError, AttributeError) as exc:
        # One line for the report: the child's stderr (the parent keeps its tail) has the traceback.
        logging.getLogger("gpu_check").exception("job failed")
        doc = {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return 0 if doc["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
