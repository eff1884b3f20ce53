"""``medge``: one program, many subcommands.

Each subcommand lives in its own module that exposes
``configure_parser(parser)`` and ``run(args) -> int``. Only the chosen
command's module is imported, so ``medge --help`` is fast and the daemon
never loads the trainer. Trainer commands are found through the
``medge.commands`` entry-point group (the ``edge`` package never imports
``trainer``); they need the ``trainer`` extra (torch, onnx).

This is the only module that prints, exits or configures logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points
from typing import Sequence

from edge import __version__
from edge.errors import MedgeError

__all__ = ["main", "COMMANDS"]

# name -> (module, one-line help). Trainer commands resolve via entry points.
COMMANDS: dict[str, tuple[str | None, str]] = {
    "serve": ("edge.commands.serve", "run the daemon (ZeroMQ + DICOM ingest, metrics, health)"),
    "demo": ("edge.commands.demo", "one-command demo: daemon + simulated probe + DICOM push + report"),
    "send": ("edge.commands.send", "test client / scanner simulator (zmq | dicom)"),
    "capture": ("edge.commands.capture", "a scanner's video output (V4L2) or a video file to a model (capture extra)"),
    "bench": ("edge.commands.bench", "latency benchmark (engine | zmq | dicom)"),
    "engines": ("edge.commands.engines", "list bundled/installed engines, verify their sha256"),
    "doctor": ("edge.commands.doctor", "check GPU, TensorRT, ports, engines, spool permissions"),
    "keys": ("edge.commands.keys", "write a ZeroMQ CURVE key pair (daemon or client)"),
    "outbox": ("edge.commands.outbox", "results waiting for the PACS: status, re-queue unsent and dead letters"),
    "train": (None, "train a model (needs the trainer extra)"),
    "evaluate": (None, "evaluate a checkpoint or ONNX model on a held-out set (trainer extra)"),
    "export": (None, "export a checkpoint to ONNX + manifest (trainer extra)"),
    "quantize": (None, "write an INT8 Q/DQ ONNX behind an accuracy gate (trainer extra)"),
    "build": (None, "build a TensorRT engine on this machine (tensorrt extra)"),
}


def _module_for(name: str) -> str:
    module, _ = COMMANDS[name]
    if module is not None:
        return module
    for ep in entry_points(group="medge.commands"):
        if ep.name == name:
            return ep.value
    raise MedgeError(
        f"'medge {name}' is provided by the trainer; install it with: pip install 'medge[trainer]'."
    )


def _load(name: str):
    modname = _module_for(name)
    try:
        return importlib.import_module(modname)
    except ImportError as exc:
        extra = "tensorrt" if name == "build" else "trainer"
        raise MedgeError(
            f"'medge {name}' cannot start: {exc}. Install the extra with: pip install 'medge[{extra}]'."
        ) from exc


def _base_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medge",
        description="medge: streaming edge inference for imaging devices (research use only).",
        epilog="Run 'medge COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"medge {__version__}")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


class _WarningsToLog:
    """``warnings.showwarning`` replacement: third-party warning text never reaches the log.

    pydicom and highdicom warn with the offending value in the message
    (``Invalid value for VR DA: '<birth date>'``, ``The string "<patient
    name>" is unlikely to represent ...``), so their text is withheld: the
    log gets the category and the place it came from, once per place (then
    at debug level). Warnings raised by medge's own code keep their text.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, str, int]] = set()
        self._log = logging.getLogger("edge.warnings")

    def __call__(self, message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        where = _short_path(str(filename))
        key = (category.__name__, where, int(lineno))
        level = logging.DEBUG if key in self._seen else logging.WARNING
        self._seen.add(key)
        if where.startswith("edge/"):
            self._log.log(level, "%s at %s:%d: %s", category.__name__, where, lineno, message)
        else:
            self._log.log(
                level,
                "%s from %s:%d (text withheld: third-party warnings may quote patient data; "
                "later ones from this place are logged at debug level).",
                category.__name__, where, lineno,
            )


def _short_path(filename: str) -> str:
    """``site-packages/pydicom/valuerep.py`` -> ``pydicom/valuerep.py``; our files -> ``edge/...``."""
    norm = filename.replace("\\", "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in norm:
            return norm.split(marker, 1)[1]
    if "/edge/" in norm:
        return "edge/" + norm.rsplit("/edge/", 1)[1]
    return norm.rsplit("/", 1)[-1]


class _WithholdDicomLibraryText(logging.Filter):
    """A handler filter: records of pydicom's and highdicom's loggers lose their text.

    So do the records of pynetdicom's modules that quote element values
    (``pynetdicom.utils``: ``Non-conformant 'Affected SOP Instance UID'
    value '<uid>'``; ``pynetdicom.dsutils``); its association and DIMSE
    records are kept.

    pydicom logs the same value-quoting message it warns with (``Invalid
    value for VR DA: '<birth date>'``); the place and level are kept.

    Any other record that carries an exception (``log.exception(...)``,
    ``exc_info=``) gets its traceback rendered by
    :func:`edge.ops.boundary.safe_traceback` (frames kept, third-party messages
    withheld), and one whose message *is* a third-party exception (pynetdicom
    logs ``LOGGER.exception(exc)`` when pydicom cannot encode a data set or an
    event handler raises) is logged by type only: pydicom's messages quote
    element values.
    """

    _PREFIXES = ("pydicom", "highdicom")
    # pynetdicom's modules whose records quote element values: ``utils`` validates UIDs and AE
    # titles (``Non-conformant 'Affected SOP Instance UID' value '<uid>'``, ``Invalid ... value``),
    # ``dsutils`` encodes and decodes data sets. Its association, DIMSE and transport records
    # (events, statuses, AE titles, contexts) hold no element values and are kept.
    _VALUE_LOGGERS = ("pynetdicom.utils", "pynetdicom.dsutils")
    _WITHHELD = "%s %s at %s:%d (text withheld: it may quote patient data)."

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in self._PREFIXES:
            record.msg = self._WITHHELD
            record.args = (record.name, record.levelname, record.module, record.lineno)
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
            return True
        if record.name in self._VALUE_LOGGERS and not isinstance(record.msg, BaseException):
            record.msg = self._WITHHELD  # an exception, and its traceback, are made safe below
            record.args = (record.name, record.levelname, record.module, record.lineno)
        if isinstance(record.msg, BaseException) and not isinstance(record.msg, MedgeError):
            kind = type(record.msg)
            record.msg = "%s.%s (message withheld: it may quote data from the peer)"
            record.args = (kind.__module__, kind.__qualname__)
        if record.exc_info and record.exc_info[1] is not None:
            from edge.ops.boundary import safe_traceback  # only when there is one: keeps ``medge --help`` light

            record.exc_text = safe_traceback(record.exc_info[1])
            record.exc_info = None
        return True


def _quiet_dicom_identifiers() -> None:
    """Keep pynetdicom from logging whole query data sets (patient data) line by line.

    With its logger at INFO (only at ``--log-level DEBUG``, see :func:`main`)
    pynetdicom prints every C-FIND/C-GET/C-MOVE request and response
    identifier element by element, values included. Its C-STORE and
    association records (SOP class and instance UIDs, AE titles, contexts)
    stay. Only done at debug level: importing pynetdicom takes a while.
    """
    from pynetdicom import _config  # pynetdicom's documented place for these switches

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def _route_warnings() -> None:
    """Send Python warnings to the log (never to bare stderr) and guard the log against DICOM values."""
    import warnings

    warnings.showwarning = _WarningsToLog()
    warnings.simplefilter("always")  # our replacement de-duplicates by place, not by (possibly identifying) text
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WithholdDicomLibraryText())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medge`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _base_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (_, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            try:
                _load(name).configure_parser(sp)
            except MedgeError as exc:
                print(f"medge: error: {exc}", file=sys.stderr)
                return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.log_level != "DEBUG":
        # Both log every association / every object they build at INFO; too chatty for a daemon.
        for noisy in ("pynetdicom", "highdicom"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    else:
        _quiet_dicom_identifiers()
    _route_warnings()
    try:
        return int(_load(args.command).run(args) or 0)
    except MedgeError as exc:
        print(f"medge {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
