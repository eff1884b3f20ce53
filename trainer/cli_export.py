"""``medge export``: checkpoint -> ONNX (FP32 + FP16) + manifest.json with held-out metrics.

The ONNX output is checked against PyTorch (default tolerance 1e-3 absolute)
and the export is refused beyond it. Metrics come from the held-out set
recorded in the checkpoint (synthetic: the generator's held-out seed; your
data: the folder or split set aside by ``medge train --heldout-data`` /
``--heldout-fraction``) or from ``--heldout-data``; a model trained on your
data with neither is refused (or exported with ``--no-eval``).

A classifier exports ``logits`` and its class activation map ``cam`` from one
graph; the temperature and the threshold that ``medge train`` fitted on the
validation set go into the manifest's post-processing, the held-out metrics
with their bootstrap 95 % intervals into ``metrics`` and the full FP32
report into ``training.classification_report``.
"""

from __future__ import annotations

import argparse
import json

from trainer.export import PARITY_ATOL, export_checkpoint

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add ``medge export`` options to ``p``."""
    p.add_argument("checkpoint", help="a checkpoint from medge train (best.pt)")
    p.add_argument("--out", required=True, help="engine folder to write (model.onnx, manifest.json, ...)")
    p.add_argument("--name", required=True, help="model name, e.g. us-lesion-seg")
    p.add_argument("--version", default="1")
    p.add_argument("--no-fp16", action="store_true", help="skip the FP16 ONNX")
    p.add_argument("--no-eval", action="store_true", help="skip held-out evaluation (manifest without metrics)")
    p.add_argument("--heldout-n", type=int, default=None,
                   help="synthetic held-out samples (default: the recorded number, else 200); ignored for folders")
    p.add_argument("--heldout-data", default=None, metavar="DIR",
                   help="held-out folder (images the model never saw); required for a model trained on your "
                        "data unless its checkpoint records one")
    p.add_argument("--intended-use", default=None, metavar="TEXT",
                   help="the manifest's intended_use (default: the bundled recipe's text for synthetic data; "
                        "a FILL IN marker for your data)")
    p.add_argument("--atol", type=float, default=PARITY_ATOL, help="ORT vs PyTorch tolerance")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Export and print the manifest's metrics."""
    man = export_checkpoint(
        args.checkpoint, args.out, args.name, version=args.version, fp16=not args.no_fp16,
        evaluate=not args.no_eval, heldout_n=args.heldout_n, heldout_data=args.heldout_data, atol=args.atol,
        intended_use=args.intended_use,
    )
    if args.json:
        print(json.dumps(man.to_dict(), indent=2))
    else:
        print(f"wrote {man.directory}: {', '.join(sorted(man.artifacts))}")
        for prec, m in man.metrics.items():
            print(f"  {prec}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()))
    return 0
