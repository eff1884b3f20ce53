"""Export: PyTorch checkpoint -> ONNX (FP32, FP16) + ``manifest.json``.

- ONNX opset 18 (>= 17) through ``torch.onnx.export`` (the torch.export
  based exporter), BatchNorm folded into Conv first, a dynamic batch axis
  named ``batch``.
- Parity: ONNX Runtime's output is compared with PyTorch's on seeded random
  inputs at batch 1 and 2; the export is refused when the largest absolute
  difference exceeds ``atol`` (default :data:`PARITY_ATOL`).
- FP16: weights and activations in float16, inputs and outputs kept float32
  (a Cast at each end), for GPUs (TensorRT / CUDA EP).
- The manifest lists every artifact with its sha256 (see
  :mod:`edge.inference.manifest`), the preprocessing and post-processing, labels,
  metrics per precision and the training record.

Examples
--------
>>> from trainer.export import export_onnx  # doctest: +SKIP
>>> export_onnx(model, "engines/us-lesion-seg/model.onnx", task="segmentation")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edge.errors import DataError, ModelError
from edge.inference.manifest import Artifact, InputSpec, Manifest, Postprocessing, Preprocessing, sha256_file
from trainer.models import fold_batchnorm

__all__ = [
    "OPSET",
    "PARITY_ATOL",
    "ARTIFACT_FILES",
    "output_names",
    "export_onnx",
    "check_parity",
    "convert_fp16",
    "git_describe",
    "build_manifest",
    "write_manifest",
    "export_checkpoint",
    "INTENDED_USE",
]

_log = logging.getLogger(__name__)

OPSET = 18
#: Largest accepted |ORT - PyTorch| on model outputs (logits, probabilities, pixels).
PARITY_ATOL = 1e-3
ARTIFACT_FILES = {
    "fp32": "model.onnx",
    "fp16": "model.fp16.onnx",
    "int8": "model.int8.onnx",  # uint8 activations: fastest on ONNX Runtime CPU
    "int8-tensorrt": "model.int8-tensorrt.onnx",  # symmetric int8 activations: what TensorRT builds INT8 from
}


def output_names(task: str) -> list[str]:
    """ONNX output names of a model for ``task``."""
    return ["logits"] if task == "segmentation" else ["heatmap", "size", "offset"]


def _atomic_onnx_save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(model.SerializeToString())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def export_onnx(
    model: torch.nn.Module,
    path: Path | str,
    task: str,
    spec: InputSpec | None = None,
    opset: int = OPSET,
) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis; returns the path.

    BatchNorm is folded into the preceding Conv; the file is checked with
    :func:`onnx.checker.check_model` and written atomically.
    """
    if opset < 17:
        raise ModelError(f"ONNX opset {opset} is below the required 17.")
    spec = spec or InputSpec()
    path = Path(path)
    # channels_last weights (used in training) break torch.export's batch symbol.
    m = fold_batchnorm(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    x = torch.zeros(2, spec.channels, *spec.size)
    batch = torch.export.Dim("batch", min=1, max=256)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp_path = Path(tmp) / "model.onnx"
        # The exporter reports progress on stdout; library code stays quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                m,
                (x,),
                str(tmp_path),
                input_names=[spec.name],
                output_names=output_names(task),
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
            )
        proto = onnx.load(str(tmp_path))
    proto.producer_name = "medge-trainer"
    onnx.checker.check_model(proto)
    _atomic_onnx_save(proto, path)
    _log.info("Exported %s (opset %d, %d nodes)", path, opset, len(proto.graph.node))
    return path


def _ort_run(path: Path | str, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def check_parity(
    model: torch.nn.Module,
    onnx_path: Path | str,
    spec: InputSpec | None = None,
    atol: float = PARITY_ATOL,
    seed: int = 0,
) -> float:
    """Largest ``|ORT - PyTorch|`` over outputs at batch 1 and 2; raises if above ``atol``.

    Raises
    ------
    ModelError
        If the ONNX outputs differ from PyTorch's by more than ``atol``.
    """
    spec = spec or InputSpec()
    rng = np.random.default_rng(seed)
    m = copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval()
    worst = 0.0
    for n in (1, 2):
        x = rng.random((n, spec.channels, *spec.size), dtype=np.float32)
        with torch.no_grad():
            ref = m(torch.from_numpy(x))
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        outs = _ort_run(onnx_path, x)
        for r, o in zip(refs, outs):
            if tuple(r.shape) != o.shape:
                raise ModelError(f"ONNX output shape {o.shape} differs from PyTorch's {tuple(r.shape)}.")
            worst = max(worst, float(np.max(np.abs(r.numpy() - o))))
    if worst > atol:
        raise ModelError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {atol:.0e}) on {onnx_path}.")
    _log.info("ORT vs PyTorch parity on %s: max |diff| %.2e (tolerance %.0e)", onnx_path, worst, atol)
    return worst


def convert_fp16(src: Path | str, dst: Path | str) -> Path:
    """Write a float16 copy of an FP32 ONNX model, keeping float32 inputs and outputs.

    Float initializers become float16 except those that ops read as
    parameters rather than tensors (``Resize`` scales/roi); a ``Cast`` to
    float16 follows every graph input and a ``Cast`` to float32 precedes
    every graph output.
    """
    model = onnx.load(str(src))
    g = model.graph
    keep_fp32: set[str] = set()
    for node in g.node:
        if node.op_type == "Resize":
            keep_fp32.update(node.input[1:])
    new_inits = []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and init.name not in keep_fp32:
            arr = numpy_helper.to_array(init).astype(np.float16)
            new_inits.append(numpy_helper.from_array(arr, init.name))
        else:
            new_inits.append(init)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    for node in g.node:  # Constant nodes holding float tensors
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT and node.output[0] not in keep_fp32:
                    attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
    casts_in = []
    for inp in g.input:
        if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = inp.name + "_fp16"
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == inp.name:
                    node.input[i] = half
        casts_in.append(helper.make_node("Cast", [inp.name], [half], to=TensorProto.FLOAT16, name=f"cast_in_{inp.name}"))
    for out in g.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = out.name + "_fp16"
        for node in g.node:
            for i, name in enumerate(node.output):
                if name == out.name:
                    node.output[i] = half
        g.node.append(helper.make_node("Cast", [half], [out.name], to=TensorProto.FLOAT, name=f"cast_out_{out.name}"))
    for i, c in enumerate(casts_in):
        g.node.insert(i, c)
    # Intermediate value_info entries would carry stale float32 types.
    del g.value_info[:]
    onnx.checker.check_model(model)
    dst = Path(dst)
    _atomic_onnx_save(model, dst)
    return dst


def git_describe(cwd: Path | str | None = None) -> str:
    """``git describe --always --dirty`` of the code, or ``unknown`` outside a checkout."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_manifest(
    directory: Path | str,
    name: str,
    task: str,
    labels: Sequence[str],
    spec: InputSpec,
    pre: Preprocessing,
    post: Postprocessing,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    training: Mapping[str, Any] | None = None,
    intended_use: str = "",
    version: str = "1",
    research_only: bool = True,
) -> Manifest:
    """A :class:`~edge.inference.manifest.Manifest` for the artifacts present in ``directory``.

    Every ``model*.onnx`` artifact present (fp32, fp16, int8) is listed with
    its sha256; metrics are kept only for listed precisions.
    """
    directory = Path(directory)
    arts = {
        prec: Artifact(path=fname, sha256=sha256_file(directory / fname))
        for prec, fname in ARTIFACT_FILES.items()
        if (directory / fname).is_file()
    }
    mets = {k: dict(v) for k, v in (metrics or {}).items() if k in arts}
    return Manifest.from_dict(
        {
            "name": name,
            "version": version,
            "task": task,
            "labels": list(labels),
            "input": {
                "name": spec.name,
                "layout": spec.layout,
                "dtype": spec.dtype,
                "channels": spec.channels,
                "size": list(spec.size),
            },
            "outputs": output_names(task),
            "preprocessing": {
                "color": pre.color,
                "resize": pre.resize,
                "normalize": pre.normalize,
                "mean": pre.mean,
                "std": pre.std,
                "window": list(pre.window) if pre.window else None,
            },
            "postprocessing": {
                "threshold": post.threshold,
                "nms_iou": post.nms_iou,
                "max_detections": post.max_detections,
                "stride": post.stride,
            },
            "artifacts": {k: {"path": a.path, "sha256": a.sha256} for k, a in arts.items()},
            "metrics": mets,
            "training": dict(training or {}),
            "intended_use": intended_use,
            "research_only": research_only,
        },
        directory=directory,
    )


def write_manifest(manifest: Manifest, directory: Path | str | None = None) -> Path:
    """Save ``manifest`` atomically and check that it loads and every artifact verifies."""
    directory = Path(directory) if directory is not None else manifest.directory
    if directory is None:
        raise ModelError("No directory given for the manifest.")
    path = manifest.save(directory)
    loaded = Manifest.load(directory)
    for prec in loaded.artifacts:
        loaded.artifact_path(prec, verify=True)
    return path


INTENDED_USE = {
    "segmentation": (
        "Research and demonstration only: segmentation of lesions in B-mode ultrasound frames, "
        "trained on synthetic data. NOT FOR CLINICAL USE."
    ),
    "detection": (
        "Research and demonstration only: detection of nodules in chest radiographs, "
        "trained on synthetic data. NOT FOR CLINICAL USE."
    ),
}


def export_checkpoint(
    checkpoint: Path | str,
    out_dir: Path | str,
    name: str,
    version: str = "1",
    fp16: bool = True,
    evaluate: bool = True,
    heldout_n: int | None = None,
    heldout_data: str | None = None,
    val_n: int = 100,
    atol: float = PARITY_ATOL,
    extra_training: Mapping[str, Any] | None = None,
    intended_use: str | None = None,
) -> Manifest:
    """Checkpoint -> ``out_dir`` with ``model.onnx`` (+ ``model.fp16.onnx``), ``model.pt`` and ``manifest.json``.

    The detector's score threshold is chosen on the validation set (never
    the held-out one) as the FROC point of best sensitivity within the FP
    budget; FP32 (and FP16) metrics come from the held-out set through ONNX
    Runtime and :mod:`edge.inference.postprocess`. An existing INT8 artifact in
    ``out_dir`` is removed, because it no longer matches the new FP32 model.

    The held-out set is the one recorded in the checkpoint
    (:func:`trainer.provenance.plan_heldout`), or ``heldout_data``;
    ``heldout_n`` sizes a synthetic one (default: 200). The manifest's
    training record describes the data the checkpoint was trained on:
    for a user's folder, its path and real sizes, no synthetic generator,
    and ``intended_use`` as given or :data:`~trainer.provenance.INTENDED_USE_FILL_IN`.

    Raises
    ------
    DataError
        Before anything is written, when the checkpoint was trained on a
        user's data, records no held-out set and ``heldout_data`` is not
        given (unless ``evaluate`` is false).
    """
    import shutil

    from trainer.evaluate import (
        FP_BUDGET,
        VALIDATION_SEED,
        detect_all,
        evaluate_model,
        froc,
        heldout_set,
        onnx_runner,
        pick_threshold,
        summarize,
    )
    from trainer.provenance import (
        GENERATORS,
        INTENDED_USE_FILL_IN,
        HeldoutPlan,
        checkpoint_record,
        is_user_data,
        plan_heldout,
    )
    from trainer.train import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint)
    task = ckpt["task"]
    cfg = ckpt.get("config", {})
    base_record = checkpoint_record(ckpt)
    user = is_user_data(base_record)
    # Decided before anything is written: a refusal leaves out_dir untouched.
    plan: HeldoutPlan | None = None
    if evaluate or heldout_data:
        plan = plan_heldout(base_record, task, heldout_data, heldout_n, what=f"Checkpoint {checkpoint}")
    else:
        try:  # --no-eval: still record the held-out set where one is known, for medge quantize
            plan = plan_heldout(base_record, task, None, heldout_n)
        except DataError:
            plan = None
    model = model_from_checkpoint(ckpt)
    spec = InputSpec(name=ckpt["input"]["name"], channels=int(ckpt["input"]["channels"]), size=tuple(ckpt["input"]["size"]))
    pre_d = dict(ckpt["preprocessing"])
    if pre_d.get("window") is not None:
        pre_d["window"] = tuple(pre_d["window"])
    pre = Preprocessing(**pre_d)
    post = Postprocessing(**ckpt["postprocessing"])
    labels = list(ckpt["labels"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ARTIFACT_FILES.values():
        if (out / stale).exists():
            (out / stale).unlink()
    fp32 = export_onnx(model, out / ARTIFACT_FILES["fp32"], task, spec)
    parity = check_parity(model, fp32, spec, atol=atol)
    paths = {"fp32": fp32}
    if fp16:
        paths["fp16"] = convert_fp16(fp32, out / ARTIFACT_FILES["fp16"])
    ckpt_dst = out / "model.pt"
    if Path(checkpoint).resolve() != ckpt_dst.resolve():
        tmp = ckpt_dst.with_name("model.pt.tmp")
        shutil.copyfile(checkpoint, tmp)
        os.replace(tmp, ckpt_dst)
    metrics: dict[str, dict[str, float]] = {}
    synthetic = not user
    n_heldout: int | None = None
    if evaluate and plan is not None:  # evaluate always has a plan (or plan_heldout raised)
        if task == "detection" and not synthetic and not cfg.get("val_data"):
            _log.warning("No validation folder recorded; keeping the detector threshold %.3f.", post.threshold)
        elif task == "detection":
            val = heldout_set(task, val_n, seed=int(cfg.get("val_seed", VALIDATION_SEED)), spec=spec, pre=pre,
                              data=None if synthetic else cfg.get("val_data"), labels=labels)
            pts = froc(detect_all(onnx_runner(fp32), val, post, labels), val)
            # Aim a little under the budget on validation data so the held-out point stays within it.
            chosen = pick_threshold(pts, FP_BUDGET * 0.8)
            post = Postprocessing(threshold=float(chosen["threshold"]), nms_iou=post.nms_iou,
                                  max_detections=post.max_detections, stride=post.stride)
            _log.info("Detector threshold %.3f chosen on validation data (sensitivity %.3f at %.3f FP/image)",
                      chosen["threshold"], chosen["sensitivity"], chosen["fp_per_image"])
        test = plan.load(task, spec, pre, labels)
        n_heldout = len(test)
        _log.info("Evaluating on the held-out set %s (%d cases).", plan.data, n_heldout)
        for prec, p in paths.items():
            metrics[prec] = summarize(task, evaluate_model(onnx_runner(p), task, test, post, labels))
    knobs = ("batch_size", "lr", "epochs", "steps_per_epoch", "base", "augment", "seed")
    if synthetic:
        base_record["generator"] = GENERATORS[task]
        run_config = {k: cfg.get(k) for k in ("n_train", "n_val", *knobs, "data_seed", "val_seed")}
    else:
        # Nothing of the synthetic recipe describes a user's data: no generator, no data seeds
        # (a split's seed is kept inside its heldout record), sizes as counted at training.
        for k in ("generator", "data_seed", "val_seed"):
            base_record.pop(k, None)
        run_config = {k: cfg.get(k) for k in knobs}
        run_config["heldout_fraction"] = cfg.get("heldout_fraction", 0.0)
    training = {
        **base_record,
        "epochs": int(ckpt.get("epoch", 0)),
        "config": run_config,
        "heldout": plan.record(task, n_heldout) if plan is not None else None,
        "code_version": git_describe(),
        "checkpoint": {"path": "model.pt", "sha256": sha256_file(ckpt_dst)},
        "onnx_parity_max_abs_diff": parity,
        "onnx_parity_tolerance": atol,
        "opset": OPSET,
        **dict(extra_training or {}),
    }
    if intended_use is None:
        intended_use = INTENDED_USE[task] if synthetic else INTENDED_USE_FILL_IN
        if not synthetic:
            _log.warning("Manifest %s: intended_use is a FILL IN marker; edit it or pass --intended-use.", out / "manifest.json")
    man = build_manifest(
        out, name, task, labels, spec, pre, post, metrics=metrics, training=training,
        intended_use=intended_use, version=version,
    )
    write_manifest(man, out)
    return Manifest.load(out)
