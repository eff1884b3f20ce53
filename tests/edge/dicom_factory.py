"""Synthetic DICOM for the DICOM tests: the shared builders, plus test-only hostile ones and test doubles.

The instances themselves (US, US cine, CT, CR, DX; writing them as files or
as a C-STORE's bytes) come from :mod:`edge.tools.synthetic_dicom`, the one
home the demo and the benchmarks use too, and are re-exported here. What
only tests need stays here: compressed and hostile instances (deflate and
codestream bombs), a fake inference service, a test configuration.
Identifiers are made up ("MEDGE^TEST"); nothing here is patient data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from edge.tools.daemon_process import free_port  # re-exported: f.free_port() in the tests
from edge.tools.synthetic_dicom import (  # re-exported: f.make_us_single() etc. in the tests
    CR,
    CT,
    DX,
    US,
    US_MF,
    encode_dataset,
    make_cr,
    make_ct_series,
    make_dx,
    make_us_multiframe,
    make_us_single,
    new_dataset,
    save,
    set_pixels,
    write_part10,
)

__all__ = [
    "US_MF",
    "US",
    "CT",
    "CR",
    "DX",
    "new_dataset",
    "set_pixels",
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
    "c_store",
]

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
    ds = new_dataset(US, "US")
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


def c_store(port: int, paths: list[Path], calling: str = "PYSCU", bind: str = "127.0.0.1") -> list[Dataset]:
    """Send files as stored (no decode, any transfer syntax) with pynetdicom; returns the status data sets."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config
    from pynetdicom.presentation import build_context

    pairs: list[tuple[str, str]] = []
    for p in paths:
        meta = read_file_meta_info(p)  # never dcmread: pydicom would inflate a deflated data set in full
        pair = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        if pair not in pairs:
            pairs.append(pair)
    ae = AE(ae_title=calling)
    ae.requested_contexts = [build_context(s, t) for s, t in pairs]
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGE", bind_address=(bind, 0))
    assert assoc.is_established
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True  # raw bytes, as sent
    try:
        return [assoc.send_c_store(p) for p in paths]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
