"""What TensorRT accepts in an explicit-quantization (Q/DQ) ONNX graph, checked on the graph.

TensorRT's ``IDequantizeLayer`` takes only INT8, FP8, INT4 or FP4 inputs and
its ``IQuantizeLayer`` only a zero point of 0. ONNX Runtime's
``quantize_static`` by default also quantizes each Conv bias to INT32 behind a
``DequantizeLinear`` (onnx-tensorrt#850, TensorRT#3360): such a graph runs on
ONNX Runtime but TensorRT's ONNX parser refuses it. The INT8 artifact for
TensorRT (``model.int8-tensorrt.onnx``) must therefore hold:

- every ``DequantizeLinear`` input: an INT8 initializer (a quantized weight)
  or the output of a ``QuantizeLinear`` whose zero point is INT8;
- every zero point (``QuantizeLinear`` and ``DequantizeLinear``): an INT8
  initializer equal to 0 (symmetric).

:func:`tensorrt_qdq_problems` lists each rule broken (empty: the graph
passes); :func:`strip_unused_opsets` drops the opset imports ONNX Runtime's
optimizer adds for domains no node uses; :func:`finish_for_tensorrt` does
both to a file (raising when a rule is broken); :func:`qdq_reference_runner` runs
a Q/DQ graph by its ONNX definition on the CPU (what the TensorRT artifact's
accuracy gate measures), :func:`daemon_cpu_runner` runs it as the daemon
serves it on the CPU (fused integer kernels), and :func:`cpu_int8_features`
says whether this CPU's integer kernels can saturate (no VNNI).

Examples
--------
>>> import onnx  # doctest: +SKIP
>>> tensorrt_qdq_problems(onnx.load("engines/us-lesion-seg/model.int8-tensorrt.onnx"))  # doctest: +SKIP
[]
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = [
    "tensorrt_qdq_problems",
    "strip_unused_opsets",
    "dq_input_types",
    "finish_for_tensorrt",
    "qdq_reference_runner",
    "daemon_cpu_runner",
    "cpu_int8_features",
]

_MAX_PROBLEMS = 20  # enough to act on; a broken graph repeats the same fault per layer


def _dtype_name(data_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(data_type)


def _zero_point_problem(node: "onnx.NodeProto", inits: dict[str, "onnx.TensorProto"]) -> str | None:
    """Why ``node``'s zero point breaks TensorRT's rule, or None when it is an INT8 zero."""
    import onnx
    from onnx import numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        # No zero point: QuantizeLinear then outputs uint8; DequantizeLinear assumes 0 of x's type.
        return None if node.op_type == "DequantizeLinear" else f"{node.op_type} {node.name!r} has no zero point (uint8 output)"
    zp = inits.get(node.input[2])
    if zp is None:
        return f"{node.op_type} {node.name!r} has a zero point that is not an initializer"
    if zp.data_type != onnx.TensorProto.INT8:
        return f"{node.op_type} {node.name!r} has a {_dtype_name(zp.data_type)} zero point, not INT8"
    if numpy_helper.to_array(zp).any():
        return f"{node.op_type} {node.name!r} has a non-zero zero point (TensorRT needs symmetric, 0)"
    return None


def dq_input_types(model: "onnx.ModelProto") -> dict[str, str]:
    """Each ``DequantizeLinear`` node's name → the element type of its input ``x``.

    ``x`` is typed from its initializer, or from the zero point of the
    ``QuantizeLinear`` that produces it (``UINT8`` without one); anything
    else is reported as ``produced by <op>`` or ``graph input``.
    """
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    types: dict[str, str] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type != "DequantizeLinear":
            continue
        x = node.input[0]
        name = node.name or f"#{i}"
        if x in inits:
            types[name] = _dtype_name(inits[x].data_type)
        elif x in producer and producer[x].op_type == "QuantizeLinear":
            q = producer[x]
            zp = inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
            types[name] = _dtype_name(zp.data_type) if zp is not None else _dtype_name(onnx.TensorProto.UINT8)
        else:
            types[name] = f"produced by {producer[x].op_type}" if x in producer else "graph input"
    return types


def tensorrt_qdq_problems(model: "onnx.ModelProto") -> list[str]:
    """Every way ``model``'s Q/DQ nodes break TensorRT's explicit-quantization rules (at most 20).

    Parameters
    ----------
    model : onnx.ModelProto
        A Q/DQ ONNX model (main graph; TensorRT's rules apply to subgraphs
        too, but the bundled models have none).

    Returns
    -------
    list of str
        One sentence per fault, naming the node; empty when TensorRT can
        build the graph's Q/DQ layers.
    """
    inits = {i.name: i for i in model.graph.initializer}
    problems = [
        f"DequantizeLinear {name!r} dequantizes an input of type {kind}; TensorRT accepts only INT8 here"
        for name, kind in dq_input_types(model).items()
        if kind != "INT8"
    ]
    for node in model.graph.node:
        if len(problems) >= _MAX_PROBLEMS:
            break
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            why = _zero_point_problem(node, inits)
            if why is not None:
                problems.append(why)
    return problems[:_MAX_PROBLEMS]


def strip_unused_opsets(model: "onnx.ModelProto") -> int:
    """Drop opset imports of domains no node uses (the default domain is kept); returns how many."""
    used = {n.domain or "" for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    dropped = len(model.opset_import) - len(keep)
    if dropped:
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return dropped


def finish_for_tensorrt(path: Path | str, what: str) -> None:
    """Check the Q/DQ model at ``path`` against TensorRT's rules and drop its unused opset imports, in place.

    Raises
    ------
    EngineBuildError
        If a Q/DQ node breaks TensorRT's rules (``what`` names the model in the message).
    """
    import onnx

    from edge.errors import EngineBuildError

    model = onnx.load(str(path))
    problems = tensorrt_qdq_problems(model)
    if problems:
        raise EngineBuildError(
            f"{what} is not one TensorRT can build ({len(problems)} problems, first: {problems[0]})."
        )
    if strip_unused_opsets(model):
        onnx.save(model, str(path))


def qdq_reference_runner(path: Path | str) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A runner that executes a Q/DQ model by its ONNX definition: ``DQ -> float op -> Q``, node by node.

    With ONNX Runtime's graph optimizations off, no ``DQ -> Conv -> Q`` group
    is fused into an integer kernel, so the result is the graph's own
    arithmetic, the one TensorRT implements with exact int32 accumulation.
    ONNX Runtime's fused int8 kernels instead measure the CPU they run on: on
    x86 CPUs without VNNI they use ``VPMADDUBSW``, whose 16-bit intermediate
    sums saturate (the symmetric bundled artifacts lose most of their Dice
    there), so they cannot stand in for TensorRT in the gate.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(None, {in_name: np.ascontiguousarray(batch, dtype=np.float32)})))

    return run


def daemon_cpu_runner(path: Path | str, max_batch: int = 16) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A runner on the daemon's own ONNX Runtime CPU session (``OnnxRuntimeBackend``: ORT_ENABLE_ALL).

    With graph optimizations on, ``DQ -> Conv -> Q`` groups become fused
    integer kernels (``QLinearConv``) whose arithmetic depends on the CPU:
    this is what ``medge serve`` computes on the machine that runs it.
    Batches larger than ``max_batch`` are run in slices.
    """
    from edge.inference.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(path, precision="int8", provider="cpu", max_batch=max_batch, spin_us=0)

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        if batch.shape[0] <= max_batch:
            return backend.infer(batch)
        parts = [backend.infer(batch[i : i + max_batch]) for i in range(0, batch.shape[0], max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    return run


_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_int8_features(cpuinfo: Path | str = "/proc/cpuinfo") -> dict[str, object]:
    """This CPU's model and the x86 flags that decide ONNX Runtime's u8s8 kernels.

    Returns ``{"model", "avx2", "avx512f", "vnni"}``; ``vnni`` is True when
    ``avx512_vnni``, ``avx_vnni`` or ``amx_int8`` is present (int32 dot
    products, no 16-bit saturation). Without a readable ``cpuinfo`` (not
    Linux) the flags are None and the model is :func:`platform.processor`.
    """
    import platform

    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            text = fh.read(1 << 20)  # one processor's block is a few kB; bounded read
    except OSError:
        return {"model": platform.processor() or platform.machine(), "avx2": None, "avx512f": None, "vnni": None}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())  # the first processor's block
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name", platform.machine()),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "vnni": any(f in flags for f in _VNNI_FLAGS),
    }
