"""The systemd units: hardened (``systemd-analyze security`` exposure <= 2.5), valid
(``systemd-analyze verify``), with a watchdog, a per-scanner template, and an explicit
spool precedence (file, then ``$STATE_DIRECTORY``; ``MEDGE_SPOOL_DIR`` only when set,
and logged when it overrides the file)."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.config import load_config
from tests.conftest import peer_path

UNITS = Path(__file__).resolve().parents[2] / "systemd"
ANALYZE = peer_path("systemd-analyze") or "systemd-analyze"
needs_analyze = pytest.mark.peer("systemd-analyze")
MAX_EXPOSURE = 2.5


def _directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@needs_analyze
@pytest.mark.parametrize("name", ["medge.service", "medge@.service"])
def test_security_exposure_is_at_most_2_5(name: str) -> None:
    res = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(UNITS / name)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", res.stdout)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, res.stdout


@needs_analyze
def test_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing to say about either unit (ExecStart pointed at a real binary)."""
    true = shutil.which("true")
    assert true is not None
    for name in ("medge.service", "medge@.service"):
        text = (UNITS / name).read_text()
        # verify checks that ExecStart's binary exists; /opt/medge is not installed here.
        text, n = re.subn(r"^ExecStart=\S+", f"ExecStart={true}", text, flags=re.M)
        assert n == 1
        (tmp_path / name).write_text(text)
    res = subprocess.run([ANALYZE, "verify", "--man=no", "medge.service", "medge@.service", "medge@us1.service"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    ours = [line for line in (res.stdout + res.stderr).splitlines() if "medge" in line]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr


def test_units_have_a_watchdog_and_leave_the_spool_to_the_config() -> None:
    for name in ("medge.service", "medge@.service"):
        d = _directives(UNITS / name)
        assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
        seconds = int(re.fullmatch(r"(\d+)s?", d["WatchdogSec"][0]).group(1))  # type: ignore[union-attr]
        assert 10 <= seconds <= 120
        assert not any(v.startswith("MEDGE_SPOOL_DIR") for v in d.get("Environment", [])), name
    t = _directives(UNITS / "medge@.service")
    assert t["ExecStart"][0].endswith("--config /etc/medge/%i.toml")
    assert t["StateDirectory"] == ["medge/%i"]  # its own spool, via $STATE_DIRECTORY


def test_spool_precedence(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """File wins over systemd's $STATE_DIRECTORY; MEDGE_SPOOL_DIR wins over both and says so."""
    state = "/var/lib/medge/us1"
    bare = tmp_path / "bare.toml"
    bare.write_text("[metrics]\nport = 9200\n")
    withspool = tmp_path / "spool.toml"
    withspool.write_text(f'spool_dir = "{tmp_path / "from-file"}"\n')
    env = {"STATE_DIRECTORY": state}
    assert str(load_config(bare, env=env, check_models=False).spool_dir) == state
    assert str(load_config(None, env={}, check_models=False).spool_dir) == ".medge"
    assert load_config(withspool, env=env, check_models=False).spool_dir == tmp_path / "from-file"
    with caplog.at_level(logging.INFO, logger="edge.config"):
        cfg = load_config(withspool, env={**env, "MEDGE_SPOOL_DIR": "/srv/spool"}, check_models=False)
    assert str(cfg.spool_dir) == "/srv/spool"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "overrides spool_dir" in r.getMessage()]
    assert len(warned) == 1 and "MEDGE_SPOOL_DIR" in warned[0].getMessage()
