"""``medge build``: build (and cache) a TensorRT engine for a model on this machine.

TensorRT plans are specific to the GPU, its compute capability and the
TensorRT version, so they are built on the target from the manifest's
sha256-checked ONNX artifact, with :class:`edge.inference.backends.tensorrt.TensorRTBackend`
(the daemon would build the same plan on first use; this command does it
ahead of time). INT8 needs an artifact with **symmetric** int8 activations
(zero point 0): the bundled ``model.int8.onnx`` uses uint8 activations,
which ONNX Runtime CPU runs fastest, so for TensorRT INT8 first run
``medge quantize ENGINE --activations int8``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge.errors import EngineBuildError
from edge.inference.manifest import Manifest, default_engines_dir

__all__ = ["configure_parser", "run", "build"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add ``medge build`` options to ``p``."""
    p.add_argument("engine", help="engine folder or bundled model name (e.g. us-lesion-seg)")
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--cache-dir", default=".medge/trt", help="TensorRT plan cache")
    p.add_argument("--device", type=int, default=0, help="CUDA device ordinal")
    p.add_argument("--json", action="store_true")


def build(engine: str | Path, precision: str, max_batch: int, cache_dir: str | Path, device: int = 0) -> Path:
    """Build or reuse the cached plan for ``engine`` at ``precision``; returns its path.

    Raises
    ------
    EngineBuildError
        If INT8 is asked of an artifact without symmetric int8 activations,
        or TensorRT cannot build the plan.
    BackendUnavailableError
        If TensorRT, cuda-python or a GPU is missing.
    """
    from edge.inference.backends.tensorrt import TensorRTBackend

    d = Path(engine)
    if not d.is_dir():
        d = default_engines_dir() / str(engine)
    man = Manifest.load(d)
    if precision == "int8" and not man.int8_tensorrt_ready:
        act = man.training.get("quantization", {}).get("activations", "")
        raise EngineBuildError(
            f"{d}/model.int8.onnx has {act or 'unknown'} activations; TensorRT needs symmetric int8 "
            f"(zero point 0). Run: medge quantize {d} --activations int8"
        )
    key = man.artifact_key(precision, "tensorrt")
    path = man.artifact_path(key, verify=True)
    backend = TensorRTBackend(
        path, onnx_sha256=man.artifacts[key].sha256, model_name=man.name, precision=precision,
        input_name=man.input.name, input_chw=(man.input.channels, *man.input.size), max_batch=max_batch,
        cache_dir=cache_dir, device_id=device,
    )
    try:
        return backend.plan_path
    finally:
        backend.close()


def run(args: argparse.Namespace) -> int:
    """Build the plan and print where it is."""
    plan = build(args.engine, args.precision, args.max_batch, args.cache_dir, args.device)
    print(json.dumps({"plan": str(plan)}) if args.json else f"TensorRT plan: {plan}")
    return 0
