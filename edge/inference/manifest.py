"""Engine manifests: ``engines/<name>/manifest.json``.

A manifest describes one model: its task, labels, input tensor, the
pre- and post-processing the daemon must apply, its artifacts (each with a
sha256 the daemon checks before loading), measured metrics per precision,
the training record and the intended use.

Examples
--------
>>> from edge.inference.manifest import Manifest, default_engines_dir
>>> m = Manifest.load(default_engines_dir() / "us-lesion-seg")  # a bundled model
>>> m.task
'segmentation'
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from edge.errors import ModelError
from edge.fileio import atomic_write_text

__all__ = [
    "TASKS",
    "CLASSIFICATION_OUTPUTS",
    "PRECISIONS",
    "ARTIFACT_KEYS",
    "INT8_TENSORRT",
    "InputSpec",
    "Preprocessing",
    "Postprocessing",
    "Artifact",
    "Manifest",
    "sha256_file",
    "default_engines_dir",
    "discover",
    "duplicate_message",
    "scan",
]

_log = logging.getLogger(__name__)

TASKS = ("segmentation", "detection", "classification")
#: The outputs a classification model may have: ``logits`` (required) and ``cam``.
CLASSIFICATION_OUTPUTS = ("logits", "cam")
PRECISIONS = ("fp32", "fp16", "int8")
# Artifact keys: one per precision, plus an INT8 variant with symmetric int8
# activations (zero point 0) for TensorRT, beside the CPU-fast uint8 one.
INT8_TENSORRT = "int8-tensorrt"
ARTIFACT_KEYS = PRECISIONS + (INT8_TENSORRT,)
_COLORS = ("grayscale", "rgb")
_RESIZE = ("letterbox", "stretch")
_NORMALIZE = ("minmax", "zscore", "fixed")
_CLASSIFICATION_POST = ("temperature", "target_sensitivity", "target_confidence")
#: The most boxes a detection manifest may ask for (the decoder's NMS is quadratic in 4x this).
MAX_DETECTIONS = 1000
# Detection-only post-processing: left out of the other tasks' JSON (their defaults are never read).
_DETECTION_POST = ("nms_iou", "max_detections", "stride")


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk_bytes)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def default_engines_dir() -> Path:
    """The bundled ``engines/`` folder (``MEDGE_ENGINES_DIR`` overrides it)."""
    env = os.environ.get("MEDGE_ENGINES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "engines"  # edge/inference/manifest.py -> the repository root


@dataclass(frozen=True)
class InputSpec:
    """The model's input tensor: ``NCHW`` float32 of ``channels`` x ``size``."""

    name: str = "image"
    layout: str = "NCHW"
    dtype: str = "float32"
    channels: int = 1
    size: tuple[int, int] = (256, 256)  # (height, width)


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become the input tensor.

    ``color``: ``grayscale`` or ``rgb``. ``resize``: ``letterbox`` (keep the
    aspect ratio, pad with zeros, centred) or ``stretch``. ``normalize``:
    ``minmax`` (per image to [0, 1]), ``zscore`` (per image mean 0, std 1) or
    ``fixed`` (``(x - mean) / std`` on the raw values). ``window``: an optional
    CT window ``[center, width]`` applied first, mapping to [0, 1].
    """

    color: str = "grayscale"
    resize: str = "letterbox"
    normalize: str = "minmax"
    mean: float = 0.0
    std: float = 1.0
    window: tuple[float, float] | None = None


@dataclass(frozen=True)
class Postprocessing:
    """How outputs become a mask, boxes or a decision.

    Segmentation: ``threshold`` on the sigmoid probability (one output
    channel) or argmax over channels. Detection (CenterNet-style outputs
    ``heatmap`` [N, K, h, w] in probabilities, ``size`` [N, 2, h, w] as
    (width, height) in input-tensor pixels, ``offset`` [N, 2, h, w]):
    ``threshold`` on peak score, ``nms_iou``, ``max_detections``, ``stride``.
    Classification (``logits`` [N, K], optional ``cam`` [N, K, h, w]): the
    calibrated probability is ``sigmoid(logits / temperature)`` (one label)
    or ``softmax(logits / temperature)`` (K >= 2 labels); the decision is
    positive when the label's probability is ``>= threshold``, chosen on
    validation data for ``target_sensitivity``: with ``target_confidence``
    (e.g. 0.95) as the highest threshold whose one-sided lower confidence
    bound of the validation sensitivity reaches the target, without it (an
    older manifest, or ``medge train --threshold-confidence 0``) as the
    highest whose validation sensitivity does. ``temperature``,
    ``target_sensitivity`` and ``target_confidence`` belong to
    classification only (``None`` and left out of the JSON for the other
    tasks); ``nms_iou``, ``max_detections`` and ``stride`` to detection
    only (written for detection alone; the defaults fill them in elsewhere).
    """

    threshold: float = 0.5
    nms_iou: float = 0.5
    max_detections: int = 20
    stride: int = 4
    temperature: float | None = None
    target_sensitivity: float | None = None
    target_confidence: float | None = None


@dataclass(frozen=True)
class Artifact:
    """One model file, relative to the manifest's folder, and its sha256."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated ``manifest.json``."""

    name: str
    version: str
    task: str
    labels: tuple[str, ...]
    input: InputSpec
    outputs: tuple[str, ...]
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    artifacts: Mapping[str, Artifact]
    metrics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    intended_use: str = ""
    research_only: bool = True
    directory: Path | None = None

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], directory: Path | None = None) -> "Manifest":
        """Build and validate a manifest from its JSON object."""
        where = f"manifest {directory / 'manifest.json' if directory else '<dict>'}"
        try:
            inp = dict(data.get("input", {}))
            if "size" in inp:
                inp["size"] = tuple(int(v) for v in inp["size"])
            pre = dict(data.get("preprocessing", {}))
            if pre.get("window") is not None:
                pre["window"] = tuple(float(v) for v in pre["window"])
            m = cls(
                name=str(data["name"]),
                version=str(data["version"]),
                task=str(data["task"]),
                labels=tuple(str(x) for x in data["labels"]),
                input=InputSpec(**inp),
                outputs=tuple(str(x) for x in data["outputs"]),
                preprocessing=Preprocessing(**pre),
                postprocessing=Postprocessing(**dict(data.get("postprocessing", {}))),
                artifacts={
                    str(k): Artifact(path=str(v["path"]), sha256=str(v["sha256"]))
                    for k, v in dict(data["artifacts"]).items()
                },
                metrics={str(k): dict(v) for k, v in dict(data.get("metrics", {})).items()},
                training=dict(data.get("training", {})),
                intended_use=str(data.get("intended_use", "")),
                research_only=bool(data.get("research_only", True)),
                directory=directory,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where} is malformed: {exc!r}.") from exc
        m._validate(where)
        return m

    @classmethod
    def load(cls, path: Path | str) -> "Manifest":
        """Load ``manifest.json`` from a file or from the folder holding it."""
        p = Path(path)
        if p.is_dir():
            p = p / "manifest.json"
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelError(f"No manifest at {p}.") from exc
        except json.JSONDecodeError as exc:
            raise ModelError(f"Manifest {p} is not valid JSON: {exc}.") from exc
        return cls.from_dict(data, directory=p.parent)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this manifest (without ``directory``)."""
        d = asdict(self)
        d.pop("directory", None)
        d["labels"] = list(self.labels)
        d["outputs"] = list(self.outputs)
        d["input"]["size"] = list(self.input.size)
        if self.preprocessing.window is not None:
            d["preprocessing"]["window"] = list(self.preprocessing.window)
        for key in _CLASSIFICATION_POST:  # classification-only fields stay out of the other tasks' JSON
            if d["postprocessing"][key] is None:
                del d["postprocessing"][key]
        if self.task != "detection":  # and the detector's out of theirs
            for key in _DETECTION_POST:
                del d["postprocessing"][key]
        return d

    def save(self, directory: Path | str) -> Path:
        """Write ``manifest.json`` atomically into ``directory``."""
        return atomic_write_text(Path(directory) / "manifest.json", json.dumps(self.to_dict(), indent=2) + "\n")

    # ------------------------------------------------------------ artifacts
    def artifact_path(self, precision: str, verify: bool = True) -> Path:
        """Path of the artifact for ``precision``; checks its sha256 unless told not to.

        Raises
        ------
        ModelError
            If there is no such artifact, the file is missing, or its sha256
            does not match the manifest.
        """
        if precision not in self.artifacts:
            raise ModelError(
                f"Model {self.name!r} has no {precision!r} artifact "
                f"(it has: {', '.join(sorted(self.artifacts)) or 'none'})."
            )
        art = self.artifacts[precision]
        base = self.directory if self.directory is not None else Path(".")
        path = (base / art.path).resolve()
        if not path.is_file():
            raise ModelError(f"Artifact {path} of model {self.name!r} is missing.")
        if verify:
            actual = sha256_file(path)
            if actual != art.sha256:
                raise ModelError(
                    f"Artifact {path} of model {self.name!r} has sha256 {actual}, "
                    f"but the manifest says {art.sha256}; refusing to load it."
                )
        return path

    @property
    def int8_tensorrt_ready(self) -> bool:
        """Whether TensorRT can build INT8 from this model's artifacts.

        TensorRT builds explicit-precision INT8 only from Q/DQ graphs with
        symmetric int8 activations (zero point 0): the ``int8-tensorrt``
        artifact, or an ``int8`` artifact whose ``training.quantization``
        record says its activations are int8. The trainer's default ``int8``
        uses uint8 activations (faster on ONNX Runtime's CPU kernels).
        """
        if INT8_TENSORRT in self.artifacts:
            return True
        if "int8" not in self.artifacts:
            return False
        quant = self.training.get("quantization", {})
        act = quant.get("activations", "") if isinstance(quant, Mapping) else ""
        return str(act).startswith("int8")

    def artifact_key(self, precision: str, backend: str, provider: str = "") -> str:
        """The artifact that serves ``precision`` on ``backend`` (and ONNX Runtime ``provider``).

        INT8 on TensorRT, native or ONNX Runtime's TensorRT provider, is the
        Q/DQ ``int8-tensorrt`` artifact when the manifest has one (else the
        ``int8`` one, usable there only when :attr:`int8_tensorrt_ready`);
        everything else is the precision's own key (``fp16`` is
        ``model.fp16.onnx`` on every runtime). The key need not exist: look
        it up in :attr:`artifacts`.

        Examples
        --------
        >>> m = Manifest.load(default_engines_dir() / "us-lesion-seg")
        >>> m.artifact_key("int8", "onnxruntime", "tensorrt"), m.artifact_key("int8", "onnxruntime", "cpu")
        ('int8-tensorrt', 'int8')
        """
        on_tensorrt = backend == "tensorrt" or (backend == "onnxruntime" and provider == "tensorrt")
        if on_tensorrt and precision == "int8" and INT8_TENSORRT in self.artifacts:
            return INT8_TENSORRT
        return precision

    @property
    def num_classes(self) -> int:
        """Number of foreground labels."""
        return len(self.labels)

    # ------------------------------------------------------------ checks
    def _validate(self, where: str) -> None:
        def bad(msg: str) -> ModelError:
            return ModelError(f"{where}: {msg}")

        if self.task not in TASKS:
            raise bad(f"task {self.task!r} is not one of {TASKS}.")
        if not self.labels:
            raise bad("labels is empty.")
        if self.input.layout != "NCHW":
            raise bad(f"input.layout {self.input.layout!r} is not 'NCHW'.")
        if self.input.channels not in (1, 3):
            raise bad(f"input.channels {self.input.channels} is not 1 or 3.")
        if len(self.input.size) != 2 or min(self.input.size) < 8:
            raise bad(f"input.size {list(self.input.size)} is not [height, width] >= 8.")
        if self.preprocessing.color not in _COLORS:
            raise bad(f"preprocessing.color {self.preprocessing.color!r} is not one of {_COLORS}.")
        if self.preprocessing.resize not in _RESIZE:
            raise bad(f"preprocessing.resize {self.preprocessing.resize!r} is not one of {_RESIZE}.")
        if self.preprocessing.normalize not in _NORMALIZE:
            raise bad(
                f"preprocessing.normalize {self.preprocessing.normalize!r} is not one of {_NORMALIZE}."
            )
        if self.preprocessing.std == 0:
            raise bad("preprocessing.std is 0.")
        if not 0.0 <= self.postprocessing.threshold <= 1.0:
            raise bad(f"postprocessing.threshold {self.postprocessing.threshold} is not in [0, 1].")
        for prec in self.artifacts:
            if prec not in ARTIFACT_KEYS:
                raise bad(f"artifact key {prec!r} is not one of {ARTIFACT_KEYS}.")
        if "fp32" not in self.artifacts:
            raise bad("there is no fp32 artifact.")
        if self.task == "detection":
            self._validate_detection(bad)
        self._validate_classification(bad)

    def _validate_detection(self, bad: Callable[[str], ModelError]) -> None:
        """Detection outputs and the decoder's bounds (NMS builds an n x n matrix of 4 x max_detections)."""
        if set(self.outputs) != {"heatmap", "size", "offset"}:
            raise bad(f"detection outputs {list(self.outputs)} are not heatmap, size, offset.")
        post = self.postprocessing
        md, stride, iou = post.max_detections, post.stride, post.nms_iou
        if isinstance(md, bool) or not isinstance(md, int) or not 1 <= md <= MAX_DETECTIONS:
            raise bad(f"postprocessing.max_detections {md!r} is not an integer in [1, {MAX_DETECTIONS}].")
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= 64:
            raise bad(f"postprocessing.stride {stride!r} is not an integer in [1, 64].")
        if isinstance(iou, bool) or not isinstance(iou, (int, float)) or not 0.0 <= iou <= 1.0:
            raise bad(f"postprocessing.nms_iou {iou!r} is not in [0, 1].")

    def _validate_classification(self, bad: Callable[[str], ModelError]) -> None:
        """Classification outputs and calibration; the other tasks carry no calibration fields."""
        post = self.postprocessing
        if self.task != "classification":
            for key in _CLASSIFICATION_POST:
                if getattr(post, key) is not None:
                    raise bad(f"postprocessing.{key} is for classification models, not {self.task}.")
            return
        if "logits" not in self.outputs or not set(self.outputs) <= set(CLASSIFICATION_OUTPUTS):
            raise bad(f"classification outputs {list(self.outputs)} are not logits (and cam).")
        t = post.temperature
        if t is None or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise bad(f"postprocessing.temperature {t!r} is not a finite number > 0.")
        ts = post.target_sensitivity
        if ts is not None and (not isinstance(ts, (int, float)) or not 0.0 < ts <= 1.0):
            raise bad(f"postprocessing.target_sensitivity {ts!r} is not in (0, 1].")
        tc = post.target_confidence
        if tc is not None and (isinstance(tc, bool) or not isinstance(tc, (int, float)) or not 0.0 < tc < 1.0):
            raise bad(f"postprocessing.target_confidence {tc!r} is not in (0, 1).")


def scan(engines_dir: Path | str | None = None) -> tuple[dict[str, list[Manifest]], list[tuple[Path, str]]]:
    """Every ``<name>/manifest.json`` under ``engines_dir``, grouped by manifest name.

    Returns ``(by_name, broken)``: ``by_name`` maps each manifest name to the
    manifests carrying it, in folder order (more than one is a duplicate);
    ``broken`` lists ``(folder, problem)`` for manifests that do not load.
    A missing ``engines_dir`` gives two empty results.
    """
    root = Path(engines_dir) if engines_dir is not None else default_engines_dir()
    by_name: dict[str, list[Manifest]] = {}
    broken: list[tuple[Path, str]] = []
    if not root.is_dir():
        return by_name, broken
    for sub in sorted(root.iterdir()):
        if (sub / "manifest.json").is_file():
            try:
                m = Manifest.load(sub)
            except ModelError as exc:
                broken.append((sub, str(exc)))
                continue
            by_name.setdefault(m.name, []).append(m)
    return by_name, broken


def duplicate_message(name: str, manifests: "list[Manifest]") -> str:
    """The error sentence for one model name claimed by several folders."""
    paths = " and ".join(str(m.directory) for m in manifests)
    return (
        f"Model name {name!r} is claimed by more than one engine folder: {paths}; "
        "model names must be unique (rename one in its manifest.json, or remove one folder)."
    )


def discover(engines_dir: Path | str | None = None) -> dict[str, Manifest]:
    """Load every ``<name>/manifest.json`` under ``engines_dir``, by model name.

    Raises
    ------
    ModelError
        If a manifest does not load, or if two folders carry the same model
        name (the message names both folders: one would silently shadow the
        other).
    """
    root = Path(engines_dir) if engines_dir is not None else default_engines_dir()
    found: dict[str, Manifest] = {}
    if not root.is_dir():
        return found
    for sub in sorted(root.iterdir()):
        if (sub / "manifest.json").is_file():
            m = Manifest.load(sub)
            if m.name in found:
                raise ModelError(duplicate_message(m.name, [found[m.name], m]))
            found[m.name] = m
    return found
