"""``medge build`` pre-builds exactly the plan the daemon loads (fake tensorrt and CUDA: no GPU).

The same configuration gives the same cache folder, max batch, device and
precision, so a daemon started after ``medge build --config`` builds nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge.cli import main
from edge.config import load_config
from tests.edge.test_tensorrt_fake import fake_gpu  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("fake_gpu")


def _config(tmp_path: Path, engines: Path, extra: str = "") -> Path:
    cfg = tmp_path / "medge.toml"
    cfg.write_text(
        f'engines_dir = "{engines}"\nspool_dir = "{tmp_path / "spool"}"\n'
        "[scheduler]\nmax_batch = 3\n"
        '[[models]]\nname = "tiny-seg"\nbackend = "auto"\nprecision = "auto"\ndevice_id = 1\n'
        '[[models]]\nname = "tiny-det"\nbackend = "onnxruntime"\n' + extra
    )
    return cfg


def test_medge_build_then_the_daemon_loads_without_building(fake_gpu: Any, fixture_engines: Path,  # noqa: F811
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edge.inference.model import ModelRegistry

    cfg_path = _config(tmp_path, fixture_engines)
    assert main(["build", "--config", str(cfg_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    [res] = out["plans"]  # tiny-det runs on onnxruntime: not built unless named
    cache = tmp_path / "spool" / "engine-cache"
    assert out["cache_dir"] == str(cache) and res["model"] == "tiny-seg" and res["source"] == "built"
    meta = json.loads(Path(res["plan"]).with_suffix(".json").read_text())
    assert (meta["max_batch"], meta["device_id"], meta["precision"]) == (3, 1, res["precision"])
    builds = len(fake_gpu.log["builds"])
    assert builds == 1
    cfg = load_config(cfg_path)
    with ModelRegistry.from_config(cfg, warmup=False) as reg:  # the daemon's load path
        assert reg["tiny-seg"].backend_label == "tensorrt"
    assert len(fake_gpu.log["builds"]) == builds  # loaded from the cache medge build filled
    assert main(["build", "--config", str(cfg_path), "tiny-seg"]) == 0  # again: cached
    assert "(cache," in capsys.readouterr().out and len(fake_gpu.log["builds"]) == builds


def test_flags_override_the_configuration(fake_gpu: Any, fixture_engines: Path, tmp_path: Path,  # noqa: F811
                                          capsys: pytest.CaptureFixture) -> None:
    cfg_path = _config(tmp_path, fixture_engines)
    other = tmp_path / "elsewhere"
    args = ["build", "--config", str(cfg_path), "--json", "--max-batch", "2", "--device", "0",
            "--precision", "fp32", "--cache-dir", str(other), "tiny-det"]
    assert main(args) == 0
    [res] = json.loads(capsys.readouterr().out)["plans"]
    meta = json.loads(Path(res["plan"]).with_suffix(".json").read_text())
    assert Path(res["plan"]).parent == other and res["model"] == "tiny-det"
    assert (meta["max_batch"], meta["device_id"], meta["precision"]) == (2, 0, "fp32")


def test_a_systemd_spool_needs_an_explicit_cache_dir(fixture_engines: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "unit.toml"
    cfg.write_text(f'engines_dir = "{fixture_engines}"\n[[models]]\nname = "tiny-seg"\nbackend = "tensorrt"\n')
    assert main(["build", "--config", str(cfg)]) == 1
    assert "--cache-dir" in capsys.readouterr().err


def test_nothing_to_build(fixture_engines: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "cpu.toml"
    cfg.write_text(f'engines_dir = "{fixture_engines}"\ncache_dir = "{tmp_path}"\n[[models]]\nname = "tiny-seg"\n')
    assert main(["build", "--config", str(cfg)]) == 0
    assert "nothing to build" in capsys.readouterr().out


def test_the_units_bound_the_start_and_say_how_to_pre_build() -> None:
    units = Path(__file__).resolve().parents[2] / "systemd"
    for name in ("medge.service", "medge@.service"):
        text = (units / name).read_text()
        assert "\nTimeoutStartSec=90s\n" in text and "EXTEND_TIMEOUT_USEC" in text, name
        assert "medge build --config /etc/medge/" in text, name
    assert "--cache-dir /var/lib/medge/%i/engine-cache" in (units / "medge@.service").read_text()
