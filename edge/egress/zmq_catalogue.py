"""The model catalogue of the ZeroMQ ``op: models`` reply (protocol v1).

One entry per served model (:func:`describe_model`): name, version, task,
labels, what the model expects of a frame's pixels (as data and as
sentences: window, normalisation, resize, channels, the dtypes that fit) and
what an ``ok`` reply of it can carry, with its thresholds. The reply around
the entries is encoded by :func:`edge.egress.zmq.encode_models`; the socket
work happens in :mod:`edge.ingest.zmq`. See ``docs/protocol.md``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Protocol

from edge.inference.manifest import InputSpec, Manifest, Preprocessing
from edge.inference.preprocess import SUPPORTED_DTYPES

__all__ = ["DescribedModel", "describe_model", "describe_models"]


class DescribedModel(Protocol):
    """What :func:`describe_model` reads: a served model (:class:`edge.inference.model.LoadedModel`)."""

    manifest: Manifest
    precision: str
    backend_label: str

    @property
    def threshold(self) -> float: ...


def _num(value: float) -> float | int:
    """``value`` as an int when it is integral (``255`` rather than ``255.0`` in sentences and JSON)."""
    return int(value) if float(value).is_integer() else float(value)


def _bits(pre: Preprocessing) -> int | None:
    """The bit depth a fixed ``(x - 0) / (2**b - 1)`` normalisation implies, else ``None``."""
    if pre.normalize != "fixed" or pre.window is not None or pre.mean != 0:
        return None
    b = math.log2(pre.std + 1.0) if pre.std > 0 else 0.5
    return int(b) if b.is_integer() and 1 <= b <= 16 else None


def _full_scale(pre: Preprocessing) -> list[float | int] | None:
    """The raw values that become black and full white, when a fixed mapping says so (else ``None``)."""
    if pre.normalize != "fixed":
        return None
    if pre.window is None:
        return [_num(pre.mean), _num(pre.mean + pre.std)]
    if pre.mean == 0 and pre.std == 1:
        c, ww = pre.window
        return [_num(c - ww / 2.0), _num(c + ww / 2.0)]
    return None


def _window_sentence(window: tuple[float, float]) -> str:
    """The sentence on the window applied before the normalisation."""
    c, ww = window
    lo, hi = c - ww / 2.0, c + ww / 2.0
    return (
        f"Values are first clipped to the window [{_num(lo)}, {_num(hi)}] (centre {_num(c)}, width {_num(ww)}, "
        "in the modality's units, e.g. HU) and mapped linearly to [0, 1]."
    )


def _normalize_sentence(pre: Preprocessing) -> str:
    """The sentence on the normalisation (after the window, if there is one)."""
    if pre.normalize == "fixed":
        if pre.window is not None:
            return f"Then (x - {_num(pre.mean)}) / {_num(pre.std)}."
        return (
            f"Values are mapped by (x - {_num(pre.mean)}) / {_num(pre.std)} whatever the dtype, without "
            f"clipping or per-frame rescaling: {_num(pre.mean)} is black and {_num(pre.mean + pre.std)} "
            "full white. A frame on another scale is not rescaled and gives wrong results (for example "
            "16-bit values read as far brighter than white, float32 in [0, 1] as nearly black): scale it "
            f"to [{_num(pre.mean)}, {_num(pre.mean + pre.std)}] first."
        )
    if pre.normalize == "minmax":
        return (
            ("Then each" if pre.window is not None else "Each")
            + " frame is rescaled on its own from its minimum (0) to its maximum (1): any dtype and bit "
            "depth work and absolute brightness does not matter; a constant frame becomes all 0, and a few "
            "extreme pixels (a burned-in annotation, a dead pixel) compress the contrast of the rest."
        )
    return (  # zscore
        ("Then each" if pre.window is not None else "Each")
        + " frame is standardised on its own (mean 0, standard deviation 1): any dtype and bit depth work."
    )


def _frame_sentences(spec: InputSpec, pre: Preprocessing) -> list[str]:
    """The sentences on resizing, channels and float32 pixels."""
    h, w = spec.size
    if pre.resize == "letterbox":
        resize = f"The frame is resized to {h}x{w} keeping its aspect ratio, centred and zero-padded."
    else:
        resize = f"The frame is resized (stretched) to {h}x{w}."
    if spec.channels == 1:
        channels = "RGB frames become luma (0.299 R + 0.587 G + 0.114 B)."
    else:
        channels = "Grayscale frames are repeated into 3 channels."
    return [resize, channels, "float32 pixels must be finite (a NaN or an infinity makes the result meaningless)."]


def _expected_dtypes(per_frame: bool, bits: int | None) -> list[str]:
    """The frame dtypes that fit the model's input scale (every supported one for a per-frame normalisation)."""
    if per_frame:
        return list(SUPPORTED_DTYPES)
    if bits is not None:
        return [d for d, b in (("uint8", 8), ("uint16", 16)) if bits <= b][:1]
    return []


def _input_semantics(manifest: Manifest) -> dict[str, Any]:
    """How raw pixel values become the model's input, as data and as sentences."""
    spec, pre = manifest.input, manifest.preprocessing
    h, w = spec.size
    parts = [] if pre.window is None else [_window_sentence(pre.window)]
    parts.append(_normalize_sentence(pre))
    parts.extend(_frame_sentences(spec, pre))
    bits = _bits(pre)
    per_frame = pre.normalize in ("minmax", "zscore")
    return {
        "size": [h, w],
        "channels": spec.channels,
        "color": pre.color,
        "resize": pre.resize,
        "expected_dtypes": _expected_dtypes(per_frame, bits),
        "bits": bits,
        "full_scale": _full_scale(pre),
        "per_frame": per_frame,
        "normalize": pre.normalize,
        "mean": _num(pre.mean),
        "std": _num(pre.std),
        "window": None if pre.window is None else [_num(v) for v in pre.window],
        "semantics": " ".join(parts),
    }


def describe_model(model: DescribedModel | Manifest) -> dict[str, Any]:
    """One entry of the ``op: models`` reply: name, version, task, labels, input semantics, output.

    Parameters
    ----------
    model : LoadedModel or Manifest
        A served model (its threshold, precision and backend are then those
        in use) or a bare manifest (the manifest's threshold; precision and
        backend ``null``).

    Examples
    --------
    >>> from edge.inference.manifest import Artifact, InputSpec, Manifest, Postprocessing, Preprocessing
    >>> m = Manifest(name="m", version="2", task="segmentation", labels=("lesion",), input=InputSpec(),
    ...              outputs=("logits",), preprocessing=Preprocessing(normalize="fixed", std=255.0),
    ...              postprocessing=Postprocessing(), artifacts={"fp32": Artifact("m.onnx", "0")})
    >>> d = describe_model(m)
    >>> d["input"]["full_scale"], d["input"]["bits"], d["input"]["expected_dtypes"], d["output"]["mask"]
    ([0, 255], 8, ['uint8'], True)
    """
    bare = isinstance(model, Manifest)
    manifest = model if isinstance(model, Manifest) else model.manifest
    threshold = manifest.postprocessing.threshold if isinstance(model, Manifest) else model.threshold
    return {
        "name": manifest.name,
        "version": manifest.version,
        "task": manifest.task,
        "labels": list(manifest.labels),
        "input": _input_semantics(manifest),
        "output": _output_description(manifest, float(threshold)),
        "precision": None if bare else str(model.precision),  # type: ignore[union-attr]
        "backend": None if bare else str(model.backend_label),  # type: ignore[union-attr]
        "research_only": bool(manifest.research_only),
    }


def _output_description(manifest: Manifest, threshold: float) -> dict[str, Any]:
    """``output`` of a models-reply entry: what an ``ok`` reply of this model can carry, and its thresholds."""
    task, post = manifest.task, manifest.postprocessing
    detection = task == "detection"
    classification = task == "classification"
    return {
        "mask": task == "segmentation",
        "boxes": detection,
        "probability": task == "segmentation",
        "classes": classification,
        "heatmap": classification and "cam" in manifest.outputs,
        "threshold": threshold,
        "temperature": float(post.temperature or 1.0) if classification else None,
        "max_detections": int(post.max_detections) if detection else None,
        "nms_iou": float(post.nms_iou) if detection else None,
    }


def describe_models(models: Iterable[DescribedModel | Manifest]) -> list[dict[str, Any]]:
    """:func:`describe_model` of each model, in order."""
    return [describe_model(m) for m in models]
