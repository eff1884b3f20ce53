"""A user's own training data that is wrong in ways a careless export makes.

Non-finite boxes, one image listed under two spellings (or two labels),
images too large to decode, CSVs in the wrong encoding or with Excel's byte
order mark: each is one clear :class:`~edge.errors.DataError` before any
training, never a traceback, a NaN model or a held-out set that holds
training images. A NaN loss that gets through anyway stops training, and
export refuses a model whose outputs are not finite.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from edge.errors import DataError, ModelError  # noqa: E402
from edge.inference.manifest import InputSpec  # noqa: E402
from tests.trainer.conftest import tiny_config  # noqa: E402
from trainer.classification_data import load_classification_folder  # noqa: E402
from trainer.data import MAX_IMAGE_PIXELS, folder_items, load_detection_folder, load_image, split_items  # noqa: E402

SPEC = InputSpec(size=(32, 32))
ROWS = "".join(f"img/n{i}.png,normal\n" for i in range(3)) + "".join(f"img/p{i}.png,nodule\n" for i in range(3))


def _png(path: Path, seed: int = 0, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)).save(path)


def _csv_folder(root: Path, text: str | bytes) -> Path:
    for i in range(3):
        _png(root / "img" / f"n{i}.png", i)
        _png(root / "img" / f"p{i}.png", 10 + i)
    csv_path = root / "labels.csv"
    csv_path.write_bytes(text.encode() if isinstance(text, str) else text)
    return csv_path


def _coco_folder(root: Path, bbox: object = (2, 2, 8, 8), extra_ann: object = None) -> Path:
    images, anns = [], []
    for i in range(3):
        _png(root / "images" / f"{i}.png", i)
        images.append({"id": i + 1, "file_name": f"{i}.png"})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 8, 8]})
    anns[1]["bbox"] = list(bbox) if isinstance(bbox, tuple) else bbox
    if extra_ann is not None:
        anns.append(extra_ann)
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nodule"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


# ------------------------------------------------------------- detection boxes
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_box_is_refused_naming_its_annotation(tmp_path: Path, value: float) -> None:
    root = _coco_folder(tmp_path / "d", bbox=(2, 2, value, 8))
    with pytest.raises(DataError, match=r"Annotation 1 \(counting from 0\) .* non-finite"):
        load_detection_folder(root, SPEC)


@pytest.mark.parametrize("ann", [5, "x", [1, 2]])
def test_annotation_that_is_not_an_object_is_a_data_error(tmp_path: Path, ann: object) -> None:
    root = _coco_folder(tmp_path / "d", extra_ann=ann)
    with pytest.raises(DataError, match=r"annotation 3 \(counting from 0\) is not an object"):
        load_detection_folder(root, SPEC)


def test_nan_loss_stops_training_without_a_checkpoint(tmp_path: Path, cache_dir: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.train as tt

    real = tt._step_loss
    monkeypatch.setattr(tt, "_step_loss", lambda loop, b: real(loop, b) * float("nan"))
    cfg = tiny_config("detection", tmp_path / "run", cache_dir, n_train=4, n_val=2, steps_per_epoch=1)
    with pytest.raises(DataError, match="training loss is not finite"):
        tt.train(cfg)
    assert not (tmp_path / "run" / "best.pt").exists()


def test_parity_refuses_non_finite_outputs(tmp_path: Path) -> None:
    from trainer.export import check_parity, export_onnx
    from trainer.models import CenterNet

    spec = InputSpec(size=(64, 64))
    model = CenterNet(base=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    path = export_onnx(model, tmp_path / "m.onnx", "detection", spec)
    with pytest.raises(ModelError, match="non-finite"):
        check_parity(model, path, spec)


# ------------------------------------------------------------- one file, two names
def test_csv_alias_of_one_file_is_refused(tmp_path: Path) -> None:
    csv_path = _csv_folder(tmp_path, "path,label\n" + ROWS + "./img/n0.png,normal\n")
    with pytest.raises(DataError, match=r"same image more than once \(lines 2 and 8\)"):
        load_classification_folder(csv_path, SPEC)


def test_csv_alias_with_the_other_label_is_refused(tmp_path: Path) -> None:
    csv_path = _csv_folder(tmp_path, "path,label\n" + ROWS + f"{tmp_path / 'img' / 'n0.png'},nodule\n")
    with pytest.raises(DataError, match=r"two different labels \(lines 2 and 8\)"):
        load_classification_folder(csv_path, SPEC)


def test_coco_aliases_of_one_file_cannot_straddle_a_split(tmp_path: Path) -> None:
    root = _coco_folder(tmp_path / "d")
    coco = json.loads((root / "annotations.json").read_text())
    coco["images"].append({"id": 9, "file_name": "./0.png"})
    (root / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match="same image file twice"):
        split_items(folder_items(root, "detection"), 0.5, seed=0)


def test_symlinked_class_folder_image_is_refused(tmp_path: Path) -> None:
    for i in range(2):
        _png(tmp_path / "d" / "normal" / f"{i}.png", i)
        _png(tmp_path / "d" / "nodule" / f"{i}.png", 5 + i)
    (tmp_path / "d" / "nodule" / "again.png").symlink_to(tmp_path / "d" / "normal" / "0.png")
    with pytest.raises(DataError, match="same image file twice"):
        folder_items(tmp_path / "d", "classification")


# ------------------------------------------------------------- encodings
def test_csv_with_excel_byte_order_mark_loads(tmp_path: Path) -> None:
    csv_path = _csv_folder(tmp_path, "\ufeffpath,label\n" + ROWS)
    ds = load_classification_folder(csv_path, SPEC)
    assert len(ds) == 6 and ds.n_positive == 3


def test_latin1_csv_is_a_clear_error(tmp_path: Path) -> None:
    csv_path = _csv_folder(tmp_path, ("path,label\n" + ROWS + "img/M\u00fcller.png,normal\n").encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_classification_folder(csv_path, SPEC)


# ------------------------------------------------------------- pixel limit
def _bare_png(path: Path, w: int, h: int) -> None:
    """A valid all-black 8-bit grey PNG of ``w`` x ``h`` whose pixels are never decoded here."""
    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    co = zlib.compressobj(9)
    row = b"\0" * (w + 1)
    data = b"".join(co.compress(row) for _ in range(min(h, 4))) + co.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [4097, 20000])
def test_oversized_png_is_refused_stating_the_limit(tmp_path: Path, side: int) -> None:
    _bare_png(tmp_path / "big.png", side, side)
    with pytest.raises(DataError, match=f"more than the {MAX_IMAGE_PIXELS} pixels"):
        load_image(tmp_path / "big.png")


# ------------------------------------------------------------- which file, without its name
PATIENT = "DOE_JANE_MRN477"


def test_csv_image_error_gives_the_line_not_the_name(tmp_path: Path) -> None:
    csv_path = _csv_folder(tmp_path, "path,label\n" + ROWS + f"img/{PATIENT}.png,normal\n")
    with pytest.raises(DataError, match=r"line 8 of .*does not exist") as info:
        load_classification_folder(csv_path, SPEC)
    assert PATIENT not in str(info.value)


def _dicom_without_pixels(path: Path) -> None:
    from tests.trainer.test_data import _write_dicom

    _write_dicom(path, None)


def test_dicom_without_pixels_names_its_position_in_the_folder(tmp_path: Path) -> None:
    _png(tmp_path / "d" / "normal" / "a.png")
    _png(tmp_path / "d" / "nodule" / "a.png", 1)
    _dicom_without_pixels(tmp_path / "d" / "nodule" / f"{PATIENT}.dcm")
    with pytest.raises(DataError, match=r"Image 0 of class folder 'nodule' .*no pixel data") as info:
        load_classification_folder(tmp_path / "d", SPEC)
    assert PATIENT not in str(info.value)


def test_coco_image_error_gives_its_index_not_its_name(tmp_path: Path) -> None:
    root = _coco_folder(tmp_path / "d")
    (root / "images" / "1.png").write_bytes(b"not a png")
    coco = json.loads((root / "annotations.json").read_text())
    coco["images"][1]["file_name"] = f"{PATIENT}.png"
    (root / "annotations.json").write_text(json.dumps(coco))
    (root / "images" / "1.png").rename(root / "images" / f"{PATIENT}.png")
    with pytest.raises(DataError, match=r"Image 1 \(counting from 0\) of .*annotations\.json: cannot read the PNG") as info:
        load_detection_folder(root, SPEC)
    assert PATIENT not in str(info.value)


def test_grey_png_with_alpha_loads_as_grey(tmp_path: Path) -> None:
    grey = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), mode="LA").save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert out.shape == (8, 8, 1)
    np.testing.assert_array_equal(out[:, :, 0], grey)


def test_user_sets_do_not_keep_source_images(tmp_path: Path) -> None:
    ds, _ = load_detection_folder(_coco_folder(tmp_path / "d"), SPEC)
    cls = load_classification_folder(_csv_folder(tmp_path / "c", "path,label\n" + ROWS), SPEC)
    assert len(ds) == 3 and ds.images == [] and len(cls) == 6 and cls.images == []


# ------------------------------------------------------------- truth that would train wrong without a word
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["annotations"].append({"id": 9, "image_id": 77, "category_id": 1, "bbox": [2, 2, 4, 4]}),
         "names an image_id that no image has"),
        (lambda c: c["annotations"][0].update(category_id=5), "category_id that is not among"),
        (lambda c: c["images"].append({"id": 9, "file_name": "0.png"}), "same file_name"),
        (lambda c: c["images"].append({"id": 1, "file_name": "1b.png"}), "same id"),
        (lambda c: c.update(annotations=[]), "holds no annotation"),
    ],
    ids=["orphan-annotation", "unknown-category", "duplicate-file", "duplicate-id", "no-boxes"],
)
def test_coco_truth_that_would_be_silently_wrong_is_refused(tmp_path: Path, change, message: str) -> None:
    """Before: an unknown category became class 0, an orphan annotation made its image a negative, ..."""
    root = _coco_folder(tmp_path / "d")
    coco = json.loads((root / "annotations.json").read_text())
    change(coco)
    (root / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=message):
        load_detection_folder(root, InputSpec(size=(16, 16)))


def test_a_folder_of_empty_masks_is_refused(tmp_path: Path) -> None:
    from trainer.data import load_segmentation_folder

    for i in range(3):
        _png(tmp_path / "s" / "images" / f"{i}.png", i)
        (tmp_path / "s" / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "s" / "masks" / f"{i}.png")
    with pytest.raises(DataError, match="Every mask .* is empty"):
        load_segmentation_folder(tmp_path / "s", InputSpec(size=(16, 16)))


def test_a_palette_png_is_read_as_its_colours_not_its_indices(tmp_path: Path) -> None:
    """A palette whose index 0 is white: the image is its colours (luma), not the indices (it trained inverted)."""
    grey = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    img = Image.fromarray(255 - grey, mode="L").convert("P")  # indices and colours differ after quantisation
    palette = img.getpalette()[: 256 * 3]
    inverted = [255 - v for v in palette]
    idx = np.asarray(img)
    img.putpalette(inverted)
    img.save(tmp_path / "p.png")
    got = load_image(tmp_path / "p.png")
    want = np.asarray(inverted, np.uint8).reshape(-1, 3)[idx]
    assert got.shape == (8, 8, 3) and np.array_equal(got, want)
