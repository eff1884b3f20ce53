"""Evaluation on a held-out set, through the served post-processing.

A *runner* maps a batch ``[N, C, H, W]`` float32 to the model's named
outputs; :func:`onnx_runner` runs an ONNX file in ONNX Runtime (what the
daemon serves) and :func:`torch_runner` a PyTorch model (validation during
training). Outputs are decoded with :mod:`edge.inference.postprocess` back to source
pixels and compared with the source-resolution ground truth, so what is
measured is what is served.

- Segmentation: Dice and IoU per case (both 1.0 when prediction and truth
  are empty), their means.
- Detection: FROC points (sensitivity vs false positives per image over a
  sweep of score thresholds; a detection *hits* a nodule when its centre
  lies inside the nodule's box, each nodule counted once), the best
  sensitivity at <= 0.25 FP/image, and mAP@0.5 (VOC all-point AP at IoU
  >= 0.5, averaged over labels).
- Classification: the calibrated probability ``sigmoid(logit / T)`` at the
  manifest's threshold, reported by
  :func:`trainer.classification_metrics.evaluation_report` (accuracy,
  sensitivity, specificity, PPV, NPV, ROC AUC, PR AUC, ECE with bootstrap
  95 % intervals, confusion matrix; ROC, PR and reliability plots when asked),
  and where the nodules are known, how often the class activation map's
  hottest cell falls on a nodule (:func:`cam_hits`).

The default held-out synthetic set uses seed :data:`HELDOUT_SEED`, which
training refuses to use.

Examples
--------
>>> from trainer.evaluate import onnx_runner, evaluate_segmentation  # doctest: +SKIP
>>> evaluate_segmentation(onnx_runner("engines/us-lesion-seg/model.onnx"), heldout)["dice"]  # doctest: +SKIP
0.93
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from edge.inference.manifest import Postprocessing
from edge.inference.postprocess import box_iou, decode_detections, segmentation_mask
from trainer.classification_data import POSITIVE_LABEL, ClassificationSet
from trainer.data import DetectionSet, SegmentationSet

__all__ = [
    "HELDOUT_SEED",
    "VALIDATION_SEED",
    "TRAIN_SEED",
    "FP_BUDGET",
    "Runner",
    "onnx_runner",
    "torch_runner",
    "dice_iou",
    "evaluate_segmentation",
    "detect_all",
    "froc",
    "average_precision",
    "evaluate_detection",
    "pick_threshold",
    "heldout_set",
    "summarize",
    "evaluate_model",
    "gated_metric",
    "evaluate_classification",
    "cam_hits",
    "CAM_MARGIN_CELLS",
]

_log = logging.getLogger(__name__)

#: Seeds of the default synthetic sets: training, validation (early stopping,
#: threshold choice) and the held-out test set that never touches training.
TRAIN_SEED = 1
VALIDATION_SEED = 2
HELDOUT_SEED = 1000
#: The operating point the detector is judged at: false positives per image.
FP_BUDGET = 0.25
#: A CAM peak "next to" a nodule: within this many feature-map cells of its box.
CAM_MARGIN_CELLS = 1.0

Runner = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def onnx_runner(path: Path | str, providers: Sequence[str] | None = None, threads: int = 0) -> Runner:
    """A runner over an ONNX file in ONNX Runtime (CPU unless ``providers`` say otherwise)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=list(providers or ["CPUExecutionProvider"]))
    in_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = sess.run(None, {in_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return dict(zip(names, outs))

    return run


def torch_runner(model: Any, task: str) -> Runner:
    """A runner over a PyTorch model (eval mode, no grad); outputs named as in ONNX."""
    import torch

    names = {"segmentation": ["logits"], "classification": ["logits", "cam"]}.get(task, ["heatmap", "size", "offset"])

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        model.train(was_training)
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        return {n: o.float().numpy() for n, o in zip(names, outs)}

    return run


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two binary masks (1.0 and 1.0 when both are empty)."""
    p, t = pred.astype(bool), truth.astype(bool)
    inter = float(np.count_nonzero(p & t))
    ps, ts = float(np.count_nonzero(p)), float(np.count_nonzero(t))
    if ps + ts == 0:
        return 1.0, 1.0
    return 2 * inter / (ps + ts), inter / (ps + ts - inter)


def evaluate_segmentation(
    runner: Runner, ds: SegmentationSet, threshold: float = 0.5, batch_size: int = 8
) -> dict[str, Any]:
    """Per-case Dice/IoU at source resolution and their means.

    ``ds`` must keep its source images and masks (``keep_source=True``).
    """
    if not ds.masks:
        raise ValueError("The segmentation set was built without its source masks.")
    per_case = []
    for sl in _batches(len(ds), batch_size):
        logits = runner(ds.inputs[sl])["logits"]
        for j, i in enumerate(range(sl.start, sl.stop)):
            pred = segmentation_mask(logits[j], ds.geoms[i], threshold)
            d, u = dice_iou(pred, ds.masks[i])
            per_case.append({"dice": round(d, 5), "iou": round(u, 5)})
    dice = np.array([c["dice"] for c in per_case])
    iou = np.array([c["iou"] for c in per_case])
    return {
        "n": len(per_case),
        "dice": float(dice.mean()),
        "iou": float(iou.mean()),
        "dice_median": float(np.median(dice)),
        "dice_min": float(dice.min()),
        "per_case": per_case,
    }


def detect_all(
    runner: Runner,
    ds: DetectionSet,
    post: Postprocessing,
    labels: Sequence[str],
    floor: float = 0.02,
    batch_size: int = 8,
) -> list[list[tuple[int, float, np.ndarray]]]:
    """Detections per image as ``(label_index, score, box)`` down to score ``floor``."""
    loose = Postprocessing(
        threshold=floor, nms_iou=post.nms_iou, max_detections=max(post.max_detections, 50), stride=post.stride
    )
    index = {name: k for k, name in enumerate(labels)}
    out: list[list[tuple[int, float, np.ndarray]]] = []
    for sl in _batches(len(ds), batch_size):
        o = runner(ds.inputs[sl])
        for j, i in enumerate(range(sl.start, sl.stop)):
            boxes = decode_detections(o["heatmap"][j], o["size"][j], o["offset"][j], ds.geoms[i], loose, labels)
            out.append([(index[b.label], b.score, np.array([b.x0, b.y0, b.x1, b.y1])) for b in boxes])
    return out


def _hits(dets: list[tuple[int, float, np.ndarray]], gt: np.ndarray, gt_cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For detections sorted by score: whether each is a hit, and which nodule it hit (-1)."""
    hit = np.zeros(len(dets), bool)
    which = np.full(len(dets), -1)
    taken = np.zeros(len(gt), bool)
    for d, (k, _, b) in enumerate(dets):
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        inside = (gt[:, 0] <= cx) & (cx <= gt[:, 2]) & (gt[:, 1] <= cy) & (cy <= gt[:, 3]) & (gt_cls == k) & ~taken
        if inside.any():
            g = int(np.flatnonzero(inside)[0])
            taken[g] = True
            hit[d] = True
            which[d] = g
    return hit, which


def froc(
    dets: list[list[tuple[int, float, np.ndarray]]],
    ds: DetectionSet,
    thresholds: Sequence[float] | None = None,
) -> list[dict[str, float]]:
    """FROC points ``{threshold, sensitivity, fp_per_image}`` over score thresholds."""
    ths = np.round(np.arange(0.05, 0.96, 0.025), 3) if thresholds is None else np.asarray(thresholds)
    n_gt = sum(len(b) for b in ds.boxes)
    scores, hits = [], []
    for i, d in enumerate(dets):
        d = sorted(d, key=lambda t: -t[1])
        h, _ = _hits(d, ds.boxes[i], ds.classes[i])
        scores.extend(t[1] for t in d)
        hits.extend(h.tolist())
    s, h = np.asarray(scores), np.asarray(hits, bool)
    n_img = max(1, len(dets))
    points = []
    for t in ths:
        keep = s >= t
        tp = int(np.count_nonzero(h & keep))
        fp = int(np.count_nonzero(~h & keep))
        points.append(
            {
                "threshold": float(t),
                "sensitivity": tp / n_gt if n_gt else 1.0,
                "fp_per_image": fp / n_img,
            }
        )
    return points


def average_precision(
    dets: list[list[tuple[int, float, np.ndarray]]], ds: DetectionSet, num_classes: int, iou: float = 0.5
) -> float:
    """VOC all-point AP at ``iou``, averaged over classes that have ground truth."""
    aps = []
    for k in range(num_classes):
        recs: list[tuple[float, bool]] = []
        n_gt = 0
        for i, d in enumerate(dets):
            gt = ds.boxes[i][ds.classes[i] == k]
            n_gt += len(gt)
            taken = np.zeros(len(gt), bool)
            for _, score, b in sorted((t for t in d if t[0] == k), key=lambda t: -t[1]):
                ok = False
                if len(gt):
                    ious = box_iou(b, gt)
                    ious[taken] = -1
                    g = int(np.argmax(ious))
                    if ious[g] >= iou:
                        taken[g] = True
                        ok = True
                recs.append((score, ok))
        if n_gt == 0:
            continue
        recs.sort(key=lambda r: -r[0])
        tp = np.cumsum([r[1] for r in recs]) if recs else np.zeros(0)
        fp = np.cumsum([not r[1] for r in recs]) if recs else np.zeros(0)
        recall = tp / n_gt
        precision = tp / np.maximum(tp + fp, 1e-9)
        mrec = np.concatenate([[0.0], recall, [1.0]])
        mpre = np.concatenate([[0.0], precision, [0.0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        idx = np.flatnonzero(mrec[1:] != mrec[:-1])
        aps.append(float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1])))
    return float(np.mean(aps)) if aps else 0.0


def pick_threshold(points: list[dict[str, float]], fp_budget: float = FP_BUDGET) -> dict[str, float]:
    """The FROC point of highest sensitivity with ``fp_per_image <= fp_budget`` (lowest threshold on ties)."""
    ok = [p for p in points if p["fp_per_image"] <= fp_budget]
    if not ok:
        return max(points, key=lambda p: p["threshold"])
    best = max(p["sensitivity"] for p in ok)
    return min((p for p in ok if p["sensitivity"] == best), key=lambda p: p["threshold"])


def evaluate_detection(
    runner: Runner,
    ds: DetectionSet,
    post: Postprocessing,
    labels: Sequence[str],
    fp_budget: float = FP_BUDGET,
    batch_size: int = 8,
) -> dict[str, Any]:
    """mAP@0.5, FROC, sensitivity at ``fp_budget`` FP/image, and the numbers at ``post.threshold``."""
    dets = detect_all(runner, ds, post, labels, batch_size=batch_size)
    points = froc(dets, ds)
    best = pick_threshold(points, fp_budget)
    at_op = froc(dets, ds, [post.threshold])[0]
    return {
        "n": len(ds),
        "n_nodules": int(sum(len(b) for b in ds.boxes)),
        "map50": average_precision(dets, ds, len(labels)),
        f"sensitivity_at_{fp_budget:g}fp": best["sensitivity"],
        "threshold_at_budget": best["threshold"],
        "sensitivity": at_op["sensitivity"],
        "fp_per_image": at_op["fp_per_image"],
        "threshold": post.threshold,
        "froc": points,
    }


def heldout_set(
    task: str,
    n: int = 200,
    seed: int = HELDOUT_SEED,
    spec: Any = None,
    pre: Any = None,
    data: str | None = None,
    labels: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
) -> DetectionSet | SegmentationSet | ClassificationSet:
    """The held-out set: synthetic with ``seed`` (default), or a user's folder ``data``."""
    from edge.inference.manifest import InputSpec
    from trainer.data import (
        US_PREPROCESSING,
        XRAY_PREPROCESSING,
        default_cache_dir,
        load_detection_folder,
        load_segmentation_folder,
        synthetic_detection_set,
        synthetic_segmentation_set,
    )

    spec = spec or InputSpec()
    cache = cache_dir if cache_dir is not None else default_cache_dir() / "data"
    if task == "classification":
        from trainer.classification_data import load_classification_folder, synthetic_classification_set

        pre = pre or XRAY_PREPROCESSING
        if data:
            return load_classification_folder(data, spec, pre, positive_label=(list(labels or []) or [POSITIVE_LABEL])[0])
        return synthetic_classification_set(n, seed, spec, pre, cache_dir=cache)
    if task == "segmentation":
        pre = pre or US_PREPROCESSING
        if data:
            return load_segmentation_folder(data, spec, pre)
        return synthetic_segmentation_set(n, seed, spec, pre, cache_dir=cache)
    pre = pre or XRAY_PREPROCESSING
    if data:
        return load_detection_folder(data, spec, pre, labels=labels)[0]
    return synthetic_detection_set(n, seed, spec, pre, cache_dir=cache)


def summarize(task: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics kept in a manifest (no per-case lists or FROC curve; a classification
    report flattened by :func:`~trainer.classification_metrics.report_scalars`, plus its CAM hits)."""
    if task == "classification":
        from trainer.classification_metrics import report_scalars

        extra = {k: float(metrics[k]) for k in ("cam_hit_fraction", "cam_n") if metrics.get(k) is not None}
        return {**report_scalars(metrics), **extra}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def evaluate_model(
    runner: Runner,
    task: str,
    ds: DetectionSet | SegmentationSet | ClassificationSet,
    post: Postprocessing,
    labels: Sequence[str],
) -> dict[str, Any]:
    """Evaluate ``runner`` on ``ds`` for ``task`` (Dice/IoU, FROC/mAP, or the classification report)."""
    if task == "classification":
        return evaluate_classification(runner, ds, post)  # type: ignore[arg-type]
    if task == "segmentation":
        return evaluate_segmentation(runner, ds, threshold=post.threshold)  # type: ignore[arg-type]
    return evaluate_detection(runner, ds, post, labels)  # type: ignore[arg-type]


def gated_metric(task: str) -> str:
    """The metric the INT8 gate compares: ``dice``, ``map50`` or ``roc_auc``."""
    return {"segmentation": "dice", "classification": "roc_auc"}.get(task, "map50")


def _logits_and_cams(runner: Runner, ds: ClassificationSet, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Positive-class logits ``(N,)`` and CAMs ``(N, h, w)`` (``None`` when the model has no ``cam``)."""
    zs, cams = [], []
    for sl in _batches(len(ds), batch_size):
        out = runner(ds.inputs[sl])
        z = np.asarray(out["logits"], np.float64)
        if z.ndim != 2 or z.shape[1] != 1:
            raise ValueError(f"A binary classifier's logits are [N, 1]; got {list(z.shape)}.")
        zs.append(z[:, 0])
        if "cam" in out:
            cams.append(np.asarray(out["cam"], np.float32)[:, 0])
    return np.concatenate(zs), (np.concatenate(cams) if cams else None)


def cam_hits(cams: np.ndarray, ds: ClassificationSet, margin_cells: float = CAM_MARGIN_CELLS) -> dict[str, Any]:
    """How often the hottest CAM cell of a positive case with known nodules falls on one.

    The hottest cell's centre, in model-input pixels, *hits* when it lies
    inside a nodule's box (model-input pixels) grown by ``margin_cells``
    cells on every side ("inside or next to"). Returns ``cam_n`` (cases
    judged), ``cam_hits`` and ``cam_hit_fraction`` (``None`` when no case
    could be judged).
    """
    h_in, w_in = ds.inputs.shape[-2:]
    n = hits = 0
    for i in np.flatnonzero(ds.labels):
        if i >= len(ds.input_boxes) or not len(ds.input_boxes[i]):
            continue
        cam = cams[i]
        sy, sx = h_in / cam.shape[0], w_in / cam.shape[1]
        cy, cx = np.unravel_index(int(np.argmax(cam)), cam.shape)
        py, px = (cy + 0.5) * sy, (cx + 0.5) * sx
        b = ds.input_boxes[i]
        inside = ((b[:, 0] - margin_cells * sx <= px) & (px <= b[:, 2] + margin_cells * sx)
                  & (b[:, 1] - margin_cells * sy <= py) & (py <= b[:, 3] + margin_cells * sy))
        n += 1
        hits += bool(inside.any())
    return {"cam_n": n, "cam_hits": hits, "cam_hit_fraction": hits / n if n else None}


def evaluate_classification(
    runner: Runner,
    ds: ClassificationSet,
    post: Postprocessing,
    report_dir: Path | str | None = None,
    prefix: str = "",
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """The held-out classification report at ``post``'s temperature and threshold.

    :func:`trainer.classification_metrics.evaluation_report` on
    ``sigmoid(logit / post.temperature)`` (temperature 1 when the
    post-processing has none), plus :func:`cam_hits` when the model has a
    ``cam`` output and the set knows its nodules; with ``report_dir`` the
    ROC, PR and reliability PNGs are written there (``<prefix>-roc.png``, ...).
    """
    from trainer.classification_metrics import apply_temperature, evaluation_report

    logits, cams = _logits_and_cams(runner, ds, batch_size)
    temperature = post.temperature if post.temperature is not None else 1.0
    p = apply_temperature(logits, temperature)
    report = evaluation_report(ds.labels, p, post.threshold, out_dir=report_dir, prefix=prefix, n_boot=n_boot,
                               seed=seed)
    report["temperature"] = float(temperature)
    if cams is not None and ds.input_boxes:
        report.update(cam_hits(cams, ds))
    return report
