"""Export: PyTorch checkpoint -> ONNX (FP32, FP16) + ``manifest.json``.

- ONNX opset 18 (>= 17) through ``torch.onnx.export`` (the torch.export
  based exporter), BatchNorm folded into Conv first, a dynamic batch axis
  named ``batch``.
- Parity: ONNX Runtime's output is compared with PyTorch's on seeded random
  inputs at batch 1 and 2; the export is refused when the largest absolute
  difference exceeds ``atol`` (default :data:`PARITY_ATOL`).
- Classifiers export two outputs of one graph: ``logits`` ``[N, 1]`` and
  the class activation map ``cam`` ``[N, 1, H/16, W/16]``
  (:class:`trainer.models.Classifier`); parity covers both. Their manifest
  carries the temperature and threshold fitted on validation data at
  training (or here, for a checkpoint without them), the target sensitivity
  and the confidence of its claim (``target_confidence``), and the held-out
  classification report. Only a detector's manifest carries ``nms_iou``,
  ``max_detections`` and ``stride``.
- FP16: weights and activations in float16 (onnxconverter-common's
  converter, clamped to the float16 range), inputs and outputs kept float32
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
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch

from edge.errors import DataError, ModelError
from edge.fileio import atomic_file, atomic_write
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
    return {"segmentation": ["logits"], "classification": ["logits", "cam"]}.get(task, ["heatmap", "size", "offset"])


def _serving(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` set to return every served output (a classifier's CAM beside its logits)."""
    if hasattr(model, "emit_cam"):
        model.emit_cam = True
    return model


def _atomic_onnx_save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, model.SerializeToString())


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
    m = _serving(fold_batchnorm(model).cpu().float().to(memory_format=torch.contiguous_format).eval())
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


def _check_finite_output(ref: np.ndarray, out: np.ndarray, onnx_path: Path | str) -> None:
    """Raise :class:`ModelError` if the PyTorch or ONNX output holds NaN or infinity."""
    for who, arr in (("PyTorch", ref), ("ONNX Runtime", out)):
        if not np.isfinite(arr).all():
            raise ModelError(
                f"The {who} output for {onnx_path} holds non-finite values (NaN or infinity); "
                "the model's weights are unusable (was its training loss finite?)."
            )


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
        If the ONNX outputs differ from PyTorch's by more than ``atol``, or
        either holds a non-finite value (NaN or infinity: a model trained to
        NaN weights agrees with itself, so the difference alone cannot tell).
    """
    spec = spec or InputSpec()
    rng = np.random.default_rng(seed)
    m = _serving(copy.deepcopy(model).cpu().float().to(memory_format=torch.contiguous_format).eval())
    worst = 0.0
    for n in (1, 2):
        x = rng.random((n, spec.channels, *spec.size), dtype=np.float32)
        with torch.no_grad():
            ref = m(torch.from_numpy(x))
        refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
        outs = _ort_run(onnx_path, x)
        if len(outs) != len(refs):
            raise ModelError(f"{onnx_path} has {len(outs)} outputs but the PyTorch model {len(refs)}.")
        for r, o in zip(refs, outs):
            if tuple(r.shape) != o.shape:
                raise ModelError(f"ONNX output shape {o.shape} differs from PyTorch's {tuple(r.shape)}.")
            _check_finite_output(r.numpy(), o, onnx_path)
            worst = max(worst, float(np.max(np.abs(r.numpy() - o))))
    if worst > atol:
        raise ModelError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {atol:.0e}) on {onnx_path}.")
    _log.info("ORT vs PyTorch parity on %s: max |diff| %.2e (tolerance %.0e)", onnx_path, worst, atol)
    return worst


def convert_fp16(src: Path | str, dst: Path | str) -> Path:
    """Write a float16 copy of an FP32 ONNX model, keeping float32 inputs and outputs.

    The conversion is onnxconverter-common's
    :func:`~onnxconverter_common.float16.convert_float_to_float16` with
    ``keep_io_types=True``: the serving code feeds float32 and reads float32
    whatever the precision (a ``Cast`` at each end does the rest). It clamps
    weights to the float16 range (magnitudes above 1e4 to 1e4, nonzero ones
    below 1e-7 to 1e-7) instead of letting them overflow to infinity or
    flush to zero, converts subgraphs and keeps ``value_info`` consistent, and
    leaves the ops it lists as float-only (``Resize``, ``TopK``, ...) in
    float32 between casts.

    Raises
    ------
    ModelError
        If the model is already float16 or the converted model fails the
        ONNX checker.
    """
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    try:
        # The converter warns once per clamped tensor; one log line says how many instead.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            half = float16.convert_float_to_float16(model, keep_io_types=True)
        onnx.checker.check_model(half)
    except (ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"Cannot convert {src} to float16: {exc}") from exc
    clamped = sum("will be truncated to" in str(w.message) for w in caught)
    for w in caught:
        if "will be truncated to" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if clamped:
        _log.info("FP16 export of %s: %d tensor(s) had values clamped to the float16 range.", src, clamped)
    dst = Path(dst)
    _atomic_onnx_save(half, dst)
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
            "postprocessing": _post_dict(post, task),
            "artifacts": {k: {"path": a.path, "sha256": a.sha256} for k, a in arts.items()},
            "metrics": mets,
            "training": dict(training or {}),
            "intended_use": intended_use,
            "research_only": research_only,
        },
        directory=directory,
    )


def _post_dict(post: Postprocessing, task: str) -> dict[str, Any]:
    """The manifest's ``postprocessing``: ``threshold``, the detector's NMS fields for detection only,
    a classifier's calibration only where set."""
    d: dict[str, Any] = {"threshold": post.threshold}
    if task == "detection":
        d.update(nms_iou=post.nms_iou, max_detections=post.max_detections, stride=post.stride)
    for key in ("temperature", "target_sensitivity", "target_confidence"):
        if getattr(post, key) is not None:
            d[key] = getattr(post, key)
    return d


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
    "classification": (
        "Research and demonstration only: nodule present / absent in chest radiographs, "
        "trained on synthetic data. NOT FOR CLINICAL USE."
    ),
}


def _export_heldout_plan(base_record: Mapping[str, Any], task: str, evaluate: bool, heldout_data: str | None,
                         heldout_n: int | None, checkpoint: Path | str) -> Any:
    """The held-out set to evaluate on and record (``None``: none known and none needed)."""
    from trainer.provenance import plan_heldout

    if evaluate or heldout_data:
        return plan_heldout(base_record, task, heldout_data, heldout_n, what=f"Checkpoint {checkpoint}")
    try:  # --no-eval: still record the held-out set where one is known, for medge quantize
        return plan_heldout(base_record, task, None, heldout_n)
    except DataError:
        return None


def _checkpoint_io(ckpt: Mapping[str, Any]) -> tuple[InputSpec, Preprocessing, Postprocessing, list[str]]:
    """The input spec, pre- and post-processing and labels a checkpoint records."""
    spec = InputSpec(name=ckpt["input"]["name"], channels=int(ckpt["input"]["channels"]), size=tuple(ckpt["input"]["size"]))
    pre_d = dict(ckpt["preprocessing"])
    if pre_d.get("window") is not None:
        pre_d["window"] = tuple(pre_d["window"])
    pre = Preprocessing(**pre_d)
    post = Postprocessing(**ckpt["postprocessing"])
    if ckpt["task"] != "classification":  # checkpoints record every field; the others carry no calibration
        post = Postprocessing(threshold=post.threshold, nms_iou=post.nms_iou, max_detections=post.max_detections,
                              stride=post.stride)
    return spec, pre, post, list(ckpt["labels"])


def _write_artifacts(ckpt: Mapping[str, Any], checkpoint: Path | str, out: Path, task: str, spec: InputSpec,
                     fp16: bool, atol: float) -> tuple[dict[str, Path], float, Path]:
    """Remove stale artifacts, export (and check) the ONNX files, copy the checkpoint beside them.

    Returns the artifact paths by precision, the FP32 parity and the copied checkpoint.
    """
    import shutil

    from trainer.train import model_from_checkpoint

    model = model_from_checkpoint(ckpt)
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
        with open(checkpoint, "rb") as src, atomic_file(ckpt_dst, durable=False) as dst:
            shutil.copyfileobj(src, dst)
    return paths, parity, ckpt_dst


def _evaluate_artifacts(ckpt: Mapping[str, Any], plan: Any, paths: Mapping[str, Path], spec: InputSpec,
                        pre: Preprocessing, post: Postprocessing, labels: list[str], synthetic: bool,
                        val_n: int) -> tuple[Postprocessing, dict[str, dict[str, float]], int, dict[str, Any]]:
    """Choose the detector threshold on validation data, then evaluate each artifact on the held-out set.

    Returns the (possibly re-thresholded) post-processing, the metrics by
    precision, the held-out size and what the training record adds (a
    classifier's FP32 report).
    """
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

    task = ckpt["task"]
    cfg = ckpt.get("config", {})
    if task == "classification":
        return _evaluate_classifier(ckpt, plan, paths, spec, pre, post, labels)
    if task == "detection" and not synthetic and not cfg.get("val_data"):
        _log.warning("No validation folder recorded; keeping the detector threshold %.3f.", post.threshold)
    elif task == "detection":
        val = heldout_set(task, val_n, seed=int(cfg.get("val_seed", VALIDATION_SEED)), spec=spec, pre=pre,
                          data=None if synthetic else cfg.get("val_data"), labels=labels)
        pts = froc(detect_all(onnx_runner(paths["fp32"]), val, post, labels), val)
        # Aim a little under the budget on validation data so the held-out point stays within it.
        chosen = pick_threshold(pts, FP_BUDGET * 0.8)
        post = Postprocessing(threshold=float(chosen["threshold"]), nms_iou=post.nms_iou,
                              max_detections=post.max_detections, stride=post.stride)
        _log.info("Detector threshold %.3f chosen on validation data (sensitivity %.3f at %.3f FP/image)",
                  chosen["threshold"], chosen["sensitivity"], chosen["fp_per_image"])
    test = plan.load(task, spec, pre, labels)
    n_heldout = len(test)
    _log.info("Evaluating on the held-out set %s (%d cases).", plan.data, n_heldout)
    metrics: dict[str, dict[str, float]] = {}
    for prec, p in paths.items():
        metrics[prec] = summarize(task, evaluate_model(onnx_runner(p), task, test, post, labels))
    return post, metrics, n_heldout, {}


def _classifier_calibration(ckpt: Mapping[str, Any], fp32: Path, spec: InputSpec, pre: Preprocessing,
                            post: Postprocessing, labels: list[str]) -> Postprocessing:
    """``post`` as calibrated at training, or calibrated now on the recorded validation set (FP32 ONNX)."""
    from trainer.classification import calibrate, predict_logits
    from trainer.evaluate import VALIDATION_SEED, heldout_set, onnx_runner
    from trainer.operating_point import DEFAULT_TARGET_SENSITIVITY, DEFAULT_THRESHOLD_CONFIDENCE

    if post.temperature is not None:
        return post
    cfg = ckpt.get("config", {})
    rec = ckpt.get("training", {}) or {}
    if cfg.get("data", "synthetic") == "synthetic":
        from trainer.classification_data import synthetic_classification_set

        shape = tuple(rec.get("source_shape") or cfg.get("synthetic_shape") or (512, 512))
        val = synthetic_classification_set(int(cfg.get("n_val", 64)), int(cfg.get("val_seed", VALIDATION_SEED)), spec,
                                           pre, positive_fraction=float(cfg.get("positive_fraction", 0.15)),
                                           shape=(int(shape[0]), int(shape[1])))
    elif cfg.get("val_data"):
        val = heldout_set("classification", spec=spec, pre=pre, data=cfg["val_data"], labels=labels)
    else:  # the training folder may hold the held-out split: never calibrate on it
        raise DataError(
            "The classifier checkpoint records no calibration and no validation folder to fit one on; "
            "export the best.pt or last.pt that medge train calibrated."
        )
    _log.info("Checkpoint has no calibration; fitting it on %d validation cases.", len(val))
    target = float(cfg.get("target_sensitivity", DEFAULT_TARGET_SENSITIVITY))
    confidence = cfg.get("threshold_confidence", DEFAULT_THRESHOLD_CONFIDENCE)
    cal = calibrate(predict_logits(onnx_runner(fp32), val.inputs), val.labels, target, confidence)
    return Postprocessing(threshold=cal["threshold"], temperature=cal["temperature"], target_sensitivity=target,
                          target_confidence=cal["target_confidence"])


def _evaluate_classifier(ckpt: Mapping[str, Any], plan: Any, paths: Mapping[str, Path], spec: InputSpec,
                         pre: Preprocessing, post: Postprocessing,
                         labels: list[str]) -> tuple[Postprocessing, dict[str, dict[str, float]], int, dict[str, Any]]:
    """Calibration (recorded or fitted now), then each artifact's held-out classification report.

    The manifest keeps each precision's scalars (values, interval ends,
    confusion counts); the FP32 report itself goes into the training record
    (``classification_report``).
    """
    from trainer.classification_data import classification_heldout
    from trainer.evaluate import evaluate_classification, onnx_runner, summarize

    post = _classifier_calibration(ckpt, paths["fp32"], spec, pre, post, labels)
    test = classification_heldout(plan, ckpt.get("training", {}) or {}, spec, pre, labels[0])
    _log.info("Evaluating on the held-out set %s (%d cases, %d positive).", plan.data, len(test), test.n_positive)
    metrics: dict[str, dict[str, float]] = {}
    reports: dict[str, dict[str, Any]] = {}
    for prec, p in paths.items():
        reports[prec] = evaluate_classification(onnx_runner(p), test, post)
        metrics[prec] = summarize("classification", reports[prec])
    return post, metrics, len(test), {"classification_report": reports["fp32"]}


def _heldout_record(plan: Any, task: str, n: int | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    if task == "classification":
        from trainer.classification_data import classification_heldout_record

        return classification_heldout_record(plan, n)
    return plan.record(task, n)


def _export_training_record(ckpt: Mapping[str, Any], base_record: dict[str, Any], synthetic: bool, plan: Any,
                            n_heldout: int | None, ckpt_dst: Path, parity: float, atol: float,
                            extra_training: Mapping[str, Any] | None) -> dict[str, Any]:
    """The manifest's ``training`` record: the checkpoint's data, run config, held-out set and parity."""
    from trainer.provenance import GENERATORS

    task = ckpt["task"]
    cfg = ckpt.get("config", {})
    knobs = ("batch_size", "lr", "epochs", "steps_per_epoch", "base", "augment", "seed")
    if task == "classification":
        knobs = (*knobs, "loss", "sampler", "target_sensitivity", "threshold_confidence")
    if synthetic:
        if task in GENERATORS:
            base_record["generator"] = GENERATORS[task]
        run_config = {k: cfg.get(k) for k in ("n_train", "n_val", *knobs, "data_seed", "val_seed")}
    else:
        # Nothing of the synthetic recipe describes a user's data: no generator, no data seeds
        # (a split's seed is kept inside its heldout record), sizes as counted at training.
        for k in ("generator", "data_seed", "val_seed"):
            base_record.pop(k, None)
        run_config = {k: cfg.get(k) for k in knobs}
        run_config["heldout_fraction"] = cfg.get("heldout_fraction", 0.0)
    return {
        **base_record,
        "epochs": int(ckpt.get("epoch", 0)),
        "config": run_config,
        "heldout": _heldout_record(plan, task, n_heldout),
        "code_version": git_describe(),
        "checkpoint": {"path": "model.pt", "sha256": sha256_file(ckpt_dst)},
        "onnx_parity_max_abs_diff": parity,
        "onnx_parity_tolerance": atol,
        "opset": OPSET,
        **dict(extra_training or {}),
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
    from trainer.provenance import INTENDED_USE_FILL_IN, checkpoint_record, is_user_data
    from trainer.train import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    task = ckpt["task"]
    base_record = checkpoint_record(ckpt)
    user = is_user_data(base_record)
    # Decided before anything is written: a refusal leaves out_dir untouched.
    plan = _export_heldout_plan(base_record, task, evaluate, heldout_data, heldout_n, checkpoint)
    spec, pre, post, labels = _checkpoint_io(ckpt)
    out = Path(out_dir)
    paths, parity, ckpt_dst = _write_artifacts(ckpt, checkpoint, out, task, spec, fp16, atol)
    metrics: dict[str, dict[str, float]] = {}
    synthetic = not user
    n_heldout: int | None = None
    if evaluate and plan is not None:  # evaluate always has a plan (or plan_heldout raised)
        post, metrics, n_heldout, found = _evaluate_artifacts(ckpt, plan, paths, spec, pre, post, labels, synthetic,
                                                              val_n)
        extra_training = {**found, **dict(extra_training or {})}
    elif task == "classification":  # the daemon needs a calibrated classifier even without metrics
        post = _classifier_calibration(ckpt, paths["fp32"], spec, pre, post, labels)
    training = _export_training_record(ckpt, base_record, synthetic, plan, n_heldout, ckpt_dst, parity, atol,
                                       extra_training)
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
