"""The bundled classifier `engines/xray-nodule-cls`: its manifest's promises, and where its CAM points.

The manifest tests read the bundled files only. The CAM test runs the FP32
artifact (ONNX Runtime CPU) on the first positive cases of the held-out
synthetic set (seed 1000), generated here one by one with the generator's
own per-sample seeds, so the nodule positions are known.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.inference.manifest import Manifest, default_engines_dir

ENGINE = default_engines_dir() / "xray-nodule-cls"
#: Positive held-out cases the CAM test judges (the first 60 of seed 1000: indices 6 .. 399).
CAM_CASES = 60
#: Measured on the bundled model: the hottest CAM cell lies in or next to a nodule in
#: 57 of these 60 cases (0.95; the export's evaluation, on the same 60, agrees). The bound
#: allows 6 misses: a retrained model that points elsewhere in more than 1 case in 10
#: fails, one that loses a few more borderline cases does not.
MIN_CAM_HIT_FRACTION = 0.90



@pytest.fixture(scope="module")
def manifest() -> Manifest:
    if not (ENGINE / "manifest.json").is_file():
        pytest.skip("engines/xray-nodule-cls not built (python -m trainer.reproduce --only xray-nodule-cls)")
    return Manifest.load(ENGINE)


def test_bundled_manifest_validates_and_its_artifacts_match(manifest: Manifest) -> None:
    assert manifest.task == "classification" and list(manifest.labels) == ["nodule"]
    assert manifest.research_only and "NOT FOR CLINICAL USE" in manifest.intended_use
    assert set(manifest.artifacts) == {"fp32", "fp16", "int8", "int8-tensorrt"}
    for precision in manifest.artifacts:
        manifest.artifact_path(precision, verify=True)  # sha256 of every file
    assert (ENGINE / "model.pt").is_file()
    assert manifest.training["init_task"] == "detection"  # encoder from the bundled detector


def test_heldout_metrics_have_cis_and_the_operating_point_holds(manifest: Manifest) -> None:
    post = manifest.postprocessing
    cal = manifest.training["calibration"]
    assert 0.0 < post.threshold < 1.0 and post.threshold == pytest.approx(cal["threshold"])
    assert cal["target_sensitivity"] == 0.90 and cal["n_positive"] >= 40  # chosen on validation, not held-out
    m = manifest.metrics["fp32"]
    for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "roc_auc", "pr_auc", "ece"):
        lo, hi = m[f"{name}_ci95_lo"], m[f"{name}_ci95_hi"]
        assert lo <= m[name] <= hi, name
    assert m["threshold"] == pytest.approx(post.threshold)
    assert m["n"] == manifest.training["heldout"]["n"] and m["n_positive"] >= 60
    assert m["tp"] + m["fn"] == m["n_positive"] and m["tp"] / m["n_positive"] == pytest.approx(m["sensitivity"])
    assert m["sensitivity_ci95_hi"] >= 0.90  # the target is at least inside the held-out CI


def test_heldout_sensitivity_meets_the_target(manifest: Manifest) -> None:
    """Issue 14: held-out sensitivity >= 0.90 at the recorded threshold (and its recorded specificity).

    The threshold is chosen on validation only, as the highest whose one-sided 95 % Clopper-Pearson lower
    bound of the validation sensitivity reaches 0.90 (86 of the 90 validation positives called).
    """
    post, cal = manifest.postprocessing, manifest.training["calibration"]
    assert post.target_sensitivity == 0.90 and post.target_confidence == 0.95
    assert cal["method"] == "clopper-pearson" and cal["target_met"] and cal["sensitivity_lower_bound"] >= 0.90
    m = manifest.metrics["fp32"]
    assert m["sensitivity"] >= 0.90  # held-out sensitivity at the recorded threshold
    assert m["specificity"] == pytest.approx(m["tn"] / (m["tn"] + m["fp"]))


@pytest.mark.parametrize("record", ["quantization", "quantization_tensorrt"])
def test_int8_artifacts_are_within_the_gate(manifest: Manifest, record: str) -> None:
    gate = manifest.training[record]["gate"]
    assert gate["metric"] == "roc_auc" and gate["max_drop"] == 0.01
    sens = gate["also"]["sensitivity"]
    assert sens["max_drop"] == 0.02
    for g in (gate, sens):
        assert g["drop"] <= g["max_drop"]
        if "reference" in g:  # the CPU artifact: the Q/DQ reference too, and the two agree
            assert g["reference_drop"] <= g["max_drop"] and g["divergence"] <= g["max_drop"]
    key = "int8" if record == "quantization" else "int8-tensorrt"
    fp32, int8 = manifest.metrics["fp32"], manifest.metrics[key]
    assert fp32["roc_auc"] - int8["roc_auc"] <= 0.01
    assert fp32["sensitivity"] - int8["sensitivity"] <= 0.02


def _positive_heldout_cases(n: int, shape: tuple[int, int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first ``n`` positive cases (with at least one nodule) of the held-out seed, and their boxes."""
    from trainer.classification_data import make_classification_xray, positive_schedule
    from trainer.data import sample_rng
    from trainer.evaluate import HELDOUT_SEED

    images, boxes = [], []
    for i in range(20 * n):  # bounded: 15 % of indices are positive
        if len(images) == n:
            break
        if positive_schedule(i):
            img, b = make_classification_xray(sample_rng(HELDOUT_SEED, i), True, shape)
            if len(b):
                images.append(img)
                boxes.append(b)
    return images, boxes


def test_hottest_cam_cell_falls_on_or_next_to_a_nodule(manifest: Manifest) -> None:
    """On positive held-out cases the raw ``cam`` output's argmax, mapped to input pixels, is on a nodule.

    "On or next to": the centre of the hottest cell lies inside a nodule's
    box (model-input pixels) grown by one CAM cell on every side.
    """
    pytest.importorskip("onnxruntime")
    from trainer.classification_data import classification_set_from_arrays
    from trainer.evaluate import onnx_runner

    shape = tuple(int(v) for v in manifest.training["source_shape"])
    images, boxes = _positive_heldout_cases(CAM_CASES, (shape[0], shape[1]))
    ds = classification_set_from_arrays(images, [1] * len(images), manifest.input, manifest.preprocessing,
                                        boxes=boxes, keep_source=False)
    run = onnx_runner(manifest.artifact_path("fp32"), threads=2)
    cams = np.concatenate([np.asarray(run(ds.inputs[i : i + 16])["cam"])[:, 0] for i in range(0, len(ds), 16)])
    h_in, w_in = ds.inputs.shape[-2:]
    assert cams.shape[1:] == (h_in // 16, w_in // 16)  # stride 16
    cell_y, cell_x = h_in / cams.shape[1], w_in / cams.shape[2]
    hits = 0
    for cam, b in zip(cams, ds.input_boxes):
        cy, cx = np.unravel_index(int(np.argmax(cam)), cam.shape)
        py, px = (cy + 0.5) * cell_y, (cx + 0.5) * cell_x
        near = ((b[:, 0] - cell_x <= px) & (px <= b[:, 2] + cell_x)
                & (b[:, 1] - cell_y <= py) & (py <= b[:, 3] + cell_y))
        hits += bool(near.any())
    assert len(ds) == CAM_CASES
    assert hits / len(ds) >= MIN_CAM_HIT_FRACTION, f"CAM peak on a nodule in {hits} of {len(ds)} positive cases"


# ------------------------------------------------------------- the classifier's gate

def test_gate_refuses_a_sensitivity_drop_even_when_auc_holds(tmp_path: Path) -> None:
    from trainer.int8_gate import GateRefused, gate_result, gated_metrics, refusal_message

    metric, max_drop, also = gated_metrics("classification")
    assert (metric, max_drop, also) == ("roc_auc", 0.01, {"sensitivity": 0.02})
    fp32 = {"roc_auc": 0.99, "sensitivity": 0.95}
    ok = gate_result(metric, max_drop, fp32, {"roc_auc": 0.985, "sensitivity": 0.94}, also=also)
    assert ok.passed and ok.also[0].drop == pytest.approx(0.01)
    bad = gate_result(metric, max_drop, fp32, {"roc_auc": 0.99, "sensitivity": 0.9}, also=also)
    assert not bad.passed and bad.own_passed  # AUC unchanged: the sensitivity alone refuses it
    assert refusal_message(bad, tmp_path / "m.onnx").startswith("INT8 sensitivity 0.9000 is 0.0500 below")
    # A served score far from the Q/DQ reference refuses too, on the second metric as on the first.
    split = gate_result(metric, max_drop, fp32, {"roc_auc": 0.99, "sensitivity": 0.95},
                        reference={"roc_auc": 0.99, "sensitivity": 0.90}, also=also)
    assert not split.passed and "Q/DQ reference" in refusal_message(split, tmp_path / "m.onnx")
    assert issubclass(GateRefused, Exception)


def test_float_output_nodes_walk_back_to_the_cam_conv() -> None:
    """The nodes excluded from quantization: from ``cam`` back to (and with) its Conv, nothing else."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from trainer.quantize import float_output_nodes

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["f"], name="stem"),
        helper.make_node("Relu", ["f"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w1"], ["c"], name="cam_conv"),
        helper.make_node("Identity", ["c"], ["cam"], name="cam_id"),
        helper.make_node("ReduceMean", ["r"], ["logits"], name="pool"),
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "cam", "logits")]
    model = helper.make_model(helper.make_graph(nodes, "g", [vi[0]], vi[1:]))
    assert float_output_nodes(model) == ["cam_id", "cam_conv"]
    assert float_output_nodes(model, outputs=("heatmap",)) == []  # a detector has no cam: nothing excluded


def test_cam_nodes_stay_in_float_in_both_int8_artifacts(manifest: Manifest) -> None:
    """The ``cam`` output comes from a float Conv on float weights (no QuantizeLinear after it)."""
    onnx = pytest.importorskip("onnx")
    for key in ("int8", "int8-tensorrt"):
        g = onnx.load(str(manifest.artifact_path(key))).graph
        producer = {o: n for n in g.node for o in n.output}
        node = producer["cam"]
        assert node.op_type == "Conv", key
        weight = node.input[1]
        assert weight not in producer or producer[weight].op_type != "DequantizeLinear", key
        assert producer["logits"].op_type in ("DequantizeLinear", "Gemm")  # the logit path is quantized
