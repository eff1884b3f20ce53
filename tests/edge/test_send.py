"""``medge send zmq``: a real daemon on loopback, folder/cine sources, a daemon that is down or dies.

Also how ``medge send`` finds the daemon: ``--endpoint``/``--port`` over the
daemon's ``MEDGE_*`` variables over ``--config FILE`` over the defaults, each
case proven by reaching the daemon while the sources it overrides point at
ports where nothing listens.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from edge.cli import main
from edge.errors import ProtocolError
from edge.tools.zmq_client import decode_reply, encode_request

from ._daemon import running_daemon
from ._fake_router import FakeRouter


@pytest.fixture(scope="module")
def daemon(fixture_engines: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("daemon")
    with running_daemon(fixture_engines, workdir, ["tiny-seg", "tiny-det"]) as d:
        d.config = workdir / "medge.toml"  # running_daemon writes the daemon's config there
        yield d


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_encode_decode_roundtrip() -> None:
    img = np.arange(12, dtype=np.uint16).reshape(3, 4)
    hdr, pix = encode_request(img, req_id="a:1", model="m", stream="s", want=["mask"])
    h = json.loads(hdr)
    assert h["v"] == 1 and h["id"] == "a:1" and h["dtype"] == "uint16" and h["shape"] == [3, 4]
    assert bytes(pix) == img.tobytes()
    mask = np.eye(3, 4, dtype=np.uint8)
    reply = json.dumps({"v": 1, "id": "a:1", "status": "ok", "mask": {"dtype": "uint8", "shape": [3, 4]}}).encode()
    rep = decode_reply([reply, mask.tobytes()])
    assert rep.status == "ok" and np.array_equal(rep.mask, mask)
    # A REQ-style empty delimiter is tolerated; garbage is a ProtocolError.
    assert decode_reply([b"", reply, mask.tobytes()]).id == "a:1"
    with pytest.raises(ProtocolError):
        decode_reply([b"not json"])
    with pytest.raises(ProtocolError):
        decode_reply([reply, b"short"])


def test_send_synthetic_stream_gets_every_reply(daemon, capsys) -> None:
    rc = main(["send", "zmq", "--endpoint", daemon.endpoint, "--model", "tiny-seg", "--fps", "60",
               "--frames", "45", "--json"])
    lines = _json_lines(capsys.readouterr().out)
    summary = lines[-1]
    assert rc == 0
    assert summary["type"] == "summary"
    assert summary["sent"] == 45 and summary["ok"] == 45 and summary["errors"] == 0
    assert summary["latency_ms"]["count"] == 45 and summary["latency_ms"]["median_ms"] > 0
    assert {"preprocess", "infer"} <= set(summary["server_stages_ms"])
    assert any(line["type"] == "tick" for line in lines[:-1])


def test_send_folder_of_pngs_and_dicom_cine(daemon, tmp_path: Path, capsys) -> None:
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 120), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (90, 80, 3), dtype=np.uint8)).save(folder / "b.png")
    rc = main(["send", "zmq", "--endpoint", daemon.endpoint, "--model", "tiny-det", "--source", str(folder),
               "--frames", "4", "--fps", "40", "--json"])
    summary = _json_lines(capsys.readouterr().out)[-1]
    assert rc == 0 and summary["ok"] == 4

    cine = np.stack([np.full((64, 72), 10 * i, np.uint8) for i in range(3)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.NumberOfFrames = 3
    ds.Rows, ds.Columns = 64, 72
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = cine.tobytes()
    path = tmp_path / "cine.dcm"
    ds.save_as(path, enforce_file_format=True)
    rc = main(["send", "zmq", "--endpoint", daemon.endpoint, "--model", "tiny-seg", "--source", str(path),
               "--frames", "3", "--fps", "40", "--json"])
    summary = _json_lines(capsys.readouterr().out)[-1]
    assert rc == 0 and summary["ok"] == 3 and summary["errors"] == 0


def test_send_unknown_model_counts_errors(daemon, capsys) -> None:
    rc = main(["send", "zmq", "--endpoint", daemon.endpoint, "--model", "no-such-model", "--frames", "3",
               "--fps", "30", "--json"])
    summary = _json_lines(capsys.readouterr().out)[-1]
    assert rc == 1
    assert summary["errors"] == 3 and summary["error_codes"] == {"unknown_model": 3}


def test_send_daemon_down_is_a_clear_error(capsys) -> None:
    from edge.tools.daemon_process import free_port

    rc = main(["send", "zmq", "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--frames", "5",
               "--connect-timeout-s", "0.5"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "no daemon is accepting connections" in err


def test_send_daemon_dies_mid_run_keeps_partial_counts(capsys) -> None:
    fake = FakeRouter(delay_s=0.001)
    timer = threading.Timer(1.5, fake.close)
    timer.start()
    try:
        rc = main(["send", "zmq", "--endpoint", fake.endpoint, "--duration-s", "10", "--fps", "50",
                   "--frame", "96x128", "--reply-timeout-s", "0.8", "--json"])
    finally:
        timer.join()
    out = capsys.readouterr()
    summary = _json_lines(out.out)[-1]
    assert rc == 3
    assert "stopped answering" in out.err
    assert 10 <= summary["ok"] < 500  # partial: it ran, then stopped well before 10 s
    assert summary["wall_s"] < 5


def test_send_dicom_is_dispatched_to_the_scu(tmp_path: Path, capsys) -> None:
    from edge.tools.synthetic_dicom import synthetic_instances
    from edge.tools.daemon_process import free_port

    path = tmp_path / "us.dcm"
    synthetic_instances(1, "US", frame=(32, 32))[0].save_as(path, enforce_file_format=True)
    rc = main(["send", "dicom", str(path), "--port", str(free_port()), "--timeout", "2"])
    assert rc != 0
    assert "127.0.0.1" in capsys.readouterr().err


# ------------------------------------------------------------------ which daemon: flag > MEDGE_* > --config > default
def _nobody_config(tmp_path: Path) -> Path:
    """A daemon config whose ZeroMQ and DICOM ports have nobody listening."""
    from edge.tools.daemon_process import free_port

    cfg = tmp_path / "nobody.toml"
    cfg.write_text(f'[zmq]\ningest = "tcp://127.0.0.1:{free_port()}"\n[dicom]\nport = {free_port()}\n')
    return cfg


def test_send_zmq_finds_the_daemon_by_config_env_and_flag(daemon, tmp_path: Path, capsys, monkeypatch) -> None:
    from edge.tools.daemon_process import free_port

    monkeypatch.delenv("MEDGE_ZMQ__INGEST", raising=False)
    nobody = _nobody_config(tmp_path)
    port = daemon.endpoint.rsplit(":", 1)[1]

    def send(*extra: str) -> tuple[int, dict, str]:
        rc = main(["send", "zmq", "--model", "tiny-seg", "--frames", "3", "--fps", "50", "--frame", "64x64",
                   "--connect-timeout-s", "0.5", "--json", *extra])
        out = capsys.readouterr()
        return rc, _json_lines(out.out)[-1], out.err

    # The daemon's own config file, on a non-default port.
    rc, summary, err = send("--config", str(daemon.config))
    assert rc == 0 and summary["ok"] == 3
    assert summary["endpoint"] == daemon.endpoint and summary["endpoint_from"] == f"--config {daemon.config}"
    assert f"endpoint: {daemon.endpoint} (from --config {daemon.config})" in err  # stdout stays JSON
    # The daemon's variable wins over the file (a wildcard bind address is reached on loopback).
    monkeypatch.setenv("MEDGE_ZMQ__INGEST", f"tcp://0.0.0.0:{port}")
    rc, summary, _ = send("--config", str(nobody))
    assert rc == 0 and summary["ok"] == 3
    assert (summary["endpoint"], summary["endpoint_from"]) == (daemon.endpoint, "MEDGE_ZMQ__INGEST")
    # The flag wins over both.
    monkeypatch.setenv("MEDGE_ZMQ__INGEST", f"tcp://127.0.0.1:{free_port()}")
    rc, summary, _ = send("--config", str(nobody), "--endpoint", daemon.endpoint)
    assert rc == 0 and summary["ok"] == 3 and summary["endpoint_from"] == "--endpoint"
    # And the overridden sources really point nowhere.
    rc, summary, err = send("--config", str(daemon.config))
    assert rc == 3 and summary["endpoint_from"] == "MEDGE_ZMQ__INGEST"
    assert "no daemon is accepting connections" in err


def test_send_dicom_finds_the_scp_by_config_env_and_flag(tmp_path: Path, capsys, monkeypatch) -> None:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import UltrasoundImageStorage

    from edge.tools.synthetic_dicom import synthetic_instances
    from edge.tools.daemon_process import free_port

    monkeypatch.delenv("MEDGE_DICOM__PORT", raising=False)
    path = tmp_path / "us.dcm"
    synthetic_instances(1, "US", frame=(32, 32))[0].save_as(path, enforce_file_format=True)
    stored: list[str] = []

    def on_store(event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="SCANNER2")
    ae.add_supported_context(UltrasoundImageStorage)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    scp_port = server.server_address[1]
    cfg = tmp_path / "scanner2.toml"
    cfg.write_text(f'[dicom]\nport = {scp_port}\nae_title = "SCANNER2"\n')
    nobody = _nobody_config(tmp_path)
    try:
        assert main(["send", "dicom", str(path), "--config", str(cfg), "--timeout", "5"]) == 0
        assert f"endpoint: SCANNER2@127.0.0.1:{scp_port} (host from default; port from --config {cfg}; " \
               f"AE title from --config {cfg})" in capsys.readouterr().out
        monkeypatch.setenv("MEDGE_DICOM__PORT", str(scp_port))
        monkeypatch.setenv("MEDGE_DICOM__AE_TITLE", "SCANNER2")
        assert main(["send", "dicom", str(path), "--config", str(nobody), "--timeout", "5"]) == 0
        assert "(host from default; port from MEDGE_DICOM__PORT; AE title from MEDGE_DICOM__AE_TITLE)" \
            in capsys.readouterr().out
        monkeypatch.setenv("MEDGE_DICOM__PORT", str(free_port()))
        assert main(["send", "dicom", str(path), "--config", str(nobody), "--port", str(scp_port),
                     "--timeout", "5"]) == 0
        assert "port from --port" in capsys.readouterr().out
        assert main(["send", "dicom", str(path), "--config", str(cfg), "--timeout", "2"]) != 0  # env wins: nobody
        assert "port from MEDGE_DICOM__PORT" in capsys.readouterr().out
    finally:
        server.shutdown()
    assert len(stored) == 3


def test_send_with_a_missing_config_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    rc = main(["send", "zmq", "--config", str(tmp_path / "nope.toml"), "--frames", "1"])
    assert rc == 1
    assert f"Config file {tmp_path / 'nope.toml'} does not exist" in capsys.readouterr().err


def test_simulated_ultrasound_keeps_its_8_bit_values_in_every_dtype() -> None:
    # The ultrasound model maps pixels with a fixed x/255 (docs/protocol.md, input semantics): a
    # uint16/int16/float32 B-mode frame must carry the same 0..255 values, not a 12-bit or [0,1] scale.
    from edge.tools.synthetic import UltrasoundProbe

    ref = UltrasoundProbe(48, 64, dtype="uint8", seed=3).frame(1)
    assert ref.max() == 255
    for dtype in ("uint16", "int16", "float32"):
        f = UltrasoundProbe(48, 64, dtype=dtype, seed=3).frame(1)
        assert f.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(f.astype(np.int64), ref.astype(np.int64))
