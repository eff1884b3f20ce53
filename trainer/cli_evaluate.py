"""``medge evaluate``: metrics of an engine, ONNX file or checkpoint on the held-out set.

ONNX models run in ONNX Runtime and are decoded by :mod:`edge.inference.postprocess`
(what the daemon serves). The default held-out set is the one the
checkpoint or manifest records (synthetic: seed 1000, which training never
uses; your data: the held-out folder or split set aside at training);
``--data`` names another folder and ``--seed`` asks for the synthetic set
explicitly. A model trained on your data with no recorded held-out set
needs ``--data``.

Classifiers are reported at their manifest's (or checkpoint's) temperature
and threshold: accuracy, sensitivity, specificity, PPV, NPV, ROC AUC, PR AUC
and ECE with bootstrap 95 % intervals and the confusion matrix
(``--per-case`` prints the full report); ``--report-dir DIR`` also writes
the ROC, precision-recall and reliability plots there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edge.errors import ConfigError
from edge.inference.manifest import Manifest

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add ``medge evaluate`` options to ``p``."""
    p.add_argument("model", help="engine folder (manifest.json), or a checkpoint .pt")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "all"])
    p.add_argument("--n", type=int, default=None, help="held-out synthetic samples (default: the recorded number, else 200)")
    p.add_argument("--data", default=None, help="held-out folder (default: the recorded held-out set)")
    p.add_argument("--seed", type=int, default=None, help="evaluate on the synthetic set of this seed instead")
    p.add_argument("--per-case", action="store_true",
                   help="include per-case Dice/IoU and the FROC curve (classification: the full report)")
    p.add_argument("--report-dir", default=None, metavar="DIR",
                   help="classification: write <precision>-roc.png, -pr.png and -reliability.png here")
    p.add_argument("--json", action="store_true", help="print JSON")


def _heldout(args: argparse.Namespace, training: dict, task: str, spec: object, pre: object, labels: list[str]) -> object:
    """The set to evaluate on: ``--seed`` (synthetic, explicit), else the recorded or ``--data`` one."""
    from trainer.evaluate import heldout_set
    from trainer.provenance import DEFAULT_SYNTHETIC_HELDOUT_N, plan_heldout

    if args.seed is not None and not args.data:
        return heldout_set(task, args.n or DEFAULT_SYNTHETIC_HELDOUT_N, args.seed, spec, pre, labels=labels)
    plan = plan_heldout(training, task, args.data, args.n, what=f"Model {args.model}")
    if task == "classification":
        from trainer.classification_data import classification_heldout

        return classification_heldout(plan, training, spec, pre, labels[0])
    return plan.load(task, spec, pre, labels)


def _evaluate(args: argparse.Namespace, runner: object, task: str, ds: object, post: object, labels: list[str],
              name: str) -> dict:
    """One model's metrics (a classifier's report, with its plots under ``--report-dir``)."""
    from trainer.evaluate import evaluate_classification, evaluate_model

    if task == "classification":
        return evaluate_classification(runner, ds, post, report_dir=args.report_dir, prefix=name)  # type: ignore[arg-type]
    return evaluate_model(runner, task, ds, post, labels)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the metrics."""
    from trainer.evaluate import onnx_runner, summarize, torch_runner
    from trainer.provenance import checkpoint_record
    from trainer.train import load_checkpoint, model_from_checkpoint

    path = Path(args.model)
    results: dict[str, dict] = {}
    if path.suffix == ".pt":
        from edge.inference.manifest import InputSpec, Postprocessing, Preprocessing

        ck = load_checkpoint(path)
        task, labels = ck["task"], list(ck["labels"])
        spec = InputSpec(size=tuple(ck["input"]["size"]), channels=int(ck["input"]["channels"]))
        pre_d = dict(ck["preprocessing"])
        if pre_d.get("window") is not None:
            pre_d["window"] = tuple(pre_d["window"])
        pre, post = Preprocessing(**pre_d), Postprocessing(**ck["postprocessing"])
        ds = _heldout(args, checkpoint_record(ck), task, spec, pre, labels)
        model = model_from_checkpoint(ck)
        if task == "classification":
            model.emit_cam = True  # CAM hits, as the exported graph gives them
        results["pytorch"] = _evaluate(args, torch_runner(model, task), task, ds, post, labels, "pytorch")
    else:
        man = Manifest.load(path)
        precs = list(man.artifacts) if args.precision == "all" else [args.precision]
        for prec in precs:
            if prec not in man.artifacts:
                raise ConfigError(f"{path} has no {prec} artifact (it has {', '.join(man.artifacts)}).")
        ds = _heldout(args, dict(man.training), man.task, man.input, man.preprocessing, list(man.labels))
        task = man.task
        for prec in precs:
            results[prec] = _evaluate(args, onnx_runner(man.artifact_path(prec)), task, ds, man.postprocessing,
                                      list(man.labels), prec)
    if not args.per_case:
        results = {k: summarize(task, v) for k, v in results.items()}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for k, v in results.items():
            shown = {m: (round(x, 4) if isinstance(x, float) else x) for m, x in v.items() if not isinstance(x, list)}
            print(f"{k}: {shown}")
    return 0
