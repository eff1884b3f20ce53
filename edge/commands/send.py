"""``medge send zmq|dicom``: a test client and scanner simulator.

``medge send zmq`` streams frames to a daemon over ZeroMQ protocol v1 from a
DEALER socket, pipelined (up to ``--window`` frames in flight; a frame that
falls due while the window is full is skipped, as a live probe would), at a
fixed ``--fps``. Sources: a synthetic ultrasound probe (default) or X-ray
frames, a folder of PNG/JPEG/TIFF/DICOM images, or one DICOM file
(multi-frame cine: every frame). It prints one line per second (sent, ok,
dropped, errors, p50/p99 latency) and a summary with what the last frame's
reply said (a classification's classes and decision and how many frames
were called positive, a detection's boxes, a segmentation's labelled
share); ``--json`` prints the same as JSON lines.

``medge send dicom`` is provided by :mod:`edge.tools.dicom_scu` (C-STORE SCU).

Both find the daemon as :mod:`edge.tools.endpoints` describes: a flag
(``--endpoint``; ``--host``, ``--port``, ``--aet``), else the daemon's
``MEDGE_*`` variables (``MEDGE_ZMQ__INGEST``; ``MEDGE_DICOM__HOST``,
``MEDGE_DICOM__PORT``, ``MEDGE_DICOM__AE_TITLE``), else the daemon's config
file given with ``--config``, else the defaults. The endpoint used and where
it came from is printed first (on stderr with ``--json``).

Exit status: 0 every frame answered ``ok`` or ``dropped``; 1 some frames got
errors or no reply; 3 no daemon reachable, or it stopped mid-run.

Examples
--------
::

    medge send zmq --fps 30 --duration-s 10
    medge send zmq --model xray-nodule-det --source xray --frame 512x512 --dtype uint16 --fps 5 --frames 20
    medge send zmq --model xray-nodule-cls --source xray --want heatmap --fps 5 --frames 20
    medge send zmq --source cine.dcm --fps 25 --json
    medge send zmq --config /etc/medge/scanner-2.toml --frames 30
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from edge.errors import MedgeError
from edge.ops.curve import add_curve_arguments, curve_from_args
from edge.tools.endpoints import add_config_argument, parse_frame, resolve_client_endpoints

__all__ = ["configure_parser", "run"]

_log = logging.getLogger(__name__)


def _positive(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return v


def _dicom_module():
    try:
        return importlib.import_module("edge.tools.dicom_scu")
    except ImportError as exc:
        _log.debug("edge.tools.dicom_scu unavailable: %s", exc)
        return None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``zmq`` and ``dicom`` transports."""
    sub = parser.add_subparsers(dest="transport", metavar="TRANSPORT", required=True)
    pz = sub.add_parser("zmq", help="stream frames over ZeroMQ protocol v1 (pipelined DEALER)",
                        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    pz.add_argument("--endpoint", default=None,
                    help="daemon ingest (default: MEDGE_ZMQ__INGEST, else [zmq] ingest of --config, "
                         "else tcp://127.0.0.1:5555)")
    add_config_argument(pz)
    pz.add_argument("--model", default=None, help="model name (default: the daemon's default model)")
    pz.add_argument("--stream", default="probe-1", help="stream name (default %(default)s)")
    pz.add_argument("--fps", type=_positive, default=30.0, help="frames per second (default %(default)s)")
    g = pz.add_mutually_exclusive_group()
    g.add_argument("--duration-s", type=_positive, default=None, help="stream for this long (default 10 s)")
    g.add_argument("--frames", type=int, default=None, help="send this many frames")
    pz.add_argument("--source", default="synthetic",
                    help="synthetic (ultrasound probe), xray, a folder of PNG/DICOM images, or a DICOM (cine) file")
    pz.add_argument("--frame", type=parse_frame, default=None, metavar="HxW",
                    help="synthetic frame size (default 480x640; xray 512x512)")
    pz.add_argument("--dtype", default=None, choices=["uint8", "uint16", "int16", "float32"],
                    help="synthetic pixel type (default uint8; xray uint16)")
    pz.add_argument("--window", type=int, default=8, help="most frames in flight (default %(default)s)")
    pz.add_argument("--seed", type=int, default=0, help="seed of the synthetic source")
    pz.add_argument("--want", default=None,
                    help="comma-separated 'want' list: mask, boxes, heatmap, probability (default: mask,boxes)")
    pz.add_argument("--reply-timeout-s", type=_positive, default=5.0,
                    help="a frame with no reply after this long is a timeout; no reply at all: the run stops")
    pz.add_argument("--connect-timeout-s", type=_positive, default=3.0)
    pz.add_argument("--json", action="store_true", help="print JSON lines (one per second, then the summary)")
    add_curve_arguments(pz)

    mod = _dicom_module()
    if mod is not None and hasattr(mod, "configure_parser"):
        pd = sub.add_parser("dicom", help="send DICOM instances by C-STORE (edge.tools.dicom_scu)",
                            description=(mod.__doc__ or "").strip().split("\n\n")[0] or None)
        mod.configure_parser(pd)
        add_config_argument(pd)
        # None marks "not given", so MEDGE_* and --config can fill them in (see _resolve_dicom).
        pd.set_defaults(host=None, port=None, called_ae=None)
    else:
        sub.add_parser("dicom", help="send DICOM instances by C-STORE (not available in this build)")


def _source(args: argparse.Namespace):
    from edge.tools.loadgen import frames_from_path
    from edge.tools.synthetic import UltrasoundProbe, XrayFrames

    if args.source in ("synthetic", "ultrasound"):
        h, w = args.frame or (480, 640)
        return UltrasoundProbe(h, w, args.dtype or "uint8", seed=args.seed), f"synthetic ultrasound {h}x{w}"
    if args.source == "xray":
        h, w = args.frame or (512, 512)
        return XrayFrames(h, w, args.dtype or "uint16", seed=args.seed), f"synthetic X-ray {h}x{w}"
    p = Path(args.source)
    if args.frame or args.dtype:
        _log.info("--frame/--dtype apply to synthetic sources only; %s is sent as stored.", p)
    src = frames_from_path(p)
    n = len(src.arrays)
    f0 = src.arrays[0]
    return src, f"{p} ({n} frame(s), first {list(f0.shape)} {f0.dtype})"


def last_result(rep: Any) -> dict[str, Any]:
    """What one ok reply (:class:`edge.tools.zmq_client.Reply`) said, as JSON-ready data.

    ``task``; ``classes`` and ``decision`` (classification); ``boxes`` (a
    count); ``labelled`` (the share of mask pixels not background); and the
    ``[H, W]`` of each map received (``mask``, ``probability``, ``heatmap``).
    """
    out: dict[str, Any] = {"task": rep.header.get("task")}
    if rep.classes:
        out["classes"], out["decision"] = rep.classes, rep.decision
    if "boxes" in rep.header:
        out["boxes"] = len(rep.boxes)
    for key in ("mask", "probability", "heatmap"):
        arr = getattr(rep, key)
        if arr is not None:
            out[key] = list(arr.shape)
            if key == "mask":
                out["labelled"] = round(float((arr > 0).mean()), 4) if arr.size else 0.0
    return out


def _result_line(result: dict[str, Any]) -> str:
    """:func:`last_result` as one line for a person."""
    parts = []
    if "classes" in result:
        shown = ", ".join(f"{c.get('label')} {float(c.get('score', 0.0)):.4f}" for c in result["classes"][:3])
        parts.append(f"classes {shown}; decision {str(result['decision']).lower()}")
    if result.get("boxes"):
        parts.append(f"{result['boxes']} box(es)")
    if "labelled" in result:
        parts.append(f"mask {100 * result['labelled']:.1f} % labelled")
    parts += [f"{k} {result[k][0]}x{result[k][1]}" for k in ("probability", "heatmap") if k in result]
    return "; ".join(parts) or "nothing asked for (status and timing only)"


def _say(args: argparse.Namespace, line: str) -> None:
    """A line for the operator: stdout, or stderr when stdout carries JSON."""
    print(line, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


def _run_zmq(args: argparse.Namespace) -> int:
    from edge.tools.loadgen import StreamSpec, Tick, describe, run_load

    eps = resolve_client_endpoints(args.config, endpoint=args.endpoint)
    endpoint = eps.zmq_ingest.value
    _say(args, f"endpoint: {eps.zmq_line()}")
    if eps.zmq_curve and curve_from_args(args) is None:
        _say(args, "note: the daemon's settings require CURVE ([zmq] curve_server_key): "
                   "pass --curve-server-key and --curve-client-key")
    if args.window < 1:
        raise MedgeError(f"--window {args.window} is not >= 1.")
    if args.frames is not None and args.frames < 1:
        raise MedgeError(f"--frames {args.frames} is not >= 1.")
    duration = None if args.frames is not None else (args.duration_s or 10.0)
    source, what = _source(args)
    want = [w.strip() for w in args.want.split(",")] if args.want else None
    spec = StreamSpec(name=args.stream, source=source, model=args.model, rate_fps=args.fps,
                      window=args.window, frames=args.frames, want=want)
    if not args.json:
        print(f"medge send zmq: {what} as stream {args.stream!r}, model "
              f"{args.model or '(daemon default)'}, {args.fps:g} fps, window {args.window}")
        print(f"{'t_s':>5} {'sent':>5} {'ok':>5} {'dropped':>7} {'errors':>6} {'timeouts':>8} {'skipped':>7} "
              f"{'p50_ms':>8} {'p99_ms':>8}")

    def tick(t: Tick) -> None:
        if args.json:
            print(json.dumps({"type": "tick", **t.to_dict()}), flush=True)
            return
        p50 = f"{t.p50_ms:8.2f}" if t.p50_ms is not None else f"{'-':>8}"
        p99 = f"{t.p99_ms:8.2f}" if t.p99_ms is not None else f"{'-':>8}"
        print(f"{t.t_s:5.0f} {t.sent:5d} {t.ok:5d} {t.dropped:7d} {t.errors:6d} {t.timeouts:8d} {t.skipped:7d} "
              f"{p50} {p99}", flush=True)

    res = run_load(endpoint, [spec], duration_s=duration, reply_timeout_s=args.reply_timeout_s,
                   connect_timeout_s=args.connect_timeout_s, on_tick=tick, curve=curve_from_args(args))
    summary: dict[str, Any] = res.summary()
    summary["endpoint"], summary["endpoint_from"] = endpoint, eps.zmq_ingest.origin
    last = res.last_replies.get(args.stream)
    if last is not None:
        summary["last_result"] = last_result(last)
    if args.json:
        print(json.dumps({"type": "summary", **summary}), flush=True)
    else:
        print(f"summary: {describe(res)}")
        if "last_result" in summary:
            print(f"last result: {_result_line(summary['last_result'])}")
        if "decisions" in summary:
            d = summary["decisions"]
            print(f"decisions: {d['positive']} positive, {d['negative']} negative "
                  "(at the model's threshold, of the frames answered ok)")
        if summary["error_codes"]:
            print(f"error codes: {summary['error_codes']}")
    if res.aborted:
        print(f"medge send zmq: error: {res.aborted}.", file=sys.stderr)
        return 3
    return 1 if summary["errors"] or summary["timeouts"] else 0


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen transport."""
    if args.transport == "zmq":
        return _run_zmq(args)
    mod = _dicom_module()
    if mod is None or not hasattr(mod, "run"):
        raise MedgeError("'medge send dicom' is not available in this build (edge.tools.dicom_scu is missing).")
    _resolve_dicom(args)
    return int(mod.run(args) or 0)


def _resolve_dicom(args: argparse.Namespace) -> None:
    """Fill in the SCP's host, port and AE title: flag > MEDGE_DICOM__* > --config > default."""
    eps = resolve_client_endpoints(args.config, host=args.host, port=args.port, ae_title=args.called_ae)
    args.host, args.port, args.called_ae = eps.dicom_host.value, eps.dicom_port.value, eps.dicom_ae_title.value
    _say(args, f"endpoint: {eps.dicom_line()}")
