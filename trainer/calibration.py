"""Calibration inputs for INT8 quantization: always from a model's **training** data.

Synthetic models regenerate the first ``n`` samples of their training seed;
models trained on a folder use that folder (less any held-out split
recorded for it) or one given. The held-out seed and the recorded held-out
folder are refused (:class:`DataError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from edge.errors import DataError

if TYPE_CHECKING:
    from edge.inference.manifest import Manifest

__all__ = ["calibration_inputs", "calibration_source"]


def _calibration_folder(manifest: "Manifest", data: str | None) -> tuple[str | None, list[str] | None]:
    """``(folder, items)`` to calibrate from, or ``(None, None)`` for the synthetic generator.

    ``data`` wins; a model trained on a user's folder otherwise calibrates on
    that folder (less any held-out split recorded for it). The recorded
    held-out folder is never a calibration set.
    """
    from trainer.data import folder_items
    from trainer.provenance import is_user_data

    training = manifest.training
    held = training.get("heldout") if isinstance(training.get("heldout"), Mapping) else None
    split = held.get("split") if held is not None and isinstance(held.get("split"), Mapping) else None
    if data:
        if held is not None and split is None and held.get("data") not in (None, "synthetic") and (
            Path(str(held["data"])).resolve() == Path(data).resolve()
        ):
            raise DataError(f"{data} is model {manifest.name!r}'s held-out folder; calibration must come from training data.")
        return data, None
    if not is_user_data(training):
        return None, None
    folder = training.get("data")
    if not isinstance(folder, str) or not Path(folder).is_dir():
        raise DataError(
            f"Model {manifest.name!r} was trained on your own data ({folder}), which is not a folder here; "
            "give --calib-data FOLDER (training images) to calibrate INT8 on."
        )
    if split is not None and held is not None and Path(str(held.get("data"))).resolve() == Path(folder).resolve():
        hidden = set(split.get("items") or ())
        return folder, [i for i in folder_items(folder, manifest.task) if i not in hidden]
    return folder, None


def calibration_inputs(manifest: "Manifest", n: int, data: str | None = None) -> np.ndarray:
    """``n`` calibration inputs from the model's **training** data.

    Synthetic models regenerate the first ``n`` samples of their training
    seed (recorded in the manifest). Models trained on a folder use ``data``
    or, without it, the training folder recorded in the manifest (less its
    held-out split); never the synthetic generator. The held-out seed and
    the recorded held-out folder are refused.
    """
    from trainer.data import load_detection_folder, load_segmentation_folder, synthetic_detection_set, synthetic_segmentation_set, default_cache_dir
    from trainer.evaluate import HELDOUT_SEED, TRAIN_SEED

    if n <= 0:
        raise DataError(f"The calibration set has size {n}; INT8 calibration needs at least one training sample.")
    folder, items = _calibration_folder(manifest, data)
    if folder is not None:
        if manifest.task == "segmentation":
            ds = load_segmentation_folder(folder, manifest.input, manifest.preprocessing, items=items)
        else:
            ds = load_detection_folder(folder, manifest.input, manifest.preprocessing, labels=list(manifest.labels), items=items)[0]
        return ds.inputs[:n]
    seed = int(manifest.training.get("data_seed", TRAIN_SEED))
    if seed == HELDOUT_SEED:
        raise DataError(f"Seed {seed} is the held-out set's; calibration must come from training data.")
    make = synthetic_segmentation_set if manifest.task == "segmentation" else synthetic_detection_set
    return make(n, seed, manifest.input, manifest.preprocessing, keep_source=False, cache_dir=default_cache_dir() / "data").inputs


def calibration_source(man: "Manifest", calib_data: str | None) -> str:
    """Where the calibration inputs came from, as the quantization record names it."""
    folder, _ = _calibration_folder(man, calib_data)
    return folder if folder is not None else f"training data (seed {man.training.get('data_seed', 1)})"
