"""The fixture models shipped in ``tests/data/fixture-engines/`` and the code that makes them.

The daemon's tests run on a daemon-only install (no onnx), so ``fixture_engines``
(tests/conftest.py) copies the committed folder instead of building it. This module
holds the one generator (built with ``onnx.helper``, so it lives with the trainer
tests, which have onnx) and a test that regenerating gives byte-identical files, so
the committed models cannot drift from the graphs described here.

* ``tiny-seg``: ``logits = 20 * (image - 0.5)``, so the served mask is the set of
  pixels brighter than the middle of the image's (min-max normalised) intensity
  range: a result a test can compute on its own.
* ``tiny-det``: ``heatmap = AveragePool4x4(image)``, ``size = 16``, ``offset = 0``:
  a bright square gives a box around it.
* ``tiny-cls``: a binary classifier (label ``nodule``) with the bundled
  classifier's two outputs: ``cam = 40 * (AveragePool8x8(image) - 0.1)``
  ``[N, 1, 8, 8]`` and ``logits = mean(cam)`` ``[N, 1]``, temperature 2,
  threshold 0.5. So ``p = sigmoid(20 * (f - 0.1))`` where ``f`` is the mean of
  the (min-max normalised, letterboxed) input: a white square on black is
  called present when it covers more than a tenth of the model input, and
  the CAM is hot on it.

All take ``image`` ``[N, 1, 64, 64]`` float32 and have ``fp32`` and ``int8``
artifacts (the int8 one is the same graph; only the selection logic is under test).

Regenerate after a deliberate change (then commit the folder)::

    .venv/bin/python -m tests.trainer.test_fixture_engines
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from edge.inference.manifest import Artifact, InputSpec, Manifest, Postprocessing, Preprocessing, sha256_file

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "fixture-engines"
FIXTURE_SIZE = 64


def _save(model, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _seg_model(size: int):
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, size, size])
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    gain = helper.make_tensor("gain", TensorProto.FLOAT, [], [20.0])
    nodes = [
        helper.make_node("Sub", ["image", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "tiny_seg", [inp], [out], initializer=[half, gain])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _det_model(size: int):
    from onnx import TensorProto, helper

    h = size // 4
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])
    outs = [
        helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", 1, h, h]),
        helper.make_tensor_value_info("size", TensorProto.FLOAT, ["N", 2, h, h]),
        helper.make_tensor_value_info("offset", TensorProto.FLOAT, ["N", 2, h, h]),
    ]
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    sixteen = helper.make_tensor("sixteen", TensorProto.FLOAT, [], [16.0])
    nodes = [
        helper.make_node("AveragePool", ["image"], ["heatmap"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Mul", ["heatmap", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "sixteen"], ["sixteens"]),
        helper.make_node("Concat", ["sixteens", "sixteens"], ["size"], axis=1),
        helper.make_node("Concat", ["zeros", "zeros"], ["offset"], axis=1),
    ]
    graph = helper.make_graph(nodes, "tiny_det", [inp], outs, initializer=[zero, sixteen])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _cls_model(size: int):
    from onnx import TensorProto, helper

    h = size // 8
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])
    outs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1]),
        helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 1, h, h]),
    ]
    offset = helper.make_tensor("offset", TensorProto.FLOAT, [], [0.1])
    gain = helper.make_tensor("gain", TensorProto.FLOAT, [], [40.0])
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Sub", ["pooled", "offset"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["cam"]),
        helper.make_node("ReduceMean", ["cam"], ["logits"], axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "tiny_cls", [inp], outs, initializer=[offset, gain])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def make_engines(root: Path, size: int = FIXTURE_SIZE) -> Path:
    """Write ``tiny-seg``, ``tiny-det`` and ``tiny-cls`` model folders under ``root``."""
    specs = {
        "tiny-seg": ("segmentation", ("lesion",), ("logits",), _seg_model(size), Postprocessing(threshold=0.5)),
        "tiny-det": (
            "detection",
            ("nodule",),
            ("heatmap", "size", "offset"),
            _det_model(size),
            Postprocessing(threshold=0.5, nms_iou=0.5, max_detections=10, stride=4),
        ),
        "tiny-cls": (
            "classification",
            ("nodule",),
            ("logits", "cam"),
            _cls_model(size),
            Postprocessing(threshold=0.5, temperature=2.0, target_sensitivity=0.9),
        ),
    }
    for name, (task, labels, outputs, model, post) in specs.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        _save(model, d / "model.onnx")
        shutil.copyfile(d / "model.onnx", d / "model.int8.onnx")
        Manifest(
            name=name,
            version="1",
            task=task,
            labels=labels,
            input=InputSpec(size=(size, size)),
            outputs=outputs,
            preprocessing=Preprocessing(color="grayscale", resize="letterbox", normalize="minmax"),
            postprocessing=post,
            artifacts={
                "fp32": Artifact("model.onnx", sha256_file(d / "model.onnx")),
                "int8": Artifact("model.int8.onnx", sha256_file(d / "model.int8.onnx")),
            },
            # Recorded as the TensorRT-ready form so the (fake-GPU) TensorRT tests may pick int8.
            training={"quantization": {"format": "QDQ", "activations": "int8 symmetric"}},
            intended_use="Test fixture only.",
        ).save(d)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shipped_fixture_engines_match_the_generator(tmp_path: Path) -> None:
    import onnx

    fresh = _files(make_engines(tmp_path / "engines"))
    shipped = _files(SHIPPED)
    regen = "regenerate with `.venv/bin/python -m tests.trainer.test_fixture_engines` and commit tests/data/fixture-engines/"
    assert sorted(shipped) == sorted(fresh), f"file set differs from the generator's; {regen}"
    for rel, data in fresh.items():
        if rel.endswith(".onnx"):
            # The graph first (a readable failure), then the bytes (what the manifest's sha256 pins).
            assert onnx.load_from_string(shipped[rel]) == onnx.load_from_string(data), f"{rel}: graph drifted; {regen}"
        assert shipped[rel] == data, f"{rel}: bytes differ from the generator's output; {regen}"


def test_shipped_fixture_engines_load_and_verify() -> None:
    """Each shipped manifest loads and its artifacts pass the daemon's own sha256 check."""
    for name in ("tiny-seg", "tiny-det", "tiny-cls"):
        m = Manifest.load(SHIPPED / name)
        for precision in ("fp32", "int8"):
            assert m.artifact_path(precision, verify=True).is_file()


if __name__ == "__main__":
    if SHIPPED.exists():
        shutil.rmtree(SHIPPED)
    make_engines(SHIPPED)
    print(f"wrote {SHIPPED}", file=sys.stderr)
