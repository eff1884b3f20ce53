"""Rebuild the bundled engines from scratch: generate, train, export, quantize, evaluate.

``python -m trainer.reproduce --out engines`` (``make engines``) retrains
``us-lesion-seg``, ``xray-nodule-det`` and ``xray-nodule-cls`` (initialised
from the detector just built, :attr:`Recipe.init`) with the recipes below, exports
FP32 + FP16 ONNX, quantizes to INT8 behind the accuracy gate, evaluates every
precision on the held-out synthetic set (seed 1000) and writes the
manifests, the PyTorch checkpoints (``model.pt``, for ``medge train --init``)
and a JSON record of times and metrics. ``--quick`` runs the same pipeline
with tiny sets and a few steps (used by the tests: it checks the plumbing,
not the accuracy).

Examples
--------
``python -m trainer.reproduce --out engines --results benchmarks/results/reproduce.json``
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["Recipe", "RECIPES", "QUICK_RECIPES", "machine_info", "reproduce", "main"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """How one bundled model is trained."""

    name: str
    task: str
    n_train: int
    n_val: int
    epochs: int
    steps_per_epoch: int | None  # None: one pass over the training set
    batch_size: int
    lr: float
    patience: int
    input_size: tuple[int, int] = (256, 256)
    base: int = 16
    crop: int | None = None
    heldout_n: int = 200
    calib_n: int = 64
    max_drop: float | None = None  # None: the gate's defaults
    init: str | None = None  # the name of an engine built before this one (in ``out``): its model.pt's encoder
    threads: int = 0  # torch CPU threads (0: all cores)
    synthetic_shape: tuple[int, int] | None = None  # classification: the synthetic source image size
    threshold_confidence: float = 0.95  # classification: confidence of the validation sensitivity claim


RECIPES = (
    # U-Net: 128 x 128 crops (4x cheaper than full frames; validation and service use full frames).
    Recipe("us-lesion-seg", "segmentation", n_train=1200, n_val=64, epochs=12, steps_per_epoch=150,
           batch_size=16, lr=3e-3, patience=4, crop=128),
    # Detector: 128 x 128 crops too (boxes follow their crop), 32 per step.
    Recipe("xray-nodule-det", "detection", n_train=1200, n_val=100, epochs=16, steps_per_epoch=80,
           batch_size=32, lr=3e-3, patience=5, crop=128),
    # Classifier: whole 256 x 256 frames (a crop could cut the nodule away), encoder from the detector,
    # plain cross-entropy on class-balanced batches (the trainer's defaults); 600 validation cases
    # (90 positive) for the threshold: the highest whose 95 % Clopper-Pearson lower bound of the validation
    # sensitivity is >= 0.90 (86 of 90 called; the point rule, 81 of 90, gave held-out 0.867);
    # 400 held-out (60 positive) for the CIs.
    Recipe("xray-nodule-cls", "classification", n_train=1200, n_val=600, epochs=12, steps_per_epoch=None,
           batch_size=32, lr=3e-3, patience=12, heldout_n=400, init="xray-nodule-det", threads=1,
           synthetic_shape=(512, 512)),
)
QUICK_RECIPES = (
    Recipe("us-lesion-seg", "segmentation", n_train=8, n_val=4, epochs=1, steps_per_epoch=2, batch_size=2,
           lr=1e-3, patience=1, input_size=(64, 64), base=4, heldout_n=4, calib_n=2, max_drop=1.0),
    Recipe("xray-nodule-det", "detection", n_train=8, n_val=4, epochs=1, steps_per_epoch=2, batch_size=2,
           lr=1e-3, patience=1, input_size=(64, 64), base=4, heldout_n=4, calib_n=2, max_drop=1.0),
    Recipe("xray-nodule-cls", "classification", n_train=16, n_val=14, epochs=1, steps_per_epoch=2, batch_size=4,
           lr=1e-3, patience=1, input_size=(64, 64), heldout_n=14, calib_n=2, max_drop=1.0,
           init="xray-nodule-det", synthetic_shape=(128, 128)),
)


def machine_info() -> dict[str, Any]:
    """Where a measurement was taken: :func:`edge.tools.results.machine_info` plus niceness and date.

    The flat keys of earlier records (``cpu``, ``python``, ``torch``, ``onnxruntime``,
    ``numpy``) are kept beside it, so old and new records compare.
    """
    from edge.tools.results import machine_info as _machine_info

    info = _machine_info()
    versions = info["versions"]
    return {
        **info,
        "cpu": info["cpu_model"],
        "python": versions["python"],
        "torch": versions.get("torch"),
        "onnxruntime": versions.get("onnxruntime") or versions.get("onnxruntime-gpu"),
        "numpy": versions.get("numpy"),
        "nice": os.nice(0),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _generate(r: Recipe, cache: str) -> float:
    """Generate (or find in ``cache``) the recipe's training and validation sets; returns the seconds taken."""
    from edge.inference.manifest import InputSpec
    from trainer.classification_data import synthetic_classification_set
    from trainer.data import synthetic_detection_set, synthetic_segmentation_set
    from trainer.evaluate import TRAIN_SEED, VALIDATION_SEED
    from trainer.train import default_preprocessing

    spec = InputSpec(size=r.input_size)
    pre = default_preprocessing(r.task)
    t0 = time.monotonic()
    if r.task == "classification":
        shape = {"shape": r.synthetic_shape} if r.synthetic_shape else {}
        synthetic_classification_set(r.n_train, TRAIN_SEED, spec, pre, keep_source=False, cache_dir=cache, **shape)
        synthetic_classification_set(r.n_val, VALIDATION_SEED, spec, pre, keep_source=False, cache_dir=cache, **shape)
    else:
        make = synthetic_segmentation_set if r.task == "segmentation" else synthetic_detection_set
        make(r.n_train, TRAIN_SEED, spec, pre, keep_source=False, cache_dir=cache)
        make(r.n_val, VALIDATION_SEED, spec, pre, cache_dir=cache)
    return time.monotonic() - t0


def _init_path(r: Recipe, out: Path) -> str | None:
    """The checkpoint :attr:`Recipe.init` names (``out/<engine>/model.pt``), checked to exist."""
    if r.init is None:
        return None
    from edge.errors import ConfigError

    path = out / r.init / "model.pt"
    if not path.is_file():
        raise ConfigError(f"Recipe {r.name} starts from {path}, which does not exist: build {r.init} first.")
    return str(path)


def _quantize_both(r: Recipe, engine: Path) -> dict[str, Any]:
    """The CPU and TensorRT INT8 artifacts behind the gate; the gate record of both.

    A recipe's ``max_drop`` replaces every gated metric's allowed drop (the
    quick recipes' 1.0: plumbing, not accuracy).
    """
    from trainer.int8_gate import GATED_METRICS, gate_summary
    from trainer.quantize import GateRefused, quantize_engine

    also = None if r.max_drop is None else {m: r.max_drop for m in list(GATED_METRICS[r.task])[1:]}
    gate: dict[str, Any]
    try:
        g = quantize_engine(engine, calib_n=r.calib_n, max_drop=r.max_drop, heldout_n=r.heldout_n,
                            also_max_drop=also)
        gate = {"passed": True, "metric": g.metric, **gate_summary(g)}
    except GateRefused as exc:
        gate = {"passed": False, "message": str(exc)}
    try:  # the TensorRT form (symmetric int8 activations), behind the same gate
        g = quantize_engine(engine, calib_n=r.calib_n, max_drop=r.max_drop, heldout_n=r.heldout_n,
                            activation_type="int8", also_max_drop=also)
        gate["tensorrt"] = {"passed": True, **gate_summary(g)}
    except GateRefused as exc:
        gate["tensorrt"] = {"passed": False, "message": str(exc)}
    return gate


def _build_one(r: Recipe, out: Path, work: Path, cache_dir: str | None, progress: bool) -> dict[str, Any]:
    from edge.inference.manifest import Manifest
    from trainer.data import default_cache_dir
    from trainer.export import export_checkpoint
    from trainer.train import TrainConfig, train

    cache = cache_dir if cache_dir is not None else str(default_cache_dir() / "data")
    t0 = time.monotonic()
    gen_s = _generate(r, cache)
    cls = r.task == "classification"
    cfg = TrainConfig(
        task=r.task, out_dir=work / r.name, n_train=r.n_train, n_val=r.n_val, epochs=r.epochs,
        steps_per_epoch=r.steps_per_epoch, batch_size=r.batch_size, lr=r.lr, patience=r.patience,
        base=r.base, input_size=r.input_size, crop=r.crop, cache_dir=cache, progress=progress,
        init=_init_path(r, out), threads=r.threads,
        synthetic_shape=r.synthetic_shape if cls else None, threshold_confidence=r.threshold_confidence,
    )
    t1 = time.monotonic()
    res = train(cfg)
    train_s = time.monotonic() - t1
    t2 = time.monotonic()
    engine = out / r.name
    timing = {"generate_s": round(gen_s, 1), "train_s": round(train_s, 1)}
    recipe = r.__dict__ | {"input_size": list(r.input_size)}
    if r.synthetic_shape is not None:
        recipe["synthetic_shape"] = list(r.synthetic_shape)
    export_checkpoint(
        res.best_checkpoint, engine, r.name, version="1", heldout_n=r.heldout_n, val_n=r.n_val,
        extra_training={"recipe": recipe, "timing": timing, "epochs_run": res.epochs_run,
                        "best_epoch": res.best_epoch, "stopped_early": res.stopped_early},
    )
    export_s = time.monotonic() - t2
    t3 = time.monotonic()
    gate = _quantize_both(r, engine)
    quant_s = time.monotonic() - t3
    man = Manifest.load(engine)
    return {
        "name": r.name,
        "task": r.task,
        "epochs_run": res.epochs_run,
        "best_epoch": res.best_epoch,
        "seconds": {"generate": round(gen_s, 1), "train": round(train_s, 1), "export_eval": round(export_s, 1),
                    "quantize_gate": round(quant_s, 1), "total": round(time.monotonic() - t0, 1)},
        "metrics": {k: dict(v) for k, v in man.metrics.items()},
        "threshold": man.postprocessing.threshold,
        "gate": gate,
    }


def reproduce(
    out: Path | str,
    quick: bool = False,
    only: Sequence[str] | None = None,
    work: Path | str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Rebuild the selected bundled engines into ``out``; returns the record of times and metrics."""
    recipes = [r for r in (QUICK_RECIPES if quick else RECIPES) if not only or r.name in only]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"machine": machine_info(), "quick": quick, "models": []}
    with tempfile.TemporaryDirectory(prefix="medge-reproduce-") as tmp:
        work_dir = Path(work) if work else Path(tmp)
        for r in recipes:
            _log.info("Building %s", r.name)
            record["models"].append(_build_one(r, out, work_dir, cache_dir, progress))
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.reproduce``."""
    p = argparse.ArgumentParser(prog="python -m trainer.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="engines", help="engines folder to (re)write")
    p.add_argument("--quick", action="store_true", help="tiny sets and steps: checks the pipeline, not accuracy")
    p.add_argument("--only", action="append", choices=[r.name for r in RECIPES], help="build only this model (repeatable)")
    p.add_argument("--work", default=None, help="keep run folders (checkpoints, metrics.jsonl) here")
    p.add_argument("--cache-dir", default=None, help="generated-data cache (default ~/.cache/medge/data)")
    p.add_argument("--results", default=None, help="also write the JSON record to this file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from edge.errors import MedgeError

    try:
        rec = reproduce(args.out, args.quick, args.only, args.work, args.cache_dir, progress=not args.no_progress)
    except MedgeError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(rec, indent=2)
    if args.results:
        from edge.fileio import atomic_write_text

        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n", durable=False)
    print(text)
    failed = [m["name"] for m in rec["models"] if not m["gate"]["passed"]]
    if failed:
        print(f"reproduce: INT8 gate refused for {', '.join(failed)}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
