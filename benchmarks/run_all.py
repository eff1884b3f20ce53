#!/usr/bin/env python3
"""The standard benchmark set (``make bench``); writes ``benchmarks/results/<date>-<machine>.{json,md}``.

1. ``medge bench engine``: every bundled model x precision (fp16 only with a GPU).
2. ``benchmarks/engine_vs_raw.py``: the tool against a plain
   ``InferenceSession.run`` loop (must agree within 5 % on the median).
3. For each precision, a daemon (``medge serve`` child process on free
   loopback ports) and ``medge bench zmq --compare-raw`` per model at batch 1,
   closed loop, for the model's native input size and a realistic frame
   size: the daemon's overhead at p50 / p99 (targets 0.5 / 2 ms).
4. On the int8 daemon (what ``precision = "auto"`` picks on a CPU; fp32
   when a model has no int8 artifact): a stream-count sweep (1, 2, 4, 8
   probes at 30 fps each) and a closed-loop concurrency sweep (1, 2, 4, 8),
   with the mean micro-batch size read from ``/metrics``.
5. ``medge bench dicom``: C-STORE throughput and store-to-result latency
   into the daemon's SCP, results received by a local storage SCP.
6. ``benchmarks/dicom_ingest.py --skip-storescp``: our SCP against a bare
   pynetdicom SCP, DCMTK ``storescu`` sending (the ratio of the DICOM issue).
7. ``benchmarks/native_sizes.py``: daemon − raw, the one-thread ZeroMQ
   echo floor and the daemon's share over it, at model size and at native
   sizes, with the issue-15 targets as PASS / FAIL; with Triton beside it
   (``--triton``, :mod:`triton_peer`) where its venv (``.venv-triton`` or
   ``MEDGE_TRITON_VENV``) exists, and a line saying so where it does not.

Every measurement runs the real command line in a fresh process, as a user
would. ``--quick`` shortens every step (for a smoke run; not for the record).
The machine is recorded (CPU model, cores, GPU, library versions, load
average before and after: these are shared machines).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT)) if str(ROOT) not in sys.path else None

from edge.inference.manifest import default_engines_dir, discover  # noqa: E402
from edge.tools.daemon_process import DaemonProcess, free_port, write_demo_config  # noqa: E402
from edge.tools.results import atomic_write_text, machine_info, write_json  # noqa: E402

MODELS = ("us-lesion-seg", "xray-nodule-det")
# Realistic source frames per task: a B-mode probe image and a downsampled radiograph.
REALISTIC = {"segmentation": ("480x640", "uint8"), "detection": ("512x512", "uint16")}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _medge(args: list[str], json_out: Path, allow_fail: bool = True) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "edge.cli", "--log-level", "WARNING", *args, "--no-progress", "--json", str(json_out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        _log(f"  exit {res.returncode}: {' '.join(args[:4])} ...\n{res.stdout[-1500:]}\n{res.stderr[-1500:]}")
        if not allow_fail and not json_out.exists():
            raise SystemExit(1)
    if json_out.exists():
        doc = json.loads(json_out.read_text())
        doc["exit_status"] = res.returncode
        doc["stdout"] = res.stdout[-4000:]
        return doc
    return None


def _slug(info: dict[str, Any]) -> str:
    cpu = info["cpu_model"].lower()
    cpu = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$", " ", cpu)
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu).strip("-")
    words = [w for w in cpu.split("-") if w][:3]
    slug = "-".join(words) + f"-{info['cpu_usable']}c"
    if info["gpus"]:
        slug += "-" + re.sub(r"[^a-z0-9]+", "-", info["gpus"][0].split(",")[0].lower()).strip("-")
    return slug


def _strip(doc: dict[str, Any] | None, keep_samples: bool = False) -> dict[str, Any] | None:
    """Drop bulky per-sample arrays (kept in the per-step JSON files only if asked)."""
    if doc is None:
        return None
    d = dict(doc)
    for k in ("samples", "samples_ms", "raw_samples_ms", "raw_pipeline_samples_ms", "stage_samples_ms", "machine"):
        if not keep_samples:
            d.pop(k, None)
    return d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short steps (smoke run)")
    ap.add_argument("--engines-dir", type=Path, default=None)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--no-dicom", action="store_true")
    ap.add_argument("--no-readme", action="store_true", help="do not update the README link")
    a = ap.parse_args(argv)

    engines_dir = (a.engines_dir or default_engines_dir()).resolve()
    manifests = {n: m for n, m in discover(engines_dir).items() if n in MODELS}
    if not manifests:
        print(f"no bundled models under {engines_dir}; run 'make engines' first", file=sys.stderr)
        return 1
    d_engine = 1.5 if a.quick else 5.0
    d_zmq = 2.0 if a.quick else 10.0
    d_sweep = 2.0 if a.quick else 8.0
    rounds = 1 if a.quick else 3
    info = machine_info()
    info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    gpu = bool(info["gpus"])
    t_start = time.time()
    date = time.strftime("%Y-%m-%d")
    out: dict[str, Any] = {"date": date, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "quick": a.quick, "machine": info,
                           "models": {n: {"version": m.version, "task": m.task, "artifacts": sorted(m.artifacts)}
                                      for n, m in manifests.items()},
                           "engine": [], "engine_vs_raw": [], "zmq_overhead": [], "skipped": []}
    tmp = Path(tempfile.mkdtemp(prefix="medge-bench-"))

    # 1. engine
    for name, m in manifests.items():
        for prec in ("fp32", "int8", "fp16"):
            if prec not in m.artifacts:
                continue
            if prec == "fp16" and not gpu:
                out["skipped"].append(f"engine {name} fp16: needs a GPU execution provider")
                continue
            _log(f"engine {name} {prec}")
            doc = _medge(["bench", "engine", "--model", name, "--engines-dir", str(engines_dir), "--precision", prec,
                          "--duration-s", str(d_engine), "--warmup-s", "1"], tmp / f"engine-{name}-{prec}.json")
            if doc:
                out["engine"].append({"model": name, "precision": prec, "config": doc["config"],
                                      "summary": doc["summary"]})

    # 2. engine vs raw
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from engine_vs_raw import compare

    for name in manifests:
        _log(f"engine_vs_raw {name} fp32")
        out["engine_vs_raw"].append(compare(name, "fp32", engines_dir=engines_dir, duration_s=2.0 if a.quick else 4.0,
                                            rounds=rounds))

    # 3-5. through the daemon
    precisions = ["fp32"] + (["int8"] if all("int8" in m.artifacts for m in manifests.values()) else [])
    for prec in precisions:
        ports = {k: free_port() for k in ("ingest", "publish", "metrics", "dicom")}
        results_port = free_port()
        dicom = prec == "fp32" and not a.no_dicom
        work = tmp / f"daemon-{prec}"
        work.mkdir()
        routes = {}
        for n, m in manifests.items():
            if m.task == "segmentation":
                routes["US"] = n
            else:
                routes["DX"] = n
        cfg = write_demo_config(work / "medge.toml", engines_dir=engines_dir, spool_dir=work / "spool",
                                models=list(manifests), ports=ports, dicom=dicom, precision=prec, routes=routes,
                                results_port=results_port if dicom else None)
        _log(f"daemon {prec}: starting")
        daemon = DaemonProcess(cfg, ports["metrics"], work / "daemon.log")
        try:
            ready_s = daemon.wait_ready(120)
            out.setdefault("daemon_ready_s", {})[prec] = round(ready_s, 2)
            ep = f"tcp://127.0.0.1:{ports['ingest']}"
            murl = f"http://127.0.0.1:{ports['metrics']}/metrics"
            for name, m in manifests.items():
                native = f"{m.input.size[0]}x{m.input.size[1]}"
                real, dtype = REALISTIC[m.task]
                for frame, dt in ((native, "uint8"), (real, dtype)):
                    _log(f"zmq --compare-raw {name} {prec} {frame} {dt}")
                    doc = _medge(["bench", "zmq", "--endpoint", ep, "--model", name, "--engines-dir", str(engines_dir),
                                  "--precision", prec, "--concurrency", "1", "--frame", frame, "--dtype", dt,
                                  "--duration-s", str(d_zmq), "--warmup-s", "1", "--compare-raw",
                                  "--metrics-url", murl], tmp / f"zmq-{name}-{prec}-{frame}.json")
                    if doc and doc["steps"]:
                        s = doc["steps"][0]["summary"]
                        out["zmq_overhead"].append({"model": name, "precision": prec, "frame": frame, "dtype": dt,
                                                    "summary": s, "exit_status": doc["exit_status"]})
            if prec == precisions[-1]:
                seg = next((n for n, m in manifests.items() if m.task == "segmentation"), None)
                if seg:
                    for key, extra in (("stream_sweep", ["--rate", "30", "--sweep", "streams=1,2,4,8"]),
                                       ("concurrency_sweep", ["--sweep", "concurrency=1,2,4,8"])):
                        _log(f"{key} {seg} {prec}")
                        doc = _medge(["bench", "zmq", "--endpoint", ep, "--model", seg, "--frame", "480x640",
                                      "--duration-s", str(d_sweep), "--warmup-s", "1", "--metrics-url", murl,
                                      *extra], tmp / f"{key}.json")
                        if doc:
                            out[key] = {"model": seg, "precision": prec, "frame": "480x640 uint8",
                                        "steps": doc["steps"], "exit_status": doc["exit_status"]}
            if dicom:
                _log("dicom")
                doc = _medge(["bench", "dicom", "--port", str(ports["dicom"]), "--synthetic", "10" if a.quick else "40",
                              "--results-port", str(results_port), "--results-timeout-s", "60"],
                             tmp / "dicom.json")
                if doc:
                    out["dicom"] = {"summary": doc["summary"], "config": doc["config"],
                                    "exit_status": doc["exit_status"]}
        finally:
            code = daemon.stop()
            out.setdefault("daemon_exit_status", {})[prec] = code
            _log(f"daemon {prec}: stopped ({code})")
    # 6. DICOM ingest: our SCP (inference off) against a bare pynetdicom SCP, storescu sending
    if not a.no_dicom:
        _log("dicom_ingest (ours vs bare pynetdicom SCP)")
        di_out = tmp / "dicom_ingest"
        res = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "dicom_ingest.py"), "--skip-storescp",
             "--count", "50" if a.quick else "200", "--repeat", "1" if a.quick else "3", "--out", str(di_out)],
            capture_output=True, text=True,
        )
        latest = di_out / "dicom_ingest-latest.json"
        if latest.is_file():
            out["dicom_ingest"] = json.loads(latest.read_text(encoding="utf-8"))
        else:
            out["skipped"].append(f"dicom_ingest: exit {res.returncode}: {(res.stderr or res.stdout)[-300:]}")
    _native_sizes(a, tmp, out)
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out["wall_s"] = round(time.time() - t_start, 1)
    stem = f"{date}-{_slug(info)}" + ("-quick" if a.quick else "")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(a.out_dir / f"{stem}.json", out)
    md = render_markdown(out)
    atomic_write_text(a.out_dir / f"{stem}.md", md)
    _log(f"wrote {a.out_dir / stem}.json and .md")
    if not a.no_readme and not a.quick:
        update_readme(Path("benchmarks/results") / f"{stem}.md", out)
    print(md)
    return 0


def _native_sizes(a: argparse.Namespace, tmp: Path, out: dict[str, Any]) -> None:
    """Step 7: ``native_sizes.py`` (with ``--triton`` where the Triton venv exists) into ``out["native_sizes"]``."""
    from triton_peer import SET_UP, venv_python

    cmd = [sys.executable, str(ROOT / "benchmarks" / "native_sizes.py"), "--out-dir", str(tmp / "native")]
    if a.engines_dir:
        cmd += ["--engines-dir", str(a.engines_dir)]
    if a.quick:
        cmd.append("--quick")
    if venv_python() is not None:
        cmd.append("--triton")
    else:
        out["skipped"].append(f"Triton beside the daemon: no venv at .venv-triton (or MEDGE_TRITON_VENV); set-up: {SET_UP}")
    _log("native_sizes" + (" with Triton" if "--triton" in cmd else ""))
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    docs = sorted((tmp / "native").glob("*native-sizes*.json"))
    if docs:
        out["native_sizes"] = json.loads(docs[-1].read_text(encoding="utf-8"))
        out["native_sizes"]["stdout"] = res.stdout[-4000:]
    else:
        out["skipped"].append(f"native_sizes: exit {res.returncode}: {(res.stderr or res.stdout)[-300:]}")


# ---------------------------------------------------------------------------- markdown
def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def render_markdown(r: dict[str, Any]) -> str:
    """The human summary of one ``run_all`` result."""
    m = r["machine"]
    v = m["versions"]
    lines = [
        f"# medge benchmarks, {r['date']}" + (" (quick smoke run, not for the record)" if r["quick"] else ""), "",
        f"Machine: {m['cpu_model']}, {m['cpu_usable']} usable of {m['cpu_count']} cores, "
        f"{m['memory_bytes'] / 2**30:.0f} GiB, {'GPU ' + ', '.join(m['gpus']) if m['gpus'] else 'no GPU'}; "
        f"Python {v.get('python')}, onnxruntime {v.get('onnxruntime', v.get('onnxruntime-gpu'))}, numpy {v.get('numpy')}, "
        f"pyzmq {v.get('pyzmq')} (libzmq {v.get('libzmq')}), pynetdicom {v.get('pynetdicom')}. "
        f"Load average before/after: {m.get('loadavg_start')} / {m.get('loadavg_end')} (a shared machine: "
        f"compare ratios measured in one run, not absolute times). Run took {r['wall_s']:.0f} s.", "",
        "Models: " + ", ".join(f"{n} v{x['version']} ({x['task']}; {', '.join(x['artifacts'])})"
                               for n, x in r["models"].items()) + ".", "",
        "Reproduce: `make bench` (or `python benchmarks/run_all.py`). Raw data: the `.json` file beside this one.", "",
        "## 1. Engine (`medge bench engine`, batch 1, only `backend.infer` timed)", "",
        "| model | precision | backend | median ms | p90 | p99 | max | CV | inferences/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in r["engine"]:
        s = e["summary"]["latency_ms"]
        lines.append(f"| {e['model']} | {e['precision']} | {e['config']['backend']} | {_f(s['median_ms'])} | "
                     f"{_f(s['p90_ms'])} | {_f(s['p99_ms'])} | {_f(s['max_ms'])} | {s['cv'] * 100:.0f}% | "
                     f"{_f(e['summary']['throughput']['inferences_per_s'], 1)} |")
    for sk in r["skipped"]:
        lines.append(f"\nSkipped: {sk}.")
    lines += ["", "## 2. Does the tool add overhead? `medge bench engine` vs a plain `InferenceSession.run` loop", "",
              "Alternating fresh processes, same artifact, same preprocessed input, same session options as the "
              "daemon's backend; medians of the pooled samples.", "",
              "| model | precision | medge bench engine median ms | plain loop median ms | ratio | within 5 %? | "
              "plain loop, ORT default session options |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in r["engine_vs_raw"]:
        lines.append(f"| {e['model']} | {e['precision']} | {_f(e['tool_ms']['median_ms'], 3)} | "
                     f"{_f(e['raw_ms']['median_ms'], 3)} | {e['median_ratio_tool_over_raw']:.3f} | "
                     f"{'yes' if e['passes'] else '**no**'} | "
                     f"{_f(e.get('raw_default_session_options_ms', {}).get('median_ms'), 3)} |")
    lines += ["", "## 3. Daemon overhead (`medge bench zmq --compare-raw`, batch 1, concurrency 1, loopback)", "",
              "End-to-end = client send to reply received (ZeroMQ, JSON header, pixels, preprocessing, queue, "
              "inference, postprocessing, mask back). Raw = `backend.infer` on the same preprocessed input in the "
              "client process, interleaved with the ZeroMQ blocks. Overhead = end-to-end minus raw, "
              "at p50 and at p99 (targets: <= 0.5 ms and <= 2 ms). The last columns subtract the in-process "
              "pre+infer+post pipeline instead: transport and queueing alone. The paired column takes, per request, "
              "the client latency minus the daemon's own `infer` time for that same request: both halves see "
              "the same machine state, so on a busy shared machine it is the steadiest estimate of the overhead.", "",
              "| model | precision | frame | n | e2e p50 | e2e p99 | raw p50 | raw p99 | **overhead p50** | "
              "**overhead p99** | targets met | transport+queue p50 | transport+queue p99 | daemon stages p50 "
              "(queue/pre/infer/post) | paired overhead p50 / p99 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for z in r["zmq_overhead"]:
        s = z["summary"]
        lat, raw = s["latency_ms"], s.get("raw_infer_ms", {})
        o = s.get("overhead_ms", {})
        oi, op = o.get("vs_raw_infer", {}), o.get("vs_raw_pipeline", {})
        pr = s.get("paired_overhead_ms") or {}
        met = (oi.get("p50") is not None and oi["p50"] <= 0.5 and oi["p99"] <= 2.0)
        # A negative or within-noise overhead says nothing about the target (edge.tools.results.overhead_verdict).
        verdicts = (s.get("overhead_verdict") or {}).get("vs_raw_infer", {})
        unjudged = sorted({v for v in verdicts.values() if v != "above noise"})
        st = s["server_stages_ms"]
        stages = "/".join(_f(st.get(k, {}).get("median_ms")) for k in ("queue", "preprocess", "infer", "postprocess"))
        lines.append(f"| {z['model']} | {z['precision']} | {z['frame']} {z['dtype']} | {s['ok']} | "
                     f"{_f(lat.get('median_ms'))} | {_f(lat.get('p99_ms'))} | {_f(raw.get('median_ms'))} | "
                     f"{_f(raw.get('p99_ms'))} | **{_f(oi.get('p50'), 3)}** | **{_f(oi.get('p99'), 3)}** | "
                     f"{('n/a: ' + ', '.join(unjudged)) if unjudged else ('yes' if met else 'no')} | {_f(op.get('p50'), 3)} | {_f(op.get('p99'), 3)} | {stages} | "
                     f"{_f(pr.get('p50'), 3)} / {_f(pr.get('p99'), 3)} |")
    for key, title in (("stream_sweep", "## 4. Stream-count sweep: K probes at 30 fps each (open loop)"),
                       ("concurrency_sweep", "## 5. Concurrency sweep: N requests outstanding (closed loop)")):
        sw = r.get(key)
        if not sw:
            continue
        lines += ["", title, "", f"{sw['model']} {sw['precision']}, {sw['frame']}, one DEALER per stream; mean batch "
                  "from the daemon's `medge_batch_size` histogram.", "",
                  "| streams | conc | offered fps | achieved fps | p50 ms | p90 | p99 | dropped | skipped | errors "
                  "| mean batch | queue p50 | infer p50 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for stp in sw["steps"]:
            s, c = stp["summary"], stp["step"]
            offered = f"{c['rate'] * c['streams']:.0f}" if c.get("rate") else "closed loop"
            lat = s["latency_ms"]
            st = s["server_stages_ms"]
            lines.append(f"| {c['streams']} | {c.get('concurrency') or '-'} | {offered} | {_f(s['achieved_fps'], 1)} | "
                         f"{_f(lat.get('median_ms'))} | {_f(lat.get('p90_ms'))} | {_f(lat.get('p99_ms'))} | "
                         f"{s['dropped']} | {s['skipped']} | {s['errors'] + s['timeouts']} | "
                         f"{_f(s.get('mean_batch'))} | {_f(st.get('queue', {}).get('median_ms'))} | "
                         f"{_f(st.get('infer', {}).get('median_ms'))} |")
        single = None
        cs = r.get("concurrency_sweep")
        if key == "stream_sweep" and cs and cs["steps"] and cs["steps"][0]["step"].get("concurrency") == 1:
            single = cs["steps"][0]["summary"]["achieved_fps"]
        lines += ["", "Reading: " + explain_sweep(key, sw, single)]
    d = r.get("dicom")
    if d:
        s = d["summary"]
        lines += ["", "## 6. DICOM (`medge bench dicom`)", "",
                  f"{d['config']['source']} over one association into the daemon's SCP (fp32 models); results "
                  f"(SEG / SR) received by a local storage SCP standing in for the PACS.", "",
                  "| instances | stored | instances/s | C-STORE p50 ms | p99 | with result | store-to-result p50 ms | p99 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |",
                  f"| {s['instances']} | {s['stored']} | {_f(s['instances_per_s'], 1)} | "
                  f"{_f(s['store_ms'].get('median_ms'))} | {_f(s['store_ms'].get('p99_ms'))} | "
                  f"{s.get('instances_with_result')} | {_f(s.get('store_to_result_ms', {}).get('median_ms'), 1)} | "
                  f"{_f(s.get('store_to_result_ms', {}).get('p99_ms'), 1)} |"]
    di = r.get("dicom_ingest")
    if di:
        ips = di["instances_per_s"]
        lines += ["", "## 7. DICOM ingest (`benchmarks/dicom_ingest.py`)", "",
                  f"{di['instances']} CT instances ({di['megabytes']} MB), {di['sender']}, median of {di['repeat']} "
                  "runs per receiver taken in turns; our SCP with inference off (receive, check, durable spool) "
                  "against a bare pynetdicom SCP that only writes each dataset:", "",
                  "| receiver | instances/s |", "| --- | --- |",
                  *[f"| {k} | {_f(v, 1)} |" for k, v in ips.items()], "",
                  f"Ratio ours / bare: **{_f(di['ratio_ours_over_bare'], 3)}** (target >= {di['target_ratio']})."]
    if r.get("native_sizes"):
        from native_sizes import markdown as native_markdown

        lines += native_markdown(r["native_sizes"])
    lines += ["", f"Daemon ready after start: {r.get('daemon_ready_s')} s; exit status after SIGTERM: "
              f"{r.get('daemon_exit_status')}.", ""]
    return "\n".join(lines)


def explain_sweep(key: str, sw: dict[str, Any], single_fps: float | None = None) -> str:
    """Two sentences on where micro-batching helps and where latency breaks, from the measured rows.

    ``single_fps``: the closed-loop rate at concurrency 1 (frames served one at
    a time), the baseline for the open-loop stream sweep whose first step is
    limited by the offered 30 fps rather than by the model.
    """
    rows = []
    for stp in sw["steps"]:
        s, c = stp["summary"], stp["step"]
        rows.append({"k": c["streams"] if key == "stream_sweep" else c["concurrency"], "fps": s["achieved_fps"],
                     "p50": s["latency_ms"].get("median_ms"), "p99": s["latency_ms"].get("p99_ms"),
                     "lost": s["dropped"] + s["skipped"], "batch": s.get("mean_batch"),
                     "infer": s["server_stages_ms"].get("infer", {}).get("median_ms")})
    if not rows or rows[0]["p50"] is None:
        return "(no data)"
    first, best = dict(rows[0]), max(rows, key=lambda x: x["fps"])
    if key == "stream_sweep" and single_fps:
        first.update(k=1, fps=single_fps)

    def n(k: int) -> str:
        if key == "stream_sweep":
            return f"{k} stream" + ("s" if k != 1 else "")
        return f"{k} outstanding request" + ("s" if k != 1 else "")
    batch_txt = f" at a mean batch of {best['batch']:.2f}" if best.get("batch") else ""
    if key == "stream_sweep" and single_fps:
        verdict = "helps" if best["fps"] > single_fps * 1.1 else "bought little"
        s1 = (f"Micro-batching {verdict} here: with {n(best['k'])} the daemon served {best['fps']:.1f} frames/s"
              f"{batch_txt}, against {single_fps:.1f} frames/s when frames come one at a time (closed loop, "
              f"concurrency 1)" + (", because one batched `infer` costs less than that many single ones."
                                   if verdict == "helps" else
                                   ": on this CPU a batched `infer` costs about as much per frame as single ones, "
                                   "so batching saves only the per-call overhead."))
    elif best["k"] == first["k"]:
        s1 = (f"Micro-batching did not help here: the served rate was highest, {best['fps']:.1f} frames/s, with "
              f"{n(first['k'])} and did not rise with more{batch_txt}, because on this CPU a batched `infer` "
              f"costs about as much per frame as single ones (the cores are already busy with one frame).")
    elif best["fps"] > first["fps"] * 1.1:
        s1 = (f"Micro-batching helps once several frames wait at the same time: going from {first['k']} to "
              f"{n(best['k'])} raised the served rate from {first['fps']:.1f} to {best['fps']:.1f} frames/s"
              f"{batch_txt}, because one batched `infer` call costs less than that many single ones.")
    else:
        s1 = (f"Micro-batching bought little here: the best served rate was {best['fps']:.1f} frames/s at "
              f"{n(best['k'])} (vs {first['fps']:.1f} at {n(first['k'])}){batch_txt}, because on this CPU a batched "
              f"`infer` costs about as much per frame as single ones, so batching only saves the per-call overhead.")
    if key == "stream_sweep":
        offered = {stp["step"]["streams"]: stp["step"]["streams"] * (stp["step"].get("rate") or 30.0)
                   for stp in sw["steps"]}
        broke = next((x for x in rows if x["lost"] > 0 or x["fps"] < 0.95 * offered[x["k"]]), None)
        broke = broke or next((x for x in rows if (x["p99"] or 0) > 33.3), None)
        if broke is None:
            s2 = (f"Latency did not break in this range: p99 stayed at {rows[-1]['p99']:.1f} ms with nothing "
                  f"dropped at {n(rows[-1]['k'])}.")
        else:
            s2 = (f"Latency breaks at {n(broke['k'])} ({broke['k'] * 30} frames/s offered, {broke['fps']:.1f} served): "
                  f"p50 {broke['p50']:.1f} ms and p99 {broke['p99']:.1f} ms against a 33 ms frame interval"
                  + (f", and {broke['lost']} frames were shed by the daemon or skipped by the probe"
                     if broke["lost"] else "") + ".")
    else:
        broke = None
        for prev, cur in zip(rows, rows[1:]):
            if cur["p50"] and prev["p50"] and cur["p50"] > 1.5 * prev["p50"] and cur["fps"] < 1.1 * prev["fps"]:
                broke = (prev, cur)
                break
        if broke is None:
            s2 = (f"Latency did not break in this range: p50 went from {rows[0]['p50']:.1f} to "
                  f"{rows[-1]['p50']:.1f} ms while the served rate kept rising.")
        else:
            prev, cur = broke
            s2 = (f"Latency breaks from {n(prev['k'])} to {n(cur['k'])}: p50 rose from {prev['p50']:.1f} to "
                  f"{cur['p50']:.1f} ms while the served rate stayed at {cur['fps']:.1f} frames/s, so the extra "
                  f"requests only wait in the queue.")
    return s1 + " " + s2


def update_readme(md_rel: Path, r: dict[str, Any]) -> None:
    """Point the README's closing Benchmarks section at the latest results (append it if absent)."""
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    parts = []
    for z in r["zmq_overhead"]:
        s = z["summary"]
        native = z["frame"] == "x".join(str(v) for v in (256, 256))
        if z["precision"] != "fp32" or not native or not s.get("overhead_ms"):
            continue
        o, pr = s["overhead_ms"]["vs_raw_infer"], s.get("paired_overhead_ms") or {}
        parts.append(f"{z['model']} p50 {o['p50']:+.2f} ms (paired {pr.get('p50', float('nan')):+.2f}), "
                     f"p99 {o['p99']:+.2f} ms (paired {pr.get('p99', float('nan')):+.2f})")
    line = (" Daemon overhead over raw ONNX Runtime at batch 1 on loopback, fp32, native 256x256 input "
            "(end-to-end minus raw; targets 0.5 ms p50, 2 ms p99): " + "; ".join(parts) + "."
            if parts else "")
    section = (
        "## Benchmarks\n\n"
        f"Latest recorded run: [{md_rel.name}]({md_rel.as_posix()}) ({r['machine']['cpu_model']}, "
        f"{r['machine']['cpu_usable']} cores, {'GPU' if r['machine']['gpus'] else 'no GPU'}).{line} "
        "Reproduce with `make bench`; tools: `medge bench engine|zmq|dicom --help`.\n"
        + _floor_paragraph(readme.parent)
    )
    if "\n## Benchmarks\n" in text:
        head, rest = text.split("\n## Benchmarks\n", 1)
        nxt = rest.find("\n## ")  # keep any later section
        tail = rest[nxt:] if nxt >= 0 else ""
        text = head.rstrip("\n") + "\n\n" + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(readme, text)


def _floor_paragraph(root: Path) -> str:
    """A README paragraph from the newest full ``daemon_overhead.py`` run: its overhead next to the
    floor of ZeroMQ itself on the same machine (empty when there is no such run)."""
    runs = sorted((root / "benchmarks" / "results").glob("*-daemon-overhead.json"))  # date-prefixed names
    if not runs:
        return ""
    d = json.loads(runs[-1].read_text(encoding="utf-8"))
    floors = d.get("floor_one_thread_zmq_echo") or []
    rows = [o for o in d.get("overhead", []) if "model input" in o.get("input", "")]
    if not floors or not rows:
        return ""
    seg = rows[0]
    rel = runs[-1].with_suffix(".md").relative_to(root).as_posix()
    return (
        f"\nDaemon targets in one run ([{runs[-1].with_suffix('.md').name}]({rel}), {d['date_utc'][:10]}): "
        f"overhead p50 " + ", ".join(f"{o['model']} {o['overhead_p50_ms']:+.2f} ms" for o in rows)
        + f"; the floor of ZeroMQ itself on this machine (a one-thread echo server running the same session "
        f"with the same frame) is {floors[0]['overhead_p50_ms']:+.2f} ms p50 "
        f"({floors[-1]['overhead_p50_ms']:+.2f} ms with one byte each way), so the daemon's own share is "
        f"{seg['overhead_p50_ms'] - floors[0]['overhead_p50_ms']:+.2f} ms ({seg['model']}). "
        "Where it goes: docs/operations.md, *Threads and where latency goes*.\n"
    )


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
