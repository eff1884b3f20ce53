"""The INT8 artifact for TensorRT holds only Q/DQ nodes TensorRT can build.

TensorRT's DequantizeLinear takes only INT8 (FP8, INT4, FP4) inputs and a
zero point of 0; ONNX Runtime's default QuantizeBias writes INT32 Conv biases
behind a DequantizeLinear, which TensorRT's parser refuses. These tests read
the graphs with ``onnx`` (no TensorRT needed): the bundled
``model.int8-tensorrt.onnx`` files, and what ``quantize_int8`` writes for a
tiny hand-built model (no torch, a second or two).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.errors import EngineBuildError  # noqa: E402
from edge.inference.manifest import INT8_TENSORRT, Manifest, default_engines_dir  # noqa: E402
from trainer.qdq_graph import finish_for_tensorrt, strip_unused_opsets, tensorrt_qdq_problems  # noqa: E402
from trainer.quantize import quantize_int8  # noqa: E402

BUNDLED = ("us-lesion-seg", "xray-nodule-det", "xray-nodule-cls")


def _non_int8_dq_inputs(model: "onnx.ModelProto") -> list[str]:
    """DequantizeLinear nodes whose input is not INT8, read straight off the graph (independent of trainer)."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    bad = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        x = n.input[0]
        if x in inits:
            ok = inits[x].data_type == TensorProto.INT8
        elif x in producer and producer[x].op_type == "QuantizeLinear":
            q = producer[x]
            ok = len(q.input) > 2 and q.input[2] in inits and inits[q.input[2]].data_type == TensorProto.INT8
        else:
            ok = False
        if not ok:
            bad.append(n.name)
    return bad


def _q_zero_points(model: "onnx.ModelProto") -> list[np.ndarray]:
    inits = {i.name: i for i in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]


def _quantized_conv_outputs(model: "onnx.ModelProto") -> list[str]:
    """Conv outputs that feed a QuantizeLinear directly (TensorRT's placement leaves them in float)."""
    conv_out = {o for n in model.graph.node if n.op_type == "Conv" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in conv_out]


def _assert_tensorrt_buildable(model: "onnx.ModelProto") -> None:
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert dqs and qs, "not a Q/DQ model"
    assert _non_int8_dq_inputs(model) == []
    zps = _q_zero_points(model)
    assert len(zps) == len(qs), "every QuantizeLinear needs an explicit zero point (else its output is uint8)"
    assert all(z.dtype == np.int8 and not z.any() for z in zps)
    assert tensorrt_qdq_problems(model) == []


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_int8_tensorrt_artifact_has_only_int8_dequantize_inputs(name: str) -> None:
    man = Manifest.load(default_engines_dir() / name)
    model = onnx.load(str(man.artifact_path(INT8_TENSORRT, verify=True)))
    _assert_tensorrt_buildable(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in model.graph.initializer}
    biases = [inits[c.input[2]] for c in convs if len(c.input) > 2 and c.input[2]]
    assert biases and all(b.data_type == TensorProto.FLOAT for b in biases)  # float bias, no INT32 DQ
    # TensorRT's placement: Q/DQ on the inputs of each Conv, its output (bias, ReLU fused) left in float.
    assert _quantized_conv_outputs(model) == []
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert all(producers[o.name] != "DequantizeLinear" for o in model.graph.output)
    record = man.training["quantization_tensorrt"]
    assert record["biases"] == "float" and record["gate"]["drop"] <= record["gate"]["max_drop"]


@pytest.mark.parametrize("name", BUNDLED)
def test_onnxruntime_cpu_runs_the_bundled_int8_tensorrt_artifact(name: str) -> None:
    import onnxruntime as ort

    man = Manifest.load(default_engines_dir() / name)
    sess = ort.InferenceSession(str(man.artifact_path(INT8_TENSORRT)), providers=["CPUExecutionProvider"])
    h, w = man.input.size
    x = np.random.default_rng(0).random((2, man.input.channels, h, w), dtype=np.float32)
    outs = sess.run(None, {man.input.name: x})
    assert [o.shape[0] for o in outs] == [2] * len(man.outputs)
    assert all(np.isfinite(o).all() for o in outs)


def _tiny_conv_model(path: Path) -> Path:
    """Conv(bias) -> Relu -> MaxPool -> Conv(bias): the pattern whose biases ORT would quantize to INT32."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (2, 4, 3, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.normal(0, 0.1, (2,)).astype(np.float32), "b2")
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["logits"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2, 8, 8])],
        initializer=[w1, b1, w2, b2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return _tiny_conv_model(tmp_path / "tiny.onnx")


@pytest.fixture()
def calib() -> np.ndarray:
    return np.random.default_rng(1).random((4, 1, 16, 16), dtype=np.float32)


def test_quantize_int8_for_tensorrt_leaves_biases_in_float(tmp_path: Path, tiny: Path, calib: np.ndarray) -> None:
    out = quantize_int8(tiny, tmp_path / "trt.onnx", calib, activation_type="int8")
    model = onnx.load(str(out))
    _assert_tensorrt_buildable(model)
    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and all(inits[c.input[2]].data_type == TensorProto.FLOAT for c in convs)
    assert _quantized_conv_outputs(model) == []  # Conv -> Relu in float, quantized at the next op's input
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert all(c.input[0] in dq_out and c.input[1] in dq_out for c in convs)  # both Conv inputs quantized
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}  # ORT's unused domains dropped


def test_checker_catches_the_int32_bias_of_the_cpu_form(tmp_path: Path, tiny: Path, calib: np.ndarray) -> None:
    """The uint8 (ONNX Runtime CPU) form keeps INT32 biases behind DequantizeLinear: the checks must see them."""
    out = quantize_int8(tiny, tmp_path / "cpu.onnx", calib, activation_type="uint8")
    model = onnx.load(str(out))
    assert _non_int8_dq_inputs(model)
    problems = tensorrt_qdq_problems(model)
    assert any("INT32" in p for p in problems) and any("UINT8" in p for p in problems)
    assert _quantized_conv_outputs(model)  # ORT's CPU form requantizes every Conv output
    with pytest.raises(EngineBuildError, match="not one TensorRT can build"):
        finish_for_tensorrt(out, "cpu.onnx")


def test_int32_bias_with_int8_activations_is_refused(tmp_path: Path, tiny: Path, calib: np.ndarray) -> None:
    with pytest.raises(EngineBuildError, match="TensorRT"):
        quantize_int8(tiny, tmp_path / "x.onnx", calib, activation_type="int8", quantize_bias=True)
    assert not (tmp_path / "x.onnx").exists()


def test_checker_flags_a_nonzero_zero_point_and_a_missing_one() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q_nonzero"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"], name="dq"),
             helper.make_node("QuantizeLinear", ["d", "s"], ["q2"], name="q_uint8"),
             helper.make_node("DequantizeLinear", ["q2", "s"], ["y"], name="dq_uint8")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits))
    problems = tensorrt_qdq_problems(model)
    assert any("'q_nonzero'" in p and "non-zero" in p for p in problems)
    assert any("'q_uint8'" in p and "no zero point" in p for p in problems)
    assert any("'dq_uint8'" in p and "UINT8" in p for p in problems)
    assert _non_int8_dq_inputs(model) == ["dq_uint8"]


def test_strip_unused_opsets_keeps_the_used_domains() -> None:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1),
                                                helper.make_opsetid("ai.onnx.ml", 5)])
    assert strip_unused_opsets(model) == 2
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]


def _weight_ranges(model: "onnx.ModelProto") -> list[int]:
    """Largest |value| of each quantized (INT8 initializer) weight of ``model``."""
    return [int(np.abs(numpy_helper.to_array(i).astype(np.int32)).max()) for i in model.graph.initializer
            if i.data_type == TensorProto.INT8 and len(i.dims) == 4]


def test_cpu_artifact_weights_use_7_bits_by_default(tmp_path: Path, tiny: Path, calib: np.ndarray) -> None:
    """uint8 (CPU) form: reduce_range by default, so u8s8 pair sums cannot saturate on CPUs without VNNI."""
    def ranges(name: str, **kw: object) -> list[int]:
        return _weight_ranges(onnx.load(str(quantize_int8(tiny, tmp_path / name, calib, **kw))))

    reduced = ranges("cpu.onnx", activation_type="uint8")
    full = ranges("full.onnx", activation_type="uint8", reduce_range=False)
    trt = ranges("trt.onnx", activation_type="int8")
    assert len(reduced) == len(full) == len(trt) == 2
    assert max(reduced) <= 64 and min(reduced) > 32  # 7-bit range, used in full
    assert max(full) == 127 and max(trt) == 127  # 8 bits when turned off, and for TensorRT (int32 accumulation)
    # 255 * 64 * 2 = 32640 fits a signed 16-bit pair sum; 255 * 127 * 2 = 64770 does not.
    assert 255 * max(reduced) * 2 <= np.iinfo(np.int16).max < 255 * max(full) * 2


def test_bundled_cpu_int8_artifacts_have_7_bit_weights() -> None:
    for name in BUNDLED:
        man = Manifest.load(default_engines_dir() / name)
        ranges = _weight_ranges(onnx.load(str(man.artifact_path("int8", verify=True))))
        assert ranges and max(ranges) <= 64
        assert man.training["quantization"]["reduce_range"]["enabled"] is True


def test_cpu_int8_features_reads_the_vnni_flags(tmp_path: Path) -> None:
    from trainer.qdq_graph import cpu_int8_features

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\n"
                    "processor\t: 1\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert cpu_int8_features(info) == {"model": "Some CPU", "avx2": True, "avx512f": True, "vnni": True}
    info.write_text("model name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma\n")
    assert cpu_int8_features(info)["vnni"] is False
    assert cpu_int8_features(tmp_path / "missing")["vnni"] is None
