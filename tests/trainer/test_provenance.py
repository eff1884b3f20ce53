"""Provenance: what a model was trained on, and the held-out set export/quantize/evaluate judge it on.

A model trained on a user's folder must never be scored on the synthetic
generator, and its manifest must describe that folder (path, real sizes, no
generator, an intended use to fill in). Everything here trains for one or two
steps at 64 x 64; no test asserts a score, only which data a score came from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from PIL import Image  # noqa: E402

from edge.errors import ConfigError, DataError  # noqa: E402
from edge.inference.manifest import Manifest  # noqa: E402
from tests.trainer.conftest import tiny_config  # noqa: E402
from trainer.data import folder_items, load_detection_folder, load_segmentation_folder, split_items  # noqa: E402
from trainer.export import export_checkpoint  # noqa: E402
from trainer.provenance import INTENDED_USE_FILL_IN, plan_heldout  # noqa: E402
from trainer.quantize import quantize_engine  # noqa: E402
from trainer.train import load_checkpoint, train  # noqa: E402


def _seg_folder(root: Path, n: int, seed: int) -> Path:
    """``root/images/case<i>.png`` + ``root/masks/case<i>.png``: a bright ellipse on speckle and its mask."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[0:72, 0:96]
    for i in range(n):
        cy, cx, r = rng.integers(20, 52), rng.integers(24, 72), rng.integers(8, 16)
        mask = ((yy - cy) ** 2 + ((xx - cx) * 0.8) ** 2 <= r * r).astype(np.uint8)
        img = rng.integers(0, 60, size=(72, 96)).astype(np.uint8)
        img[mask > 0] = 200
        Image.fromarray(img).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"case{i:02d}.png")
    return root


def _det_folder(root: Path, n: int) -> Path:
    (root / "images").mkdir(parents=True)
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "nodule"}]}
    for i in range(n):
        img = np.zeros((64, 64), np.uint16)
        img[10 + i : 20 + i, 12:22] = 3000
        Image.fromarray(img).save(root / "images" / f"r{i}.png")
        coco["images"].append({"id": i, "file_name": f"r{i}.png"})
        coco["annotations"].append({"image_id": i, "bbox": [12, 10 + i, 10, 10], "category_id": 1})
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def user_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user-data")
    return {
        "train": _seg_folder(root / "train", 8, seed=1),
        "heldout": _seg_folder(root / "heldout", 3, seed=2),
    }


@pytest.fixture(scope="module")
def split_checkpoint(tmp_path_factory: pytest.TempPathFactory, user_data: dict[str, Path], cache_dir: str,
                     seg_checkpoint: Path) -> Path:
    """Fine-tuned from the synthetic tiny model on the user's folder, a quarter of it held out."""
    out = tmp_path_factory.mktemp("split-run")
    cfg = tiny_config("segmentation", out, cache_dir, data=str(user_data["train"]), heldout_fraction=0.25,
                      data_seed=7, steps_per_epoch=1, init=str(seg_checkpoint))
    return train(cfg).best_checkpoint


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory: pytest.TempPathFactory, user_data: dict[str, Path], cache_dir: str) -> Path:
    """Trained on the user's folder with no held-out set recorded (the documented recipe before this fix)."""
    out = tmp_path_factory.mktemp("plain-run")
    cfg = tiny_config("segmentation", out, cache_dir, data=str(user_data["train"]), steps_per_epoch=1)
    return train(cfg).best_checkpoint


# ----------------------------------------------------------------- splits
def test_split_items_is_seeded_disjoint_and_complete() -> None:
    names = [f"img{i:03d}.png" for i in range(40)]
    keep, held = split_items(list(reversed(names)), 0.2, seed=3)
    assert (keep, held) == split_items(names, 0.2, seed=3)  # depends on the names, not their order
    assert len(held) == 8 and not set(keep) & set(held) and sorted(keep + held) == names
    assert split_items(names, 0.2, seed=4)[1] != held
    assert len(split_items(names[:3], 0.01, seed=0)[1]) == 1  # at least one held out
    with pytest.raises(DataError, match="leaves nothing to train on"):
        split_items(names[:1], 0.5, seed=0)
    with pytest.raises(DataError, match="not between 0 and 1"):
        split_items(names, 1.0, seed=0)


def test_folder_loaders_take_one_side_of_a_split(tmp_path: Path) -> None:
    seg = _seg_folder(tmp_path / "seg", 4, seed=0)
    det = _det_folder(tmp_path / "det", 5)
    assert folder_items(seg, "segmentation") == [f"case{i:02d}.png" for i in range(4)]
    assert folder_items(det, "detection") == [f"r{i}.png" for i in range(5)]
    assert len(load_segmentation_folder(seg, items=["case01.png", "case03.png"])) == 2
    ds, _ = load_detection_folder(det, items=["r4.png"])
    assert len(ds) == 1 and ds.boxes[0].tolist() == [[12.0, 14.0, 22.0, 24.0]]
    with pytest.raises(DataError, match="no longer in it"):
        load_segmentation_folder(seg, items=["case01.png", "gone.png"])


def test_train_config_refuses_heldout_that_touches_training(tmp_path: Path, user_data: dict[str, Path],
                                                            cache_dir: str) -> None:
    data = str(user_data["train"])
    for kw, match in (
        ({"heldout_data": data}, "is also data"),
        ({"heldout_fraction": 0.2, "heldout_data": str(user_data["heldout"])}, "not both"),
        ({"heldout_fraction": 1.0}, "not in"),
    ):
        with pytest.raises(ConfigError, match=match):
            tiny_config("segmentation", tmp_path, cache_dir, data=data, **kw).validate()
    with pytest.raises(ConfigError, match="synthetic data has its own"):
        tiny_config("segmentation", tmp_path, cache_dir, heldout_fraction=0.2).validate()


# ------------------------------------------------------------ checkpoints
def test_synthetic_checkpoint_records_generator_and_heldout_seed(seg_checkpoint: Path) -> None:
    rec = load_checkpoint(seg_checkpoint)["training"]
    assert rec["source"] == "synthetic" and rec["data"] == "synthetic-us"
    assert rec["generator"] == "trainer.data.make_ultrasound" and rec["n_train"] == 12
    assert rec["heldout"] == {"data": "synthetic", "generator": "trainer.data.make_ultrasound", "seed": 1000}


def test_user_checkpoint_records_its_folder_split_and_starting_weights(
    split_checkpoint: Path, user_data: dict[str, Path], seg_checkpoint: Path
) -> None:
    rec = load_checkpoint(split_checkpoint)["training"]
    assert rec["source"] == "user-data" and rec["data"] == os.path.abspath(user_data["train"])
    assert "generator" not in rec and "data_seed" not in rec
    split = rec["heldout"]["split"]
    assert rec["heldout"]["data"] == rec["data"] and split["fraction"] == 0.25 and split["seed"] == 7
    assert len(split["items"]) == 2 and rec["n_train"] == 6  # 8 images, 2 set aside: counted, not configured
    assert split["items"] == split_items(folder_items(user_data["train"], "segmentation"), 0.25, 7)[1]
    assert rec["init_data"]["source"] == "synthetic" and rec["init_data"]["generator"] == "trainer.data.make_ultrasound"
    assert rec["init_sha256"] and rec["init"] == str(seg_checkpoint)


# ----------------------------------------------------------------- export
def test_export_evaluates_on_the_recorded_split_and_describes_the_users_data(
    tmp_path: Path, split_checkpoint: Path, user_data: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eng"
    man = export_checkpoint(split_checkpoint, out, "my-seg", fp16=False)
    tr = man.training
    held = tr["heldout"]
    assert held["data"] == os.path.abspath(user_data["train"]) and held["n"] == 2 and held["origin"] == "recorded"
    assert held["split"]["items"] == load_checkpoint(split_checkpoint)["training"]["heldout"]["split"]["items"]
    assert man.metrics["fp32"]["n"] == 2  # the two held-out images, not 200 synthetic frames
    assert tr["source"] == "user-data" and "generator" not in tr and tr["n_train"] == 6
    assert not {"n_train", "n_val", "data_seed", "val_seed"} & set(tr["config"])
    assert man.intended_use == INTENDED_USE_FILL_IN and "synthetic" not in man.intended_use

    # medge evaluate follows the same record by default
    from edge.cli import main as medge

    assert medge(["evaluate", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fp32"]["n"] == 2 and res["fp32"]["dice"] == pytest.approx(man.metrics["fp32"]["dice"])


def test_export_of_user_data_without_heldout_is_refused_before_writing(
    tmp_path: Path, plain_checkpoint: Path, user_data: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from edge.cli import main as medge

    out = tmp_path / "eng"
    with pytest.raises(DataError, match="--heldout-data") as exc:
        export_checkpoint(plain_checkpoint, out, "my-seg", fp16=False)
    assert os.path.abspath(user_data["train"]) in str(exc.value)
    assert not out.exists()
    assert medge(["export", str(plain_checkpoint), "--out", str(out), "--name", "my-seg"]) != 0
    assert "records no held-out set" in capsys.readouterr().err and not out.exists()
    with pytest.raises(DataError, match="never saw"):
        export_checkpoint(plain_checkpoint, out, "my-seg", fp16=False, heldout_data=str(user_data["train"]))
    assert not out.exists()

    assert medge(["export", str(plain_checkpoint), "--out", str(out), "--name", "my-seg", "--no-fp16",
                  "--heldout-data", str(user_data["heldout"]), "--intended-use", "Lesion outlines on probe X."]) == 0
    man = Manifest.load(out)
    assert man.training["heldout"] == {"data": os.path.abspath(user_data["heldout"]), "origin": "--heldout-data", "n": 3}
    assert man.metrics["fp32"]["n"] == 3 and man.intended_use == "Lesion outlines on probe X."
    assert man.training["validated_on"] == "the training set" and man.training["n_train"] == 8


# --------------------------------------------------------------- quantize
def test_quantize_refuses_without_heldout_then_records_the_one_given(
    tmp_path: Path, plain_checkpoint: Path, user_data: dict[str, Path]
) -> None:
    out = tmp_path / "eng"
    man = export_checkpoint(plain_checkpoint, out, "my-seg", fp16=False, evaluate=False)
    assert man.training["heldout"] is None and not man.metrics
    before = _tree(out)
    with pytest.raises(DataError, match="records no held-out set"):
        quantize_engine(out, calib_n=2, max_drop=1.0)
    assert _tree(out) == before  # refused before anything was written

    r = quantize_engine(out, calib_n=64, max_drop=1.0, heldout_data=str(user_data["heldout"]))
    assert r.passed
    man = Manifest.load(out)
    q = man.training["quantization"]
    assert q["heldout"]["data"] == os.path.abspath(user_data["heldout"]) and q["heldout"]["n"] == 3
    assert q["calibration"]["source"] == os.path.abspath(user_data["train"]) and q["calibration"]["n"] == 8
    assert man.training["heldout"]["data"] == os.path.abspath(user_data["heldout"])
    assert man.metrics["int8"]["n"] == 3 and man.metrics["fp32"]["n"] == 3


def test_quantize_of_a_split_model_gates_on_the_split_and_calibrates_on_the_rest(
    tmp_path: Path, split_checkpoint: Path
) -> None:
    out = tmp_path / "eng"
    export_checkpoint(split_checkpoint, out, "my-seg", fp16=False)
    quantize_engine(out, calib_n=64, max_drop=1.0)
    q = Manifest.load(out).training["quantization"]
    assert q["heldout"]["n"] == 2 and q["heldout"]["split"]["fraction"] == 0.25
    assert q["calibration"]["n"] == 6  # the 8 images less the 2 held out


def test_an_old_user_manifest_that_claims_a_synthetic_heldout_is_not_believed() -> None:
    old = {"data": "/srv/data/us", "generator": "trainer.data.make_ultrasound",
           "heldout": {"data": "synthetic", "seed": 1000, "n": 200}}
    with pytest.raises(DataError, match="records no held-out set"):
        plan_heldout(old, "segmentation", None, None)
    plan = plan_heldout(old, "segmentation", "/srv/data/us-test", None)
    assert plan.data == "/srv/data/us-test" and not plan.synthetic
    bundled = {"data": "synthetic-us", "heldout": {"data": "synthetic", "seed": 1000, "n": 200}}
    plan = plan_heldout(bundled, "segmentation", None, None)
    assert (plan.data, plan.seed, plan.n) == ("synthetic", 1000, 200)
    assert plan_heldout(bundled, "segmentation", None, 16).n == 16
