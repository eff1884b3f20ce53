"""``medge quantize``: INT8 Q/DQ ONNX behind an accuracy gate.

Calibrates on training data (never the held-out set), evaluates INT8 vs FP32
on the held-out set and refuses (exit status 3, nothing written) when Dice
drops by more than ``--max-dice-drop`` (segmentation, default 0.01), mAP@0.5
by more than ``--max-map-drop`` (detection, default 0.02), or, for a
classifier, ROC AUC by more than ``--max-auc-drop`` (0.01) or the sensitivity
at the manifest's threshold by more than ``--max-sensitivity-drop`` (0.02). The CPU artifact
(uint8 activations, 7-bit weights unless ``--no-reduce-range``) is scored on
the daemon's own session and on the Q/DQ reference arithmetic; both must pass
and agree within the same threshold. The held-out set
is the one the manifest records (as ``medge export`` evaluated it) or
``--heldout-data``; a model trained on your data with neither is refused.
"""

from __future__ import annotations

import argparse
import json
import sys

from edge.inference.manifest import Manifest
from trainer.int8_gate import DEFAULT_MAX_AUC_DROP, DEFAULT_MAX_SENSITIVITY_DROP
from trainer.quantize import DEFAULT_MAX_DICE_DROP, DEFAULT_MAX_MAP_DROP, GateRefused, gate_summary, quantize_engine

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add ``medge quantize`` options to ``p``."""
    p.add_argument("engine", help="engine folder with manifest.json and model.onnx")
    p.add_argument("--calib-n", type=int, default=64, help="calibration samples from the training data")
    p.add_argument("--calib-data", default=None,
                   help="calibration folder of training images (default: the training data the manifest records)")
    p.add_argument("--max-dice-drop", type=float, default=DEFAULT_MAX_DICE_DROP)
    p.add_argument("--max-map-drop", type=float, default=DEFAULT_MAX_MAP_DROP)
    p.add_argument("--max-auc-drop", type=float, default=DEFAULT_MAX_AUC_DROP, help="classification: ROC AUC")
    p.add_argument("--max-sensitivity-drop", type=float, default=DEFAULT_MAX_SENSITIVITY_DROP,
                   help="classification: sensitivity at the manifest's decision threshold")
    p.add_argument(
        "--activations", default="uint8", choices=["uint8", "int8"],
        help="uint8 (asymmetric; fastest on ONNX Runtime CPU) or int8 (symmetric, zero point 0, float biases, "
             "TensorRT's Q/DQ placement: the int8-tensorrt artifact)",
    )
    p.add_argument("--method", default="minmax", choices=["minmax", "percentile"])
    p.add_argument(
        "--no-reduce-range", dest="reduce_range", action="store_false", default=None,
        help="uint8 artifact: full 8-bit weights instead of 7-bit (reduce_range). The 7-bit default keeps ONNX "
             "Runtime's u8s8 kernels from saturating on x86 CPUs without VNNI; the gate refuses an artifact whose "
             "fused and reference scores differ",
    )
    p.add_argument("--heldout-n", type=int, default=None,
                   help="synthetic held-out samples (default: the number the manifest records, else 200)")
    p.add_argument("--heldout-data", default=None, metavar="DIR",
                   help="held-out folder (default: the one the manifest records; required for a model trained on "
                        "your data whose manifest records none)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Quantize; exit status 3 when the gate refuses."""
    task = Manifest.load(args.engine).task
    max_drop = {"segmentation": args.max_dice_drop, "classification": args.max_auc_drop}.get(task, args.max_map_drop)
    also = {"sensitivity": args.max_sensitivity_drop} if task == "classification" else None
    try:
        r = quantize_engine(
            args.engine, calib_n=args.calib_n, calib_data=args.calib_data, max_drop=max_drop,
            activation_type=args.activations, method=args.method, heldout_n=args.heldout_n,
            heldout_data=args.heldout_data, reduce_range=args.reduce_range, also_max_drop=also,
        )
    except GateRefused as exc:
        print(f"medge quantize: refused: {exc}", file=sys.stderr)
        return 3
    out = {"metric": r.metric, **gate_summary(r)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        ref = "" if r.reference is None else f"; Q/DQ reference {r.reference:.4f}"
        print(f"INT8 written: {r.metric} FP32 {r.fp32:.4f} INT8 {r.int8:.4f} "
              f"(drop {r.drop:.4f} <= {r.max_drop:.4f}){ref}")
    return 0
