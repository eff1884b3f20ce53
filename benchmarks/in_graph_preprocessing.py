#!/usr/bin/env python3
"""Preprocessing in the ONNX graph against the daemon's numpy/OpenCV path, on this CPU, in one run.

Issue 15 names a second way to cut the daemon's cost at the sizes scanners
send (480x640 uint8 ultrasound, 512x512 uint16 radiographs): move the resize
and normalisation, and a segmenter's mask upsampling, into the ONNX graph,
"so on a GPU it runs on the device". This script builds such a graph for
each bundled model and measures it beside what the daemon does today, so
the choice rests on a number measured here.

:func:`build_native_graph` wraps a model's ONNX file for one source size and
pixel type in a graph that does in ONNX what
:func:`edge.inference.preprocess.preprocess` and
:func:`edge.inference.postprocess.segmentation_mask` do:

1. ``pixels`` ``[N, H, W]`` of the source type, cast to float32;
2. along each shrunk axis, the separable triangle prefilter of
   :func:`~edge.inference.preprocess.resize_plane` (the same taps,
   :func:`~edge.inference.preprocess.triangle_taps`, edges replicated:
   ``Pad`` + two ``Conv``), a ``fixed`` normalisation folded into it;
3. bilinear sampling at half-pixel centres to the letterboxed size
   (``Resize`` linear, ``half_pixel``: OpenCV's ``INTER_LINEAR``), then a
   ``minmax`` normalisation over the resized image;
4. zero padding to the model input, then the model;
5. for a one-channel segmenter, a ``mask`` output ``[N, H, W]`` uint8: the
   image region's logits enlarged bilinearly to the source size and compared
   with the threshold's logit.

Printed per model (blocks alternated, batch 1, the daemon's ONNX Runtime
session options): the median of ``LoadedModel.run`` (preprocess + infer +
postprocess in Python, what the daemon's worker calls) and of one
``session.run`` of the wrapped graph, and how far the two agree (mask
pixels, largest output difference) on ``--frames`` synthetic frames.
``tests/test_benchmark_scripts.py`` checks the agreement on a few frames.

Measured on the 2-vCPU AMD EPYC VM (2026-12-01,
``benchmarks/results/2026-12-01-amd-epyc-in-graph-preprocessing.md``):
the wrapped graph is slower on this CPU for every model and precision, so
the daemon keeps its Python path; the graphs agree with it (bundled
segmenter's masks 0.999997-1.0 of pixels; detector and classifier outputs
identical). On a GPU the balance differs, and this script is how to measure
it there (``--provider cuda`` where onnxruntime-gpu is installed).

Usage::

    python benchmarks/in_graph_preprocessing.py                  # int8, the CPU default
    python benchmarks/in_graph_preprocessing.py --precision fp32 --rounds 40
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edge.errors import ModelError  # noqa: E402
from edge.inference.manifest import Manifest, default_engines_dir  # noqa: E402
from edge.inference.preprocess import geometry_for, triangle_taps  # noqa: E402

try:  # the trainer extra (pip install -e '.[trainer]'): the graphs are built with onnx
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper
except ImportError:  # pragma: no cover - --help still works without it
    onnx = None  # type: ignore[assignment]

#: Per bundled model: its source's kind (``edge.tools.synthetic.make_source``), size and pixel type.
SOURCES = {
    "us-lesion-seg": ("ultrasound", (480, 640), "uint8"),
    "xray-nodule-det": ("xray", (512, 512), "uint16"),
    "xray-nodule-cls": ("xray", (512, 512), "uint16"),
}
_ONNX_TYPES = {"uint8": 2, "uint16": 4, "int16": 5, "float32": 1}  # TensorProto's element types


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def _prefilter_nodes(x: str, h: int, w: int, nh: int, nw: int, gain: float, delta: float) -> tuple[list, str]:
    """The triangle prefilter (and a folded ``fixed`` normalisation) on ``x`` ``[N, 1, h, w]``."""
    ky, kx = triangle_taps(h / nh), triangle_taps(w / nw)
    if ky.size == 1 and kx.size == 1:
        if gain == 1.0 and delta == 0.0:
            return [], x
        return [
            _const("pre_gain", np.array(gain, np.float32)),
            _const("pre_delta", np.array(delta, np.float32)),
            helper.make_node("Mul", [x, "pre_gain"], ["pre_scaled"]),
            helper.make_node("Add", ["pre_scaled", "pre_delta"], ["pre_filtered"]),
        ], "pre_filtered"
    ry, rx = ky.size // 2, kx.size // 2  # odd, symmetric taps: centred
    nodes = [
        _const("pre_pads", np.array([0, 0, ry, rx, 0, 0, ry, rx], np.int64)),
        helper.make_node("Pad", [x, "pre_pads"], ["pre_edge"], mode="edge"),
        _const("pre_kx", kx.astype(np.float32).reshape(1, 1, 1, -1)),  # along rows, then columns: separable
        helper.make_node("Conv", ["pre_edge", "pre_kx"], ["pre_rows"]),
        _const("pre_ky", (ky.astype(np.float64) * gain).astype(np.float32).reshape(1, 1, -1, 1)),
        helper.make_node("Conv", ["pre_rows", "pre_ky"], ["pre_conv"]),
    ]
    if delta == 0.0:
        return nodes, "pre_conv"
    nodes += [
        _const("pre_delta", np.array(delta, np.float32)),
        helper.make_node("Add", ["pre_conv", "pre_delta"], ["pre_filtered"]),
    ]
    return nodes, "pre_filtered"


def _pre_model(
    manifest: Manifest, size: tuple[int, int], dtype: str, opsets: Sequence, ir_version: int
) -> onnx.ModelProto:
    """``pixels`` ``[N, H, W]`` -> ``image`` ``[N, 1, h, w]`` float32, as the daemon preprocesses."""
    spec, pre = manifest.input, manifest.preprocessing
    h, w = size
    dst_h, dst_w = spec.size
    geom = geometry_for(h, w, dst_h, dst_w, pre.resize)
    fold = pre.normalize == "fixed"
    gain = 1.0 / pre.std if fold else 1.0
    delta = -pre.mean * gain if fold else 0.0
    nodes = [
        _const("pre_axis1", np.array([1], np.int64)),
        helper.make_node("Unsqueeze", ["pixels", "pre_axis1"], ["pre_planes"]),
        helper.make_node("Cast", ["pre_planes"], ["pre_float"], to=TensorProto.FLOAT),
    ]
    filt, x = _prefilter_nodes("pre_float", h, w, geom.new_h, geom.new_w, gain, delta)
    nodes += filt
    if (geom.new_h, geom.new_w) != (h, w):
        nodes += [
            _const("pre_sizes", np.array([geom.new_h, geom.new_w], np.int64)),
            helper.make_node(
                "Resize", [x, "", "", "pre_sizes"], ["pre_resized"], axes=[2, 3], mode="linear",
                coordinate_transformation_mode="half_pixel",
            ),
        ]
        x = "pre_resized"
    elif not filt and fold:  # the model's own size: normalise without a filter
        nodes += [
            _const("pre_gain", np.array(gain, np.float32)),
            _const("pre_delta", np.array(delta, np.float32)),
            helper.make_node("Mul", [x, "pre_gain"], ["pre_scaled"]),
            helper.make_node("Add", ["pre_scaled", "pre_delta"], ["pre_fixed"]),
        ]
        x = "pre_fixed"
    if pre.normalize == "minmax":
        nodes += [
            helper.make_node("ReduceMin", [x, "pre_axes123"], ["pre_lo"], keepdims=1),
            helper.make_node("ReduceMax", [x, "pre_axes123"], ["pre_hi"], keepdims=1),
            helper.make_node("Sub", ["pre_hi", "pre_lo"], ["pre_range"]),
            _const("pre_eps", np.array(1e-12, np.float32)),
            _const("pre_one", np.array(1.0, np.float32)),
            _const("pre_zero", np.array(0.0, np.float32)),
            helper.make_node("Less", ["pre_range", "pre_eps"], ["pre_flat"]),
            helper.make_node("Where", ["pre_flat", "pre_one", "pre_range"], ["pre_den"]),
            helper.make_node("Div", ["pre_one", "pre_den"], ["pre_inv"]),
            helper.make_node("Where", ["pre_flat", "pre_zero", "pre_inv"], ["pre_scale"]),
            helper.make_node("Sub", [x, "pre_lo"], ["pre_shifted"]),
            helper.make_node("Mul", ["pre_shifted", "pre_scale"], ["pre_norm"]),
        ]
        nodes.insert(0, _const("pre_axes123", np.array([1, 2, 3], np.int64)))
        x = "pre_norm"
    elif pre.normalize != "fixed":
        raise ModelError(f"A native graph does {pre.normalize!r} normalisation only in Python; use fixed or minmax.")
    pads = [0, 0, geom.top, geom.left, 0, 0, dst_h - geom.top - geom.new_h, dst_w - geom.left - geom.new_w]
    if any(pads):
        nodes += [
            _const("pre_letterbox", np.array(pads, np.int64)),
            helper.make_node("Pad", [x, "pre_letterbox"], ["pre_padded"], mode="constant"),
        ]
        x = "pre_padded"
    nodes.append(helper.make_node("Identity", [x], ["pre_image"]))
    graph = helper.make_graph(
        nodes,
        "medge_native_pre",
        [helper.make_tensor_value_info("pixels", _ONNX_TYPES[dtype], ["batch", h, w])],
        [helper.make_tensor_value_info("pre_image", TensorProto.FLOAT, ["batch", spec.channels, dst_h, dst_w])],
    )
    return helper.make_model(graph, opset_imports=list(opsets), ir_version=ir_version)


def _mask_model(
    manifest: Manifest, size: tuple[int, int], opsets: Sequence, ir_version: int
) -> onnx.ModelProto:
    """A one-channel segmenter's ``logits`` ``[N, 1, h, w]`` -> ``mask`` ``[N, H, W]`` uint8 at the source size."""
    spec, post = manifest.input, manifest.postprocessing
    h, w = size
    dst_h, dst_w = spec.size
    geom = geometry_for(h, w, dst_h, dst_w, manifest.preprocessing.resize)
    # the region of the logits that covers the image (postprocess._region; logits at the input's size here)
    top, left, nh, nw = geom.top, geom.left, geom.new_h, geom.new_w
    if nh > h or nw > w:
        raise ModelError(
            f"A native graph enlarges a {h}x{w} source to {nh}x{nw}; the mask would be shrunk back "
            "(Pillow's antialiased filter in Python). Build native graphs for sources at least the model's size."
        )
    t = min(max(post.threshold, 1e-6), 1 - 1e-6)
    cut = np.float32(math.log(t / (1.0 - t)))
    nodes = [
        _const("post_starts", np.array([top, left], np.int64)),
        _const("post_ends", np.array([top + nh, left + nw], np.int64)),
        _const("post_axes", np.array([2, 3], np.int64)),
        helper.make_node("Slice", ["post_logits", "post_starts", "post_ends", "post_axes"], ["post_region"]),
    ]
    x = "post_region"
    if (nh, nw) != (h, w):
        nodes += [
            _const("post_sizes", np.array([h, w], np.int64)),
            helper.make_node(
                "Resize", [x, "", "", "post_sizes"], ["post_up"], axes=[2, 3], mode="linear",
                coordinate_transformation_mode="half_pixel",
            ),
        ]
        x = "post_up"
    nodes += [
        _const("post_cut", np.array(cut, np.float32)),
        helper.make_node("Greater", [x, "post_cut"], ["post_fg"]),
        helper.make_node("Cast", ["post_fg"], ["post_u8"], to=TensorProto.UINT8),
        _const("post_axis1", np.array([1], np.int64)),
        helper.make_node("Squeeze", ["post_u8", "post_axis1"], ["mask"]),
    ]
    graph = helper.make_graph(
        nodes,
        "medge_native_mask",
        [helper.make_tensor_value_info("post_logits", TensorProto.FLOAT, ["batch", 1, dst_h, dst_w])],
        [helper.make_tensor_value_info("mask", TensorProto.UINT8, ["batch", h, w])],
    )
    return helper.make_model(graph, opset_imports=list(opsets), ir_version=ir_version)


def build_native_graph(
    model_path: Path | str, manifest: Manifest, size: tuple[int, int], dtype: str
) -> onnx.ModelProto:
    """The model at ``model_path`` behind the daemon's preprocessing for ``size`` ``dtype`` sources.

    Parameters
    ----------
    model_path : path
        One of the model's artifacts (``model.onnx``, ``model.int8.onnx``...).
    manifest : Manifest
        Its manifest (input, preprocessing, post-processing).
    size : (int, int)
        The source's height and width.
    dtype : str
        The source's pixel type (``uint8``, ``uint16``, ``int16``, ``float32``).

    Returns
    -------
    onnx.ModelProto
        Input ``pixels`` ``[batch, H, W]`` of ``dtype``; outputs: the
        model's own, and for a one-channel segmenter ``mask`` ``[batch, H,
        W]`` uint8 (checked with :func:`onnx.checker.check_model`).

    Raises
    ------
    ModelError
        The model takes colour, a CT window or ``zscore`` normalisation (the
        daemon's Python path serves those), or a segmenter would need its
        mask shrunk.
    """
    if dtype not in _ONNX_TYPES or min(size) < 1:
        raise ModelError(f"No native graph for {size} {dtype}.")
    spec, pre = manifest.input, manifest.preprocessing
    if spec.channels != 1 or pre.window is not None:
        raise ModelError("Native graphs are built for grayscale models without a CT window.")
    model = onnx.load(str(model_path))
    opsets = [o for o in model.opset_import]
    if not any(o.domain in ("", "ai.onnx") and o.version >= 18 for o in opsets):
        raise ModelError("A native graph needs a model of ONNX opset 18 or later (Resize and Pad with axes).")
    image = model.graph.input[0].name
    wrapped = compose.merge_models(
        _pre_model(manifest, size, dtype, opsets, model.ir_version), model, io_map=[("pre_image", image)], prefix2="model/"
    )
    outputs = [o.name for o in model.graph.output]
    if manifest.task == "segmentation":
        if len(outputs) != 1:
            raise ModelError("A native segmentation graph needs a model with one output, its logits.")
        dims = model.graph.output[0].type.tensor_type.shape.dim
        if len(dims) != 4 or dims[1].dim_value != 1:
            raise ModelError("Native segmentation graphs are built for one-channel (sigmoid) segmenters.")
        mask = _mask_model(manifest, size, opsets, model.ir_version)
        keep = [o.name for o in wrapped.graph.output]
        wrapped = compose.merge_models(
            wrapped, mask, io_map=[(keep[0], "post_logits")], outputs=keep + ["mask"]
        )
    # the model's outputs under their own names: the daemon reads them as it reads the model's
    for out in wrapped.graph.output:
        if out.name.startswith("model/"):
            plain = out.name[len("model/"):]
            for node in wrapped.graph.node:
                node.output[:] = [plain if o == out.name else o for o in node.output]
                node.input[:] = [plain if i == out.name else i for i in node.input]
            out.name = plain
    wrapped.graph.name = f"{manifest.name}-native-{size[0]}x{size[1]}-{dtype}"
    onnx.checker.check_model(wrapped)
    return wrapped


# --------------------------------------------------------------------------- measurement
def _median_us(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times)) / 1e3


def compare(name: str, precision: str, frames: int, rounds: int, block: int, provider: str = "cpu") -> dict[str, Any]:
    """One model: the wrapped graph beside ``LoadedModel.run`` (timings in µs, agreement on ``frames`` frames)."""
    import onnxruntime as ort

    from edge.inference.backends.onnxruntime import PROVIDERS
    from edge.inference.model import load_model
    from edge.tools.synthetic import make_source

    kind, size, dtype = SOURCES[name]
    model = load_model(name, precision=precision, backend="onnxruntime", provider=provider)
    manifest = model.manifest
    art = manifest.artifact_path(manifest.artifact_key(model.precision, "onnxruntime", provider))
    graph = build_native_graph(art, manifest, size, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "native.onnx"
        onnx.save(graph, str(path))
        backend = model.backend
        so = ort.SessionOptions()  # the daemon's options (edge.inference.backends.onnxruntime)
        so.intra_op_num_threads = backend.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if backend.spin_us > 0 else "0")
        if backend.spin_us > 0:
            so.add_session_config_entry("session.intra_op.spin_duration_us", str(backend.spin_us))
            so.add_session_config_entry("session.force_spinning_stop", "1")
        session = ort.InferenceSession(str(path), so, providers=[PROVIDERS[provider]])
    names = [o.name for o in session.get_outputs()]
    source = make_source(kind, height=size[0], width=size[1], dtype=dtype, seed=7)
    images = [source.frame(i) for i in range(frames)]
    agree, max_diff = [], 0.0
    for img in images:
        got = dict(zip(names, session.run(None, {"pixels": img[None]})))
        ref = model.infer(model.preprocess(img)[0][None])
        for key, value in ref.items():
            max_diff = max(max_diff, float(np.abs(value - got[key]).max()))
        if "mask" in got:
            agree.append(float((got["mask"][0] == model.run([img])[0].mask).mean()))
    img = images[0]
    python_us, graph_us = [], []
    for _ in range(5):  # warm both
        model.run([img])
        session.run(None, {"pixels": img[None]})
    for _ in range(rounds):  # alternated blocks: machine noise hits both alike
        python_us.append(_median_us(lambda: model.run([img]), block))
        graph_us.append(_median_us(lambda: session.run(None, {"pixels": img[None]}), block))
    model.close()
    return {
        "model": name,
        "precision": model.precision,
        "source": f"{size[0]}x{size[1]} {dtype}",
        "python_run_p50_us": float(np.median(python_us)),
        "graph_run_p50_us": float(np.median(graph_us)),
        "mask_agreement_min": min(agree) if agree else None,
        "max_abs_output_diff": max_diff,
        "frames": frames,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", default="int8", help="artifact to wrap (default: int8, the CPU default)")
    ap.add_argument("--models", nargs="*", default=list(SOURCES), help="bundled models (default: all)")
    ap.add_argument("--provider", default="cpu", help="ONNX Runtime provider (cpu, cuda, ...)")
    ap.add_argument("--frames", type=int, default=16, help="frames compared for agreement")
    ap.add_argument("--rounds", type=int, default=20, help="alternated blocks per side")
    ap.add_argument("--block", type=int, default=20, help="runs per block")
    ap.add_argument("--out", type=Path, help="write the JSON record here")
    args = ap.parse_args(argv)
    if onnx is None:
        print("in_graph_preprocessing: needs the onnx package (pip install -e '.[trainer]')", file=sys.stderr)
        return 2
    rows = []
    for name in args.models:
        row = compare(name, args.precision, args.frames, args.rounds, args.block, args.provider)
        rows.append(row)
        print(
            f"{row['model']:16s} {row['precision']:5s} {row['source']:16s} python path {row['python_run_p50_us']:8.0f} us"
            f"   in-graph {row['graph_run_p50_us']:8.0f} us   ratio {row['graph_run_p50_us'] / row['python_run_p50_us']:.2f}"
            f"   mask agreement {row['mask_agreement_min']}   max |diff| {row['max_abs_output_diff']:.3g}"
        )
    if args.out:
        from edge.fileio import atomic_write_text
        from edge.tools.results import machine_info

        record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(), "rows": rows}
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
