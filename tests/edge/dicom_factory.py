"""Synthetic DICOM instances with the right IODs, for the DICOM tests and benchmark.

Pixels come from the trainer's seeded generators where they fit
(ultrasound B-mode, chest radiograph); CT slices are simple seeded phantoms.
Identifiers are made up ("MEDGE^TEST"); nothing here is patient data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

__all__ = [
    "US_MF",
    "US",
    "CT",
    "CR",
    "DX",
    "make_us_multiframe",
    "make_us_single",
    "make_ct_series",
    "make_cr",
    "make_dx",
    "save",
    "encode_dataset",
    "write_part10",
    "write_deflate_bomb",
    "make_compressed_us",
    "patch_codestream",
    "make_codestream_bomb",
    "FakeService",
    "free_port",
    "dicom_config",
]

US_MF = "1.2.840.10008.5.1.4.1.1.3.1"
US = "1.2.840.10008.5.1.4.1.1.6.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _base(sop_class: str, modality: str, study_uid: str | None = None, series_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = "20260101"
    ds.InstanceCreationTime = "120000"
    # Patient + General Study (made-up values)
    ds.PatientName = "MEDGE^TEST"
    ds.PatientID = "MEDGE-TEST-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "A1"
    # General Series + Equipment
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.Manufacturer = "medge-tests"
    # General Image
    ds.InstanceNumber = 1
    ds.ContentDate = "20260101"
    ds.ContentTime = "120000"
    return ds


def _pixels(ds: Dataset, arr: np.ndarray, bits_stored: int | None = None) -> None:
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


def make_us_multiframe(frames: np.ndarray, study_uid: str | None = None) -> Dataset:
    """US Multi-frame Image (cine) of uint8 ``[F, H, W]`` B-mode frames, no frame of reference."""
    ds = _base(US_MF, "US", study_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", ""]
    ds.NumberOfFrames = int(frames.shape[0])
    ds.FrameIncrementPointer = 0x00181063  # FrameTime
    ds.FrameTime = 33.3
    ds.LossyImageCompression = "00"
    _pixels(ds, frames.astype(np.uint8))
    return ds


def make_us_single(image: np.ndarray, study_uid: str | None = None) -> Dataset:
    """US Image of one uint8 B-mode frame."""
    ds = _base(US, "US", study_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", ""]
    ds.LossyImageCompression = "00"
    _pixels(ds, image.astype(np.uint8))
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
        ds = _base(CT, "CT", study_uid, series_uid)
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
        _pixels(ds, img, bits_stored=16)
        out.append(ds)
    return out


def make_cr(image: np.ndarray, study_uid: str | None = None) -> Dataset:
    """CR Image of a uint16 radiograph (12 bits stored)."""
    ds = _base(CR, "CR", study_uid)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    _pixels(ds, image.astype(np.uint16), bits_stored=12)
    return ds


def make_dx(image: np.ndarray, study_uid: str | None = None) -> Dataset:
    """DX Image (for presentation) of a uint16 radiograph (12 bits stored)."""
    ds = _base(DX, "DX", study_uid)
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.DetectorType = "DIRECT"
    _pixels(ds, image.astype(np.uint16), bits_stored=12)
    return ds


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


def write_part10(path: Path, sop_class: str, sop_instance: str, transfer_syntax_uid: str, chunks) -> Path:
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


def write_deflate_bomb(
    path: Path, inflated_bytes: int, rows: int = 64, columns: int = 64, frames: int = 1, pixel_length: int | None = None
) -> Path:
    """A Deflated Explicit VR Little Endian US image whose pixel data inflates to ``inflated_bytes`` of zeros.

    The header declares a small image (``rows`` x ``columns`` x 8 bits x
    ``frames``) and a Pixel Data element of ``pixel_length`` bytes (default:
    ``inflated_bytes``, so the encoding is consistent, only enormous). Built
    without ever holding the inflated bytes: one 1 MiB block of zeros is
    deflated once after a full flush, and the same compressed block repeated
    (each block is independent after a full flush); 2 GiB deflate to about 2 MB.
    """
    import struct
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    block = 1 << 20
    if inflated_bytes % block:
        raise ValueError("inflated_bytes must be a whole number of MiB.")
    ds = _base(US, "US")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    head = encode_dataset(ds, "1.2.840.10008.1.2.1")  # explicit VR LE, no pixel data yet
    length = inflated_bytes if pixel_length is None else pixel_length
    head += struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(block)
    seg = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    assert c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH) == seg  # independent blocks: safe to repeat
    tail = c.flush()
    n = inflated_bytes // block

    def chunks():
        yield first
        for _ in range(n - 2):  # two blocks were compressed above
            yield seg
        yield seg
        yield seg
        yield tail

    return write_part10(path, US, str(ds.SOPInstanceUID), DeflatedExplicitVRLittleEndian, chunks())


def _jpeg_baseline(image: np.ndarray) -> bytes:
    """A JPEG baseline (SOF0) codestream of a uint8 grayscale image (Pillow)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_compressed_us(transfer_syntax_uid: str, rows: int = 64, columns: int = 64, frames: int = 1) -> Dataset:
    """A US image (cine when ``frames`` > 1) of a uint8 ramp, compressed in ``transfer_syntax_uid``.

    JPEG baseline is encoded by Pillow; JPEG 2000, JPEG-LS and RLE by
    pydicom's encoders. No Basic Offset Table; one fragment per frame.
    """
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    stack = (np.add.outer(np.arange(rows), np.arange(columns)) % 251).astype(np.uint8)
    stack = np.stack([np.roll(stack, i, axis=1) for i in range(frames)])
    ds = make_us_multiframe(stack) if frames > 1 else make_us_single(stack[0])
    if transfer_syntax_uid == JPEGBaseline8Bit:
        ds.PixelData = encapsulate([_jpeg_baseline(f) for f in stack])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    else:
        ds.compress(transfer_syntax_uid, **({"j2k_cr": [20]} if transfer_syntax_uid == "1.2.840.10008.1.2.4.91" else {}))
    ds["PixelData"].is_undefined_length = True  # encapsulated, whichever syntax encodes it
    return ds


def patch_codestream(frame: bytes, rows: int, columns: int, samples: int | None = None) -> bytes:
    """``frame`` (a JPEG, JPEG-LS or JPEG 2000 codestream) with its header declaring ``rows`` x ``columns``.

    The frame header is rewritten in place (SOF0/SOF55 height and width, or
    JPEG 2000 SIZ image and tile size); nothing else changes, so the stream
    stays as small as it was.
    """
    import struct

    cs = bytearray(frame)
    if cs[:4] == b"\xff\x4f\xff\x51":  # JPEG 2000: SOC, SIZ
        struct.pack_into(">IIIIII", cs, 8, columns, rows, 0, 0, columns, rows)
        if samples is not None:
            struct.pack_into(">H", cs, 40, samples)
        return bytes(cs)
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc3", b"\xff\xf7"):
        i = cs.find(marker)
        if i >= 0:
            struct.pack_into(">HH", cs, i + 5, rows, columns)
            if samples is not None:
                cs[i + 9] = samples
            return bytes(cs)
    raise ValueError("no frame header found")


def make_codestream_bomb(transfer_syntax_uid: str, declared: int = 60000, rows: int = 64, columns: int = 64) -> Dataset:
    """A ``rows`` x ``columns`` US image whose one compressed frame declares ``declared`` x ``declared`` pixels.

    About 2 KB on the wire; a decoder that trusts the codestream allocates
    ``declared``\u00b2 bytes (60000: 3.6 GB) before it finds the data short.
    """
    from pydicom.encaps import encapsulate, generate_fragments

    ds = make_compressed_us(transfer_syntax_uid, rows, columns)
    _bot, frame = list(generate_fragments(ds.PixelData))
    ds.PixelData = encapsulate([patch_codestream(frame, declared, declared)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


# --------------------------------------------------------------------------- test doubles
class FakeService:
    """A deterministic stand-in for the scheduler (``edge.types.InferenceService``).

    ``us-lesion-seg``: the mask is every pixel above 60 % of the frame's
    range. ``xray-nodule-det``: one box around the brightest 5 % of pixels
    with score 0.87. Records every call (model, shape) for assertions.
    """

    def __init__(self, models: tuple[str, ...] = ("us-lesion-seg", "xray-nodule-det"), fail_model: str = "") -> None:
        import threading

        self._models = models
        self.fail_model = fail_model
        self.calls: list[tuple[str, tuple[int, ...], str]] = []
        self.images: list[np.ndarray] = []
        self._lock = threading.Lock()

    def models(self):
        return list(self._models)

    def submit(self, image, *, model, source, stream, callback, received_ns=None, live=True, track_e2e=True):  # pragma: no cover - unused
        callback(self.infer(image, model=model, source=source))

    @staticmethod
    def expected(image: np.ndarray, model: str):
        """What :meth:`infer` answers for ``image`` (mask or boxes), for assertions."""
        from edge.types import Box

        g = np.asarray(image, dtype=np.float32)
        if g.ndim == 3:
            g = g.mean(axis=2)
        lo, hi = float(g.min()), float(g.max())
        if model == "xray-nodule-det":
            ys, xs = np.nonzero(g >= lo + 0.95 * (hi - lo)) if hi > lo else (np.array([0]), np.array([0]))
            return [Box("nodule", 0.87, float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))]
        return (g > lo + 0.6 * (hi - lo)).astype(np.uint8) if hi > lo else np.zeros(g.shape, np.uint8)

    def infer(self, image, *, model, source, timeout_s=30.0):
        from edge.types import InferenceResult

        with self._lock:
            self.calls.append((model, tuple(np.shape(image)), source))
            self.images.append(np.array(image, copy=True))
        if model == self.fail_model:
            return InferenceResult(status="error", model=model, error_code="internal", error_message="fake failure")
        out = self.expected(image, model)
        if model == "xray-nodule-det":
            return InferenceResult(status="ok", model=model, model_version="1", task="detection", boxes=out)
        return InferenceResult(status="ok", model=model, model_version="1", task="segmentation", mask=out)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for peers that cannot bind port 0 themselves)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dicom_config(tmp_path: Path, base=None, **dicom_overrides):
    """A MedgeConfig for tests: SCP on an ephemeral port, fast series completion.

    ``base`` is the config to start from (default: the defaults, models not checked).
    """
    import dataclasses

    from edge.config import DicomRoute, default_config

    cfg = base if base is not None else default_config(check_models=False)
    routes = (
        DicomRoute(modality="US", model="us-lesion-seg"),
        DicomRoute(modality="CT", model="us-lesion-seg"),
        DicomRoute(modality="CR", model="xray-nodule-det"),
        DicomRoute(modality="DX", model="xray-nodule-det"),
    )
    settings = {"port": 0, "series_idle_s": 0.3, "routes": routes, **dicom_overrides}
    d = dataclasses.replace(cfg.dicom, **settings)
    o = dataclasses.replace(cfg.outbox, retry_base_s=0.1, retry_max_s=0.5)
    return dataclasses.replace(cfg, dicom=d, outbox=o, spool_dir=tmp_path / "spool")
