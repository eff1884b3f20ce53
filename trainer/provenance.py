"""What a model was trained on, and which held-out set it is judged on.

A checkpoint records its training data (``training`` in the checkpoint, then
in the manifest): either the synthetic recipe (generator, seeds, sizes) or a
user's folder (its absolute path and the real item counts), and the held-out
set chosen at training time:

- synthetic data: the generator with :data:`~trainer.evaluate.HELDOUT_SEED`;
- a user's folder: a separate folder (``medge train --heldout-data``) or a
  seeded fraction of the training folder (``--heldout-fraction``), recorded
  as the folder, the fraction, the seed and the held-out item names.

``medge export`` and ``medge quantize`` evaluate on that recorded set
(:func:`plan_heldout`). A model trained on a user's data with no recorded
held-out set and no ``--heldout-data`` is refused: scoring it on synthetic
images would put numbers that describe nothing into its manifest.

Examples
--------
>>> plan = plan_heldout({"source": "synthetic", "data": "synthetic-us"}, "segmentation", None, 8)
>>> plan.data, plan.seed, plan.n
('synthetic', 1000, 8)
>>> plan_heldout({"source": "user-data", "data": "/data/us"}, "segmentation", None, None)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
edge.errors.DataError: The model was trained on your own data (/data/us) and records no held-out set; ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from edge.errors import DataError

__all__ = [
    "SYNTHETIC",
    "USER_DATA",
    "GENERATORS",
    "INTENDED_USE_FILL_IN",
    "DEFAULT_SYNTHETIC_HELDOUT_N",
    "HeldoutPlan",
    "is_user_data",
    "checkpoint_record",
    "data_record",
    "plan_heldout",
]

#: ``training.source`` values.
SYNTHETIC = "synthetic"
USER_DATA = "user-data"
#: The synthetic generator of each task (``training.generator``).
GENERATORS = {
    "segmentation": "trainer.data.make_ultrasound",
    "detection": "trainer.data.make_xray",
    "classification": "trainer.classification_data.make_classification_xray",
}
#: Written as ``intended_use`` for a model trained on a user's data when none is given.
INTENDED_USE_FILL_IN = (
    "FILL IN: intended use (task, population, device, setting) of this model trained on user data; "
    "research only until validated. NOT FOR CLINICAL USE."
)
DEFAULT_SYNTHETIC_HELDOUT_N = 200


def _abspath(p: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(p))


def is_user_data(training: Mapping[str, Any]) -> bool:
    """Whether a training record describes a user's data (not the synthetic recipe).

    Records written before ``source`` existed name the folder in ``data``
    (synthetic ones say ``synthetic-us`` / ``synthetic-xray``).
    """
    src = training.get("source")
    if src is not None:
        return src == USER_DATA
    data = training.get("data")
    return isinstance(data, str) and bool(data) and not data.startswith("synthetic")


def checkpoint_record(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's training record with ``source`` set (older checkpoints lack it).

    An older checkpoint trained on a folder has its folder in
    ``config.data``; it is made absolute the way newer records write it.
    """
    cfg = ckpt.get("config", {}) if isinstance(ckpt.get("config"), Mapping) else {}
    rec = dict(ckpt.get("training", {}) or {})
    user = is_user_data(rec) or cfg.get("data", "synthetic") != "synthetic"
    if user and "source" not in rec:
        rec["data"] = _abspath(str(cfg.get("data") or rec.get("data")))
    rec["source"] = USER_DATA if user else SYNTHETIC
    if not user and ckpt.get("task") in GENERATORS:
        rec.setdefault("generator", GENERATORS[str(ckpt["task"])])
    return rec


def data_record(
    task: str,
    data: str,
    val_data: str | None,
    n_train: int,
    n_val: int,
    data_seed: int,
    val_seed: int,
    heldout_data: str | None = None,
    split: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The data part of a checkpoint's training record.

    Synthetic: ``source``, ``data`` (``synthetic-us``/``synthetic-xray``),
    ``generator``, seeds and sizes, ``heldout`` (generator + held-out seed).
    User data: ``source: "user-data"``, absolute folder paths, the real
    ``n_train`` / ``n_val``, and ``heldout``: the separate folder, the split
    (``split``: fraction, seed, items) or ``None`` when none was set aside.
    """
    from trainer.evaluate import HELDOUT_SEED

    if data == "synthetic":
        gen = GENERATORS[task]
        return {
            "source": SYNTHETIC,
            "data": "synthetic-us" if task == "segmentation" else "synthetic-xray",
            "generator": gen,
            "data_seed": data_seed,
            "n_train": n_train,
            "val_seed": val_seed,
            "n_val": n_val,
            "heldout": (
                {"data": _abspath(heldout_data)} if heldout_data
                else {"data": SYNTHETIC, "generator": gen, "seed": HELDOUT_SEED}
            ),
        }
    if heldout_data:
        heldout: dict[str, Any] | None = {"data": _abspath(heldout_data)}
    elif split:
        heldout = {"data": _abspath(data), "split": dict(split)}
    else:
        heldout = None
    return {
        "source": USER_DATA,
        "data": _abspath(data),
        "n_train": n_train,
        "val_data": _abspath(val_data) if val_data not in (None, "synthetic") else None,
        "n_val": n_val,
        "validated_on": "val_data" if val_data not in (None, "synthetic") else "the training set",
        "heldout": heldout,
    }


@dataclass(frozen=True)
class HeldoutPlan:
    """Where a model's held-out set comes from.

    ``data`` is ``"synthetic"`` (``seed`` and ``n`` samples of the task's
    generator) or a folder (all of it, or only ``items`` when the set is one
    side of a split recorded as ``split``). ``origin`` says who chose it:
    ``recorded`` (the training record), ``--heldout-data`` (the command line).
    """

    data: str
    seed: int | None = None
    n: int | None = None
    items: tuple[str, ...] | None = None
    split: Mapping[str, Any] | None = None
    origin: str = "recorded"

    @property
    def synthetic(self) -> bool:
        """Whether this is the synthetic generator's held-out seed."""
        return self.data == SYNTHETIC

    def load(self, task: str, spec: Any, pre: Any, labels: Sequence[str] | None = None,
             training: Mapping[str, Any] | None = None) -> Any:
        """The held-out set (source images kept, for evaluation at source resolution).

        A classifier's set comes from
        :func:`trainer.classification_data.classification_heldout` (the
        source image size of ``training``, the model's training record).
        """
        from trainer.evaluate import HELDOUT_SEED, heldout_set

        if task == "classification":
            from trainer.classification_data import POSITIVE_LABEL, classification_heldout

            positive = (list(labels or []) or [POSITIVE_LABEL])[0]
            return classification_heldout(self, training or {}, spec, pre, positive)
        if self.synthetic:
            seed = HELDOUT_SEED if self.seed is None else self.seed
            return heldout_set(task, int(self.n or DEFAULT_SYNTHETIC_HELDOUT_N), seed, spec, pre, labels=labels)
        from trainer.data import load_detection_folder, load_segmentation_folder

        if task == "segmentation":
            return load_segmentation_folder(self.data, spec, pre, items=self.items)
        return load_detection_folder(self.data, spec, pre, labels=labels, items=self.items)[0]

    def record(self, task: str, n: int | None) -> dict[str, Any]:
        """The manifest's ``training.heldout``: what the set is, and ``n`` when it was evaluated."""
        if self.synthetic and task == "classification":
            from trainer.classification_data import POSITIVE_FRACTION

            cls = {"data": SYNTHETIC, "generator": GENERATORS[task], "seed": self.seed,
                   "positive_fraction": POSITIVE_FRACTION, "origin": self.origin}
            return cls if n is None else {**cls, "n": int(n)}
        if self.synthetic:
            out: dict[str, Any] = {"data": SYNTHETIC, "generator": GENERATORS[task], "seed": self.seed}
        else:
            out = {"data": self.data}
            if self.split is not None:
                out["split"] = dict(self.split)
        out["origin"] = self.origin
        if n is not None:
            out["n"] = int(n)
        return out


def _same_folder(a: str, b: str | None) -> bool:
    return bool(b) and b != SYNTHETIC and Path(_abspath(a)).resolve() == Path(_abspath(str(b))).resolve()


def plan_heldout(
    training: Mapping[str, Any],
    task: str,
    heldout_data: str | None,
    heldout_n: int | None,
    what: str = "The model",
) -> HeldoutPlan:
    """Choose the held-out set of a model from its training record and the command line.

    ``heldout_data`` (``--heldout-data``) wins; it must not be the training or
    validation folder. Otherwise the recorded held-out set is used: a folder
    or split for user data, the generator's held-out seed for synthetic data
    (``heldout_n`` samples; default the recorded ``n``, else 200).

    Raises
    ------
    DataError
        If the model was trained on a user's data and neither the record nor
        ``heldout_data`` names a held-out set, or if ``heldout_data`` is the
        folder the model was trained or validated on.
    """
    from trainer.evaluate import HELDOUT_SEED

    user = is_user_data(training)
    if heldout_data:
        for key in ("data", "val_data"):
            if user and _same_folder(heldout_data, training.get(key)):
                raise DataError(
                    f"--heldout-data {heldout_data} is the folder {what.lower()} was "
                    f"{'trained' if key == 'data' else 'validated'} on; held-out data must be images it never saw."
                )
        return HeldoutPlan(data=_abspath(heldout_data), origin="--heldout-data")
    rec = training.get("heldout")
    rec = rec if isinstance(rec, Mapping) else None
    if user:
        # A user-data record that says "synthetic" was written by the old export, which
        # evaluated every model on synthetic images: it is no held-out set of this model.
        if rec is None or rec.get("data") in (None, SYNTHETIC):
            raise DataError(
                f"{what} was trained on your own data ({training.get('data')}) and records no held-out set; "
                "evaluating it on the synthetic generator would write meaningless metrics into its manifest. "
                "Give --heldout-data FOLDER (labelled images it never saw, laid out like the training folder), "
                "or retrain with --heldout-data or --heldout-fraction, or skip evaluation (medge export --no-eval)."
            )
        split = rec.get("split")
        items = tuple(split["items"]) if isinstance(split, Mapping) and split.get("items") else None
        return HeldoutPlan(data=str(rec["data"]), items=items, split=split if items else None)
    if rec is not None and rec.get("data") not in (None, SYNTHETIC):
        return HeldoutPlan(data=str(rec["data"]))
    seed = int(rec.get("seed", HELDOUT_SEED)) if rec is not None and rec.get("seed") is not None else HELDOUT_SEED
    n = heldout_n or (int(rec["n"]) if rec is not None and rec.get("n") else DEFAULT_SYNTHETIC_HELDOUT_N)
    return HeldoutPlan(data=SYNTHETIC, seed=seed, n=n)
