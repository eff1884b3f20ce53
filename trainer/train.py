"""Training loop for the three tasks, single-process or data-parallel under ``torchrun``.

- Seeded: model init, sample order and augmentation come from ``seed``.
- Data-parallel with no code change: when ``torchrun`` sets ``WORLD_SIZE``
  > 1 the loop joins a process group (``nccl`` on GPU, ``gloo`` on CPU),
  wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel`
  and gives each rank its shard of every epoch's permutation; rank 0 alone
  writes checkpoints, logs and the progress bar.
- Augmentation (batched, in model-input space): horizontal flip, small
  rotation, zoom and shift (one affine per sample; boxes follow their
  centres), gain/offset/gamma jitter, multiplicative speckle or additive noise.
- Losses: BCE + soft Dice (segmentation); CenterNet focal loss on the
  heatmap + L1 on size and offset (detection); cross-entropy, class-weighted
  cross-entropy or focal loss, with random or class-balanced sampling
  (classification, :mod:`trainer.classification`).
- Validation each epoch through the served post-processing
  (:mod:`trainer.evaluate`; ROC AUC for classification), early stopping on
  its score, ``best.pt`` and ``last.pt`` checkpoints, one JSON line per epoch
  in ``metrics.jsonl``.
- Transfer learning: ``init`` loads a checkpoint's weights;
  ``freeze_encoder`` keeps its contracting path fixed. A classifier may
  start from a detector's or segmenter's checkpoint: the encoder tensors
  that match by name and shape are taken (:func:`trainer.models.transfer_encoder`).
- Classification calibration: after the last epoch ``best.pt`` gets a
  temperature fitted on the validation set and the threshold for the target
  sensitivity at ``threshold_confidence``
  (:func:`trainer.classification.calibrate`), in its post-processing and its
  training record (``calibration``).

Examples
--------
>>> from trainer.train import TrainConfig, train  # doctest: +SKIP
>>> result = train(TrainConfig(task="segmentation", out_dir="runs/seg", epochs=2, n_train=32))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge.errors import ConfigError, DataError
from edge.fileio import atomic_file
from edge.inference.manifest import InputSpec, Postprocessing, Preprocessing, sha256_file
from edge.tools.progress import Progress, bar
from trainer.classification import (
    DEFAULT_LOSS,
    DEFAULT_SAMPLER,
    FOCAL_GAMMA,
    LOSSES,
    SAMPLERS,
    calibrate,
    class_weights,
    classification_loss,
    epoch_order,
    predict_logits,
    validation_metrics,
)
from trainer.classification_data import (
    POSITIVE_FRACTION,
    POSITIVE_LABEL,
    ClassificationSet,
    classification_data_record,
    load_classification_folder,
    synthetic_classification_set,
)
from trainer.data import (
    US_PREPROCESSING,
    XRAY_PREPROCESSING,
    DetectionSet,
    SegmentationSet,
    default_cache_dir,
    folder_items,
    load_detection_folder,
    load_segmentation_folder,
    split_items,
    synthetic_detection_set,
    synthetic_segmentation_set,
)
from trainer.evaluate import (
    FP_BUDGET,
    HELDOUT_SEED,
    TRAIN_SEED,
    VALIDATION_SEED,
    evaluate_detection,
    evaluate_segmentation,
    torch_runner,
)
from trainer.models import CAM_STRIDE, TASK_NAMES, CenterNet, Classifier, build_model, transfer_encoder
from trainer.operating_point import DEFAULT_THRESHOLD_CONFIDENCE, check_confidence
from trainer.provenance import checkpoint_record, data_record

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "segmentation_loss",
    "detection_targets",
    "detection_loss",
    "augment_batch",
    "crop_batch",
    "default_labels",
    "default_preprocessing",
    "default_postprocessing",
    "calibrate_checkpoint",
]

_log = logging.getLogger(__name__)


def default_labels(task: str) -> list[str]:
    """Label names of the bundled model for ``task`` (a classifier's one label is its positive class)."""
    if task == "classification":
        return [POSITIVE_LABEL]
    return ["lesion"] if task == "segmentation" else ["nodule"]


def default_preprocessing(task: str) -> Preprocessing:
    """Preprocessing of the bundled model for ``task``."""
    return US_PREPROCESSING if task == "segmentation" else XRAY_PREPROCESSING


def default_postprocessing(task: str) -> Postprocessing:
    """Post-processing defaults (the detector's threshold is tuned on validation data; a classifier's
    temperature and threshold are fitted on it after training: ``temperature`` ``None`` = not yet)."""
    if task in ("segmentation", "classification"):
        return Postprocessing(threshold=0.5)
    return Postprocessing(threshold=0.3, nms_iou=0.3, max_detections=20, stride=4)


@dataclass
class TrainConfig:
    """Everything one training run needs; saved into every checkpoint.

    ``data`` is ``"synthetic"`` or a folder (``images/`` + ``masks/``, a
    COCO ``annotations.json``, or for classification class folders
    ``<label>/*`` or a ``path,label`` CSV file); ``val_data`` likewise (default: synthetic
    with :data:`~trainer.evaluate.VALIDATION_SEED`, or the training set for a
    folder). The held-out test set is recorded in the checkpoint, never
    trained on: the generator's held-out seed for synthetic data; for a
    folder, ``heldout_data`` (a separate folder) or ``heldout_fraction`` of
    ``data`` set aside by a split seeded with ``data_seed``
    (:func:`trainer.data.split_items`). ``medge export`` evaluates on it.

    Classification only: ``loss`` (:data:`~trainer.classification.LOSSES`,
    default ``ce``), ``sampler`` (``balanced``, the default, or ``random``),
    ``target_sensitivity`` (the operating threshold's target on the
    validation set), ``threshold_confidence`` (the confidence of that claim:
    the threshold is the highest whose one-sided Clopper-Pearson lower bound
    of the validation sensitivity reaches the target; 0 or ``None``: the
    highest whose validation sensitivity does), ``positive_fraction`` and ``synthetic_shape`` (source
    image size) of the synthetic set; ``labels`` is the one positive label
    (a user's class folder or CSV label).
    """

    task: str
    out_dir: Path | str
    data: str = "synthetic"
    val_data: str | None = None
    n_train: int = 1600
    n_val: int = 64
    data_seed: int = TRAIN_SEED
    val_seed: int = VALIDATION_SEED
    seed: int = 0
    epochs: int = 30
    steps_per_epoch: int | None = None
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 6
    min_delta: float = 1e-4
    augment: bool = True
    crop: int | None = None
    amp: str = "auto"
    base: int = 16
    input_size: tuple[int, int] = (256, 256)
    init: str | None = None
    freeze_encoder: bool = False
    max_minutes: float | None = None
    threads: int = 0
    cache_dir: str | None = None
    progress: bool = True
    labels: list[str] = field(default_factory=list)
    heldout_data: str | None = None
    heldout_fraction: float = 0.0
    loss: str | None = None
    sampler: str | None = None
    target_sensitivity: float = 0.90
    threshold_confidence: float | None = DEFAULT_THRESHOLD_CONFIDENCE
    positive_fraction: float = POSITIVE_FRACTION
    synthetic_shape: tuple[int, int] | None = None

    @property
    def loss_kind(self) -> str:
        """The classification loss in effect."""
        return self.loss or DEFAULT_LOSS

    @property
    def sampler_kind(self) -> str:
        """The classification sampler in effect."""
        return self.sampler or DEFAULT_SAMPLER

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that cannot work."""
        if self.task not in TASK_NAMES:
            raise ConfigError(f"task {self.task!r} is not one of {', '.join(TASK_NAMES)}.")
        self._validate_classification()
        for name in ("n_train", "n_val", "epochs", "batch_size", "base"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} is not >= 1.")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"amp {self.amp!r} is not one of auto, bf16, off.")
        if self.data == "synthetic" and HELDOUT_SEED in (self.data_seed, self.val_seed):
            raise ConfigError(f"Seed {HELDOUT_SEED} is the held-out test set's; it must never touch training.")
        if any(s % 8 for s in self.input_size):
            raise ConfigError(f"input_size {list(self.input_size)} is not divisible by 8.")
        if self.crop is not None and (self.crop % 16 or not 16 <= self.crop <= min(self.input_size)):
            raise ConfigError(f"crop {self.crop} is not a multiple of 16 within the input size.")
        if self.freeze_encoder and not self.init:
            raise ConfigError("freeze_encoder needs init (a checkpoint to take the encoder from).")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction {self.heldout_fraction} is not in [0, 1).")
        if self.heldout_fraction and self.data == "synthetic":
            raise ConfigError("heldout_fraction splits a data folder; synthetic data has its own held-out seed.")
        if self.heldout_fraction and self.heldout_data:
            raise ConfigError("Give heldout_data or heldout_fraction, not both.")
        if self.heldout_data:
            held = Path(self.heldout_data).resolve()
            for key in ("data", "val_data"):
                other = getattr(self, key)
                if other not in (None, "synthetic") and Path(other).resolve() == held:
                    raise ConfigError(f"heldout_data {self.heldout_data} is also {key}; held-out data must never touch training.")

    def _validate_classification(self) -> None:
        """The classification-only settings: valid for a classifier, absent for the other tasks."""
        if self.task != "classification":
            for name in ("loss", "sampler", "synthetic_shape"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} is a classification setting; task {self.task!r} has its own.")
            return
        if self.loss_kind not in LOSSES:
            raise ConfigError(f"loss {self.loss!r} is not one of {', '.join(LOSSES)}.")
        if self.sampler_kind not in SAMPLERS:
            raise ConfigError(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}.")
        if not 0.0 < self.target_sensitivity <= 1.0:
            raise ConfigError(f"target_sensitivity {self.target_sensitivity} is not in (0, 1].")
        check_confidence(self.threshold_confidence)  # ConfigError outside [0, 1)
        if not 0.0 < self.positive_fraction < 1.0:
            raise ConfigError(f"positive_fraction {self.positive_fraction} is not between 0 and 1.")
        if self.crop is not None:
            raise ConfigError("crop is for segmentation and detection; a crop could cut a classifier's finding away.")
        if any(s % CAM_STRIDE for s in self.input_size):
            raise ConfigError(f"input_size {list(self.input_size)} is not divisible by {CAM_STRIDE} (the classifier's stride).")
        if self.synthetic_shape is not None and min(self.synthetic_shape) < 64:
            raise ConfigError(f"synthetic_shape {list(self.synthetic_shape)} is smaller than 64 x 64.")
        if len(self.labels) > 1:
            raise ConfigError(f"labels {self.labels} name more than one class; a classifier has one positive label.")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict of the config."""
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["input_size"] = list(self.input_size)
        if self.synthetic_shape is not None:
            d["synthetic_shape"] = list(self.synthetic_shape)
        if self.task == "classification":  # what was in effect, not "default"
            d["loss"], d["sampler"] = self.loss_kind, self.sampler_kind
        return d


@dataclass
class TrainResult:
    """What a run produced: checkpoint paths, last epoch, best score, wall time."""

    best_checkpoint: Path
    last_checkpoint: Path
    epochs_run: int
    best_epoch: int
    best_score: float
    best_metrics: dict[str, Any]
    seconds: float
    stopped_early: bool
    calibration: dict[str, Any] | None = None


# ------------------------------------------------------------------ losses
def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with logits + soft Dice (per image, smoothed)."""
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dims = tuple(range(1, p.ndim))
    inter = (p * target).sum(dims)
    dice = 1 - (2 * inter + 1) / (p.sum(dims) + target.sum(dims) + 1)
    return bce + dice.mean()


def _gaussian_radius(h: torch.Tensor, w: torch.Tensor, min_overlap: float = 0.7) -> torch.Tensor:
    """CenterNet's Gaussian radius for a box of ``h`` x ``w`` output cells."""
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def detection_targets(
    boxes: torch.Tensor, classes: torch.Tensor, valid: torch.Tensor, num_classes: int, out_h: int, out_w: int, stride: int
) -> dict[str, torch.Tensor]:
    """CenterNet targets from padded boxes ``[B, M, 4]`` (input pixels), classes and validity ``[B, M]``.

    Returns ``heatmap`` ``[B, K, h, w]`` (Gaussian peaks of 1 at centre cells),
    ``size`` and ``offset`` ``[B, 2, h, w]`` and ``mask`` ``[B, 1, h, w]``
    (1 at centre cells).
    """
    bsz, m = boxes.shape[:2]
    hm = torch.zeros(bsz, num_classes, out_h, out_w)
    size = torch.zeros(bsz, 2, out_h * out_w)
    offset = torch.zeros(bsz, 2, out_h * out_w)
    mask = torch.zeros(bsz, 1, out_h * out_w)
    if m == 0:
        return {"heatmap": hm, "size": size.view(bsz, 2, out_h, out_w), "offset": offset.view(bsz, 2, out_h, out_w), "mask": mask.view(bsz, 1, out_h, out_w)}
    cx = (boxes[..., 0] + boxes[..., 2]) / (2 * stride)
    cy = (boxes[..., 1] + boxes[..., 3]) / (2 * stride)
    bw = (boxes[..., 2] - boxes[..., 0]).clamp(min=1)
    bh = (boxes[..., 3] - boxes[..., 1]).clamp(min=1)
    valid = valid & (cx >= 0) & (cx < out_w) & (cy >= 0) & (cy < out_h)
    ix, iy = cx.floor().clamp(0, out_w - 1), cy.floor().clamp(0, out_h - 1)
    radius = _gaussian_radius(bh / stride, bw / stride).clamp(min=0).floor()
    sigma = (2 * radius + 1) / 6
    yy = torch.arange(out_h, dtype=torch.float32).view(1, 1, out_h, 1)
    xx = torch.arange(out_w, dtype=torch.float32).view(1, 1, 1, out_w)
    g = torch.exp(
        -((xx - ix[..., None, None]) ** 2 + (yy - iy[..., None, None]) ** 2) / (2 * sigma[..., None, None] ** 2)
    )
    g = g * valid[..., None, None].float()  # [B, M, h, w]
    for k in range(num_classes):
        sel = (classes == k).float()[..., None, None]
        hm[:, k] = (g * sel).amax(dim=1) if m else hm[:, k]
    flat = (iy * out_w + ix).long().clamp(0, out_h * out_w - 1)
    for j in range(m):
        ok = valid[:, j]
        if not bool(ok.any()):
            continue
        b = torch.nonzero(ok).flatten()
        idx = flat[b, j]
        size[b, 0, idx] = bw[b, j]
        size[b, 1, idx] = bh[b, j]
        offset[b, 0, idx] = cx[b, j] - ix[b, j]
        offset[b, 1, idx] = cy[b, j] - iy[b, j]
        mask[b, 0, idx] = 1.0
    return {
        "heatmap": hm,
        "size": size.view(bsz, 2, out_h, out_w),
        "offset": offset.view(bsz, 2, out_h, out_w),
        "mask": mask.view(bsz, 1, out_h, out_w),
    }


def detection_loss(
    hm_logits: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, t: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """CenterNet loss: penalty-reduced focal loss + 0.1 * L1(size) + L1(offset)."""
    hm_logits = hm_logits.float()
    gt = t["heatmap"]
    pos = (gt >= 1.0 - 1e-4).float()
    logp, log1p = F.logsigmoid(hm_logits), F.logsigmoid(-hm_logits)
    p = torch.sigmoid(hm_logits)
    focal = -(pos * (1 - p) ** 2 * logp + (1 - pos) * (1 - gt) ** 4 * p**2 * log1p).sum()
    n_pos = pos.sum().clamp(min=1.0)
    mask = t["mask"]
    n_reg = mask.sum().clamp(min=1.0)
    l_size = (mask * (size.float() - t["size"]).abs()).sum() / n_reg
    l_off = (mask * (offset.float() - t["offset"]).abs()).sum() / n_reg
    return focal / n_pos + 0.1 * l_size + l_off


# ------------------------------------------------------------ augmentation
def augment_batch(
    x: torch.Tensor,
    gen: torch.Generator,
    task: str,
    mask: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Random flip/rotation/zoom/shift + intensity jitter + noise for a batch ``[B, C, H, W]``.

    ``mask`` ``[B, 1, H, W]`` follows the geometry with nearest sampling;
    ``boxes`` ``[B, M, 4]`` (input pixels) follow it by their centres (sizes scale with zoom).
    """
    bsz, _, h, w = x.shape

    def u(lo: float, hi: float, n: int = bsz) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    flip = torch.where(torch.rand(bsz, generator=gen) < 0.5, -1.0, 1.0)
    ang = u(-10, 10) * math.pi / 180
    zoom = u(0.9, 1.15)
    tx, ty = u(-0.06, 0.06), u(-0.06, 0.06)
    cos, sin = torch.cos(ang), torch.sin(ang)
    # theta maps output to input normalised coordinates: in = A @ out + t.
    a = torch.stack([torch.stack([cos * flip, -sin], 1), torch.stack([sin * flip, cos], 1)], 1) / zoom[:, None, None]
    theta = torch.cat([a, torch.stack([tx, ty], 1)[:, :, None]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if mask is not None:
        mask = F.grid_sample(mask.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if boxes is not None and boxes.shape[1]:
        cxn = (boxes[..., 0] + boxes[..., 2]) / w - 1
        cyn = (boxes[..., 1] + boxes[..., 3]) / h - 1
        p = torch.stack([cxn - tx[:, None], cyn - ty[:, None]], -1)  # [B, M, 2]
        out = torch.linalg.solve(a[:, None], p[..., None])[..., 0]
        ncx, ncy = (out[..., 0] + 1) * w / 2, (out[..., 1] + 1) * h / 2
        bw = (boxes[..., 2] - boxes[..., 0]) * zoom[:, None]
        bh = (boxes[..., 3] - boxes[..., 1]) * zoom[:, None]
        boxes = torch.stack([ncx - bw / 2, ncy - bh / 2, ncx + bw / 2, ncy + bh / 2], -1)
    # Intensity: gain, offset, gamma on the non-padding pixels.
    fg = (x > 0).float()
    gain = u(0.8, 1.25)[:, None, None, None]
    gamma = u(0.8, 1.25)[:, None, None, None]
    off = u(-0.05, 0.05)[:, None, None, None]
    x = x.clamp(min=0) ** gamma * gain + off * fg
    noise = torch.randn(x.shape, generator=gen)
    sigma = u(0.0, 0.12)[:, None, None, None]
    if task == "segmentation":  # speckle: multiplicative, pixel-correlated a little
        noise = F.avg_pool2d(noise, 3, stride=1, padding=1) * 3
        x = x * (1 + sigma * noise).clamp(min=0)
    else:  # quantum-like additive noise
        x = x + 0.3 * sigma * noise
    return x * fg, mask, boxes


def crop_batch(
    x: torch.Tensor,
    size: int,
    gen: torch.Generator,
    mask: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    p_object: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Random ``size`` x ``size`` crops; with probability ``p_object`` near a lesion pixel / box centre.

    Both models are fully convolutional, so training on crops costs a
    fraction of full frames while validation and service run on full
    frames. Boxes are shifted with their crop; a box whose centre leaves the
    crop is marked invalid.
    """
    bsz, _, h, w = x.shape
    xs, ms, tops, lefts = [], [], [], []
    for i in range(bsz):
        if mask is not None:
            cand = torch.nonzero(mask[i, 0] > 0).float()
        elif boxes is not None and valid is not None and bool(valid[i].any()):
            b = boxes[i][valid[i]]
            cand = torch.stack([(b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2], 1)
        else:
            cand = torch.zeros(0, 2)
        if len(cand) and float(torch.rand(1, generator=gen)) < p_object:
            cy, cx = (int(v) for v in cand[int(torch.randint(len(cand), (1,), generator=gen))].tolist())
            cy += int(torch.randint(-size // 4, size // 4 + 1, (1,), generator=gen))
            cx += int(torch.randint(-size // 4, size // 4 + 1, (1,), generator=gen))
        else:
            cy = int(torch.randint(h, (1,), generator=gen))
            cx = int(torch.randint(w, (1,), generator=gen))
        top = min(max(0, cy - size // 2), h - size)
        left = min(max(0, cx - size // 2), w - size)
        tops.append(top)
        lefts.append(left)
        xs.append(x[i, :, top : top + size, left : left + size])
        if mask is not None:
            ms.append(mask[i, :, top : top + size, left : left + size])
    if boxes is not None and valid is not None and boxes.shape[1]:
        shift = torch.tensor([[lf, tp, lf, tp] for tp, lf in zip(tops, lefts)], dtype=boxes.dtype)[:, None, :]
        boxes = boxes - shift
        cx = (boxes[..., 0] + boxes[..., 2]) / 2
        cy = (boxes[..., 1] + boxes[..., 3]) / 2
        valid = valid & (cx >= 0) & (cx < size) & (cy >= 0) & (cy < size)
    return torch.stack(xs), (torch.stack(ms) if mask is not None else None), boxes, valid


# ------------------------------------------------------------- checkpoints
def _init_record(path: Path | str) -> str:
    """The ``--init`` checkpoint as recorded: relative to the working folder when inside it, else absolute.

    ``init_sha256`` identifies the file; the path says where it was, and a
    build folder's absolute path (``/tmp/...``) would say nothing on another
    machine.

    >>> _init_record(Path.cwd() / "engines" / "xray-nodule-det" / "model.pt")
    'engines/xray-nodule-det/model.pt'
    """
    p = Path(os.path.abspath(path))
    try:
        return p.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return p.as_posix()


def save_checkpoint(path: Path, model: nn.Module, cfg: TrainConfig, labels: list[str], extra: Mapping[str, Any]) -> Path:
    """Write a checkpoint atomically: weights, model config, labels, pre/post-processing, config."""
    spec = InputSpec(size=tuple(cfg.input_size))
    pre = default_preprocessing(cfg.task)
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    obj = {
        "format": "medge-checkpoint-1",
        "task": cfg.task,
        "model": {"base": cfg.base, "num_classes": len(labels), "in_channels": spec.channels},
        "labels": list(labels),
        "input": {"name": spec.name, "channels": spec.channels, "size": list(spec.size)},
        "preprocessing": dataclasses.asdict(pre),
        "postprocessing": dataclasses.asdict(default_postprocessing(cfg.task)),
        "state_dict": state,
        "config": cfg.to_json(),
        **dict(extra),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fh:
        torch.save(obj, fh)
    return path


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"Checkpoint {p} does not exist.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise DataError(f"Checkpoint {p} cannot be read: {exc}.") from exc
    if not isinstance(obj, dict) or obj.get("format") != "medge-checkpoint-1":
        raise DataError(f"{p} is not a medge checkpoint.")
    return obj


def model_from_checkpoint(ckpt: Mapping[str, Any]) -> nn.Module:
    """The model of a loaded checkpoint, weights loaded, in eval mode."""
    m = ckpt["model"]
    model = build_model(ckpt["task"], num_classes=m["num_classes"], in_channels=m["in_channels"], base=m["base"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _set_logits(model: nn.Module, on: bool) -> None:
    inner = _unwrap(model)
    if isinstance(inner, CenterNet):
        inner.emit_logits = on


# ------------------------------------------------------------------ data
def _heldout_split(cfg: TrainConfig) -> tuple[list[str] | None, dict[str, Any] | None]:
    """``(training items, split record)`` when ``heldout_fraction`` sets part of the folder aside."""
    if not cfg.heldout_fraction or cfg.data == "synthetic":
        return None, None
    keep, held = split_items(folder_items(cfg.data, cfg.task), cfg.heldout_fraction, cfg.data_seed)
    _log.info("Held out %d of %d items of %s (fraction %g, seed %d).", len(held), len(held) + len(keep),
              cfg.data, cfg.heldout_fraction, cfg.data_seed)
    return keep, {"fraction": cfg.heldout_fraction, "seed": cfg.data_seed, "n": len(held), "items": held}


def _classification_sets(cfg: TrainConfig, labels: list[str], items: list[str] | None,
                         cache: str) -> tuple[ClassificationSet, ClassificationSet]:
    """Training and validation sets of a classifier; the validation set must hold both classes."""
    spec = InputSpec(size=tuple(cfg.input_size))
    pre = default_preprocessing(cfg.task)
    positive = labels[0]
    if cfg.data == "synthetic":
        kw = {"positive_fraction": cfg.positive_fraction, "cache_dir": cache}
        if cfg.synthetic_shape is not None:
            kw["shape"] = tuple(cfg.synthetic_shape)
        tr = synthetic_classification_set(cfg.n_train, cfg.data_seed, spec, pre, keep_source=False, **kw)
        va = synthetic_classification_set(cfg.n_val, cfg.val_seed, spec, pre, keep_source=False, **kw)
    else:
        tr = load_classification_folder(cfg.data, spec, pre, positive_label=positive, items=items)
        if cfg.val_data not in (None, "synthetic"):
            va = load_classification_folder(cfg.val_data, spec, pre, positive_label=positive)
        else:
            va = tr
            _log.warning("No validation data given; validating (and calibrating) on the training set.")
    for name, ds in (("training", tr), ("validation", va)):
        if ds.n_positive in (0, len(ds)):
            raise DataError(
                f"The {name} set holds {ds.n_positive} positive case(s) of {len(ds)}; a classifier needs both classes."
            )
    return tr, va


def _load_sets(cfg: TrainConfig, labels: list[str], items: list[str] | None = None) -> tuple[Any, Any, list[str]]:
    spec = InputSpec(size=tuple(cfg.input_size))
    pre = default_preprocessing(cfg.task)
    cache = cfg.cache_dir if cfg.cache_dir is not None else str(default_cache_dir() / "data")
    if cfg.task == "classification":
        return (*_classification_sets(cfg, labels, items, cache), labels)
    if cfg.data == "synthetic":
        if cfg.task == "segmentation":
            tr = synthetic_segmentation_set(cfg.n_train, cfg.data_seed, spec, pre, keep_source=False, cache_dir=cache)
        else:
            tr = synthetic_detection_set(cfg.n_train, cfg.data_seed, spec, pre, keep_source=False, cache_dir=cache)
    elif cfg.task == "segmentation":
        tr = load_segmentation_folder(cfg.data, spec, pre, items=items)
    else:
        tr, labels = load_detection_folder(cfg.data, spec, pre, labels=labels or None, items=items)
    if cfg.val_data in (None, "synthetic") and cfg.data == "synthetic":
        if cfg.task == "segmentation":
            va = synthetic_segmentation_set(cfg.n_val, cfg.val_seed, spec, pre, cache_dir=cache)
        else:
            va = synthetic_detection_set(cfg.n_val, cfg.val_seed, spec, pre, cache_dir=cache)
    elif cfg.val_data not in (None, "synthetic"):
        if cfg.task == "segmentation":
            va = load_segmentation_folder(cfg.val_data, spec, pre)
        else:
            va, _ = load_detection_folder(cfg.val_data, spec, pre, labels=labels)
    else:
        va = tr  # a user's folder without a validation folder: validate on training data (logged)
        _log.warning("No validation data given; validating on the training set (early stopping is optimistic).")
    return tr, va, labels or default_labels(cfg.task)


def _batch(ds: Any, idx: np.ndarray, task: str) -> dict[str, torch.Tensor]:
    x = torch.from_numpy(ds.inputs[idx])
    if task == "segmentation":
        return {"x": x, "mask": torch.from_numpy(ds.targets[idx])}
    if task == "classification":
        return {"x": x, "y": torch.from_numpy(ds.labels[idx])}
    m = max([len(ds.input_boxes[i]) for i in idx] + [0])
    boxes = torch.zeros(len(idx), m, 4)
    cls = torch.zeros(len(idx), m, dtype=torch.long)
    valid = torch.zeros(len(idx), m, dtype=torch.bool)
    for j, i in enumerate(idx):
        n = len(ds.input_boxes[i])
        if n:
            boxes[j, :n] = torch.from_numpy(ds.input_boxes[i])
            cls[j, :n] = torch.from_numpy(ds.classes[i])
            valid[j, :n] = True
    return {"x": x, "boxes": boxes, "classes": cls, "valid": valid}


# ------------------------------------------------------------------ loop
def _use_bf16(amp: str) -> bool:
    if amp == "off":
        return False
    if amp == "bf16":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _Progress:
    """A one-line progress bar on a stream (stderr); silent when disabled."""

    def __init__(self, total: int, label: str, stream: TextIO | None, width: int = 28) -> None:
        self.total, self.label, self.width = max(1, total), label, width
        self.t0 = time.monotonic()
        self._line = Progress(stream, enabled=stream is not None, interval_s=0.5)

    def update(self, done: int, info: str = "") -> None:
        if not self._line.enabled:
            return
        frac = min(1.0, done / self.total)
        el = time.monotonic() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        line = f"{self.label} [{bar(frac, self.width, empty='-')}] {done}/{self.total} {el:5.0f}s eta {eta:4.0f}s {info}"
        self._line.show(line, final=done >= self.total)
        if done >= self.total:
            self._line.close()


def _score(task: str, metrics: Mapping[str, Any]) -> float:
    if task == "segmentation":
        return float(metrics["dice"])
    if task == "classification":
        return float(metrics["roc_auc"])
    return 0.5 * (float(metrics[f"sensitivity_at_{FP_BUDGET:g}fp"]) + float(metrics["map50"]))


def _validate(model: nn.Module, ds: Any, task: str, labels: list[str]) -> dict[str, Any]:
    run = torch_runner(_unwrap(model), task)
    if task == "classification":
        return validation_metrics(predict_logits(run, ds.inputs), ds.labels)
    if task == "segmentation":
        m = evaluate_segmentation(run, ds, threshold=0.5)
    else:
        m = evaluate_detection(run, ds, default_postprocessing(task), labels)
    m = {k: v for k, v in m.items() if k not in ("per_case", "froc")}
    return m


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _setup_device(cfg: TrainConfig, world: int, local: int) -> torch.device:
    """Pick the device, join the process group under ``torchrun`` and set the thread count."""
    distributed = world > 1
    device = torch.device("cpu")
    if distributed:
        import torch.distributed as dist

        if torch.cuda.is_available():
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif distributed and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return device


def _init_checkpoint(cfg: TrainConfig, labels: list[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """The ``init`` checkpoint (or ``None``) and the labels it implies; sets ``cfg.base`` from it."""
    init_ckpt = load_checkpoint(cfg.init) if cfg.init else None
    if init_ckpt is not None:
        # A classifier may take its encoder from a detector or a segmenter (same encoder layout).
        encoder_only = cfg.task == "classification" and init_ckpt["task"] in ("segmentation", "detection")
        if init_ckpt["task"] != cfg.task and not encoder_only:
            raise ConfigError(f"Checkpoint {cfg.init} is a {init_ckpt['task']} model, not {cfg.task}.")
        cfg.base = int(init_ckpt["model"]["base"])
        if not cfg.labels and not encoder_only:
            labels = list(init_ckpt["labels"])
    return init_ckpt, labels


def _frozen_modules(model: nn.Module) -> list[nn.Module]:
    """What ``freeze_encoder`` keeps fixed: the encoder; a classifier's stages less their own shortcuts."""
    if isinstance(model, Classifier):
        return [block for stage in model.encoder for block in (stage[0], stage[1])]
    return [model.encoder]


def _build(cfg: TrainConfig, n_labels: int, init_ckpt: Mapping[str, Any] | None, device: torch.device,
           distributed: bool, local: int) -> tuple[nn.Module, int]:
    """The model on ``device`` and how many tensors came from ``init``: initial weights, frozen
    encoder, channels-last on CPU, DDP when distributed."""
    model = build_model(cfg.task, num_classes=n_labels, base=cfg.base)
    n_taken = 0
    if init_ckpt is not None and init_ckpt["task"] != cfg.task:
        n_taken = len(transfer_encoder(model, init_ckpt["state_dict"]))
        _log.info("Initialised %d/%d tensors (encoder) from the %s checkpoint %s", n_taken,
                  len(model.state_dict()), init_ckpt["task"], cfg.init)
    elif init_ckpt is not None:
        own = model.state_dict()
        compatible = {k: v for k, v in init_ckpt["state_dict"].items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(compatible, strict=False)
        n_taken = len(compatible)
        _log.info("Initialised %d/%d tensors from %s", len(compatible), len(own), cfg.init)
    if cfg.freeze_encoder:
        for frozen in _frozen_modules(model):
            for p in frozen.parameters():
                p.requires_grad_(False)
            for mod in frozen.modules():  # keep BN statistics of the pretrained encoder
                if isinstance(mod, nn.BatchNorm2d):
                    mod.momentum = 0.0
    model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local] if device.type == "cuda" else None)
    return model, n_taken


def _training_record(cfg: TrainConfig, n_train: int, n_val: int, split: dict[str, Any] | None, world: int,
                     bf16: bool, init_ckpt: Mapping[str, Any] | None, n_init: int = 0,
                     train_labels: np.ndarray | None = None) -> dict[str, Any]:
    """The provenance written into every checkpoint's ``training`` record."""
    if cfg.task == "classification":
        data = classification_data_record(cfg.data, cfg.val_data, n_train, n_val, cfg.data_seed, cfg.val_seed,
                                          heldout_data=cfg.heldout_data, split=split,
                                          positive_fraction=cfg.positive_fraction, shape=cfg.synthetic_shape)
    else:
        data = data_record(cfg.task, cfg.data, cfg.val_data, n_train, n_val, cfg.data_seed, cfg.val_seed,
                           heldout_data=cfg.heldout_data, split=split)
    record = {
        **data,
        "seed": cfg.seed,
        "world_size": world,
        "bf16": bf16,
        "init": _init_record(cfg.init) if cfg.init else None,
        "freeze_encoder": cfg.freeze_encoder,
    }
    if init_ckpt is not None:
        # Fine-tuning: what the starting weights were trained on is part of this model's provenance.
        base_rec = checkpoint_record(init_ckpt)
        record["init_sha256"] = sha256_file(cfg.init)
        record["init_data"] = {k: base_rec[k] for k in ("source", "data", "generator", "n_train") if k in base_rec}
        record["init_task"] = init_ckpt["task"]
        record["init_tensors"] = n_init
    if cfg.task == "classification" and train_labels is not None:
        record.update(_classification_record(cfg, train_labels))
    return record


def _classification_record(cfg: TrainConfig, train_labels: np.ndarray) -> dict[str, Any]:
    """Loss, sampler and the class balance they answer, for the training record."""
    n_pos = int(np.count_nonzero(train_labels))
    rec: dict[str, Any] = {
        "loss": cfg.loss_kind,
        "sampler": cfg.sampler_kind,
        "class_counts": {"negative": int(train_labels.size - n_pos), "positive": n_pos},
        "target_sensitivity": cfg.target_sensitivity,
        "threshold_confidence": check_confidence(cfg.threshold_confidence),
    }
    if cfg.loss_kind == "weighted":
        rec["class_weights"] = [round(float(w), 6) for w in class_weights(train_labels)]
    if cfg.loss_kind == "focal":
        rec["focal_gamma"] = FOCAL_GAMMA
    return rec


@dataclass
class _Loop:
    """What every training step needs (built once by :func:`train`)."""

    cfg: TrainConfig
    device: torch.device
    world: int
    rank: int
    model: nn.Module
    params: list[torch.Tensor]
    opt: torch.optim.Optimizer
    sched: Any
    bf16: bool
    gen: torch.Generator
    steps: int
    per_rank_batch: int
    n_labels: int
    stream: TextIO | None
    cls_weights: torch.Tensor | None = None


def _make_loop(cfg: TrainConfig, device: torch.device, world: int, rank: int, model: nn.Module, n_train: int,
               n_labels: int, stream: TextIO | None, train_labels: np.ndarray | None = None) -> _Loop:
    """Optimiser, one-cycle schedule, steps per epoch, bf16, the augmentation generator and class weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank_batch = max(1, cfg.batch_size // world)
    steps = cfg.steps_per_epoch or max(1, n_train // (per_rank_batch * world))
    total = steps * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    bf16 = _use_bf16(cfg.amp) and device.type == "cpu"
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    weights = None
    if cfg.task == "classification" and train_labels is not None:
        weights = torch.tensor(class_weights(train_labels), dtype=torch.float32, device=device)
    return _Loop(cfg, device, world, rank, model, params, opt, sched, bf16, gen, steps, per_rank_batch,
                 n_labels, stream, weights)


def _write_epoch(loop: _Loop, labels: list[str], record: Mapping[str, Any], entry: Mapping[str, Any],
                 metrics: Mapping[str, Any], improved: bool, log_path: Path, best_path: Path,
                 last_path: Path) -> None:
    """Rank 0 after each epoch: ``last.pt``, ``best.pt`` when improved, one ``metrics.jsonl`` line."""
    epoch, model, cfg = entry["epoch"], loop.model, loop.cfg
    extra = {"epoch": epoch, "metrics": metrics, "training": {**record, "epochs": epoch}}
    save_checkpoint(last_path, model, cfg, labels, extra)
    if improved:
        save_checkpoint(best_path, model, cfg, labels, {**extra, "training": {**record, "epochs": epoch, "best_epoch": epoch}})
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    _log.info("epoch %d: %s", epoch, json.dumps(entry))


def _step_loss(loop: _Loop, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Augment, crop, forward one batch and return its loss."""
    cfg, device, gen, bf16 = loop.cfg, loop.device, loop.gen, loop.bf16
    x = b["x"]
    if cfg.task == "classification":
        return _classification_step(loop, x, b["y"])
    if cfg.task == "segmentation":
        mask = b["mask"]
        if cfg.augment:
            x, mask, _ = augment_batch(x, gen, cfg.task, mask=mask)
        if cfg.crop:
            x, mask, _, _ = crop_batch(x, cfg.crop, gen, mask=mask)
        x, mask = x.to(device), mask.to(device)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = loop.model(x)
        return segmentation_loss(logits.float(), mask)
    boxes, valid = b["boxes"], b["valid"]
    if cfg.augment:
        x, _, boxes = augment_batch(x, gen, cfg.task, boxes=boxes)
    if cfg.crop:
        x, _, boxes, valid = crop_batch(x, cfg.crop, gen, boxes=boxes, valid=valid)
    h, w = x.shape[-2:]
    t = detection_targets(boxes, b["classes"], valid, loop.n_labels, h // 4, w // 4, 4)
    t = {k: v.to(device) for k, v in t.items()}
    x = x.to(device)
    if device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hm, size, offset = loop.model(x)  # emit_logits is set: heatmap logits
    return detection_loss(hm, size, offset, t)


def _classification_step(loop: _Loop, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Augment (whole frames: a crop could cut the finding away), forward, the chosen loss."""
    if loop.cfg.augment:
        x, _, _ = augment_batch(x, loop.gen, loop.cfg.task)
    x, y = x.to(loop.device), y.to(loop.device)
    if loop.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=loop.bf16):
        logits = loop.model(x)
    return classification_loss(logits, y, loop.cfg.loss_kind, loop.cls_weights)


def _epoch_indices(cfg: TrainConfig, tr: Any, epoch: int, need: int) -> np.ndarray:
    """All ranks' sample indices for one epoch (each rank then takes every ``world``-th)."""
    if cfg.task == "classification":
        return epoch_order(tr.labels, need, cfg.sampler_kind, cfg.seed, epoch)
    return np.resize(np.random.default_rng([cfg.seed, epoch]).permutation(len(tr)), need)


def _check_finite_loss(loss: torch.Tensor, epoch: int, step: int) -> None:
    """Stop training (before the optimizer step) when a batch's loss is NaN or infinite.

    A non-finite loss poisons the weights at the next step; going on would
    save a NaN model as "best" and export it.

    Raises
    ------
    DataError
        If ``loss`` is not finite.
    """
    if not bool(torch.isfinite(loss.detach()).all()):
        raise DataError(
            f"The training loss is not finite (NaN or infinity) at epoch {epoch}, step {step}; "
            "training stopped without saving it. Check the data for non-finite values "
            "(boxes, pixels) or lower the learning rate (--lr)."
        )


def _train_epoch(loop: _Loop, tr: Any, epoch: int) -> float:
    """One epoch over this rank's shard of the epoch's permutation; the mean loss over every rank."""
    cfg, model, steps, per_rank_batch = loop.cfg, loop.model, loop.steps, loop.per_rank_batch
    world, rank = loop.world, loop.rank
    model.train()
    _set_logits(model, True)
    if cfg.freeze_encoder:
        for frozen in _frozen_modules(_unwrap(model)):
            frozen.eval()
    need = steps * per_rank_batch * world
    perm = _epoch_indices(cfg, tr, epoch, need)[rank::world]
    bar = _Progress(steps, f"epoch {epoch}/{cfg.epochs}", loop.stream)
    loss_sum = 0.0
    for s in range(steps):
        idx = perm[s * per_rank_batch : (s + 1) * per_rank_batch]
        loss = _step_loss(loop, _batch(tr, idx, cfg.task))
        _check_finite_loss(loss, epoch, s + 1)
        loop.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(loop.params, 5.0)
        loop.opt.step()
        loop.sched.step()
        loss_sum += float(loss.detach())
        bar.update(s + 1, f"loss {loss_sum / (s + 1):.4f}")
    train_loss = loss_sum / steps
    if world > 1:
        import torch.distributed as dist

        tl = torch.tensor([train_loss], device=loop.device)
        dist.all_reduce(tl)
        train_loss = float(tl) / world
    return train_loss


def train(cfg: TrainConfig, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Run one training; returns where the best and last checkpoints are.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this joins the process group and
    trains data-parallel; every rank returns the same result.
    """
    cfg.validate()
    world, rank, local = _dist_info()
    distributed = world > 1
    device = _setup_device(cfg, world, local)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()

    init_ckpt, labels = _init_checkpoint(cfg, list(cfg.labels) or default_labels(cfg.task))
    train_items, split = _heldout_split(cfg)
    tr, va, labels = _load_sets(cfg, labels, train_items)
    if len(tr) == 0:
        raise DataError("The training set is empty.")

    model, n_init = _build(cfg, len(labels), init_ckpt, device, distributed, local)
    stream = sys.stderr if (cfg.progress and is_main) else None
    train_labels = tr.labels if cfg.task == "classification" else None
    loop = _make_loop(cfg, device, world, rank, model, len(tr), len(labels), stream, train_labels)
    log_path = out / "metrics.jsonl"
    if is_main and log_path.exists() and init_ckpt is None:
        log_path.unlink()

    best_score, best_epoch, best_metrics, bad_epochs = -math.inf, 0, {}, 0
    stopped_early = False
    best_path, last_path = out / "best.pt", out / "last.pt"
    epoch = 0
    record = _training_record(cfg, len(tr), len(va), split, world, loop.bf16, init_ckpt, n_init, train_labels)
    for epoch in range(1, cfg.epochs + 1):
        t_ep = time.monotonic()
        train_loss = _train_epoch(loop, tr, epoch)
        _set_logits(model, False)
        metrics = _validate(model, va, cfg.task, labels)
        score = _score(cfg.task, metrics)
        entry = _epoch_entry(loop, epoch, train_loss, time.monotonic() - t_ep, score, metrics)
        improved = score > best_score + cfg.min_delta
        if improved:
            best_score, best_epoch, best_metrics, bad_epochs = score, epoch, metrics, 0
        else:
            bad_epochs += 1
        if is_main:
            _write_epoch(loop, labels, record, entry, metrics, improved, log_path, best_path, last_path)
            if stream is not None:
                stream.write(f"  val score {score:.4f} (best {best_score:.4f} @ {best_epoch})\n")
        if on_epoch is not None:
            on_epoch(entry)
        if bad_epochs >= cfg.patience:
            stopped_early = True
            _log.info("Early stop at epoch %d (no improvement for %d epochs).", epoch, cfg.patience)
            break
        if cfg.max_minutes is not None and (time.monotonic() - t_start) / 60 >= cfg.max_minutes:
            _log.info("Stopping at epoch %d: time budget of %.1f min used.", epoch, cfg.max_minutes)
            break
    calibration = _finish(cfg, va, best_path, last_path, is_main, distributed)
    return TrainResult(
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        epochs_run=epoch,
        best_epoch=best_epoch,
        best_score=best_score,
        best_metrics=best_metrics,
        seconds=time.monotonic() - t_start,
        stopped_early=stopped_early,
        calibration=calibration,
    )


def _epoch_entry(loop: _Loop, epoch: int, train_loss: float, seconds: float, score: float,
                 metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One ``metrics.jsonl`` line."""
    return {
        "epoch": epoch,
        "train_loss": round(train_loss, 6),
        "lr": loop.sched.get_last_lr()[0],
        "seconds": round(seconds, 2),
        "score": round(score, 6),
        **{f"val_{k}": (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
    }


def _finish(cfg: TrainConfig, va: Any, best_path: Path, last_path: Path, is_main: bool,
            distributed: bool) -> dict[str, Any] | None:
    """After the last epoch: wait for every rank; a classifier's checkpoints get their calibration.

    Returns the best checkpoint's calibration (``None`` for the other tasks).
    """
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has written both checkpoints
    if cfg.task != "classification":
        return None
    # Every rank computes the same; rank 0 writes.
    confidence = check_confidence(cfg.threshold_confidence)
    calibration = calibrate_checkpoint(best_path, va, cfg.target_sensitivity, write=is_main, confidence=confidence)
    calibrate_checkpoint(last_path, va, cfg.target_sensitivity, write=is_main, confidence=confidence)
    if distributed:
        dist.barrier()
    return calibration


def calibrate_checkpoint(path: Path, va: ClassificationSet, target_sensitivity: float, write: bool = True,
                         confidence: float | None = DEFAULT_THRESHOLD_CONFIDENCE) -> dict[str, Any]:
    """Fit a classifier checkpoint's temperature and threshold on ``va`` and record them in it.

    The checkpoint's ``postprocessing`` gets ``threshold``, ``temperature``,
    ``target_sensitivity`` and ``target_confidence`` (``None``: the point
    rule); its training record gets ``calibration``
    (:func:`trainer.classification.calibrate`, at ``confidence``). ``write``
    false only computes (the other ranks under ``torchrun``).
    """
    ckpt = load_checkpoint(path)
    logits = predict_logits(torch_runner(model_from_checkpoint(ckpt), "classification"), va.inputs)
    cal = calibrate(logits, va.labels, target_sensitivity, confidence)
    if write:
        ckpt["postprocessing"] = {
            **dict(ckpt["postprocessing"]),
            "threshold": cal["threshold"],
            "temperature": cal["temperature"],
            "target_sensitivity": cal["target_sensitivity"],
            "target_confidence": cal["target_confidence"],
        }
        ckpt["training"] = {**dict(ckpt.get("training") or {}), "calibration": cal}
        with atomic_file(path) as fh:
            torch.save(ckpt, fh)
    return cal
