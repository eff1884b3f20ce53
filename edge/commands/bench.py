"""``medge bench engine|zmq|dicom``: latency benchmarks in the style of trtexec and perf_analyzer.

Argument parsing and dispatch only: the measuring is in :mod:`edge.tools.bench`
(engine), :mod:`edge.tools.bench_zmq` (zmq) and :mod:`edge.tools.bench_dicom` (dicom).

- ``engine``: the raw backend on a preprocessed input (only ``backend.infer``
  is inside the timed region), like ``trtexec``: min / mean / median / p90 /
  p95 / p99 / max, coefficient of variation (warned about when high) and
  throughput; on TensorRT also H2D / compute / D2H from CUDA events.
  ``--device`` picks the CUDA device, ``--cache-dir`` and ``--max-batch``
  default to the daemon's (the TensorRT plan the daemon would load is the
  one measured). Only this mode's modules are imported: no pydicom.
- ``zmq``: end to end through a running daemon, like ``perf_analyzer``:
  client latency percentiles, achieved rate, drops, errors and the daemon's
  stage breakdown (``timing_us``); ``--sweep`` runs one row per step;
  ``--compare-raw`` also times the raw backend on the same input in this
  process (interleaved blocks, so both see the same machine) and prints the
  daemon's overhead at p50 and p99, each with its window-to-window noise and
  labelled when negative or within that noise; ``--stability-percentage``
  repeats measurement windows until the last few agree (perf_analyzer's rule).
- ``dicom``: C-STORE throughput into the daemon's SCP and, with
  ``--results-port``, store-to-result latency per instance (a local storage
  SCP receives the daemon's SEG/SR), with the same statistics and CV warning.

Every mode takes ``--config FILE`` and the daemon's ``MEDGE_*`` variables
for its endpoints (flag > ``MEDGE_*`` > file > default; see
:mod:`edge.tools.endpoints`) and prints the endpoint it uses first.

Every mode writes a human table to stdout and optionally ``--json`` (raw
samples and summary), ``--csv`` and ``--plot`` (latency histogram + CDF,
PNG). A daemon that is down or stops mid-run ends the run with a clear
message, the partial results written, and exit status 3.

Exit status: 0 success; 1 the run finished but some requests failed;
2 bad arguments; 3 the daemon was unreachable or stopped mid-run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge.ops.curve import add_curve_arguments
from edge.tools.endpoints import add_config_argument, parse_frame

__all__ = ["configure_parser", "run", "parse_sweep"]


# ---------------------------------------------------------------------------- parsing helpers
def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``"concurrency=1,2,4,8"`` -> ``("concurrency", [1, 2, 4, 8])``; also ``rate=`` and ``streams=``."""
    try:
        key, values = text.split("=", 1)
        vals = [float(v) for v in values.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"sweep {text!r} is not KEY=V1,V2,... ") from exc
    key = key.strip()
    if key not in ("concurrency", "rate", "streams") or not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(
            f"sweep {text!r}: KEY must be concurrency, rate or streams and values > 0")
    return key, vals


def _positive_float(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return v


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        v = int(text)
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{text} is not >= {minimum}")
        return v

    parse.__name__ = "int"  # argparse's "invalid int value: 'x'"
    return parse


_non_negative_int, _positive_int, _at_least_two = _int_at_least(0), _int_at_least(1), _int_at_least(2)


def _percentage(text: str) -> float:
    v = float(text)
    if not 0 < v <= 1000:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage in (0, 1000]")
    return v


def _add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", type=Path, metavar="FILE", help="write raw samples + summary as JSON")
    g.add_argument("--csv", type=Path, metavar="FILE", help="write per-sample rows as CSV")
    g.add_argument("--plot", type=Path, metavar="FILE.png", help="write a latency histogram + CDF (PNG)")
    g.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    g.add_argument("--cv-warn", type=float, default=0.10, metavar="RATIO",
                   help="warn when the coefficient of variation exceeds this (default 0.10)")


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("model (engine mode, and the raw side of --compare-raw)")
    g.add_argument("--model", required=required, help="model name under the engines folder (e.g. us-lesion-seg)")
    g.add_argument("--engines-dir", type=Path, default=None,
                   help="engines folder (default: MEDGE_ENGINES_DIR, else engines_dir of --config, else the "
                        "bundled engines/)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16", "auto"])
    g.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "auto"])
    g.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"],
                   help="ONNX Runtime execution provider (default cpu)")
    g.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads (0: one per usable core, as the daemon)")
    g.add_argument("--spin-us", type=int, default=1000, metavar="US",
                   help="ONNX Runtime intra-op spin after each parallel section, as the daemon's "
                        "[[models]] spin_us (default 1000; 0: no spinning)")
    g.add_argument("--device", type=_non_negative_int, default=0, metavar="N",
                   help="CUDA device ordinal, as the daemon's [[models]] device_id (default 0)")
    g.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="TensorRT engine cache (default: the daemon's, [cache_dir] or <spool_dir>/engine-cache "
                        "of --config and MEDGE_*, so a plan built by the daemon or 'medge build' is reused)")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``engine``, ``zmq`` and ``dicom`` modes to ``parser``."""
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True)

    pe = sub.add_parser("engine", help="raw backend latency/throughput (trtexec style)",
                        description="Time only backend.infer on a preprocessed input, like trtexec.")
    _add_model_args(pe, required=True)
    add_config_argument(pe)
    pe.add_argument("--batch", type=_positive_int, default=1)
    pe.add_argument("--max-batch", type=_positive_int, default=None, metavar="N",
                    help="largest batch the backend is built for (TensorRT's profile and cache key; default: "
                         "the daemon's for this model from --config and MEDGE_*, at least --batch)")
    pe.add_argument("--frame", type=parse_frame, default=(480, 640), metavar="HxW",
                    help="size of the synthetic source frame that is preprocessed once (default 480x640)")
    pe.add_argument("--warmup-s", type=float, default=1.0)
    g = pe.add_mutually_exclusive_group()
    g.add_argument("--duration-s", type=_positive_float, default=None, help="timed run length (default 5 s)")
    g.add_argument("--iterations", type=_positive_int, default=None)
    _add_output_args(pe)

    pz = sub.add_parser("zmq", help="end-to-end through a running daemon (perf_analyzer style)",
                        description="Stream synthetic frames to a running daemon and measure latency.")
    pz.add_argument("--endpoint", default=None,
                    help="daemon ingest (default: MEDGE_ZMQ__INGEST, else [zmq] ingest of --config, "
                         "else tcp://127.0.0.1:5555)")
    add_config_argument(pz)
    add_curve_arguments(pz)
    g = pz.add_mutually_exclusive_group()
    g.add_argument("--rate", type=_positive_float, default=None, metavar="FPS",
                   help="open loop: frames per second per stream")
    g.add_argument("--concurrency", type=_positive_int, default=None, metavar="N",
                   help="closed loop: requests outstanding per stream (default 1)")
    pz.add_argument("--streams", type=_positive_int, default=1, metavar="K")
    pz.add_argument("--window", type=_positive_int, default=8,
                    help="rate mode: most requests in flight per stream; later frames are skipped")
    pz.add_argument("--frame", type=parse_frame, default=(480, 640), metavar="HxW")
    pz.add_argument("--dtype", default="uint8", choices=["uint8", "uint16", "int16", "float32"])
    pz.add_argument("--source", default="auto", choices=["auto", "ultrasound", "xray"],
                    help="synthetic frames (auto: by the model's task, else ultrasound)")
    pz.add_argument("--duration-s", type=_positive_float, default=10.0,
                    help="per step (default 10; not used with --stability-percentage)")
    pz.add_argument("--warmup-s", type=float, default=1.0, help="unrecorded warm-up before each step")
    pz.add_argument("--sweep", type=parse_sweep, default=None, metavar="KEY=V1,V2",
                    help="concurrency=1,2,4,8 | rate=10,30,60 | streams=1,2,4,8: one row per step")
    pz.add_argument("--compare-raw", action="store_true",
                    help="also time the raw backend on the same input in this process; print the overhead")
    st = pz.add_argument_group("stability (perf_analyzer's --stability-percentage)")
    st.add_argument("--stability-percentage", type=_percentage, default=None, metavar="P",
                    help="measure each step in windows of --measurement-interval-s until the last "
                         "--stability-windows windows' p50 latency and throughput are each within P %% of "
                         "their mean (or --max-windows is reached); the step reports those last windows")
    st.add_argument("--measurement-interval-s", type=_positive_float, default=2.0, metavar="S",
                    help="length of one measurement window (default %(default)s)")
    st.add_argument("--stability-windows", type=_at_least_two, default=3, metavar="N",
                    help="how many of the last windows must agree (default %(default)s)")
    st.add_argument("--max-windows", type=_positive_int, default=10, metavar="N",
                    help="give up after this many windows per step and report 'not stable' (default %(default)s)")
    pz.add_argument("--metrics-url", default=None,
                    help="daemon /metrics URL: adds the mean batch size per step (e.g. http://127.0.0.1:9108/metrics)")
    pz.add_argument("--reply-timeout-s", type=_positive_float, default=5.0)
    pz.add_argument("--connect-timeout-s", type=_positive_float, default=3.0)
    pz.add_argument("--want", default=None, help="comma-separated 'want' list sent in the header")
    _add_model_args(pz, required=False)
    _add_output_args(pz)

    pd = sub.add_parser("dicom", help="C-STORE throughput and store-to-result latency",
                        description="Send DICOM instances to the daemon's SCP; optionally receive its results.")
    _add_dicom_args(pd)
    add_config_argument(pd)
    _add_output_args(pd)


def _add_dicom_args(p: argparse.ArgumentParser) -> None:
    """Options of ``medge bench dicom``."""
    p.add_argument("--host", default=None,
                   help="the daemon's SCP host (default: MEDGE_DICOM__HOST, else [dicom] host of --config, "
                        "else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="its port (default: MEDGE_DICOM__PORT, else [dicom] port of --config, else 11112)")
    p.add_argument("--aet", default=None,
                   help="called AE title (default: MEDGE_DICOM__AE_TITLE, else [dicom] ae_title of --config, "
                        "else MEDGE)")
    p.add_argument("--calling-aet", default="MEDGEBENCH", help="our AE title (must be allowed by the daemon)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--files", type=Path, metavar="DIR", help="send every DICOM file under DIR")
    g.add_argument("--synthetic", type=int, metavar="N", help="send N synthetic single-frame instances")
    p.add_argument("--modality", default="US", choices=["US", "DX"], help="synthetic modality (default US)")
    p.add_argument("--frame", default=None, metavar="HxW", help="synthetic frame size (US 480x640, DX 512x512)")
    p.add_argument("--results-port", type=int, default=None, metavar="PORT",
                   help="start a local storage SCP on PORT (0: a free port) to time store-to-result; "
                        "the daemon must have it as a [[dicom.destinations]] entry")
    p.add_argument("--results-aet", default="MEDGEPACS", help="AE title of that SCP (default %(default)s)")
    p.add_argument("--results-timeout-s", type=float, default=30.0,
                   help="how long to wait for results after the last C-STORE (default %(default)s)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="association timeouts (default %(default)s)")


# ---------------------------------------------------------------------------- entry
def run(args: argparse.Namespace) -> int:
    """Run the chosen mode; see the module docstring for the exit status.

    Each mode's module is imported here, when chosen: engine mode never
    loads pydicom/pynetdicom (DICOM mode's) nor the ZeroMQ client.
    """
    if args.mode == "engine":
        from edge.tools.bench import run_engine

        return run_engine(args)
    if args.mode == "zmq":
        from edge.tools.bench_zmq import run_zmq

        return run_zmq(args)
    from edge.tools.bench_dicom import run_dicom

    return run_dicom(args)
