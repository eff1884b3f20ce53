"""Synthetic generators, the shared preprocessing path, caching and user-data loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.errors import DataError
from edge.inference.manifest import InputSpec
from edge.inference.preprocess import preprocess
from trainer.data import (
    US_PREPROCESSING,
    XRAY_PREPROCESSING,
    load_detection_folder,
    load_image,
    load_segmentation_folder,
    make_ultrasound,
    make_xray,
    sample_rng,
    synthetic_detection_set,
    synthetic_segmentation_set,
)

SPEC = InputSpec(size=(64, 64))


def test_ultrasound_frame_is_seeded_and_plausible() -> None:
    img, mask = make_ultrasound(sample_rng(7, 3))
    img2, mask2 = make_ultrasound(sample_rng(7, 3))
    other, _ = make_ultrasound(sample_rng(8, 3))
    assert img.shape == (480, 640) and img.dtype == np.uint8
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    np.testing.assert_array_equal(img, img2)
    np.testing.assert_array_equal(mask, mask2)
    assert not np.array_equal(img, other)
    # Fan geometry: corners outside the sector are black; the lesion lies inside the fan.
    assert img[-1, 0] == 0 and img[-1, -1] == 0
    assert img[240, 320] > 0
    assert (img[mask == 1] > 0).mean() > 0.5
    # Speckle: strong pixel-to-pixel variation inside tissue.
    tissue = img[200:260, 300:340].astype(float)
    assert tissue.std() > 10


def test_lesions_differ_from_their_surroundings() -> None:
    contrasts = []
    for i in range(6):
        img, mask = make_ultrasound(sample_rng(3, i))
        inside = img[mask == 1].astype(float).mean()
        ring = np.zeros_like(mask, bool)
        ys, xs = np.nonzero(mask)
        ring[max(0, ys.min() - 15) : ys.max() + 15, max(0, xs.min() - 15) : xs.max() + 15] = True
        ring &= (mask == 0) & (img > 0)
        contrasts.append(abs(inside - img[ring].astype(float).mean()))
    assert np.median(contrasts) > 8


def test_xray_is_seeded_with_boxes_inside() -> None:
    img, boxes = make_xray(sample_rng(5, 1))
    img2, boxes2 = make_xray(sample_rng(5, 1))
    assert img.shape == (512, 512) and img.dtype == np.uint16 and img.max() <= 4095
    np.testing.assert_array_equal(img, img2)
    np.testing.assert_array_equal(boxes, boxes2)
    counts = [len(make_xray(sample_rng(5, i))[1]) for i in range(10)]
    assert max(counts) >= 1 and min(counts) <= 4
    for i in range(4):
        im, bx = make_xray(sample_rng(5, i))
        for x0, y0, x1, y1 in bx:
            assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
            # A nodule adds attenuation: brighter than the ring around it.
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            assert im[cy, cx] > 0


def test_sets_go_through_edge_preprocess(cache_dir: str) -> None:
    ds = synthetic_segmentation_set(3, 11, SPEC, US_PREPROCESSING, cache_dir=cache_dir)
    img, mask = make_ultrasound(sample_rng(11, 2))
    x, geom = preprocess(img, SPEC, US_PREPROCESSING)
    np.testing.assert_array_equal(ds.inputs[2], x)
    assert ds.geoms[2] == geom
    assert ds.targets.shape == (3, 1, 64, 64) and ds.targets[2].max() == 1
    # Padding rows of the letterbox carry no lesion.
    assert ds.targets[:, :, : geom.top].sum() == 0
    # The cache returns identical data.
    again = synthetic_segmentation_set(3, 11, SPEC, US_PREPROCESSING, cache_dir=cache_dir)
    np.testing.assert_array_equal(again.inputs, ds.inputs)
    np.testing.assert_array_equal(again.masks[1], ds.masks[1])
    det = synthetic_detection_set(3, 12, SPEC, XRAY_PREPROCESSING, cache_dir=cache_dir)
    det2 = synthetic_detection_set(3, 12, SPEC, XRAY_PREPROCESSING, cache_dir=cache_dir)
    for a, b, ib in zip(det.boxes, det2.boxes, det.input_boxes):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(ib, a * 64 / 512, rtol=1e-5)


def _write_dicom(path: Path, arr: np.ndarray | None) -> None:
    """A 12-bit secondary capture of ``arr`` at ``path``; ``None``: no image attributes and no pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    if arr is None:
        ds.save_as(path, enforce_file_format=True)
        return
    ds.Modality = "OT"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _seg_folder(root: Path, n: int = 2, bad_mask: bool = False) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img, mask = make_ultrasound(sample_rng(21, i))
        Image.fromarray(img).save(root / "images" / f"case{i}.png")
        if bad_mask and i == 1:
            mask = mask[:100, :100]
        Image.fromarray(mask * 255).save(root / "masks" / f"case{i}.png")
    return root


def test_segmentation_folder_loads_png(tmp_path: Path) -> None:
    ds = load_segmentation_folder(_seg_folder(tmp_path / "d"), SPEC)
    assert len(ds) == 2 and ds.masks[0].max() == 1
    ref, mask = make_ultrasound(sample_rng(21, 0))
    np.testing.assert_array_equal(ds.inputs[0], preprocess(ref, SPEC, US_PREPROCESSING)[0])
    np.testing.assert_array_equal(ds.masks[0], mask > 0)
    assert ds.images == []  # nothing reads a user's source images: they are not kept


def test_mask_of_wrong_size_is_a_clear_error(tmp_path: Path) -> None:
    root = _seg_folder(tmp_path / "d", bad_mask=True)
    with pytest.raises(DataError, match=r"mask of image 1 of .* is 100x100 but the image is 480x640"):
        load_segmentation_folder(root, SPEC)


def test_dicom_image_loads_through_edge_pixels(tmp_path: Path) -> None:
    img, _ = make_xray(sample_rng(2, 0))
    _write_dicom(tmp_path / "a.dcm", img)
    out = load_image(tmp_path / "a.dcm")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, img.astype(np.float32))


def test_unreadable_dicom_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"this is not DICOM at all" * 10)
    with pytest.raises(DataError, match=r"cannot read the file as DICOM") as info:
        load_image(bad)
    assert "broken" not in str(info.value)  # a file name may hold a patient's name


def _coco_folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(2):
        img, boxes = make_xray(sample_rng(31, i))
        _write_dicom(root / "images" / f"cxr{i}.dcm", img)
        images.append({"id": i + 1, "file_name": f"cxr{i}.dcm", "width": 512, "height": 512})
        for b in boxes:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1,
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nodule"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def test_coco_folder_loads_dicom_and_boxes(tmp_path: Path) -> None:
    ds, labels = load_detection_folder(_coco_folder(tmp_path / "c"), SPEC)
    assert labels == ["nodule"] and len(ds) == 2
    _, boxes = make_xray(sample_rng(31, 0))
    np.testing.assert_allclose(ds.boxes[0], boxes, atol=1e-4)


@pytest.mark.parametrize("content", ["", "{}", '{"images": [], "annotations": []}'])
def test_empty_coco_is_a_clear_error(tmp_path: Path, content: str) -> None:
    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    (root / "annotations.json").write_text(content)
    with pytest.raises(DataError, match="empty"):
        load_detection_folder(root, SPEC)


def test_zero_size_synthetic_set_is_refused() -> None:
    with pytest.raises(DataError, match="0 samples"):
        synthetic_segmentation_set(0, 1, SPEC)
