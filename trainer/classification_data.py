"""Classification data: synthetic "nodule present / absent" radiographs and a loader for users' own data.

Synthetic set (:func:`synthetic_classification_set`): chest radiographs from
:func:`edge.tools.synthetic_xray.make_xray` (the detector's generator, numpy
only, so the demo streams the same images), *present* = an image with 1-4
nodules (the generator's own count distribution given at least one),
*absent* = the same generator with nodules disabled
(:func:`~edge.tools.synthetic_xray.make_classification_xray`, re-exported
here). Which samples are positive follows a fixed
schedule (:func:`positive_schedule`): sample ``i`` is positive when
``floor((i + 1) f) > floor(i f)`` for the positive fraction ``f`` (default
:data:`POSITIVE_FRACTION`), so every prefix of a set holds ``floor(n f)``
positives and, as for the other tasks, a sample depends only on its seed and
index (``numpy.random.default_rng([seed, i])``), never on the set size. The
nodule boxes are kept (source and model-input pixels): they are the truth a
class activation map is judged against.

User data (:func:`load_classification_folder`): either a folder of class
folders, ``root/<label>/<image>`` (PNG or DICOM, as :func:`trainer.data.load_image`
reads them), or a CSV file of ``path,label`` rows (an optional
``path,label`` header; paths relative to the CSV's folder). Classification
is binary: the set may hold at most two label names, one of which is the
*positive* class (the model's one label, e.g. ``nodule``). An item is the
image's name relative to the root (``<label>/<file>``) or the CSV's ``path``
cell; :func:`trainer.data.split_items` splits items as for the other tasks.

Model inputs are made only through :func:`edge.inference.preprocess.preprocess`,
as for the other tasks.

Examples
--------
>>> [i for i in range(20) if positive_schedule(i, 0.15)]
[6, 13, 19]
>>> from trainer.classification_data import make_classification_xray
>>> from edge.tools.synthetic_xray import sample_rng
>>> img, boxes = make_classification_xray(sample_rng(0, 6), positive=True, shape=(128, 128))
>>> img.shape, len(boxes) >= 1
((128, 128), True)
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

from edge.errors import DataError
from edge.inference.manifest import InputSpec, Preprocessing
from edge.inference.preprocess import Geometry, preprocess
from edge.tools.synthetic_xray import XRAY_SHAPE, make_classification_xray, sample_rng
from trainer.data import (
    IMAGE_SUFFIXES,
    XRAY_PREPROCESSING,
    boxes_to_input,
    cache_path,
    check_items,
    load_item,
    refuse_aliases,
    save_arrays,
)

__all__ = [
    "POSITIVE_FRACTION",
    "POSITIVE_LABEL",
    "MAX_CSV_BYTES",
    "ClassificationSet",
    "positive_schedule",
    "make_classification_xray",
    "classification_set_from_arrays",
    "synthetic_classification_set",
    "classification_items",
    "load_classification_folder",
    "GENERATOR",
    "SYNTHETIC_DATA",
    "classification_data_record",
    "classification_heldout",
    "classification_heldout_record",
]

_log = logging.getLogger(__name__)

#: Default share of positive ("nodule present") samples of a synthetic set.
POSITIVE_FRACTION = 0.15
#: The bundled classifier's one label: the positive class.
POSITIVE_LABEL = "nodule"
#: The synthetic generator and data name written into training records.
GENERATOR = "trainer.classification_data.make_classification_xray"
SYNTHETIC_DATA = "synthetic-xray-cls"
#: Largest CSV of ``path,label`` rows read (bounded before it is read).
MAX_CSV_BYTES = 64 << 20
_PPM = 1_000_000


@dataclass
class ClassificationSet:
    """Preprocessed binary classification samples.

    ``inputs`` ``[N, C, H, W]`` float32 in model-input space; ``labels``
    ``[N]`` int64 (1 = the positive class ``positive_label``). ``boxes``
    (source pixels) and ``input_boxes`` (model-input pixels) are the nodules
    of a synthetic set (empty lists for users' data); ``items`` name the
    files of a user's set.
    """

    inputs: np.ndarray
    labels: np.ndarray
    geoms: list[Geometry]
    boxes: list[np.ndarray] = field(default_factory=list)
    input_boxes: list[np.ndarray] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    positive_label: str = POSITIVE_LABEL
    source: str = ""

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def n_positive(self) -> int:
        """How many samples are positive."""
        return int(np.count_nonzero(self.labels))


def _check_fraction(fraction: float) -> int:
    """``fraction`` in parts per million, after checking it lies in (0, 1)."""
    if not 0.0 < float(fraction) < 1.0:
        raise DataError(f"The positive fraction {fraction} is not between 0 and 1.")
    return int(round(float(fraction) * _PPM))


def positive_schedule(index: int, fraction: float = POSITIVE_FRACTION) -> bool:
    """Whether sample ``index`` of a synthetic set is positive (exact integer arithmetic)."""
    ppm = _check_fraction(fraction)
    return ((index + 1) * ppm) // _PPM > (index * ppm) // _PPM


def classification_set_from_arrays(
    images: Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray,
    spec: InputSpec,
    pre: Preprocessing,
    boxes: Sequence[np.ndarray] | None = None,
    keep_source: bool = True,
    source: str = "",
    items: Sequence[str] = (),
    positive_label: str = POSITIVE_LABEL,
) -> ClassificationSet:
    """Preprocess images (and their nodule boxes, when known) into a :class:`ClassificationSet`."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(images) != y.size:
        raise DataError(f"{len(images)} images but {y.size} labels.")
    if not images:
        raise DataError(f"The classification set {source} is empty.")
    if not np.isin(y, (0, 1)).all():
        raise DataError("Classification labels must be 0 or 1 (1 = the positive class).")
    if boxes is not None and len(boxes) != y.size:
        raise DataError(f"{y.size} images but {len(boxes)} box lists.")
    xs, geoms, ib = [], [], []
    for i, img in enumerate(images):
        x, g = preprocess(img, spec, pre)
        xs.append(x)
        geoms.append(g)
        if boxes is not None:
            ib.append(boxes_to_input(np.asarray(boxes[i], np.float32).reshape(-1, 4), g))
    return ClassificationSet(
        inputs=np.stack(xs),
        labels=y,
        geoms=geoms,
        boxes=[np.asarray(b, np.float32).reshape(-1, 4) for b in boxes] if boxes is not None else [],
        input_boxes=ib,
        images=list(images) if keep_source else [],
        items=list(items),
        positive_label=positive_label,
        source=source,
    )


def _generate(n: int, seed: int, ppm: int, shape: tuple[int, int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, boxes = [], []
    for i in range(n):
        positive = ((i + 1) * ppm) // _PPM > (i * ppm) // _PPM
        img, b = make_classification_xray(sample_rng(seed, i), positive, shape)
        images.append(img)
        boxes.append(b)
    return images, boxes


def synthetic_classification_set(
    n: int,
    seed: int,
    spec: InputSpec | None = None,
    pre: Preprocessing = XRAY_PREPROCESSING,
    keep_source: bool = True,
    cache_dir: Path | str | None = None,
    positive_fraction: float = POSITIVE_FRACTION,
    shape: tuple[int, int] = XRAY_SHAPE,
) -> ClassificationSet:
    """``n`` synthetic radiographs with seed ``seed``, ``positive_fraction`` of them with nodules.

    With ``cache_dir`` the generated images and boxes are stored there
    (atomically) and reused by later calls with the same arguments.
    """
    if n <= 0:
        raise DataError(f"Cannot generate a set of {n} samples.")
    ppm = _check_fraction(positive_fraction)
    spec = spec or InputSpec()
    kind = f"xcls-p{ppm}-{shape[0]}x{shape[1]}"
    path = cache_path(Path(cache_dir) if cache_dir else None, kind, n, seed)
    if path is not None and path.is_file():
        with np.load(path) as z:
            images = list(z["images"])
            counts = z["counts"]
            flat = z["boxes"]
        boxes = list(np.split(flat, np.cumsum(counts)[:-1]))
        _log.debug("Loaded %d classification radiographs from %s", n, path)
    else:
        images, boxes = _generate(n, seed, ppm, shape)
        if path is not None:
            counts = np.array([len(b) for b in boxes], np.int64)
            save_arrays(path, images=np.stack(images), counts=counts, boxes=np.concatenate(boxes).reshape(-1, 4))
    labels = np.array([len(b) > 0 for b in boxes], np.int64)
    return classification_set_from_arrays(
        images, labels, spec, pre, boxes=boxes, keep_source=keep_source,
        source=f"synthetic-xray-cls seed={seed}",
    )


# ------------------------------------------------------------- user data
#: ``(item, path, label, where)``: ``where`` says which item it is without naming the file.
_Entry = tuple[str, Path, str, str]


def _folder_entries(root: Path) -> list[_Entry]:
    """``(item, path, label, where)`` of every image in ``root/<label>/``."""
    entries: list[_Entry] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in sorted(sub.iterdir())
                 if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES]
        for k, f in enumerate(files):
            where = f"Image {k} of class folder {sub.name!r} of {root} (sorted by name, counting from 0)"
            entries.append((f"{sub.name}/{f.name}", f, sub.name, where))
    if not entries:
        raise DataError(f"{root} holds no class folders with .png or DICOM images (root/<label>/<image>).")
    refuse_aliases(root, [e[0] for e in entries], root)
    return entries


def _csv_rows(csv_path: Path) -> list[tuple[int, list[str]]]:
    """``(line number, cells)`` of every non-blank row of a UTF-8 CSV file (a BOM is skipped).

    Raises
    ------
    DataError
        If the file is larger than :data:`MAX_CSV_BYTES` or not UTF-8.
    """
    size = csv_path.stat().st_size
    if size > MAX_CSV_BYTES:
        raise DataError(f"CSV file {csv_path} is {size} bytes, more than the {MAX_CSV_BYTES} read.")
    try:
        # utf-8-sig: Excel writes "UTF-8 CSV" with a byte order mark, which would glue onto the header.
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            rows = list(enumerate(csv.reader(fh), start=1))
    except UnicodeDecodeError as exc:
        raise DataError(
            f"CSV file {csv_path} is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8."
        ) from exc
    return [(n, [c.strip() for c in row]) for n, row in rows if row and any(c.strip() for c in row)]


def _check_aliases(csv_path: Path, entries: Sequence[_Entry], lines: Sequence[int]) -> None:
    """Refuse two rows naming the same file (compared by resolved real path, so ``./a.png`` is ``a.png``).

    The same file twice would be counted twice and could land on both sides
    of a train/held-out split; with two labels it is also contradictory. The
    error names line numbers, not paths (file names can hold patient names).
    """
    seen: dict[str, tuple[int, str]] = {}
    for (_, path, label, _), line_no in zip(entries, lines):
        key = os.path.realpath(path)
        if key in seen:
            first, first_label = seen[key]
            what = "with two different labels" if label != first_label else "more than once"
            raise DataError(f"CSV file {csv_path} lists the same image {what} (lines {first} and {line_no}).")
        seen[key] = (line_no, label)


def _csv_entries(csv_path: Path) -> list[_Entry]:
    """``(item, path, label, where)`` of every ``path,label`` row of a CSV file."""
    entries: list[_Entry] = []
    lines: list[int] = []
    for line_no, cells in _csv_rows(csv_path):
        if line_no == 1 and [c.lower() for c in cells] == ["path", "label"]:
            continue
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise DataError(f"Line {line_no} of {csv_path} is not 'path,label'.")
        p = Path(cells[0])
        where = f"The image on line {line_no} of {csv_path}"
        entries.append((cells[0], p if p.is_absolute() else csv_path.parent / p, cells[1], where))
        lines.append(line_no)
    if not entries:
        raise DataError(f"CSV file {csv_path} lists no images.")
    _check_aliases(csv_path, entries, lines)
    return entries


def _entries(root: Path) -> list[_Entry]:
    if root.is_dir():
        return _folder_entries(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        return _csv_entries(root)
    raise DataError(f"Classification data {root} is neither a folder of class folders nor a .csv file.")


def classification_items(root: Path | str) -> list[str]:
    """The items of a user's classification data, sorted (for :func:`trainer.data.split_items`)."""
    return sorted(e[0] for e in _entries(Path(root)))


def _binary_labels(names: Sequence[str], positive_label: str, root: Path) -> np.ndarray:
    """1 where the label name is ``positive_label``; at most two names in all."""
    distinct = sorted(set(names))
    if len(distinct) > 2:
        raise DataError(
            f"{root} holds {len(distinct)} classes ({', '.join(distinct[:5])}{' ...' if len(distinct) > 5 else ''}); "
            "classification is binary: give one positive and one negative class."
        )
    if len(distinct) == 2 and positive_label not in distinct:
        raise DataError(
            f"The positive label {positive_label!r} is not one of the classes of {root} "
            f"({distinct[0]!r}, {distinct[1]!r}); name the positive class (medge train --positive-label)."
        )
    return np.array([n == positive_label for n in names], np.int64)


def load_classification_folder(
    root: Path | str,
    spec: InputSpec | None = None,
    pre: Preprocessing = XRAY_PREPROCESSING,
    positive_label: str = POSITIVE_LABEL,
    items: Collection[str] | None = None,
) -> ClassificationSet:
    """Load ``root/<label>/*`` images, or the ``path,label`` rows of the CSV file ``root``.

    ``items``: load only these items (one side of a split).

    Raises
    ------
    DataError
        For a missing or unreadable image, more than two classes, two classes
        of which none is ``positive_label``, a malformed CSV line, or an item
        of ``items`` that the data does not hold.
    """
    root = Path(root)
    entries = _entries(root)
    want = check_items(root, items, [e[0] for e in entries])
    chosen = [e for e in entries if want is None or e[0] in want]
    labels = _binary_labels([e[2] for e in chosen], positive_label, root)
    images = [load_item(e[1], e[3]) for e in chosen]
    return classification_set_from_arrays(
        images, labels, spec or InputSpec(), pre, keep_source=False, source=str(root),  # nothing reads them
        items=[e[0] for e in chosen], positive_label=positive_label,
    )


# ------------------------------------------------------------- provenance
# trainer.provenance describes the segmentation and detection data; these three
# functions give the same records and held-out sets for a classifier.
def classification_data_record(
    data: str,
    val_data: str | None,
    n_train: int,
    n_val: int,
    data_seed: int,
    val_seed: int,
    heldout_data: str | None = None,
    split: Mapping[str, Any] | None = None,
    positive_fraction: float = POSITIVE_FRACTION,
    shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The data part of a classifier's training record (:func:`trainer.provenance.data_record`'s fields).

    Synthetic data names :data:`SYNTHETIC_DATA` and :data:`GENERATOR`, and
    adds ``positive_fraction`` and ``source_shape``; a user's data is
    recorded as for the other tasks.
    """
    from trainer.provenance import SYNTHETIC, data_record

    # The user-data record is the same for every task; "detection" only picks the X-ray names,
    # which are replaced below for synthetic data.
    rec = data_record("detection", data, val_data, n_train, n_val, data_seed, val_seed,
                      heldout_data=heldout_data, split=split)
    if rec["source"] != SYNTHETIC:
        return rec
    rec.update(data=SYNTHETIC_DATA, generator=GENERATOR, positive_fraction=float(positive_fraction),
               source_shape=list(shape or XRAY_SHAPE))
    if rec["heldout"].get("data") == SYNTHETIC:
        rec["heldout"] = {**rec["heldout"], "generator": GENERATOR}
    return rec


def classification_heldout(plan: Any, training: Mapping[str, Any], spec: InputSpec, pre: Preprocessing,
                           positive_label: str) -> ClassificationSet:
    """The held-out set a :class:`trainer.provenance.HeldoutPlan` names, for a classifier.

    Synthetic: the plan's seed and size at :data:`POSITIVE_FRACTION`, with the
    source image size the model was trained at (``training.source_shape``).
    """
    from trainer.data import default_cache_dir
    from trainer.evaluate import HELDOUT_SEED
    from trainer.provenance import DEFAULT_SYNTHETIC_HELDOUT_N

    if not plan.synthetic:
        return load_classification_folder(plan.data, spec, pre, positive_label=positive_label, items=plan.items)
    shape = tuple(int(v) for v in training.get("source_shape") or XRAY_SHAPE)
    seed = HELDOUT_SEED if plan.seed is None else int(plan.seed)
    return synthetic_classification_set(
        int(plan.n or DEFAULT_SYNTHETIC_HELDOUT_N), seed, spec, pre, cache_dir=default_cache_dir() / "data",
        shape=(shape[0], shape[1]),
    )


def classification_heldout_record(plan: Any, n: int | None) -> dict[str, Any]:
    """The manifest's ``training.heldout`` for a classifier (:meth:`HeldoutPlan.record`'s fields)."""
    if not plan.synthetic:
        return plan.record("classification", n)
    out: dict[str, Any] = {"data": "synthetic", "generator": GENERATOR, "seed": plan.seed,
                           "positive_fraction": POSITIVE_FRACTION, "origin": plan.origin}
    if n is not None:
        out["n"] = int(n)
    return out
