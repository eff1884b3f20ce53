"""Source instances as vendors send them, for the result-object tests (``test_dicom_results.py``).

Helpers only, plus one check that each variant has (and lacks) what it
claims. Built on :mod:`tests.edge.dicom_factory`; identifiers are made up.

- ultrasound single frames with and without Pixel Spacing, Frame of
  Reference UID and Sequence of Ultrasound Regions, as ultrasound systems
  send them: none of them has an image plane (Image Position/Orientation
  (Patient)); medge's own demo data (``edge.tools.synthetic_dicom``) has Frame of
  Reference + Pixel Spacing;
- ultrasound cine, plain and with a Frame of Reference and regions;
- CR, DX (with Imager Pixel Spacing, and also with Pixel Spacing);
- CT and MR slices with a complete image plane, and a CT slice whose Slice
  Thickness is empty (Type 2 in the CT IOD);
- :func:`put_raw`: an attribute with exactly the bytes a modality sent,
  valid or not, as the SCP spools it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from tests.edge import dicom_factory as f

MR = "1.2.840.10008.5.1.4.1.1.4"


def received(ds: Dataset) -> Dataset:
    """``ds`` as the pipeline reads a spooled instance: encoded, then read back without pixel data."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return dcmread(buf, stop_before_pixels=True)


def put_raw(ds: Dataset, keyword: str, value: bytes, vr: str | None = None) -> Dataset:
    """Set ``keyword`` to exactly ``value`` (padded to even length), bypassing pydicom's checks.

    The data set must then go through :func:`received`, like a file from a modality.
    """
    tag = Tag(tag_for_keyword(keyword))
    vr = vr or dictionary_VR(tag)
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    return ds


def _image(h: int, w: int, dtype=np.uint8) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 3 + yy * 5) % 200).astype(dtype)


def _regions(rows: int, cols: int) -> list[Dataset]:
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2D
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = cols - 1, rows - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.02
    region.ReferencePixelX0, region.ReferencePixelY0 = cols // 2, 0
    return [region]


def us_plain() -> Dataset:
    return f.make_us_single(_image(48, 64))


def us_spacing() -> Dataset:
    ds = us_plain()
    ds.PixelSpacing = [0.2, 0.2]
    return ds


def us_frame_of_reference() -> Dataset:
    ds = us_plain()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    return ds


def us_demo() -> Dataset:
    """medge's own synthetic ultrasound (what ``medge demo`` sends): Frame of Reference + Pixel Spacing."""
    from edge.tools.synthetic_dicom import synthetic_instances

    return synthetic_instances(1, "US", frame=(48, 64), seed=3)[0]


def us_regions() -> Dataset:
    ds = us_frame_of_reference()
    ds.SequenceOfUltrasoundRegions = _regions(48, 64)
    ds.BodyPartExamined = "ABDOMEN"
    return ds


def us_cine() -> Dataset:
    return f.make_us_multiframe(np.stack([_image(40, 56)] * 4))


def us_cine_regions() -> Dataset:
    ds = us_cine()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.SequenceOfUltrasoundRegions = _regions(40, 56)
    return ds


def cr() -> Dataset:
    return f.make_cr(_image(64, 64, np.uint16))


def dx() -> Dataset:
    return f.make_dx(_image(64, 64, np.uint16))


def dx_pixel_spacing() -> Dataset:
    ds = dx()
    ds.PixelSpacing = [0.2, 0.2]  # DX Detector: calibrated spacing, still no image plane
    return ds


def ct_slice() -> Dataset:
    return f.make_ct_series(1, 48)[0]


def ct_without_thickness() -> Dataset:
    ds = ct_slice()
    ds.SliceThickness = None  # Type 2: present, empty
    return ds


def make_mr_series(n: int, size: int = 48) -> list[Dataset]:
    """An MR series of ``n`` sagittal uint16 slices sharing a frame of reference."""
    study, series, for_uid = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = f.new_dataset(MR, "MR", study, series)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.InstanceNumber = i + 1
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [4.0 * i, -100.0, 100.0]
        ds.PixelSpacing = [0.9, 0.9]
        ds.SliceThickness = 4.0
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500
        ds.EchoTime = 15
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
        f.set_pixels(ds, _image(size, size, np.uint16), bits_stored=12)
        out.append(ds)
    return out


def mr_slice() -> Dataset:
    return make_mr_series(1)[0]


@dataclass(frozen=True)
class Variant:
    name: str
    make: Callable[[], Dataset]
    seg_kind: str  # what a segmentation model's result is: "SEG" or "SR"
    seg_in_frame_of_reference: bool = False


VARIANTS = (
    Variant("us", us_plain, "SEG"),
    Variant("us_pixel_spacing", us_spacing, "SEG"),
    Variant("us_frame_of_reference", us_frame_of_reference, "SEG"),
    Variant("us_medge_demo", us_demo, "SEG"),
    Variant("us_regions", us_regions, "SEG"),
    Variant("us_cine", us_cine, "SR"),
    Variant("us_cine_regions", us_cine_regions, "SR"),
    Variant("cr", cr, "SEG"),
    Variant("dx", dx, "SEG"),
    Variant("dx_pixel_spacing", dx_pixel_spacing, "SEG"),
    Variant("ct", ct_slice, "SEG", True),
    Variant("mr", mr_slice, "SEG", True),
    Variant("ct_without_slice_thickness", ct_without_thickness, "SR"),
)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_variants_are_what_they_claim(variant: Variant) -> None:
    ds = received(variant.make())
    plane = all(k in ds for k in ("ImagePositionPatient", "ImageOrientationPatient"))
    assert plane == (variant.name in ("ct", "mr", "ct_without_slice_thickness"))
    assert ("FrameOfReferenceUID" in ds) == (
        plane or variant.name in ("us_frame_of_reference", "us_medge_demo", "us_regions", "us_cine_regions")
    )
    assert ("SequenceOfUltrasoundRegions" in ds) == variant.name.endswith("regions")
    assert (int(ds.get("NumberOfFrames", 1) or 1) > 1) == ("cine" in variant.name)
