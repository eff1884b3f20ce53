"""``medge build``: build (and cache) the TensorRT plans the daemon will load, before it starts.

TensorRT plans are specific to the GPU, its compute capability and the
TensorRT version, so they are built on the target. ``medge build`` builds
exactly the plan ``medge serve`` would build at start, in the same folder,
by the same code (:class:`~edge.inference.backends.tensorrt.TensorRTBackend`
and its engine cache: one key function, one lock per plan), so::

    sudo -u medge medge build --config /etc/medge/medge.toml
    sudo systemctl start medge      # loads the plans: no build at start

With ``--config`` (default: the same as ``medge serve``, the defaults and
``MEDGE_*`` variables) each model's plan follows the daemon's settings: the
engine cache folder (``cache_dir``, else ``<spool_dir>/engine-cache``), the
model's effective max batch (its ``max_batch``, else ``[scheduler] max_batch``),
its ``device_id`` and its precision. ``precision = "auto"`` builds the first
of int8 -> fp16 -> fp32 that builds, as the daemon's chain would
(:func:`edge.inference.chain.plan`). Flags override the file for every
model named. With no model named, every configured model whose backend is
``tensorrt`` or ``auto`` is built.

A unit that takes its spool from systemd (``StateDirectory=``, no
``spool_dir`` in the file) has its cache under ``$STATE_DIRECTORY``, which an
operator's shell does not have: pass ``--cache-dir`` then (``medge build``
refuses to guess).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from edge.config import MedgeConfig, ModelConfig, load_config_and_spool_source
from edge.errors import BackendUnavailableError, ConfigError, EngineBuildError, ModelError
from edge.inference.manifest import Manifest, default_engines_dir

__all__ = ["configure_parser", "run", "build", "build_model", "BuildTarget", "BuildResult"]


@dataclass(frozen=True)
class BuildTarget:
    """One model to build for, with the daemon's settings (flags applied)."""

    name: str
    directory: Path
    precision: str
    max_batch: int
    device_id: int


@dataclass(frozen=True)
class BuildResult:
    """What ``medge build`` did for one model."""

    model: str
    precision: str
    plan: str
    source: str  # cache | built | rebuilt
    seconds: float
    failed: tuple[str, ...] = ()  # precisions tried before, and why they failed


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add ``medge build`` options to ``p``."""
    p.description = ("Build the TensorRT plans the daemon loads, in its engine cache, with its settings "
                     "(--config), so the next start builds nothing.")
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="served model names, or engine folders / bundled names (default: every configured "
                        "model whose backend is tensorrt or auto)")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="the daemon's TOML configuration (default: as medge serve: defaults and MEDGE_*)")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8", "auto"],
                   help="override the model's precision (auto: int8, then fp16, then fp32)")
    p.add_argument("--max-batch", type=int, default=None, help="override the effective max batch")
    p.add_argument("--cache-dir", type=Path, default=None, help="override the engine cache folder")
    p.add_argument("--device", type=int, default=None, help="override the CUDA device ordinal")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _cache_dir(cfg: MedgeConfig, spool_source: str, args: argparse.Namespace) -> Path:
    if args.cache_dir is not None:
        return Path(args.cache_dir)
    if args.config is not None and spool_source == "default" and str(cfg.cache_dir) in ("", "."):
        raise ConfigError(
            f"{args.config} sets neither cache_dir nor spool_dir, so under systemd the daemon's engine cache is "
            "$STATE_DIRECTORY/engine-cache, which this shell does not know. Pass it: --cache-dir "
            "/var/lib/medge/engine-cache (or /var/lib/medge/<instance>/engine-cache for medge@<instance>)."
        )
    return cfg.engine_cache_dir


def _targets(cfg: MedgeConfig, args: argparse.Namespace) -> list[BuildTarget]:
    """The models to build for, each with the daemon's settings and the flags applied."""
    picked: list[tuple[ModelConfig, Path]] = []
    if not args.models:
        picked = [(mc, cfg.model_dir(mc)) for mc in cfg.models if mc.backend in ("tensorrt", "auto")]
    for name in args.models:
        if name in cfg.model_names:
            mc = cfg.model(name)
            picked.append((mc, cfg.model_dir(mc)))
            continue
        folder = Path(name) if Path(name).is_dir() else default_engines_dir() / name
        if not (folder / "manifest.json").is_file():
            raise ModelError(f"No model {name!r}: not a served model of the configuration, nor an engine folder "
                             f"({folder / 'manifest.json'} does not exist).")
        picked.append((ModelConfig(name=Manifest.load(folder).name, path=str(folder), precision="auto"), folder))
    return [
        BuildTarget(
            name=mc.name, directory=folder,
            precision=args.precision or mc.precision,
            max_batch=int(args.max_batch or mc.max_batch or cfg.scheduler.max_batch),
            device_id=int(mc.device_id if args.device is None else args.device),
        )
        for mc, folder in picked
    ]


def build_model(target: BuildTarget, cache_dir: Path) -> BuildResult:
    """Build or reuse the plan the daemon would load for one model.

    Tries the model's TensorRT steps in the daemon's order (one for an
    explicit precision) and stops at the first that builds.

    Raises
    ------
    EngineBuildError, ModelError, BackendUnavailableError
        No step builds (the last step's error, with the earlier ones named).
    """
    from edge.inference.backends.tensorrt import TensorRTBackend
    from edge.inference.chain import plan

    man = Manifest.load(target.directory)
    if target.precision == "int8" and not man.int8_tensorrt_ready:
        act = man.training.get("quantization", {}).get("activations", "")
        raise EngineBuildError(
            f"{target.directory}/model.int8.onnx has {act or 'unknown'} activations; TensorRT needs symmetric int8 "
            f"(zero point 0). Run: medge quantize {target.directory} --activations int8"
        )
    steps = [s for s in plan(man, "tensorrt", "cpu", target.precision) if s.kind == "tensorrt"]
    failed: list[str] = []
    for i, step in enumerate(steps):
        t0 = time.monotonic()
        try:
            backend = TensorRTBackend(
                man.artifact_path(step.artifact, verify=True), onnx_sha256=man.artifacts[step.artifact].sha256,
                model_name=man.name, precision=step.precision, input_name=man.input.name,
                input_chw=(man.input.channels, *man.input.size), max_batch=target.max_batch,
                cache_dir=cache_dir, device_id=target.device_id,
            )
        except (BackendUnavailableError, ModelError) as exc:
            failed.append(f"{step.precision}: {exc}")
            if i == len(steps) - 1:
                raise type(exc)(f"Model {target.name!r}: no TensorRT plan builds ({'; '.join(failed)}).") from exc
            continue
        try:
            return BuildResult(target.name, step.precision, str(backend.plan_path), backend.plan_source,
                               round(time.monotonic() - t0, 1), tuple(failed))
        finally:
            backend.close()
    raise ModelError(f"Model {target.name!r} has no TensorRT artifact to build.")  # plan() never returns []


def build(engine: str | Path, precision: str, max_batch: int, cache_dir: str | Path, device: int = 0) -> Path:
    """Build or reuse the cached plan for one engine folder (or bundled name) at ``precision``; its path.

    Raises
    ------
    EngineBuildError
        INT8 asked of an artifact without symmetric int8 activations, or
        TensorRT cannot build the plan.
    BackendUnavailableError
        TensorRT, cuda-python or a GPU is missing.
    """
    folder = Path(engine) if Path(engine).is_dir() else default_engines_dir() / str(engine)
    target = BuildTarget(Manifest.load(folder).name, folder, precision, int(max_batch), int(device))
    return Path(build_model(target, Path(cache_dir)).plan)


def run(args: argparse.Namespace) -> int:
    """Build every targeted model's plan and say where it is; 1 if any model has none."""
    from edge.inference.backends.tensorrt import tensorrt_available

    cfg, spool_source = load_config_and_spool_source(args.config)
    cache_dir = _cache_dir(cfg, spool_source, args)
    targets = _targets(cfg, args)
    if not targets:
        print("No configured model runs on TensorRT (backend = tensorrt or auto): nothing to build.")
        return 0
    ok, why = tensorrt_available()
    if not ok:
        raise BackendUnavailableError(f"medge build needs TensorRT and a CUDA device: {why}")
    results, errors = [], []
    for target in targets:
        if not args.json:
            print(f"{target.name}: TensorRT plan ({target.precision}, max batch {target.max_batch}, device "
                  f"{target.device_id}) in {cache_dir} ... (a first build takes minutes)", flush=True)
        try:
            results.append(build_model(target, cache_dir))
        except (BackendUnavailableError, ModelError) as exc:
            errors.append(f"{target.name}: {exc}")
    if args.json:
        print(json.dumps({"cache_dir": str(cache_dir), "plans": [dataclasses.asdict(r) for r in results],
                          "errors": errors}, indent=2))
    else:
        for r in results:
            print(f"{r.model}: {r.precision} plan {r.plan} ({r.source}, {r.seconds} s)"
                  + (f"; tried first: {'; '.join(r.failed)}" if r.failed else ""))
        for e in errors:
            print(f"error: {e}")
    return 1 if errors else 0
