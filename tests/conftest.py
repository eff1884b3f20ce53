"""Shared fixtures: a tiny engines folder that makes tests independent of training.

``fixture_engines`` (session scope) holds two models with valid manifests
and sha256s, copied from ``tests/data/fixture-engines/`` (committed, so the
daemon's tests need no onnx; ``tests/trainer/test_fixture_engines.py`` holds
their generator and fails if the committed files drift from it):

* ``tiny-seg``: ``logits = 20 * (image - 0.5)``, so the served mask is the
  set of pixels brighter than the middle of the image's (min-max
  normalised) intensity range: a result a test can compute on its own.
* ``tiny-det``: ``heatmap = AveragePool4x4(image)``, ``size = 16``,
  ``offset = 0``: a bright square gives a box around it.

Both take ``image`` ``[N, 1, 64, 64]`` float32 (small, so tests are fast)
and have ``fp32`` and ``int8`` artifacts (the int8 one is the same graph;
only the selection logic is under test).

``fixture_engines_with_cls`` (session scope) adds the third committed model,
``tiny-cls``: a binary classifier (label ``nodule``, outputs ``logits`` and
``cam``, temperature 2) whose calibrated probability is
``sigmoid(20 * (f - 0.1))``, ``f`` the mean of the min-max normalised,
letterboxed input (see ``tests/trainer/test_fixture_engines.py``).

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

#: The committed fixture models (see the module doc).
FIXTURE_ENGINES = Path(__file__).resolve().parent / "data" / "fixture-engines"

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


#: The committed models ``fixture_engines`` serves; ``fixture_engines_with_cls`` serves every one.
FIXTURE_MODELS = ("tiny-seg", "tiny-det")


@pytest.fixture(scope="session")
def fixture_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engines folder with ``tiny-seg`` and ``tiny-det`` (see module doc): a copy of the shipped ones.

    Copied, not used in place, so no test can write into the committed folder.
    """
    dst = tmp_path_factory.mktemp("engines") / "engines"
    for name in FIXTURE_MODELS:
        shutil.copytree(FIXTURE_ENGINES / name, dst / name)
    return dst


@pytest.fixture(scope="session")
def fixture_engines_with_cls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engines folder with ``tiny-seg``, ``tiny-det`` and ``tiny-cls`` (see module doc): a copy."""
    return Path(shutil.copytree(FIXTURE_ENGINES, tmp_path_factory.mktemp("engines-cls") / "engines"))


@pytest.fixture
def engines_copy(fixture_engines: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the fixture engines (for tamper tests)."""
    dst = tmp_path / "engines"
    shutil.copytree(fixture_engines, dst)
    return dst
