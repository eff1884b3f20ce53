"""``medge evaluate``: metrics of an engine, ONNX file or checkpoint on the held-out set.

ONNX models run in ONNX Runtime and are decoded by :mod:`edge.postprocess`
(what the daemon serves). The default held-out set is synthetic with seed
1000, which training never uses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge.errors import ConfigError
from edge.manifest import Manifest

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add ``medge evaluate`` options to ``p``."""
    p.add_argument("model", help="engine folder (manifest.json), or a checkpoint .pt")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "all"])
    p.add_argument("--n", type=int, default=200, help="held-out synthetic samples")
    p.add_argument("--data", default=None, help="held-out folder instead of synthetic data")
    p.add_argument("--seed", type=int, default=1000, help="held-out synthetic seed")
    p.add_argument("--per-case", action="store_true", help="include per-case Dice/IoU and the FROC curve")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics."""
    from trainer.evaluate import evaluate_model, heldout_set, onnx_runner, summarize, torch_runner
    from trainer.train import load_checkpoint, model_from_checkpoint

    path = Path(args.model)
    results: dict[str, dict] = {}
    if path.suffix == ".pt":
        from edge.manifest import InputSpec, Postprocessing, Preprocessing

        ck = load_checkpoint(path)
        task, labels = ck["task"], list(ck["labels"])
        spec = InputSpec(size=tuple(ck["input"]["size"]), channels=int(ck["input"]["channels"]))
        pre_d = dict(ck["preprocessing"])
        if pre_d.get("window") is not None:
            pre_d["window"] = tuple(pre_d["window"])
        pre, post = Preprocessing(**pre_d), Postprocessing(**ck["postprocessing"])
        ds = heldout_set(task, args.n, args.seed, spec, pre, data=args.data, labels=labels)
        results["pytorch"] = evaluate_model(torch_runner(model_from_checkpoint(ck), task), task, ds, post, labels)
    else:
        man = Manifest.load(path)
        precs = list(man.artifacts) if args.precision == "all" else [args.precision]
        for prec in precs:
            if prec not in man.artifacts:
                raise ConfigError(f"{path} has no {prec} artifact (it has {', '.join(man.artifacts)}).")
        ds = heldout_set(man.task, args.n, args.seed, man.input, man.preprocessing, data=args.data, labels=list(man.labels))
        for prec in precs:
            m = evaluate_model(onnx_runner(man.artifact_path(prec)), man.task, ds, man.postprocessing, list(man.labels))
            results[prec] = m
    if not args.per_case:
        results = {k: summarize("", v) for k, v in results.items()}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for k, v in results.items():
            shown = {m: (round(x, 4) if isinstance(x, float) else x) for m, x in v.items() if not isinstance(x, list)}
            print(f"{k}: {shown}")
    return 0
