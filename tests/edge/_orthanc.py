"""A private Orthanc instance as the real PACS in tests (Debian's ``orthanc`` package, 1.10).

:class:`OrthancServer` writes its own JSON configuration under a work folder
(its own storage and index folders, free HTTP and DICOM ports, no plugins,
HTTP on loopback only, no authentication), starts ``Orthanc`` as a child
process, waits until its REST API answers, and stops it with SIGTERM.
:meth:`OrthancServer.restart` keeps the ports and the storage, so instances
stored before survive.

Orthanc answers success to a C-STORE of an instance it already holds and keeps
one copy, so its REST API alone cannot tell whether a peer sent something
twice. The instance therefore runs with ``OverwriteInstances`` (a re-sent
object is stored again) and a built-in Lua ``OnStoredInstance`` hook that
appends one line per stored instance (SOPInstanceUID, origin, calling AE) to
a journal file in the work folder: the PACS's own record of every store,
which survives a restart. :meth:`OrthancServer.stored` reads it after a
:meth:`OrthancServer.barrier`.

Orthanc 1.10 cannot bind its DICOM port to one address, so stores are
allowed only from the configured modalities at their configured host
(``DicomAlwaysAllowStore`` false, ``DicomCheckModalityHost`` true).
REST calls use :mod:`urllib` only.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from edge.tools.daemon_process import free_port

__all__ = ["ORTHANC_DEBIAN", "orthanc_binary", "OrthancError", "OrthancServer"]

ORTHANC_DEBIAN = "/usr/sbin/Orthanc"

_LUA_JOURNAL = """\
-- Written by tests/edge/_orthanc.py: one line per stored instance (also for a re-sent one).
function OnStoredInstance(instanceId, tags, metadata, origin)
  local f = io.open([==[{journal}]==], 'a')
  f:write((tags['SOPInstanceUID'] or '') .. '\\t' .. (origin['RequestOrigin'] or '') .. '\\t'
          .. (origin['RemoteAet'] or '') .. '\\t' .. instanceId .. '\\n')
  f:close()
end
"""


def orthanc_binary() -> str | None:
    """Debian's ``/usr/sbin/Orthanc``, else ``Orthanc`` on PATH, else ``None``."""
    if os.access(ORTHANC_DEBIAN, os.X_OK):
        return ORTHANC_DEBIAN
    return shutil.which("Orthanc")


class OrthancError(RuntimeError):
    """Orthanc did not start, did not answer, or answered a REST call with an error."""


class OrthancServer:
    """A private Orthanc: own config, storage, index and ports; a context manager.

    Parameters
    ----------
    workdir
        Folder for the configuration, storage, index, log and store journal.
    modalities
        ``name -> (AE title, host, port)``: the peers Orthanc may C-STORE to
        (``POST /modalities/{name}/store``) and the only ones it accepts
        C-STOREs from.
    aet
        Orthanc's own AE title.
    """

    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
                 *, aet: str = "ORTHANC", binary: str | None = None) -> None:
        binary = binary or orthanc_binary()
        if binary is None:
            raise OrthancError(f"Orthanc is not installed ({ORTHANC_DEBIAN} or Orthanc on PATH).")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.journal_path = self.workdir / "stored.tsv"
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh: Any = None

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    def _write_config(self) -> None:
        lua = self.workdir / "journal.lua"
        lua.write_text(_LUA_JOURNAL.format(journal=self.journal_path), encoding="utf-8")
        db = self.workdir / "db"
        config = {
            "Name": "medge-test-pacs",
            "StorageDirectory": str(db / "storage"),
            "IndexDirectory": str(db / "index"),
            "Plugins": [],
            "LuaScripts": [str(lua)],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpCompressionEnabled": False,
            "HttpThreadsCount": 4,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomScuTimeout": 30,
            "DicomModalities": {name: list(m) for name, m in self.modalities.items()},
            "OverwriteInstances": True,  # a re-sent object is stored (and journaled) again: see module doc
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "StableAge": 3600,
        }
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    def start(self, timeout_s: float = 30.0) -> "OrthancServer":
        """Start Orthanc and wait until its REST API and DICOM port answer."""
        if self.proc is not None and self.proc.poll() is None:
            raise OrthancError("Orthanc is already running.")
        self._write_config()
        self._log_fh = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, str(self.config_path)], stdout=self._log_fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()  # closes the log
                raise OrthancError(f"Orthanc exited with status {self.proc.returncode} during start-up:\n"
                                   f"{self.log_tail()}")
            try:
                system = self.get("/system")
                if system.get("DicomPort") == self.dicom_port and self._dicom_listening():
                    return self
            except (OrthancError, urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {timeout_s:g} s:\n{self.log_tail()}")

    def _dicom_listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1.0)
            return s.connect_ex(("127.0.0.1", self.dicom_port)) == 0

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; return the exit status (``None``: not started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        return self.proc.returncode

    def restart(self, timeout_s: float = 30.0) -> "OrthancServer":
        """Stop and start again on the same ports, storage and index."""
        self.stop()
        return self.start(timeout_s)

    @property
    def running(self) -> bool:
        """Whether the Orthanc process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of Orthanc's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # REST ---------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | dict | list | str | None = None,
                timeout_s: float = 60.0) -> Any:
        """One REST call; JSON answers are decoded, others returned as bytes; an HTTP error raises."""
        data: bytes | None
        headers = {}
        if isinstance(body, (dict, list)):
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        elif isinstance(body, str):
            data, headers["Content-Type"] = body.encode(), "text/plain"
        else:
            data = body
            if body is not None:
                headers["Content-Type"] = "application/dicom"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - loopback
                raw = resp.read()
                kind = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")
            raise OrthancError(f"Orthanc answered {method} {path} with HTTP {exc.code}: {detail}") from exc
        return json.loads(raw) if kind.startswith("application/json") else raw

    def get(self, path: str) -> Any:
        """``GET path``."""
        return self.request("GET", path, timeout_s=5.0)

    def upload(self, data: bytes) -> dict[str, Any]:
        """``POST /instances`` of one Part 10 file; returns Orthanc's answer (``Status``, ``ID``, ...)."""
        answer = self.request("POST", "/instances", data)
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"Orthanc did not store the upload: {answer}")
        return answer

    def store_to(self, modality: str, resources: list[str], timeout_s: float = 120.0) -> dict[str, Any]:
        """``POST /modalities/{modality}/store`` (synchronous C-STORE of ``resources``); Orthanc's answer."""
        return self.request("POST", f"/modalities/{modality}/store",
                            {"Resources": resources, "Synchronous": True}, timeout_s=timeout_s)

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        """``GET /studies/{id}/instances``: every instance of the study with its main tags."""
        return list(self.get(f"/studies/{study_id}/instances"))

    def instance_file(self, instance_id: str) -> bytes:
        """The stored Part 10 file of one instance."""
        return bytes(self.request("GET", f"/instances/{instance_id}/file", timeout_s=30.0))

    def find_instances(self, **query: str) -> list[str]:
        """``POST /tools/find`` at instance level; Orthanc ids of the matches."""
        return list(self.request("POST", "/tools/find", {"Level": "Instance", "Query": query}))

    # Store journal ------------------------------------------------------------------------------

    def journal(self) -> list[tuple[str, str, str, str]]:
        """``(SOPInstanceUID, origin, calling AE, Orthanc id)`` per store so far, oldest first."""
        try:
            text = self.journal_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [tuple(line.split("\t")) for line in text.splitlines() if line]  # type: ignore[misc]

    def stored(self, calling_ae: str | None = None, since: int = 0) -> Counter[str]:
        """How many times each SOPInstanceUID was stored, from journal line ``since`` on.

        With ``calling_ae``: only C-STOREs from that AE title. Call :meth:`barrier` first.
        """
        return Counter(uid for uid, origin, aet, _id in self.journal()[since:]
                       if calling_ae is None or (origin == "DicomProtocol" and aet == calling_ae))

    def barrier(self, timeout_s: float = 10.0) -> None:
        """Return once every store Orthanc acknowledged so far is in the journal.

        Orthanc runs the Lua hook from one queue, in order: this uploads a
        tiny marker instance (its own patient) and waits until its line is written.
        """
        from pydicom import dcmwrite
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian

        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName = "BARRIER", "BARRIER"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality = "OT"
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        self.upload(buf.getvalue())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(uid == ds.SOPInstanceUID for uid, *_ in self.journal()):
                return
            time.sleep(0.05)
        raise OrthancError(f"Orthanc's store journal did not record the barrier within {timeout_s:g} s.")
