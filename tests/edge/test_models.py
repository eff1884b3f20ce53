"""Model registry: manifests, sha256 refusal, precision choice, pre/post-processing, warm-up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge.config import load_config
from edge.errors import BackendUnavailableError, ModelError
from edge.inference.manifest import default_engines_dir, discover
from edge.inference.model import LoadedModel, ModelRegistry, load_model

BUNDLED = ("us-lesion-seg", "xray-nodule-det", "xray-nodule-cls")


def _bright_rect(shape: tuple[int, int], dtype: str, rect: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """Dark noisy background, one bright rectangle (y0, x0, y1, x1)."""
    rng = np.random.default_rng(seed)
    hi = 200 if dtype == "uint8" else 3000
    img = rng.integers(0, hi // 10, size=shape).astype(dtype)
    y0, x0, y1, x1 = rect
    img[y0:y1, x0:x1] = hi
    return img


def _iou(mask: np.ndarray, rect: tuple[int, int, int, int]) -> float:
    ref = np.zeros(mask.shape, bool)
    y0, x0, y1, x1 = rect
    ref[y0:y1, x0:x1] = True
    m = mask.astype(bool)
    return float((m & ref).sum() / (m | ref).sum())


def test_segmentation_mask_at_input_size_and_correct(fixture_engines: Path) -> None:
    with load_model("tiny-seg", engines_dir=fixture_engines, warmup_iterations=1) as model:
        assert model.warm and model.task == "segmentation" and model.precision == "fp32"
        cases = [((480, 640), "uint8", (100, 200, 300, 450)), ((512, 512), "uint16", (50, 60, 400, 300))]
        images = [_bright_rect(s, d, r, seed=i) for i, (s, d, r) in enumerate(cases)]
        results = model.run(images)
    assert [r.status for r in results] == ["ok", "ok"]
    for res, (shape, _, rect) in zip(results, cases):
        assert res.mask is not None and res.mask.shape == shape and res.mask.dtype == np.uint8
        assert _iou(res.mask, rect) > 0.9
        assert set(res.timing_us) == {"preprocess", "infer", "postprocess", "total"}
        assert res.model == "tiny-seg" and res.model_version == "1"


def test_detection_boxes_in_input_coordinates(fixture_engines: Path) -> None:
    with load_model("tiny-det", engines_dir=fixture_engines) as model:
        img = _bright_rect((400, 400), "uint8", (180, 180, 220, 220))
        [res] = model.run([img])
    assert res.status == "ok" and res.mask is None and res.boxes
    best = res.boxes[0]
    cx, cy = (best.x0 + best.x1) / 2, (best.y0 + best.y1) / 2
    # the fixture's boxes are 16 model pixels wide = 100 source pixels, centred on the bright
    # square to within one heatmap cell (4 model pixels = 25 source pixels; its offsets are 0)
    assert abs(cx - 200) <= 25 and abs(cy - 200) <= 25
    assert 80 < best.x1 - best.x0 < 120
    assert best.label == "nodule" and 0.5 <= best.score <= 1.0


def test_rgb_and_float_inputs_and_a_bad_image_in_a_batch(fixture_engines: Path) -> None:
    with load_model("tiny-seg", engines_dir=fixture_engines, max_batch=2) as model:
        rgb = np.zeros((100, 120, 3), np.uint8)
        rgb[20:60, 30:90] = 255
        flt = np.zeros((64, 64), np.float32)
        flt[:32] = 1.0
        bad = np.zeros((10, 10, 2), np.uint8)
        results = model.run([rgb, bad, flt])
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert results[1].error_code == "bad_shape"
    assert results[0].mask.shape == (100, 120) and _iou(results[0].mask, (20, 30, 60, 90)) > 0.9
    assert results[2].mask[:32].all() and not results[2].mask[32:].any()


def test_sha256_mismatch_is_refused(engines_copy: Path) -> None:
    with open(engines_copy / "tiny-seg" / "model.onnx", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ModelError, match="sha256"):
        load_model("tiny-seg", engines_dir=engines_copy)


def test_precision_selection(engines_copy: Path) -> None:
    with load_model("tiny-seg", engines_dir=engines_copy, precision="auto") as m:
        assert m.precision == "int8"
        assert m.backend.path.name == "model.int8.onnx"  # type: ignore[attr-defined]
    with pytest.raises(ModelError, match="no 'fp16' artifact"):
        load_model("tiny-seg", engines_dir=engines_copy, precision="fp16")
    manifest = json.loads((engines_copy / "tiny-seg" / "manifest.json").read_text())
    del manifest["artifacts"]["int8"]
    (engines_copy / "tiny-seg" / "manifest.json").write_text(json.dumps(manifest))
    with load_model("tiny-seg", engines_dir=engines_copy, precision="auto") as m:
        assert m.precision == "fp32"
    with pytest.raises(ModelError, match="no 'int8' artifact"):
        load_model("tiny-seg", engines_dir=engines_copy, precision="int8")


def test_unavailable_backends_are_errors_not_silent_fallbacks(fixture_engines: Path) -> None:
    from edge.inference.backends.onnxruntime import available_providers
    from edge.inference.backends.tensorrt import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT is usable here; the refusal path cannot be shown")
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        load_model("tiny-seg", engines_dir=fixture_engines, backend="tensorrt")
    if "CUDAExecutionProvider" not in available_providers():
        with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
            load_model("tiny-seg", engines_dir=fixture_engines, provider="cuda")
    # auto may fall back, and says why
    with load_model("tiny-seg", engines_dir=fixture_engines, backend="auto", provider="cuda") as m:
        assert m.backend_label == "onnxruntime" and "tensorrt unavailable" in m.fallback


def test_unknown_model_and_threshold_override(fixture_engines: Path) -> None:
    with pytest.raises(ModelError, match="No model 'nope'"):
        load_model("nope", engines_dir=fixture_engines)
    with load_model(fixture_engines / "tiny-det", threshold=0.99) as m:
        assert m.threshold == 0.99
        img = np.zeros((64, 64), np.uint8)
        img[20:40, 20:40] = 100  # heatmap peaks are well below 0.99 after pooling edges
        img[0, 0] = 255
        [res] = m.run([img])
        assert all(b.score >= 0.99 for b in res.boxes)


def test_registry_from_config_warms_every_model(fixture_engines: Path) -> None:
    cfg = load_config(None, env={"MEDGE_ENGINES_DIR": str(fixture_engines), "MEDGE_SCHEDULER__MAX_BATCH": "3"})
    with ModelRegistry.from_config(cfg) as reg:
        assert reg.names() == ("tiny-det", "tiny-seg") and reg.warm
        assert all(isinstance(m, LoadedModel) and m.max_batch == 3 for m in reg)
        assert "tiny-seg" in reg and len(reg) == 2


@pytest.mark.skipif(
    not all((default_engines_dir() / n / "manifest.json").is_file() for n in BUNDLED),
    reason="the bundled engines are not built yet (trainer)",
)
def test_bundled_models_load_verify_and_answer() -> None:
    found = discover()
    assert set(BUNDLED) <= set(found)
    img = _bright_rect((480, 640), "uint8", (150, 250, 250, 380))
    for name in BUNDLED:
        for precision in sorted(set(found[name].artifacts) & {"fp32", "fp16", "int8"}):
            if precision == "fp16":
                continue
            with load_model(name, precision=precision) as model:
                [res] = model.run([img])
                assert res.status == "ok"
                if model.task == "segmentation":
                    assert res.mask is not None and res.mask.shape == (480, 640)
                elif model.task == "classification":
                    assert res.classes and res.classes[0].label == "nodule" and 0.0 <= res.classes[0].score <= 1.0
                    assert res.decision == (res.classes[0].score >= model.manifest.postprocessing.threshold)
                else:
                    assert all(0 <= b.x0 <= b.x1 <= 640 and 0 <= b.y0 <= b.y1 <= 480 for b in res.boxes)


def test_vectorised_nms_matches_the_greedy_reference() -> None:
    """edge.inference.postprocess.nms (IoU matrix once) keeps exactly what one-box-at-a-time greedy NMS keeps."""
    from edge.inference.postprocess import box_iou, nms

    def reference(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
        order = np.argsort(-scores, kind="stable")
        keep: list[int] = []
        while order.size:
            i = int(order[0])
            keep.append(i)
            rest = order[1:]
            order = rest[box_iou(boxes[i], boxes[rest]) <= iou] if rest.size else rest
        return np.asarray(keep, dtype=np.intp)

    rng = np.random.default_rng(3)
    for _ in range(500):
        n = int(rng.integers(0, 40))
        xy = rng.random((n, 2)) * 100
        boxes = np.concatenate([xy, xy + rng.random((n, 2)) * 40 + 0.5], axis=1)
        scores = rng.random(n).round(2)  # ties exercise the stable order
        thr = float(rng.choice([0.0, 0.3, 0.5, 0.9]))
        np.testing.assert_array_equal(nms(boxes, scores, thr), reference(boxes, scores, thr))


def test_tensorrt_int8_needs_symmetric_activations():
    """The CPU int8 artifact (uint8 activations) is never handed to TensorRT."""
    import dataclasses

    from edge.errors import BackendUnavailableError
    from edge.inference.manifest import INT8_TENSORRT, Manifest, default_engines_dir
    from edge.inference.model import resolve_precision

    bundled = Manifest.load(default_engines_dir() / "us-lesion-seg")
    assert bundled.int8_tensorrt_ready
    assert resolve_precision("auto", bundled, "tensorrt", "cpu") == "int8"
    assert bundled.artifact_key("int8", "tensorrt") == INT8_TENSORRT
    # Without the TensorRT artifact, only the uint8-activation one is left.
    m = dataclasses.replace(bundled, artifacts={k: v for k, v in bundled.artifacts.items() if k != INT8_TENSORRT})
    assert "int8" in m.artifacts and not m.int8_tensorrt_ready
    assert resolve_precision("auto", m, "tensorrt", "cpu") == "fp16"
    assert resolve_precision("auto", m, "onnxruntime", "cpu") == "int8"
    with pytest.raises(BackendUnavailableError, match="symmetric int8"):
        resolve_precision("int8", m, "tensorrt", "cpu")
    training = dict(m.training)
    training["quantization"] = {**dict(training.get("quantization", {})), "activations": "int8 symmetric"}
    sym = dataclasses.replace(m, training=training)
    assert sym.int8_tensorrt_ready
    assert resolve_precision("auto", sym, "tensorrt", "cpu") == "int8"
    assert resolve_precision("int8", sym, "tensorrt", "cpu") == "int8"


def test_duplicate_model_names_are_an_error_naming_both_folders(
    engines_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two folders whose manifests say the same name: neither silently shadows the other."""
    import shutil

    from edge.cli import main

    shutil.copytree(engines_copy / "tiny-seg", engines_copy / "zz-seg-copy")
    first, second = str(engines_copy / "tiny-seg"), str(engines_copy / "zz-seg-copy")
    with pytest.raises(ModelError, match="'tiny-seg' is claimed by more than one") as exc:
        discover(engines_copy)
    assert first in str(exc.value) and second in str(exc.value)

    assert main(["engines", "list", "--engines-dir", str(engines_copy)]) == 1
    out = capsys.readouterr().out
    assert "DUPLICATE" in out and first in out and second in out
    assert main(["engines", "list", "--engines-dir", str(engines_copy), "--json"]) == 1
    listed = json.loads(capsys.readouterr().out)
    assert listed["duplicates"] == {"tiny-seg": [first, second]}
    assert sorted(r["directory"] for r in listed["models"] if r["name"] == "tiny-seg") == [first, second]

    assert main(["engines", "verify", "--engines-dir", str(engines_copy), "--json"]) == 1
    verified = json.loads(capsys.readouterr().out)
    assert not verified["ok"] and verified["duplicates"] == {"tiny-seg": [first, second]}
    assert {f"tiny-seg ({first})", f"tiny-seg ({second})", "tiny-det"} == set(verified["models"])
    # Verifying only the other model is unaffected by the duplicate.
    assert main(["engines", "verify", "tiny-det", "--engines-dir", str(engines_copy)]) == 0
    capsys.readouterr()


def test_registry_refuses_a_model_configured_twice(fixture_engines: Path) -> None:
    from edge.config import MedgeConfig, ModelConfig

    cfg = MedgeConfig(
        engines_dir=fixture_engines,
        models=(ModelConfig(name="tiny-seg"), ModelConfig(name="tiny-seg", path=str(fixture_engines / "tiny-seg"))),
    )
    with pytest.raises(ModelError, match="configured twice"):
        ModelRegistry.from_config(cfg, warmup=False)


@pytest.mark.parametrize("key, value", [
    ("max_detections", 0), ("max_detections", 10**6), ("max_detections", 3.0), ("max_detections", True),
    ("stride", 0), ("stride", -4), ("stride", 1.5), ("nms_iou", -0.1), ("nms_iou", 1.5), ("nms_iou", "0.5"),
])
def test_detection_manifest_bounds_the_decoder(key: str, value: object) -> None:
    """NMS is quadratic in 4 x max_detections: a manifest asking for a million boxes is refused at load."""
    from edge.inference.manifest import Manifest

    d = Manifest.load(default_engines_dir() / "xray-nodule-det").to_dict()
    assert Manifest.from_dict(d).postprocessing.max_detections == 20  # the bundled one loads
    with pytest.raises(ModelError, match=key):
        Manifest.from_dict({**d, "postprocessing": {**d["postprocessing"], key: value}})
