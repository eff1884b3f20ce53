"""The demo runner behind ``medge demo``: the daemon, simulated probe and X-ray streams, a DICOM push, a report.

What it does, in about ``--duration-s`` plus a few seconds:

1. writes a temporary configuration (free loopback ports for ZeroMQ, the
   metrics/health server and the DICOM SCP; a local storage SCP as the
   results destination) and starts ``medge serve --config`` as a child
   process on the bundled models; waits for ``/readyz``;
2. streams a simulated ultrasound probe (480x640 uint8, ``--fps``) to the
   segmentation model, synthetic chest radiographs (512x512 uint16, 2 fps;
   :class:`edge.tools.synthetic.Radiographs`, the X-ray models' training
   generator) to the detection model and, when a classification model is
   there (``--cls-model``), labelled radiographs with and without nodules to it
   (``--cls-fps``, plus 1 fps asking for the heatmap;
   :mod:`edge.tools.demo_classification`), pipelined, printing a live table
   every second (fps, p50/p99 latency, drops, errors);
3. unless ``--no-dicom``, C-STOREs a few synthetic US and DX instances (and
   one CR, routed to the classifier when there is one) to the daemon's SCP
   and waits for the SEG / SR results at the local SCP (if the DICOM side
   cannot start, this step is skipped with a message);
4. stops the daemon with SIGTERM (graceful shutdown) and writes the report
   folder: ``overlay_segmentation.png``, ``overlay_detection.png``,
   ``latency.png`` (histogram + CDF), with a classifier
   ``roc_classification.png`` and ``overlay_classification.png`` (a class
   activation map), ``summary.json``, ``report.md``, ``medge.toml`` and
   ``daemon.log``.

A model that is not under the engines folder is left out with a note.

Runs on a CPU-only machine. Exit status 0 when every frame got an ``ok``
or ``dropped`` reply, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import MedgeError
from edge.tools.daemon_process import DaemonProcess, free_port, write_demo_config
from edge.tools.demo_classification import (ClassificationStreams, classification_cr, classification_markdown,
                                            resolve_classifier, write_classification_report)

__all__ = ["run_demo"]

_log = logging.getLogger(__name__)


def _available_models(engines_dir: Path, names: list[str]) -> list[str]:
    return [n for n in names if (engines_dir / n / "manifest.json").is_file()]


def _dicom_available() -> tuple[bool, str]:
    for mod in ("edge.ingest.dicom.scp", "edge.egress.dicom.results"):
        if importlib.util.find_spec(mod) is None:
            return False, f"{mod} is not part of this build"
    return True, ""


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo with the options of ``medge demo``; see the module docstring."""
    if args.duration_s <= 0 or args.fps <= 0 or args.cls_fps <= 0:
        raise MedgeError("--duration-s, --fps and --cls-fps must be > 0.")
    t_start = time.monotonic()
    engines_dir, models, seg, det = _resolve_models(args)
    cls, cls_note = resolve_classifier(engines_dir, args.cls_model)
    if cls is not None:
        models.append(cls.model)
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    want_dicom, dicom_note = _dicom_plan(args)
    work = Path(tempfile.mkdtemp(prefix="medge-demo-"))
    catcher = None
    try:
        if want_dicom:
            from edge.tools.bench_dicom import ResultCatcher

            catcher = ResultCatcher(0, "MEDGEPACS", keep_datasets=False)
        plan = _Plan(engines_dir, models, seg, det, report, work, args.precision,
                     ports={k: free_port() for k in ("ingest", "publish", "metrics", "dicom")},
                     routes=_routes(seg, det, cls.model if cls else None),
                     cls_streams=ClassificationStreams(cls, args.cls_fps) if cls else None)
        outcome = _run_daemon(args, plan, catcher, want_dicom, dicom_note)
    finally:
        if catcher is not None:
            catcher.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = _write_report(report, args, outcome, plan, cls_note, time.monotonic() - t_start)
    print(f"report written to {report}/ (report.md, summary.json, "
          + ", ".join(f for f in summary["files"].values() if f.endswith(".png")) + ")")
    frames = summary["frames"]
    return 0 if frames["errors"] == 0 and frames["timeouts"] == 0 and not summary["aborted"] else 1


@dataclass(frozen=True)
class _Plan:
    """What the demo's daemon runs: its models, folders, ports and DICOM routes."""

    engines_dir: Path
    models: list[str]
    seg: str | None
    det: str | None
    report: Path
    work: Path
    precision: str
    ports: dict[str, int]
    routes: dict[str, str]
    cls_streams: ClassificationStreams | None = None

    def write_config(self, *, dicom: bool, results_port: int | None) -> Path:
        """Write (or rewrite) the report folder's ``medge.toml``; return its path."""
        return write_demo_config(self.report / "medge.toml", engines_dir=self.engines_dir.resolve(),
                                 spool_dir=self.work / "spool", models=self.models, ports=self.ports, dicom=dicom,
                                 precision=self.precision, routes=self.routes, results_port=results_port)


@dataclass(frozen=True)
class _Outcome:
    """What a demo run measured, for the report."""

    stream_res: Any
    sources: dict[str, Any]
    stream_models: dict[str, str]
    dicom_summary: dict[str, Any]
    ready_s: float
    exit_code: int
    metrics_text: str


def _resolve_models(args: argparse.Namespace) -> tuple[Path, list[str], str | None, str | None]:
    """The engines folder, the requested models found there, and which is segmentation and detection."""
    from edge.inference.manifest import Manifest, default_engines_dir

    engines_dir = Path(args.engines_dir) if args.engines_dir else default_engines_dir()
    models = _available_models(engines_dir, [args.seg_model, args.det_model])
    if not models:
        raise MedgeError(f"No models {args.seg_model!r} / {args.det_model!r} under {engines_dir}; "
                         f"build them with 'make engines' or pass --engines-dir.")
    tasks = {m: Manifest.load(engines_dir / m).task for m in models}
    seg = next((m for m in models if tasks[m] == "segmentation"), None)
    det = next((m for m in models if tasks[m] == "detection"), None)
    return engines_dir, models, seg, det


def _dicom_plan(args: argparse.Namespace) -> tuple[bool, str]:
    """Whether to push DICOM, and why not (printed when this build lacks the DICOM side)."""
    want_dicom = not args.no_dicom
    dicom_note = "skipped (--no-dicom)" if args.no_dicom else ""
    if want_dicom:
        ok, why = _dicom_available()
        if not ok:
            want_dicom, dicom_note = False, f"skipped: {why}"
            print(f"DICOM push {dicom_note}")
    return want_dicom, dicom_note


def _routes(seg: str | None, det: str | None, cls: str | None = None) -> dict[str, str]:
    """The daemon's DICOM routes: US to the segmentation model, DX to the detection model, CR to the
    classification model (to the detection model without one)."""
    routes = {}
    if seg:
        routes["US"] = seg
    if det:
        routes["DX"] = det
        routes["CR"] = det
    if cls:
        routes["CR"] = cls
    return routes


def _run_daemon(args: argparse.Namespace, plan: _Plan, catcher, want_dicom: bool, dicom_note: str) -> _Outcome:
    """Start the daemon, stream, push DICOM, scrape its metrics, and stop it (always)."""
    ports = plan.ports
    cfg_path = plan.write_config(dicom=want_dicom, results_port=catcher.port if catcher else None)
    print(f"medge demo: starting the daemon on {', '.join(plan.models)} ({args.precision}); "
          f"ZeroMQ tcp://127.0.0.1:{ports['ingest']}, metrics http://127.0.0.1:{ports['metrics']}/metrics"
          + (f", DICOM SCP MEDGE@127.0.0.1:{ports['dicom']}" if want_dicom else ""))
    daemon = DaemonProcess(cfg_path, ports["metrics"], plan.report / "daemon.log")
    try:
        try:
            ready_s = daemon.wait_ready(90.0)
        except MedgeError as exc:
            if not want_dicom:
                raise
            # The DICOM side must not take the demo down: retry without it.
            want_dicom, dicom_note = False, _DICOM_FAILED
            daemon = _restart_without_dicom(daemon, plan, exc)
            ready_s = daemon.wait_ready(90.0)
        print(f"daemon ready in {ready_s:.1f} s")
        stream_res, sources, stream_models = _stream(args, ports, plan.seg, plan.det, plan.cls_streams)
        dicom_summary: dict[str, Any] = {"status": dicom_note or "not run"}
        if want_dicom and catcher is not None:
            dicom_summary = _dicom_push(ports["dicom"], catcher, plan.seg, plan.det, plan.routes.get("CR"))
        metrics_text = _fetch(f"http://127.0.0.1:{ports['metrics']}/metrics")
    finally:
        if plan.cls_streams is not None:
            plan.cls_streams.close()
        exit_code = daemon.stop()
    print(f"daemon stopped (exit status {exit_code})")
    return _Outcome(stream_res, sources, stream_models, dicom_summary, ready_s, exit_code, metrics_text)


_DICOM_FAILED = "skipped: the daemon could not start with DICOM enabled (see daemon-dicom-failed.log)"


def _restart_without_dicom(daemon: DaemonProcess, plan: _Plan, exc: MedgeError) -> DaemonProcess:
    """Stop a daemon that failed to start with DICOM, keep its log, and start one without DICOM."""
    daemon.stop()
    print(f"DICOM push {_DICOM_FAILED}: {str(exc).splitlines()[0]}")
    shutil.copyfile(plan.report / "daemon.log", plan.report / "daemon-dicom-failed.log")
    cfg_path = plan.write_config(dicom=False, results_port=None)
    return DaemonProcess(cfg_path, plan.ports["metrics"], plan.report / "daemon.log")


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:  # noqa: S310 - loopback
            return resp.read().decode("utf-8")
    except (urllib.error.URLError, OSError):
        return ""


def _stream(args: argparse.Namespace, ports: dict[str, int], seg: str | None, det: str | None,
            cls_streams: ClassificationStreams | None):
    """Stream to every model for ``--duration-s``; the result, the sources and each stream's model."""
    from edge.tools.loadgen import StreamSpec, Tick, run_load
    from edge.tools.synthetic import Radiographs, UltrasoundProbe

    specs = []
    sources: dict[str, Any] = {}
    if cls_streams is not None:
        cls_streams.subscribe(f"tcp://127.0.0.1:{ports['publish']}")  # before the first frame: slow joiner
    if seg:
        probe = UltrasoundProbe(480, 640, "uint8", seed=7, loop=24)
        sources["probe-1"] = probe
        specs.append(StreamSpec(name="probe-1", source=probe, model=seg, rate_fps=args.fps, window=8))
    if det:
        # The detector's own training generator (edge.tools.synthetic_xray), 1-3 nodules per frame.
        xr = Radiographs(512, 512, "uint16", seed=3, loop=4, nodules=(1, 2, 3, 2))
        sources["xray-1"] = xr
        specs.append(StreamSpec(name="xray-1", source=xr, model=det, rate_fps=args.xray_fps, window=4))
    if cls_streams is not None:
        sources.update(cls_streams.sources)
        specs += cls_streams.specs()
    print()
    print(f"streaming {args.duration_s:g} s: " + ", ".join(
        f"{s.name} -> {s.model} at {s.rate_fps:g} fps" for s in specs))
    print(f"{'t_s':>4} {'fps':>6} {'sent':>5} {'ok':>5} {'dropped':>7} {'errors':>6} {'p50_ms':>7} {'p99_ms':>7}")

    def tick(t: Tick) -> None:
        p50 = f"{t.p50_ms:7.2f}" if t.p50_ms is not None else f"{'-':>7}"
        p99 = f"{t.p99_ms:7.2f}" if t.p99_ms is not None else f"{'-':>7}"
        print(f"{t.t_s + 1:4.0f} {t.ok:6d} {t.sent:5d} {t.ok:5d} {t.dropped:7d} {t.errors + t.timeouts:6d} {p50} {p99}",
              flush=True)
        if cls_streams is not None:
            cls_streams.drain()  # the scores, from PUB, once a second

    res = run_load(f"tcp://127.0.0.1:{ports['ingest']}", specs, duration_s=args.duration_s,
                   reply_timeout_s=5.0, connect_timeout_s=5.0, on_tick=tick)
    if cls_streams is not None:
        cls_streams.finish(res)
    print()
    return res, sources, {s.name: s.model for s in specs}


def _dicom_push(port: int, catcher, seg: str | None, det: str | None, cr_model: str | None) -> dict[str, Any]:
    """C-STORE the synthetic instances (3 US, 2 DX, 1 CR, as routed) and wait for their results."""
    from edge.tools.bench_dicom import store_instances
    from edge.tools.synthetic_dicom import synthetic_instances

    items = []
    if seg:
        items += synthetic_instances(3, "US", seed=11)
    if det:
        items += synthetic_instances(2, "DX", seed=12)
    cr = classification_cr() if cr_model else None
    if cr is not None:
        items.append(cr)
    print(f"DICOM: C-STORE of {len(items)} synthetic instance(s) to MEDGE@127.0.0.1:{port} ...")
    run = store_instances("127.0.0.1", port, "MEDGE", "MEDGEDEMO", items, timeout_s=15.0)
    stored = [r for r in run.records if r.status == 0]
    missing = catcher.wait_for([r.sop_instance_uid for r in stored], 20.0) if stored else set()
    lat = []
    for r in stored:
        a = catcher.first_arrival(r.sop_instance_uid)
        if a is not None:
            lat.append((a.t_ns - r.t_start_ns) / 1e6)
    kinds: dict[str, int] = {}
    for a in catcher.arrivals:
        kinds[a.modality or a.sop_class_uid] = kinds.get(a.modality or a.sop_class_uid, 0) + 1
    out = {"status": "ran", "sent": len(items), "stored": len(stored), "aborted": run.aborted,
           "results_received": len(catcher.arrivals), "results_by_modality": kinds,
           "instances_with_result": len(lat), "instances_without_result": len(missing),
           "store_ms_median": round(float(np.median([r.store_ms for r in stored])), 2) if stored else None,
           "store_to_result_ms_median": round(float(np.median(lat)), 1) if lat else None}
    if cr is not None:  # which result the CR became (an SR from the classifier)
        a = catcher.first_arrival(str(cr.SOPInstanceUID))
        out["cr"] = {"model": cr_model, "result": a.modality if a is not None else None}
    print(f"DICOM: stored {len(stored)}/{len(items)}; {len(catcher.arrivals)} result(s) received "
          f"({', '.join(f'{k}: {v}' for k, v in kinds.items()) or 'none'}); "
          f"{len(missing)} instance(s) without a result"
          + (f"; store-to-result median {out['store_to_result_ms_median']} ms" if lat else ""))
    if run.aborted:
        print(f"DICOM: {run.aborted}")
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    s = int(a.sum()) + int(b.sum())
    return round(2.0 * int((a & b).sum()) / s, 3) if s else None


def _write_report(report: Path, args, outcome: _Outcome, plan: _Plan, cls_note: str,
                  wall_s: float) -> dict[str, Any]:
    """Write the overlays and plots, ``summary.json``, ``report.md`` and ``metrics.prom``; return the summary."""
    from edge.tools.results import atomic_write_text, write_json

    res, sources, seg, det = outcome.stream_res, outcome.sources, plan.seg, plan.det
    files: dict[str, str] = {}
    notes: list[str] = [cls_note] if cls_note else []
    seg_dice = _segmentation_overlay(report, res, sources, seg, files, notes)
    det_rep = _detection_overlay(report, res, sources, det, files, notes)
    per_stream = _latency_plot(report, res, sources, files)
    classification: dict[str, Any] = {"status": cls_note or "not run"}
    if plan.cls_streams is not None:
        classification = write_classification_report(report, plan.cls_streams, res, files, notes)
    s = res.summary()
    summary = _summary(
        args, s, models={"segmentation": seg, "detection": det, "classification": classification.get("model")},
        stream_models=outcome.stream_models, ready_s=outcome.ready_s, exit_code=outcome.exit_code,
        per_stream=per_stream, seg_dice=seg_dice, detections=len(det_rep.boxes) if det_rep is not None else None,
        classification=classification, dicom_summary=outcome.dicom_summary, files=files, notes=notes, wall_s=wall_s,
    )
    write_json(report / "summary.json", summary)
    md = _report_markdown(summary, s["server_stages_ms"], args.duration_s, outcome.ready_s)
    atomic_write_text(report / "report.md", "\n".join(md) + "\n")
    if outcome.metrics_text:
        atomic_write_text(report / "metrics.prom", outcome.metrics_text)
        files["metrics"] = "metrics.prom"  # after summary.json: only the returned summary lists it
    return summary


def _segmentation_overlay(report: Path, res, sources, seg, files: dict[str, str], notes: list[str]) -> float | None:
    """``overlay_segmentation.png`` of the last mask and the simulator's outline; the Dice on that frame."""
    from edge.egress.dicom.outlines import mask_boundary
    from edge.tools.plots import overlay_mask, save_png

    seg_rep = res.last_replies.get("probe-1")
    if seg_rep is not None and seg_rep.mask is not None:
        seq = int(seg_rep.id.rsplit(":", 1)[1])
        frame = sources["probe-1"].frame(seq)
        truth = sources["probe-1"].truth(seq)
        img = overlay_mask(frame, seg_rep.mask, caption=f"{seg}: predicted mask (red), frame {seq}")
        # The simulator's own lesion outline, in green, for comparison.
        arr = np.asarray(img).copy()
        arr[mask_boundary(truth.astype(bool))] = (40, 220, 40)
        from PIL import Image

        save_png(Image.fromarray(arr), report / "overlay_segmentation.png")
        files["overlay_segmentation"] = "overlay_segmentation.png"
        return _dice(seg_rep.mask.astype(bool), truth.astype(bool))
    if seg:
        notes.append("no segmentation reply with a mask was received")
    return None


def _detection_overlay(report: Path, res, sources, det, files: dict[str, str], notes: list[str]):
    """``overlay_detection.png`` of the last reply's boxes and the simulator's; that reply (or ``None``)."""
    from edge.tools.plots import overlay_boxes, save_png

    det_rep = res.last_replies.get("xray-1")
    if det_rep is not None:
        seq = int(det_rep.id.rsplit(":", 1)[1])
        frame = sources["xray-1"].frame(seq)
        truth = [{"x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3], "label": "truth", "score": 1.0}
                 for b in sources["xray-1"].truth(seq)]
        img = overlay_boxes(frame, truth, color=(60, 140, 255))
        img = overlay_boxes(np.asarray(img), det_rep.boxes, color=(40, 220, 40),
                            caption=f"{det}: {len(det_rep.boxes)} box(es) (green), simulator truth (blue)")
        save_png(img, report / "overlay_detection.png")
        files["overlay_detection"] = "overlay_detection.png"
    elif det:
        notes.append("no detection reply was received")
    return det_rep


def _latency_plot(report: Path, res, sources, files: dict[str, str]) -> dict[str, dict]:
    """``latency.png`` (where matplotlib is installed) and the latency statistics per stream."""
    from edge.tools.plots import save_latency_plot
    from edge.tools.results import summarize_ms

    series = {}
    per_stream = {}
    for name in sources:
        lat = res.latencies_ms(stream=name)
        series[name] = lat
        per_stream[name] = summarize_ms(lat)
    if save_latency_plot(series, report / "latency.png", title="medge demo: client latency (ZeroMQ round trip)"):
        files["latency"] = "latency.png"  # not without matplotlib (the plots extra)
    return per_stream


def _summary(args, s: dict[str, Any], *, models, stream_models, ready_s, exit_code, per_stream, seg_dice,
             detections, classification, dicom_summary, files, notes, wall_s: float) -> dict[str, Any]:
    """``summary.json``: the run's settings, counts, latencies, results and machine."""
    from edge.tools.results import machine_info

    frames = {k: s[k] for k in ("sent", "ok", "dropped", "errors", "timeouts", "skipped", "unanswered")}
    return {
        "tool": "medge demo", "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_s": args.duration_s, "fps": args.fps, "precision": args.precision,
        "models": models, "stream_models": stream_models,
        "daemon": {"ready_s": round(ready_s, 2), "exit_status": exit_code},
        "frames": frames, "achieved_fps": s["achieved_fps"], "aborted": s["aborted"],
        "error_codes": s["error_codes"],
        "latency_ms": s["latency_ms"], "latency_ms_by_stream": per_stream,
        "server_stages_ms": {k: {"median_ms": v.get("median_ms"), "p99_ms": v.get("p99_ms")}
                             for k, v in s["server_stages_ms"].items()},
        "segmentation_dice_vs_simulator": seg_dice,
        "detections_last_frame": detections, "classification": classification,
        "dicom": dicom_summary, "files": files, "notes": notes,
        "wall_s": round(wall_s, 1), "machine": machine_info(),
    }


def _report_markdown(summary: dict[str, Any], stages: dict[str, dict], duration_s: float, ready_s: float) -> list[str]:
    """The lines of ``report.md``, from the summary (and the unrounded ready time)."""
    frames, machine, files = summary["frames"], summary["machine"], summary["files"]
    md = [
        "# medge demo report", "",
        f"{summary['date_utc']} on {machine['cpu_model']} ({machine['cpu_usable']} usable cores"
        + (f", GPU {', '.join(machine['gpus'])}" if machine["gpus"] else ", no GPU") + ").",
        "Research use only: the bundled models are trained on synthetic data; not for clinical use.", "",
        f"Daemon ready in {ready_s:.1f} s; stopped with SIGTERM, exit status {summary['daemon']['exit_status']}.", "",
        "## ZeroMQ streams", "",
        f"Streamed {duration_s:g} s: sent {frames['sent']}, ok {frames['ok']}, dropped {frames['dropped']}, "
        f"errors {frames['errors']}, timeouts {frames['timeouts']}, skipped by the client {frames['skipped']}.", "",
        "| stream | model | n | p50 ms | p90 ms | p99 ms | max ms |", "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, st in summary["latency_ms_by_stream"].items():
        model = summary["stream_models"].get(name)
        md.append(f"| {name} | {model} | {st.get('count', 0)} | {st.get('median_ms', '-')} | {st.get('p90_ms', '-')} "
                  f"| {st.get('p99_ms', '-')} | {st.get('max_ms', '-')} |")
    md += ["", "Daemon stages (p50 ms, from the replies' `timing_us`): " + ", ".join(
        f"{k} {v.get('median_ms')}" for k, v in stages.items()), ""]
    if "latency" in files:
        md += ["![latency](latency.png)", ""]
    md += _markdown_results(summary)
    return md


def _markdown_results(summary: dict[str, Any]) -> list[str]:
    """The report's Segmentation, Detection and DICOM sections, and its notes."""
    files, dicom_summary, notes = summary["files"], summary["dicom"], summary["notes"]
    md: list[str] = []
    if "overlay_segmentation" in files:
        md += ["## Segmentation", "",
               f"Last reply's mask (red) on its frame; the simulator's lesion outline in green "
               f"(Dice on this frame: {summary['segmentation_dice_vs_simulator']}). The simulator is not the "
               f"training distribution, so this shows the pipeline works end to end, not the model's accuracy.", "",
               "![segmentation](overlay_segmentation.png)", ""]
    if "overlay_detection" in files:
        md += ["## Detection", "", "Last reply's boxes (green) and the simulator's nodules (blue).", "",
               "![detection](overlay_detection.png)", ""]
    if "n" in summary["classification"]:
        md += classification_markdown(summary["classification"], files)
    md += ["## DICOM", ""]
    if dicom_summary.get("status") == "ran":
        md.append(f"C-STORE of {dicom_summary['sent']} synthetic instance(s): {dicom_summary['stored']} stored; "
                  f"{dicom_summary['results_received']} result(s) received at the local SCP "
                  f"({dicom_summary['results_by_modality']}); store-to-result median "
                  f"{dicom_summary['store_to_result_ms_median']} ms.")
        if "cr" in dicom_summary:
            md.append(f"The CR instance went to `{dicom_summary['cr']['model']}`; its result: "
                      f"{dicom_summary['cr']['result'] or 'none received'}.")
    else:
        md.append(f"DICOM push {dicom_summary.get('status')}.")
    if notes:
        md += ["", "Notes: " + "; ".join(notes) + "."]
    return md
