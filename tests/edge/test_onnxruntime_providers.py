"""ONNX Runtime's GPU providers: the options built per artifact, and providers that do not start.

The option tests are pure. The detection tests use the real onnxruntime: with
the CPU build (``.venv``) a GPU provider is made to look listed, as
onnxruntime-gpu lists CUDA and TensorRT even where their libraries are
missing; with onnxruntime-gpu on a machine without a GPU (run this file with
that interpreter) nothing is faked. Either way the backend must refuse, never
serve on the CPU under a GPU provider's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.errors import BackendUnavailableError
from edge.inference.backends import onnxruntime as ort_backend
from edge.inference.backends.onnxruntime import (
    OnnxRuntimeBackend,
    ProviderInactiveError,
    session_providers,
    tensorrt_options,
    trt_cache_folder,
)

# Every TensorRT provider option ONNX Runtime documents (TensorRT-ExecutionProvider.md; all present in
# libonnxruntime_providers_tensorrt.so of onnxruntime-gpu 1.31.1). A misspelt key would be rejected.
DOCUMENTED_TRT_OPTIONS = {
    "device_id", "trt_max_workspace_size", "trt_max_partition_iterations", "trt_min_subgraph_size",
    "trt_fp16_enable", "trt_bf16_enable", "trt_int8_enable", "trt_int8_calibration_table_name",
    "trt_int8_use_native_calibration_table", "trt_dla_enable", "trt_dla_core", "trt_engine_cache_enable",
    "trt_engine_cache_path", "trt_engine_cache_prefix", "trt_dump_subgraphs", "trt_force_sequential_engine_build",
    "trt_context_memory_sharing_enable", "trt_layer_norm_fp32_fallback", "trt_timing_cache_enable",
    "trt_timing_cache_path", "trt_force_timing_cache", "trt_detailed_build_log", "trt_build_heuristics_enable",
    "trt_sparsity_enable", "trt_builder_optimization_level", "trt_auxiliary_streams", "trt_tactic_sources",
    "trt_extra_plugin_lib_paths", "trt_profile_min_shapes", "trt_profile_max_shapes", "trt_profile_opt_shapes",
    "trt_cuda_graph_enable",
}
KW: dict[str, Any] = dict(input_name="image", input_chw=(1, 256, 256), max_batch=4, cache_dir="/var/cache/medge/ort-trt/m-ab", device_id=1)


def test_cpu_and_cuda_providers() -> None:
    assert session_providers("cpu", "int8", **KW) == ["CPUExecutionProvider"]
    assert session_providers("cuda", "fp16", **KW) == [
        ("CUDAExecutionProvider", {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"}),
        "CPUExecutionProvider",
    ]
    with pytest.raises(BackendUnavailableError, match="Unknown ONNX Runtime provider"):
        session_providers("rocm", "fp32", **KW)


@pytest.mark.parametrize(
    ("precision", "fp16", "int8"), [("fp32", "False", "False"), ("fp16", "True", "False"), ("int8", "False", "True")]
)
def test_tensorrt_provider_options_per_artifact(precision: str, fp16: str, int8: str) -> None:
    providers = session_providers("tensorrt", precision, **KW)
    assert [p if isinstance(p, str) else p[0] for p in providers] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider",
    ]
    first = providers[0]
    assert isinstance(first, tuple)
    opts = first[1]
    assert set(opts) <= DOCUMENTED_TRT_OPTIONS
    assert all(isinstance(v, str) for v in opts.values())
    assert opts["trt_fp16_enable"] == fp16 and opts["trt_int8_enable"] == int8
    assert "trt_int8_calibration_table_name" not in opts  # Q/DQ models must not get a calibration table
    assert opts["device_id"] == "1"
    assert opts["trt_engine_cache_enable"] == "True" and opts["trt_timing_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == "/var/cache/medge/ort-trt/m-ab"
    assert opts["trt_profile_min_shapes"] == "image:1x1x256x256"
    assert opts["trt_profile_opt_shapes"] == opts["trt_profile_max_shapes"] == "image:4x1x256x256"
    assert providers[1] == ("CUDAExecutionProvider", {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"input_name": "a,b"}, "cannot be given"),
        ({"input_name": "a:b"}, "cannot be given"),
        ({"input_name": ""}, "cannot be given"),
        ({"max_batch": 0}, "not a valid profile"),
        ({"input_chw": (1, 256)}, "not a valid profile"),
    ],
)
def test_tensorrt_options_refuse_what_the_profile_syntax_cannot_carry(change: dict[str, Any], match: str) -> None:
    with pytest.raises(BackendUnavailableError, match=match):
        tensorrt_options("fp32", **{**KW, **change})
    with pytest.raises(BackendUnavailableError, match="precision"):
        tensorrt_options("bf16", **KW)


def test_trt_cache_folder_is_keyed_by_content_and_stays_inside() -> None:
    a = trt_cache_folder("/c", "us-lesion-seg", "AB" * 32)
    assert a == Path("/c/onnxruntime-trt/us-lesion-seg-abababababababab")
    assert trt_cache_folder("/c", "us-lesion-seg", "cd" * 32) != a  # new weights, new engines
    odd = trt_cache_folder("/c", "../../etc/x", "ab" * 32)
    assert odd.parent == Path("/c/onnxruntime-trt") and "/" not in odd.name


def test_precisions_without_kernels_are_refused(fixture_engines: Path) -> None:
    path = fixture_engines / "tiny-seg" / "model.onnx"
    with pytest.raises(BackendUnavailableError, match="fp16"):
        OnnxRuntimeBackend(path, precision="fp16")
    if "CUDAExecutionProvider" in ort_backend.available_providers():
        with pytest.raises(BackendUnavailableError, match="int8"):
            OnnxRuntimeBackend(path, precision="int8", provider="cuda")


# ----------------------------------------------------------------------------- real onnxruntime
def _listed_as_onnxruntime_gpu_does(monkeypatch: pytest.MonkeyPatch, ep: str) -> bool:
    """Make ``ep`` listed; return whether the real build listed it already."""
    real = ort_backend.available_providers()
    if ep in real:
        return True
    monkeypatch.setattr(ort_backend, "available_providers", lambda: [*real, ep])
    return False


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_gpu_provider_that_does_not_start_is_detected(
    provider: str, fixture_engines: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = ort_backend.PROVIDERS[provider]
    really_listed = _listed_as_onnxruntime_gpu_does(monkeypatch, ep)
    path = fixture_engines / "tiny-seg" / "model.onnx"
    kw: dict[str, Any] = dict(provider=provider, input_name="image", input_chw=(1, 64, 64), max_batch=2, cache_dir=tmp_path,
              model_name="tiny-seg", intra_op_threads=1)
    try:
        be = OnnxRuntimeBackend(path, **kw)
    except ProviderInactiveError as exc:
        text = str(exc)
        assert ep in text and "\n" not in text
        assert "CPUExecutionProvider" in text or "cannot start" in text
    else:
        # Only a machine where the provider really starts gets here, and then it is active.
        assert really_listed, f"{ep} was not in this onnxruntime build, yet the session was accepted"
        assert be.providers[0] == ep
        out = be.infer(np.full((2, 1, 64, 64), 0.75, np.float32))
        np.testing.assert_allclose(out["logits"], 5.0, rtol=1e-3)
        be.close()
    if provider == "tensorrt":  # the engine cache folder is per artifact content, under the cache dir
        assert [p.name[:9] for p in (tmp_path / "onnxruntime-trt").iterdir()] == ["tiny-seg-"]


def test_provider_missing_from_the_build_is_refused_before_any_session(fixture_engines: Path) -> None:
    if "CUDAExecutionProvider" in ort_backend.available_providers():
        pytest.skip("this onnxruntime build lists CUDA")
    with pytest.raises(ProviderInactiveError, match="not available in this onnxruntime build"):
        OnnxRuntimeBackend(fixture_engines / "tiny-seg" / "model.onnx", provider="cuda")
