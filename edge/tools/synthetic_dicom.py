"""Synthetic DICOM instances with the right IODs: one home for the demo, the benchmarks and the tests.

Two families, both made up, never patient data:

- test instances (``MEDGE^TEST``, fixed dates, :data:`TEST_IDENTITY`):
  :func:`make_us_single`, :func:`make_us_multiframe` (cine),
  :func:`make_ct_series`, :func:`make_cr`, :func:`make_dx`, from pixels the
  caller gives (CT: a seeded phantom);
- the demo's and ``medge bench dicom``'s instances
  (``SYNTHETIC^PHANTOM``, dated today, :func:`phantom_identity`):
  :func:`synthetic_instances`, ultrasound or X-ray frames of
  :mod:`edge.tools.synthetic`, with Frame of Reference and Pixel Spacing.

Both start from :func:`new_dataset` (file meta, SOP, study and series UIDs,
Patient, General Study, General Series and Equipment attributes) and
:func:`set_pixels` (Image Pixel module of a native grayscale array).
:func:`save`, :func:`encode_dataset` and :func:`write_part10` write them as
files, as a C-STORE carries them, or as a Part 10 file of given bytes.

Never imported by the daemon.

Examples
--------
>>> import numpy as np
>>> ds = make_us_single(np.zeros((4, 6), np.uint8))
>>> ds.Modality, ds.Rows, ds.Columns, ds.BitsStored, str(ds.PatientName)
('US', 4, 6, 8, 'MEDGE^TEST')
"""

from __future__ import annotations

import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from edge.errors import DataError

__all__ = [
    "US_MF",
    "US",
    "CT",
    "CR",
    "DX",
    "TEST_IDENTITY",
    "phantom_identity",
    "new_dataset",
    "set_pixels",
    "make_us_multiframe",
    "make_us_single",
    "make_ct_series",
    "make_cr",
    "make_dx",
    "synthetic_instances",
    "save",
    "encode_dataset",
    "write_part10",
]

US_MF = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
US = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
CR = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation

#: Made-up Patient, General Study, Series and Equipment values of the test instances (fixed dates).
TEST_IDENTITY: Mapping[str, Any] = MappingProxyType(
    {
        "SpecificCharacterSet": "ISO_IR 100",
        "InstanceCreationDate": "20260101",
        "InstanceCreationTime": "120000",
        "PatientName": "MEDGE^TEST",
        "PatientID": "MEDGE-TEST-1",
        "PatientBirthDate": "19700101",
        "PatientSex": "O",
        "StudyDate": "20260101",
        "StudyTime": "120000",
        "ReferringPhysicianName": "",
        "StudyID": "1",
        "AccessionNumber": "A1",
        "SeriesNumber": 1,
        "Manufacturer": "medge-tests",
        "ContentDate": "20260101",
        "ContentTime": "120000",
    }
)


def phantom_identity() -> dict[str, Any]:
    """Made-up Patient, Study, Series and Equipment values of the demo's instances, dated now."""
    today, now = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    return {
        "PatientName": "SYNTHETIC^PHANTOM",
        "PatientID": "SYNTH-0001",
        "PatientBirthDate": "",
        "PatientSex": "O",
        "StudyDate": today,
        "SeriesDate": today,
        "ContentDate": today,
        "StudyTime": now,
        "SeriesTime": now,
        "ContentTime": now,
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
        "StudyID": "1",
        "SeriesNumber": 1,
        "Manufacturer": "medge simulator",
        "SeriesDescription": "medge synthetic test data",
    }


def new_dataset(
    sop_class: str,
    modality: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    *,
    identity: Mapping[str, Any] = TEST_IDENTITY,
    instance_number: int = 1,
) -> Dataset:
    """A data set with file meta (Explicit VR Little Endian), a new SOP Instance UID and ``identity``'s values.

    ``study_uid`` and ``series_uid`` default to new UIDs. No pixel module
    yet: see :func:`set_pixels`.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.InstanceNumber = instance_number
    for keyword, value in identity.items():
        setattr(ds, keyword, value)
    return ds


def set_pixels(ds: Dataset, arr: np.ndarray, bits_stored: int | None = None) -> None:
    """Image Pixel module of a native MONOCHROME2 array ``[H, W]`` or ``[F, H, W]`` (all its bits stored by default)."""
    arr = np.ascontiguousarray(arr)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    bits = arr.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    ds.PixelData = arr.tobytes()


# --------------------------------------------------------------------------- test instances
def make_us_multiframe(frames: np.ndarray, study_uid: str | None = None) -> Dataset:
    """US Multi-frame Image (cine) of uint8 ``[F, H, W]`` B-mode frames, no frame of reference."""
    ds = new_dataset(US_MF, "US", study_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", ""]
    ds.NumberOfFrames = int(frames.shape[0])
    ds.FrameIncrementPointer = 0x00181063  # FrameTime
    ds.FrameTime = 33.3
    ds.LossyImageCompression = "00"
    set_pixels(ds, frames.astype(np.uint8))
    return ds


def make_us_single(image: np.ndarray, study_uid: str | None = None) -> Dataset:
    """US Image of one uint8 B-mode frame."""
    ds = new_dataset(US, "US", study_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", ""]
    ds.LossyImageCompression = "00"
    set_pixels(ds, image.astype(np.uint8))
    return ds


def make_ct_series(n: int, size: int = 128, seed: int = 0, study_uid: str | None = None) -> list[Dataset]:
    """A CT series of ``n`` axial int16 slices (HU via rescale) sharing a frame of reference."""
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    for_uid = generate_uid()
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for i in range(n):
        body = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) < (0.42 * size) ** 2
        img = np.where(body, 40, -1000).astype(np.int16)
        cx, cy, r = size * 0.6, size * 0.45, size * (0.06 + 0.01 * i)
        img[((xx - cx) ** 2 + (yy - cy) ** 2) < r * r] = 200
        img = (img + rng.normal(0, 10, img.shape)).astype(np.int16)
        ds = new_dataset(CT, "CT", study_uid, series_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = i + 1
        ds.PixelSpacing = [0.7, 0.7]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-size * 0.35, -size * 0.35, 2.5 * i]
        ds.SliceThickness = 2.5
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        set_pixels(ds, img, bits_stored=16)
        out.append(ds)
    return out


def make_cr(image: np.ndarray, study_uid: str | None = None) -> Dataset:
    """CR Image of a uint16 radiograph (12 bits stored)."""
    ds = new_dataset(CR, "CR", study_uid)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    set_pixels(ds, image.astype(np.uint16), bits_stored=12)
    return ds


def make_dx(image: np.ndarray, study_uid: str | None = None) -> Dataset:
    """DX Image (for presentation) of a uint16 radiograph (12 bits stored)."""
    ds = new_dataset(DX, "DX", study_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    _dx_chest_pa(ds, intensity_relationship="LIN")
    set_pixels(ds, image.astype(np.uint16), bits_stored=12)
    return ds


def _dx_chest_pa(ds: Dataset, *, intensity_relationship: str) -> None:
    """DX Image and DX Detector attributes of a PA chest radiograph for presentation (0.2 mm pixels)."""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.PixelIntensityRelationship = intensity_relationship
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.DetectorType = "DIRECT"


# --------------------------------------------------------------------------- demo and benchmark instances
def synthetic_instances(n: int, modality: str = "US", frame: tuple[int, int] | None = None,
                        seed: int = 0) -> list[Dataset]:
    """``n`` single-frame instances of one new study/series (``US``, or ``DX`` for ``DX``/``CR``).

    Frames from :mod:`edge.tools.synthetic` (default 480 x 640 uint8 ultrasound,
    512 x 512 uint16 X-ray with 12 bits stored); Frame of Reference UID and
    Pixel Spacing 0.2 mm but no image plane, as the demo sends them.
    """
    from edge.tools.synthetic import UltrasoundProbe, XrayFrames

    if n < 1:
        raise DataError(f"Number of synthetic instances {n} is not >= 1.")
    if modality not in ("US", "DX", "CR"):
        raise DataError(f"Synthetic modality {modality!r} is not US or DX.")
    study, series = generate_uid(), generate_uid()
    if modality == "US":
        h, w = frame or (480, 640)
        src = UltrasoundProbe(h, w, "uint8", seed=seed, loop=min(n, 16))
        return [_phantom_instance("US", US, study, series, i, src.frame(i)) for i in range(n)]
    h, w = frame or (512, 512)
    xray = XrayFrames(h, w, "uint16", seed=seed, loop=min(n, 8))
    out = []
    for i in range(n):
        ds = _phantom_instance("DX", DX, study, series, i, xray.frame(i), bits_stored=12)
        ds.ImageType = ["DERIVED", "PRIMARY"]
        _dx_chest_pa(ds, intensity_relationship="LOG")
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
        out.append(ds)
    return out


def _phantom_instance(modality: str, sop_class: str, study: str, series: str, n: int, frame: np.ndarray,
                      bits_stored: int | None = None) -> Dataset:
    """Instance ``n`` of a demo series: phantom identity, Frame of Reference, 0.2 mm pixels, no image plane."""
    ds = new_dataset(sop_class, modality, study, series, identity=phantom_identity(), instance_number=n + 1)
    ds.FrameOfReferenceUID = study + ".1" if len(study) < 60 else generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.PixelSpacing = [0.2, 0.2]
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientOrientation = ""
    set_pixels(ds, frame, bits_stored=bits_stored)
    return ds


# --------------------------------------------------------------------------- writing
def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file (with preamble and file meta)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def encode_dataset(ds: Dataset, transfer_syntax_uid: str) -> bytes:
    """``ds`` encoded in one of the four native transfer syntaxes (no file meta): the bytes a C-STORE carries."""
    import zlib

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

    buf = DicomBytesIO()
    buf.is_little_endian = transfer_syntax_uid != ExplicitVRBigEndian
    buf.is_implicit_VR = transfer_syntax_uid == ImplicitVRLittleEndian
    write_dataset(buf, ds)
    data = buf.getvalue()
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = c.compress(data) + c.flush()
    return data


def write_part10(path: Path, sop_class: str, sop_instance: str, transfer_syntax_uid: str,
                 chunks: Iterable[bytes]) -> Path:
    """A Part 10 file: preamble, file meta for ``transfer_syntax_uid``, then ``chunks`` (encoded data set) as given."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM" + buf.getvalue())
        for chunk in chunks:
            fh.write(chunk)
    return path
