"""ONNX export: opset, dynamic batch, parity with PyTorch, FP16, manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edge.errors import ModelError  # noqa: E402
from edge.inference.manifest import InputSpec, Manifest  # noqa: E402
from trainer.evaluate import onnx_runner  # noqa: E402
from trainer.export import check_parity, convert_fp16, export_checkpoint, export_onnx  # noqa: E402
from trainer.models import CenterNet  # noqa: E402

SPEC = InputSpec(size=(64, 64))


def test_export_dynamic_batch_and_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CenterNet(base=4).eval()
    path = export_onnx(model, tmp_path / "m.onnx", "detection", SPEC)
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert [o.name for o in proto.graph.output] == ["heatmap", "size", "offset"]
    out = onnx_runner(path)(np.zeros((3, 1, 64, 64), np.float32))
    assert out["heatmap"].shape == (3, 1, 16, 16)
    assert check_parity(model, path, SPEC) < 1e-3
    with pytest.raises(ModelError, match="differs from PyTorch"):
        check_parity(model, path, SPEC, atol=-1.0)  # an impossible tolerance must refuse


def test_fp16_keeps_float32_io_and_tracks_fp32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CenterNet(base=4).eval()
    fp32 = export_onnx(model, tmp_path / "m.onnx", "detection", SPEC)
    fp16 = convert_fp16(fp32, tmp_path / "m.fp16.onnx")
    x = np.random.default_rng(0).random((2, 1, 64, 64), dtype=np.float32)
    a, b = onnx_runner(fp32)(x), onnx_runner(fp16)(x)
    for k in a:
        assert b[k].dtype == np.float32
        np.testing.assert_allclose(a[k], b[k], atol=2e-2)
    assert fp16.stat().st_size < fp32.stat().st_size * 0.7
    g = onnx.load(str(fp16)).graph
    # What the backends feed and read: float32 at both ends, the dynamic batch axis kept.
    assert [i.type.tensor_type.elem_type for i in g.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in g.output] == [onnx.TensorProto.FLOAT] * 3
    assert [o.name for o in g.output] == ["heatmap", "size", "offset"]
    assert g.input[0].type.tensor_type.shape.dim[0].dim_param
    assert {i.data_type for i in g.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)} \
        == {onnx.TensorProto.FLOAT16}
    assert any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in g.value_info)  # value_info kept


def _graph_with_weight(weight: np.ndarray, name: str = "g") -> onnx.GraphProto:
    from onnx import TensorProto, helper, numpy_helper

    return helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [weight.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [weight.size])],
        [numpy_helper.from_array(weight, "w")],
    )


def test_fp16_clamps_weights_to_the_float16_range_and_converts_subgraphs(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weight = np.array([1e6, -1e6, 1e-9, 0.0, 1.5], np.float32)  # 1e6 overflows float16 to inf
    branch = _graph_with_weight(weight, "then")
    other = _graph_with_weight(np.ones(5, np.float32), "else")
    main = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)], "main",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
    )
    src = tmp_path / "if.onnx"
    onnx.save(helper.make_model(main, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    half = onnx.load(str(convert_fp16(src, tmp_path / "if.fp16.onnx")))
    onnx.checker.check_model(half)
    (if_node,) = [n for n in half.graph.node if n.op_type == "If"]
    then = next(a.g for a in if_node.attribute if a.name == "then_branch")
    (w,) = [i for i in then.initializer if i.name == "w"]
    assert w.data_type == TensorProto.FLOAT16  # the subgraph's weight is converted too
    got = numpy_helper.to_array(w)
    assert np.isfinite(got).all()  # clamped to 1e4, not overflowed to inf
    assert got[0] == np.float16(1e4) and got[1] == np.float16(-1e4) and got[3] == 0 and got[4] == np.float16(1.5)
    assert got[2] > 0  # a tiny weight keeps its sign instead of flushing to zero
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [TensorProto.FLOAT]


def test_fp16_refuses_a_model_that_is_already_float16(tmp_path: Path) -> None:
    from onnx import helper

    fp32 = tmp_path / "m.onnx"
    model = helper.make_model(_graph_with_weight(np.full(5, 2.0, np.float32)), opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(fp32))
    fp16 = convert_fp16(fp32, tmp_path / "m.fp16.onnx")
    with pytest.raises(ModelError, match="to float16"):
        convert_fp16(fp16, tmp_path / "twice.onnx")
    assert not (tmp_path / "twice.onnx").exists()


def test_export_checkpoint_writes_verified_manifest(tmp_path: Path, seg_checkpoint: Path) -> None:
    out = tmp_path / "eng"
    man = export_checkpoint(seg_checkpoint, out, "tiny-seg", heldout_n=3, val_n=3)
    again = Manifest.load(out)
    assert again.task == "segmentation" and again.labels == ("lesion",)
    assert set(again.artifacts) == {"fp32", "fp16"}
    for prec in again.artifacts:
        again.artifact_path(prec, verify=True)
    assert {"dice", "iou"} <= set(again.metrics["fp32"])
    tr = again.training
    assert tr["checkpoint"]["path"] == "model.pt" and (out / "model.pt").is_file()
    assert tr["heldout"]["seed"] == 1000 and tr["data_seed"] == 1 and tr["code_version"]
    assert "NOT FOR CLINICAL USE" in again.intended_use and again.research_only
    assert man.input.size == (64, 64)


def test_cli_export_then_evaluate(tmp_path: Path, det_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from edge.cli import main as medge

    out = tmp_path / "eng"
    assert medge(["export", str(det_checkpoint), "--out", str(out), "--name", "tiny-det", "--heldout-n", "3", "--no-fp16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert medge(["evaluate", str(out), "--n", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"map50", "sensitivity", "fp_per_image"} <= set(res["fp32"])
    # The manifest's FP32 metrics are the same held-out numbers.
    assert res["fp32"]["map50"] == pytest.approx(Manifest.load(out).metrics["fp32"]["map50"])
