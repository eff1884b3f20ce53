"""``medge train``: train a segmentation, detection or classification model.

Examples
--------
``medge train --task segmentation --out runs/us`` trains the default
ultrasound lesion U-Net on synthetic data; ``--data DIR`` trains on your own
``DIR/images`` + ``DIR/masks`` (or ``DIR/annotations.json`` for detection);
``--init engines/us-lesion-seg/model.pt --freeze-encoder`` fine-tunes the
bundled model. ``medge train --task classification --out runs/cls --init
engines/xray-nodule-det/model.pt`` trains the nodule present / absent
classifier from the bundled detector's encoder (``--loss``, ``--sampler``
answer the class imbalance; the run ends by fitting the temperature and the
threshold for ``--target-sensitivity`` on the validation set: the highest
threshold whose one-sided 95 % lower confidence bound of the validation
sensitivity reaches the target, ``--threshold-confidence`` to change the
confidence, 0 for the point rule); your own
classification data is ``DIR/<label>/<image>`` or a ``path,label`` CSV
file, with ``--positive-label``. With your own data, set a held-out test set aside now
(``--heldout-data DIR`` or ``--heldout-fraction 0.2``): the checkpoint
records it and ``medge export`` / ``medge quantize`` evaluate on it. Under ``torchrun --nproc_per_node N`` the same command trains
data-parallel.
"""

from __future__ import annotations

import argparse
import json
import sys

from trainer.classification import LOSSES, SAMPLERS
from trainer.classification_data import POSITIVE_FRACTION, POSITIVE_LABEL
from trainer.operating_point import DEFAULT_THRESHOLD_CONFIDENCE
from trainer.train import TrainConfig, train

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add ``medge train`` options to ``p``."""
    p.add_argument("--task", required=True, choices=["segmentation", "detection", "classification"])
    p.add_argument("--out", required=True, help="run folder: best.pt, last.pt, metrics.jsonl")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (default) or a folder with images/ + masks/ or annotations.json; "
                        "classification: a folder of class folders (DIR/<label>/<image>) or a path,label CSV file")
    p.add_argument("--val-data", default=None, help="validation folder (default: synthetic validation seed)")
    p.add_argument("--heldout-data", default=None, metavar="DIR",
                   help="with --data DIR: a separate held-out test folder, recorded in the checkpoint, never trained on")
    p.add_argument("--heldout-fraction", type=float, default=0.0, metavar="F",
                   help="with --data DIR: hold out this fraction of DIR (split seeded by --data-seed), recorded in the checkpoint")
    p.add_argument("--n-train", type=int, default=1600, help="synthetic training samples")
    p.add_argument("--n-val", type=int, default=64, help="synthetic validation samples")
    p.add_argument("--data-seed", type=int, default=1, help="synthetic training data seed; with --heldout-fraction, the split's seed")
    p.add_argument("--seed", type=int, default=0, help="model init / order / augmentation seed")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (split over torchrun ranks)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--patience", type=int, default=6, help="early stopping: epochs without improvement")
    p.add_argument("--base", type=int, default=16, help="channels at full resolution")
    p.add_argument("--input-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"), help="model input size")
    p.add_argument("--crop", type=int, default=None, help="train on random crops of this size (segmentation)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"], help="bfloat16 autocast on CPU")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="fine-tune from this checkpoint (classification: or take a detector's or segmenter's encoder)")
    p.add_argument("--freeze-encoder", action="store_true", help="with --init: keep the encoder fixed")
    cls = p.add_argument_group("classification")
    cls.add_argument("--loss", default=None, choices=list(LOSSES),
                     help="ce (default), weighted (class-weighted from the training set's frequencies) or focal (gamma 2)")
    cls.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                     help="balanced (default: each class half of every epoch's draws, seeded) or random")
    cls.add_argument("--target-sensitivity", type=float, default=0.90,
                     help="the operating threshold is chosen on the validation set for this sensitivity (0.90)")
    cls.add_argument("--threshold-confidence", type=float, default=DEFAULT_THRESHOLD_CONFIDENCE, metavar="C",
                     help="the threshold is the highest whose one-sided Clopper-Pearson lower bound of the validation "
                          f"sensitivity, at confidence C, reaches the target (default {DEFAULT_THRESHOLD_CONFIDENCE}); "
                          "0: the highest whose validation sensitivity does (the point rule)")
    cls.add_argument("--positive-fraction", type=float, default=POSITIVE_FRACTION,
                     help="synthetic data: the share of images with nodules")
    cls.add_argument("--positive-label", default=None, metavar="NAME",
                     help=f"the positive class: the model's label and, with --data, its class folder or CSV label "
                          f"(default {POSITIVE_LABEL!r})")
    cls.add_argument("--synthetic-shape", type=int, nargs=2, default=None, metavar=("H", "W"),
                     help="synthetic data: source image size (default 512 512)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after the epoch that crosses this budget")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Train; prints where the checkpoints are."""
    cfg = TrainConfig(
        task=args.task, out_dir=args.out, data=args.data, val_data=args.val_data, n_train=args.n_train,
        n_val=args.n_val, data_seed=args.data_seed, seed=args.seed, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
        base=args.base, input_size=tuple(args.input_size), crop=args.crop, augment=not args.no_augment, amp=args.amp, init=args.init,
        freeze_encoder=args.freeze_encoder, max_minutes=args.max_minutes, threads=args.threads,
        progress=not args.no_progress, heldout_data=args.heldout_data, heldout_fraction=args.heldout_fraction,
        loss=args.loss, sampler=args.sampler, target_sensitivity=args.target_sensitivity,
        threshold_confidence=args.threshold_confidence,
        positive_fraction=args.positive_fraction, labels=[args.positive_label] if args.positive_label else [],
        synthetic_shape=tuple(args.synthetic_shape) if args.synthetic_shape else None,
    )
    r = train(cfg)
    out = {
        "best_checkpoint": str(r.best_checkpoint), "last_checkpoint": str(r.last_checkpoint),
        "epochs_run": r.epochs_run, "best_epoch": r.best_epoch, "best_score": r.best_score,
        "best_metrics": r.best_metrics, "seconds": round(r.seconds, 1), "stopped_early": r.stopped_early,
    }
    if r.calibration is not None:
        out["calibration"] = r.calibration
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print(f"best: {r.best_checkpoint} (epoch {r.best_epoch}, score {r.best_score:.4f}); "
                  f"{r.epochs_run} epochs in {r.seconds:.0f} s", file=sys.stdout)
    return 0
