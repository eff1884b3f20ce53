"""Classification in the trainer: data, model, losses and sampling, training, calibration, export, evaluation.

Runs are tiny (64 x 64 inputs from 128 x 128 synthetic radiographs, base 4, a few
steps) and use one torch thread: on a loaded 2-core machine two threads spin
against each other and a step takes ten times as long.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.trainer.conftest import tiny_config  # noqa: E402
from trainer.classification import (  # noqa: E402
    class_weights,
    classification_loss,
    epoch_order,
)
from trainer.classification_data import (  # noqa: E402
    classification_items,
    load_classification_folder,
    positive_schedule,
    synthetic_classification_set,
)
from trainer.data import make_xray, sample_rng, split_items  # noqa: E402
from trainer.models import Classifier, transfer_encoder  # noqa: E402
from trainer.train import load_checkpoint, train  # noqa: E402

from edge.errors import ConfigError, DataError, ModelError  # noqa: E402
from edge.inference.manifest import InputSpec, Manifest, default_engines_dir  # noqa: E402

SIZE = (64, 64)
SHAPE = (128, 128)


def cls_config(out: Path, cache_dir: str, **kw):
    """A classification TrainConfig that trains in a few seconds."""
    base = dict(n_train=24, n_val=20, synthetic_shape=SHAPE, positive_fraction=0.3, threads=1, amp="off")
    base.update(kw)
    return tiny_config("classification", out, cache_dir, **base)


@pytest.fixture(scope="module")
def cls_checkpoint(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    """best.pt of a tiny classification run."""
    run = cls_config(tmp_path_factory.mktemp("cls-run"), cache_dir, epochs=2, loss="weighted", sampler="random")
    return train(run).best_checkpoint


# ------------------------------------------------------------------ data
def test_positive_schedule_is_exact_in_every_prefix() -> None:
    flags = [positive_schedule(i, 0.15) for i in range(1000)]
    for n in (7, 20, 64, 200, 1000):
        assert sum(flags[:n]) == int(n * 0.15 + 1e-9)
    with pytest.raises(DataError):
        positive_schedule(0, 1.0)


def test_nodule_count_parameter_keeps_the_default_stream() -> None:
    for i in range(3):
        img, boxes = make_xray(sample_rng(0, i), SHAPE)
        forced, forced_boxes = make_xray(sample_rng(0, i), SHAPE, nodules=len(boxes))
        np.testing.assert_array_equal(img, forced)
        np.testing.assert_array_equal(boxes, forced_boxes)
    _, none = make_xray(sample_rng(0, 2), SHAPE, nodules=0)
    assert none.shape == (0, 4)
    with pytest.raises(DataError):
        make_xray(sample_rng(0, 0), SHAPE, nodules=99)


def test_synthetic_set_labels_boxes_size_independence_and_cache(tmp_path: Path) -> None:
    spec = InputSpec(size=SIZE)
    ds = synthetic_classification_set(20, 3, spec, cache_dir=tmp_path, shape=SHAPE, positive_fraction=0.3)
    assert ds.labels.tolist() == [int(positive_schedule(i, 0.3)) for i in range(20)]
    assert all((len(b) > 0) == bool(y) for b, y in zip(ds.boxes, ds.labels))
    assert all(len(ib) == len(b) for ib, b in zip(ds.input_boxes, ds.boxes))
    assert ds.inputs.shape == (20, 1, *SIZE) and ds.n_positive == 6
    again = synthetic_classification_set(20, 3, spec, cache_dir=tmp_path, shape=SHAPE, positive_fraction=0.3)
    np.testing.assert_array_equal(ds.inputs, again.inputs)
    assert [b.tolist() for b in again.boxes] == [b.tolist() for b in ds.boxes]
    prefix = synthetic_classification_set(7, 3, spec, shape=SHAPE, positive_fraction=0.3)
    np.testing.assert_array_equal(prefix.inputs, ds.inputs[:7])


def _write_pngs(root: Path, names: dict[str, int]) -> None:
    from PIL import Image

    for i, (name, label_index) in enumerate(names.items()):
        img, _ = make_xray(sample_rng(60, i), SHAPE, nodules=label_index)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img >> 4).astype(np.uint8)).save(path)


def test_class_folders_and_csv_load_the_same_set(tmp_path: Path) -> None:
    root = tmp_path / "folders"
    _write_pngs(root, {"absent/a.png": 0, "absent/b.png": 0, "present/c.png": 1})
    ds = load_classification_folder(root, InputSpec(size=SIZE), positive_label="present")
    assert ds.items == ["absent/a.png", "absent/b.png", "present/c.png"] and ds.labels.tolist() == [0, 0, 1]
    assert classification_items(root) == ds.items
    csv_path = root / "labels.csv"
    csv_path.write_text("path,label\npresent/c.png,present\nabsent/a.png,absent\n\nabsent/b.png,absent\n")
    by_csv = load_classification_folder(csv_path, InputSpec(size=SIZE), positive_label="present")
    assert by_csv.labels.tolist() == [1, 0, 0]
    np.testing.assert_array_equal(by_csv.inputs[0], ds.inputs[2])
    keep, held = split_items(classification_items(root), 0.34, seed=0)
    part = load_classification_folder(root, InputSpec(size=SIZE), positive_label="present", items=keep)
    assert part.items == keep and len(held) == 1


@pytest.mark.parametrize("case", ["three-classes", "no-positive", "bad-csv", "missing-item"])
def test_user_data_errors_are_clear(tmp_path: Path, case: str) -> None:
    root = tmp_path / "d"
    _write_pngs(root, {"a/1.png": 0, "b/2.png": 1, **({"c/3.png": 0} if case == "three-classes" else {})})
    spec = InputSpec(size=SIZE)
    if case == "bad-csv":
        (tmp_path / "l.csv").write_text("d/a/1.png,a,extra\n")
        with pytest.raises(DataError, match="Line 1"):
            load_classification_folder(tmp_path / "l.csv", spec, positive_label="a")
    elif case == "missing-item":
        with pytest.raises(DataError, match="no longer"):
            load_classification_folder(root, spec, positive_label="b", items=["b/gone.png"])
    else:
        with pytest.raises(DataError, match="3 classes" if case == "three-classes" else "positive label"):
            load_classification_folder(root, spec, positive_label="nodule")


# ----------------------------------------------------------------- model
def test_cam_averages_to_the_logits_and_encoder_transfers(det_checkpoint: Path, seg_checkpoint: Path) -> None:
    m = Classifier(base=4).eval()
    m.emit_cam = True
    with torch.no_grad():
        logits, cam = m(torch.rand(3, 1, *SIZE))
    assert logits.shape == (3, 1) and cam.shape == (3, 1, SIZE[0] // 16, SIZE[1] // 16)
    torch.testing.assert_close(cam.mean(dim=(2, 3)), logits)
    for ckpt in (det_checkpoint, seg_checkpoint):
        src = load_checkpoint(ckpt)["state_dict"]
        fresh = Classifier(base=4)
        taken = transfer_encoder(fresh, src)
        assert len(taken) == 48 and all(k.startswith("encoder.") and ".shortcut." not in k for k in taken)
        assert all(torch.equal(fresh.state_dict()[k], src[k]) for k in taken)


# ------------------------------------------------------- losses, sampling
def test_losses_and_class_weights() -> None:
    y = torch.tensor([0.0, 0.0, 0.0, 1.0])
    z = torch.tensor([[-2.0], [0.5], [-1.0], [1.0]])
    w = torch.tensor(class_weights(y.numpy().astype(int)), dtype=torch.float32)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 2.0]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], y, reduction="none")
    torch.testing.assert_close(classification_loss(z, y, "ce"), bce.mean())
    wts = torch.where(y > 0, w[1], w[0])
    torch.testing.assert_close(classification_loss(z, y, "weighted", w), (wts * bce).sum() / wts.sum())
    # Focal loss down-weights the confident, correct cases more than the hard ones.
    def ratio(logit: float) -> float:
        zz, yy = torch.tensor([[logit]]), torch.tensor([0.0])
        return float(classification_loss(zz, yy, "focal") / classification_loss(zz, yy, "ce"))

    assert ratio(-4.0) < 1e-3 < 0.1 < ratio(0.5) < 1.0
    with pytest.raises(ConfigError):
        classification_loss(z, y, "weighted")


def test_balanced_sampler_is_seeded_and_balanced() -> None:
    labels = np.array([1] * 10 + [0] * 90)
    a = epoch_order(labels, 4000, "balanced", seed=3, epoch=1)
    np.testing.assert_array_equal(a, epoch_order(labels, 4000, "balanced", seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(labels, 4000, "balanced", seed=3, epoch=2))
    assert 0.45 < labels[a].mean() < 0.55
    r = epoch_order(labels, 150, "random", seed=3, epoch=1)
    np.testing.assert_array_equal(r, np.resize(np.random.default_rng([3, 1]).permutation(100), 150))


# -------------------------------------------------------------- training
def test_run_records_loss_sampler_and_calibration(cls_checkpoint: Path, tmp_path: Path, cache_dir: str) -> None:
    default_run = train(cls_config(tmp_path, cache_dir, n_train=12, n_val=10)).last_checkpoint
    ck = load_checkpoint(cls_checkpoint)
    assert ck["task"] == "classification" and ck["labels"] == ["nodule"]
    rec = ck["training"]
    assert rec["loss"] == "weighted" and rec["sampler"] == "random" and rec["data"] == "synthetic-xray-cls"
    assert rec["class_counts"] == {"negative": 17, "positive": 7} and len(rec["class_weights"]) == 2
    defaults = load_checkpoint(default_run)["training"]
    assert (defaults["loss"], defaults["sampler"]) == ("ce", "balanced") and "class_weights" not in defaults
    cal = rec["calibration"]
    post = ck["postprocessing"]
    assert post["temperature"] == cal["temperature"] > 0 and post["threshold"] == cal["threshold"]
    assert post["target_sensitivity"] == 0.9 and cal["sensitivity"] >= 0.9 and cal["n_positive"] == 6
    assert load_checkpoint(cls_checkpoint.parent / "last.pt")["postprocessing"]["temperature"] > 0
    # The default rule: a 95 % lower bound of the validation sensitivity; 6 positives cannot carry 0.90
    # (6 of 6 bounds it at 0.05 ** (1 / 6) = 0.607), so the threshold calls every validation positive.
    assert post["target_confidence"] == cal["target_confidence"] == 0.95 == rec["threshold_confidence"]
    assert cal["method"] == "clopper-pearson" and cal["sensitivity"] == 1.0 and cal["target_met"] is False
    assert cal["sensitivity_lower_bound"] == pytest.approx(0.05 ** (1 / 6))


def test_threshold_confidence_zero_is_the_point_rule(tmp_path: Path, cache_dir: str) -> None:
    from trainer.cli_train import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--task", "classification", "--out", str(tmp_path), "--threshold-confidence", "0"])
    assert args.threshold_confidence == 0.0
    assert parser.parse_args(["--task", "classification", "--out", "x"]).threshold_confidence == 0.95
    ck = load_checkpoint(train(cls_config(tmp_path, cache_dir, n_train=12, n_val=10,
                                          threshold_confidence=args.threshold_confidence)).last_checkpoint)
    cal, post = ck["training"]["calibration"], ck["postprocessing"]
    assert cal["method"] == "point" and cal["target_confidence"] is None and post["target_confidence"] is None
    assert cal["sensitivity_lower_bound"] is None and cal["target_met"] is True
    assert ck["training"]["threshold_confidence"] is None and ck["config"]["threshold_confidence"] == 0.0
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="confidence"):
            train(cls_config(tmp_path / "bad", cache_dir, threshold_confidence=bad))


def test_classification_settings_are_checked(tmp_path: Path, cache_dir: str) -> None:
    with pytest.raises(ConfigError, match="classification setting"):
        train(tiny_config("segmentation", tmp_path, cache_dir, loss="focal"))
    with pytest.raises(ConfigError, match="crop"):
        train(cls_config(tmp_path, cache_dir, crop=32))
    with pytest.raises(ConfigError, match="loss"):
        train(cls_config(tmp_path, cache_dir, loss="hinge"))


def test_init_from_the_detector_encoder_frozen(tmp_path: Path, cache_dir: str, det_checkpoint: Path) -> None:
    r = train(cls_config(tmp_path, cache_dir, init=str(det_checkpoint), freeze_encoder=True, sampler="balanced",
                         loss="focal"))
    ck = load_checkpoint(r.last_checkpoint)
    rec = ck["training"]
    assert rec["init_task"] == "detection" and rec["init_tensors"] == 48
    assert rec["sampler"] == "balanced" and rec["loss"] == "focal" and ck["labels"] == ["nodule"]
    src, got = load_checkpoint(det_checkpoint)["state_dict"], ck["state_dict"]
    main = [k for k in got if k.startswith("encoder.") and ".shortcut." not in k]
    assert main and all(torch.equal(src[k], got[k]) for k in main)
    assert any(not torch.equal(got[k], src.get(k, torch.zeros(0))) for k in got if ".shortcut." in k)


# -------------------------------------------------------- manifest, export
def test_manifest_checks_classification_calibration() -> None:
    det = Manifest.load(default_engines_dir() / "xray-nodule-det")
    assert set(det.to_dict()["postprocessing"]) == {"threshold", "nms_iou", "max_detections", "stride"}
    d = det.to_dict()
    d.update(task="classification", outputs=["logits", "cam"])
    with pytest.raises(ModelError, match="temperature"):
        Manifest.from_dict(d)
    d["postprocessing"] = {**d["postprocessing"], "temperature": 1.5, "target_sensitivity": 0.9}
    assert Manifest.from_dict(d).postprocessing.temperature == 1.5
    with pytest.raises(ModelError, match="outputs"):
        Manifest.from_dict({**d, "outputs": ["heatmap"]})
    with pytest.raises(ModelError, match="for classification"):
        Manifest.from_dict({**d, "task": "detection", "outputs": ["heatmap", "size", "offset"]})


def test_manifest_target_confidence_is_optional_and_checked() -> None:
    det = Manifest.load(default_engines_dir() / "xray-nodule-det").to_dict()
    post = {"threshold": 0.06, "temperature": 0.5, "target_sensitivity": 0.9}
    d = {**det, "task": "classification", "outputs": ["logits", "cam"], "postprocessing": post}
    old = Manifest.from_dict(d)  # a manifest from before the key: the point rule
    assert old.postprocessing.target_confidence is None and "target_confidence" not in old.to_dict()["postprocessing"]
    new = Manifest.from_dict({**d, "postprocessing": {**post, "target_confidence": 0.95}})
    assert new.postprocessing.target_confidence == 0.95
    assert Manifest.from_dict(new.to_dict()) == new  # round trip
    # Only a detector carries the NMS fields: a classifier's (and a segmenter's) JSON leaves them out.
    assert set(new.to_dict()["postprocessing"]) == {"threshold", "temperature", "target_sensitivity",
                                                     "target_confidence"}
    seg = Manifest.load(default_engines_dir() / "us-lesion-seg")
    assert set(seg.to_dict()["postprocessing"]) == {"threshold"}
    for bad in (1.0, 0.0, -0.5, "0.95", True):
        with pytest.raises(ModelError, match="target_confidence"):
            Manifest.from_dict({**d, "postprocessing": {**post, "target_confidence": bad}})
    with pytest.raises(ModelError, match="for classification"):
        Manifest.from_dict({**det, "postprocessing": {**det["postprocessing"], "target_confidence": 0.95}})


def test_export_then_evaluate(tmp_path: Path, cls_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from edge.cli import main
    from trainer.export import export_checkpoint

    man = export_checkpoint(cls_checkpoint, tmp_path / "eng", "xray-nodule-cls", heldout_n=40)
    ck = load_checkpoint(cls_checkpoint)
    assert man.task == "classification" and man.outputs == ("logits", "cam") and man.labels == ("nodule",)
    assert {"fp32", "fp16"} <= set(man.artifacts)
    assert man.postprocessing.temperature == ck["postprocessing"]["temperature"]
    assert man.postprocessing.threshold == ck["postprocessing"]["threshold"]
    assert man.postprocessing.target_sensitivity == 0.9 and man.postprocessing.target_confidence == 0.95
    written = json.loads((tmp_path / "eng" / "manifest.json").read_text())["postprocessing"]
    assert set(written) == {"threshold", "temperature", "target_sensitivity", "target_confidence"}  # no NMS fields
    assert man.training["config"]["threshold_confidence"] == 0.95
    graph = onnx.load(str(man.artifact_path("fp32"))).graph
    assert [o.name for o in graph.output] == ["logits", "cam"]
    assert man.training["onnx_parity_max_abs_diff"] <= man.training["onnx_parity_tolerance"]
    m = man.metrics["fp32"]
    assert m["n"] == 40 and m["n_positive"] == 6 and m["tp"] + m["fn"] == 6
    assert "roc_auc_ci95_lo" in m and "sensitivity" in m and "cam_hit_fraction" in m
    report = man.training["classification_report"]
    assert report["n"] == 40 and set(report["confusion"]) == {"tp", "fp", "tn", "fn"}
    assert man.training["heldout"]["generator"].endswith("make_classification_xray")
    assert man.training["config"]["loss"] == "weighted"

    capsys.readouterr()
    rc = main(["evaluate", str(tmp_path / "eng"), "--precision", "all", "--json", "--report-dir", str(tmp_path / "rep")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fp32"]["tp"] == m["tp"] and out["fp32"]["roc_auc"] == pytest.approx(m["roc_auc"])
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == sorted(
        f"{prec}-{kind}.png" for prec in ("fp32", "fp16") for kind in ("roc", "pr", "reliability")
    )


def test_cam_hits_counts_peaks_on_or_next_to_a_nodule() -> None:
    from trainer.classification_data import ClassificationSet
    from trainer.evaluate import cam_hits

    ds = ClassificationSet(
        inputs=np.zeros((4, 1, 64, 64), np.float32), labels=np.array([1, 1, 1, 0]), geoms=[],
        input_boxes=[np.array([[8.0, 8.0, 20.0, 20.0]]), np.array([[40.0, 40.0, 44.0, 44.0]]),
                     np.array([[40.0, 40.0, 44.0, 44.0]]), np.zeros((0, 4))],
    )
    cams = np.zeros((4, 4, 4), np.float32)
    cams[0, 0, 0] = 1  # cell centre (8, 8): inside the box
    cams[1, 1, 1] = 1  # centre (24, 24): 16 px (one cell) from the box, on its margin
    cams[2, 0, 3] = 1  # centre (56, 8): far from it
    cams[3, 2, 2] = 1  # a negative case is not judged
    assert cam_hits(cams, ds) == {"cam_n": 3, "cam_hits": 2, "cam_hit_fraction": 2 / 3}
    assert cam_hits(cams, ds, margin_cells=0.0)["cam_hits"] == 1


def test_users_class_folders_train_split_export_and_evaluate(tmp_path: Path, cache_dir: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from edge.cli import main
    from trainer.export import export_checkpoint

    root = tmp_path / "mine"
    _write_pngs(root, {f"{'present' if i % 2 else 'absent'}/{i:02d}.png": i % 2 for i in range(12)})
    r = train(cls_config(tmp_path / "run", cache_dir, data=str(root), heldout_fraction=0.25, labels=["present"],
                         positive_fraction=0.15, synthetic_shape=None))
    ck = load_checkpoint(r.best_checkpoint)
    held = ck["training"]["heldout"]["split"]["items"]
    assert ck["labels"] == ["present"] and ck["training"]["n_train"] == 9 and len(held) == 3
    man = export_checkpoint(r.best_checkpoint, tmp_path / "eng", "mine-cls", fp16=False, intended_use="test")
    assert man.metrics["fp32"]["n"] == 3 and man.training["heldout"]["split"]["items"] == held
    assert man.postprocessing.temperature == ck["postprocessing"]["temperature"]
    capsys.readouterr()
    assert main(["evaluate", str(r.best_checkpoint), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pytorch"]["n"] == 3 and out["pytorch"]["tp"] + out["pytorch"]["fn"] == sum("present/" in h for h in held)


@pytest.mark.parametrize("confidence, expected", [("absent", 0.95), (0.0, None)])
def test_export_calibrates_an_uncalibrated_checkpoint_at_its_confidence(
        tmp_path: Path, cls_checkpoint: Path, confidence: object, expected: float | None) -> None:
    """A checkpoint without a calibration (older, or a mid-run copy) is calibrated at export, by its config's
    ``threshold_confidence`` (a config from before the setting: the default, 0.95)."""
    from trainer.export import export_checkpoint

    ck = load_checkpoint(cls_checkpoint)
    ck["postprocessing"] = {**ck["postprocessing"], "temperature": None, "target_confidence": None}
    ck["training"] = {k: v for k, v in ck["training"].items() if k != "calibration"}
    ck["config"] = {k: v for k, v in ck["config"].items() if k != "threshold_confidence"}
    if confidence != "absent":
        ck["config"]["threshold_confidence"] = confidence
    path = tmp_path / "uncalibrated.pt"
    torch.save(ck, path)
    man = export_checkpoint(path, tmp_path / "eng", "cls", fp16=False, evaluate=False)
    assert man.postprocessing.temperature is not None and man.postprocessing.target_confidence == expected
