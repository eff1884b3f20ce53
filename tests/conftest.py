"""Shared fixtures: a tiny engines folder that makes tests independent of training.

``fixture_engines`` (session scope) holds two models built with
``onnx.helper``, with valid manifests and sha256s:

* ``tiny-seg``: ``logits = 20 * (image - 0.5)``, so the served mask is the
  set of pixels brighter than the middle of the image's (min-max
  normalised) intensity range: a result a test can compute on its own.
* ``tiny-det``: ``heatmap = AveragePool4x4(image)``, ``size = 16``,
  ``offset = 0``: a bright square gives a box around it.

Both take ``image`` ``[N, 1, 64, 64]`` float32 (small, so tests are fast)
and have ``fp32`` and ``int8`` artifacts (the int8 one is the same graph;
only the selection logic is under test).

Real peers (DCMTK, dicom3tools, Prometheus, Orthanc, systemd-analyze,
OpenSSL): a test that drives one says so with ``@pytest.mark.peer("tool", ...)``
or calls :func:`require_peer`. A missing peer skips the test with a reason
naming the tool and its Debian package (``make peers`` installs them); under
``CI=true`` it fails instead, so CI cannot pass with its peers silently absent.

Waiting for another thread or process: :func:`wait_until` polls a condition
with a deadline; tests never sleep a fixed time hoping something happened.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, NoReturn

import pytest

from edge.inference.manifest import Artifact, InputSpec, Manifest, Postprocessing, Preprocessing, sha256_file

FIXTURE_SIZE = 64

# ------------------------------------------------------------------ real peers
#: Every external program the suite drives, and the Debian package that provides it.
#: ``make peers`` (run by ``make test`` and ``.ci/run``) installs these packages.
PEERS: dict[str, str] = {
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "echoscu": "dcmtk",
    "dciodvfy": "dicom3tools",
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "Orthanc": "orthanc",
    "systemd-analyze": "systemd",
    "openssl": "openssl",
}
# Debian puts Orthanc in /usr/sbin, which is not on an ordinary user's PATH.
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def in_ci() -> bool:
    """True under ``CI=true`` (``.ci/run`` sets it): a missing peer is then a failure."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _is_python_script(path: Path) -> bool:
    with open(path, "rb") as fh:
        first = fh.readline(256)
    return first.startswith(b"#!") and b"python" in first


def peer_path(tool: str) -> str | None:
    """Absolute path of peer ``tool`` (PATH, then the sbin folders), or None where it is absent.

    Python console scripts of the same name are passed over: pynetdicom puts its own
    ``storescu``/``storescp``/``echoscu`` into the virtual environment's ``bin``, and
    they take none of DCMTK's options.
    """
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d] + list(_SBIN_DIRS)
    for d in dirs:
        candidate = Path(d) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK) and not _is_python_script(candidate):
            return str(candidate.absolute())
    return None


def peer_missing(reason: str) -> NoReturn:
    """Skip the running test because a peer is unusable; fail instead under ``CI=true``."""
    if in_ci():
        pytest.fail(f"{reason}; CI=true requires every real peer", pytrace=False)
    pytest.skip(reason)


def require_peer(*tools: str) -> str:
    """Path of the first of ``tools``; skips (fails under ``CI=true``) naming every one missing.

    >>> storescu = require_peer("storescu")  # doctest: +SKIP
    """
    if not tools:
        raise ValueError("require_peer needs at least one tool name")
    unknown = [t for t in tools if t not in PEERS]
    if unknown:
        raise ValueError(f"{unknown} not in tests/conftest.py PEERS: add each tool with its Debian package")
    paths = {t: peer_path(t) for t in tools}
    missing = [t for t, p in paths.items() if p is None]
    if missing:
        names = ", ".join(f"{t} (Debian package {PEERS[t]})" for t in missing)
        peer_missing(f"real peer not installed: {names}; `make peers` installs missing peers (as root or with passwordless sudo)")
    return str(paths[tools[0]])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "peer(*tools): needs these real peer programs (tests/conftest.py PEERS); "
        "skipped with a reason where one is missing, a failure under CI=true",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before the test's fixtures, so a missing peer costs no daemon start-up.
    for mark in item.iter_markers(name="peer"):
        require_peer(*mark.args)


# ------------------------------------------------------------------ waiting
def wait_until(cond: Callable[[], object], timeout_s: float = 10.0, what: str = "condition", interval_s: float = 0.01) -> None:
    """Poll ``cond()`` every ``interval_s`` until it is true; fail naming ``what`` after ``timeout_s``.

    For observing another thread or process that offers no event to wait on.
    """
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def _save(model, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _seg_model(size: int):
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, size, size])
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    gain = helper.make_tensor("gain", TensorProto.FLOAT, [], [20.0])
    nodes = [
        helper.make_node("Sub", ["image", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "tiny_seg", [inp], [out], initializer=[half, gain])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _det_model(size: int):
    from onnx import TensorProto, helper

    h = size // 4
    inp = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])
    outs = [
        helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", 1, h, h]),
        helper.make_tensor_value_info("size", TensorProto.FLOAT, ["N", 2, h, h]),
        helper.make_tensor_value_info("offset", TensorProto.FLOAT, ["N", 2, h, h]),
    ]
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    sixteen = helper.make_tensor("sixteen", TensorProto.FLOAT, [], [16.0])
    nodes = [
        helper.make_node("AveragePool", ["image"], ["heatmap"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Mul", ["heatmap", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "sixteen"], ["sixteens"]),
        helper.make_node("Concat", ["sixteens", "sixteens"], ["size"], axis=1),
        helper.make_node("Concat", ["zeros", "zeros"], ["offset"], axis=1),
    ]
    graph = helper.make_graph(nodes, "tiny_det", [inp], outs, initializer=[zero, sixteen])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def make_engines(root: Path, size: int = FIXTURE_SIZE) -> Path:
    """Write ``tiny-seg`` and ``tiny-det`` model folders under ``root``."""
    specs = {
        "tiny-seg": ("segmentation", ("lesion",), ("logits",), _seg_model(size), Postprocessing(threshold=0.5)),
        "tiny-det": (
            "detection",
            ("nodule",),
            ("heatmap", "size", "offset"),
            _det_model(size),
            Postprocessing(threshold=0.5, nms_iou=0.5, max_detections=10, stride=4),
        ),
    }
    for name, (task, labels, outputs, model, post) in specs.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        _save(model, d / "model.onnx")
        shutil.copyfile(d / "model.onnx", d / "model.int8.onnx")
        Manifest(
            name=name,
            version="1",
            task=task,
            labels=labels,
            input=InputSpec(size=(size, size)),
            outputs=outputs,
            preprocessing=Preprocessing(color="grayscale", resize="letterbox", normalize="minmax"),
            postprocessing=post,
            artifacts={
                "fp32": Artifact("model.onnx", sha256_file(d / "model.onnx")),
                "int8": Artifact("model.int8.onnx", sha256_file(d / "model.int8.onnx")),
            },
            # Recorded as the TensorRT-ready form so the (fake-GPU) TensorRT tests may pick int8.
            training={"quantization": {"format": "QDQ", "activations": "int8 symmetric"}},
            intended_use="Test fixture only.",
        ).save(d)
    return root


@pytest.fixture(scope="session")
def fixture_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only engines folder with ``tiny-seg`` and ``tiny-det`` (see module doc)."""
    pytest.importorskip("onnx", reason="building fixture models needs onnx (the trainer extra)")
    return make_engines(tmp_path_factory.mktemp("engines"))


@pytest.fixture
def engines_copy(fixture_engines: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the fixture engines (for tamper tests)."""
    dst = tmp_path / "engines"
    shutil.copytree(fixture_engines, dst)
    return dst
