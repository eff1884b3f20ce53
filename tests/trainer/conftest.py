"""Shared fixtures for the trainer tests: tiny sets, a private data cache, tiny trained checkpoints.

Everything runs at 64 x 64 with narrow models and a few steps, so the whole
trainer suite stays within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from trainer.train import TrainConfig, train  # noqa: E402

SIZE = (64, 64)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A data cache private to this test session."""
    return str(tmp_path_factory.mktemp("medge-cache"))


@pytest.fixture(autouse=True)
def _private_cache(cache_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests away from the user's ~/.cache/medge."""
    monkeypatch.setenv("MEDGE_CACHE_DIR", cache_dir)


def tiny_config(task: str, out: Path, cache_dir: str, **kw) -> TrainConfig:
    """A TrainConfig that trains in seconds."""
    base = dict(
        task=task, out_dir=out, n_train=12, n_val=6, epochs=1, steps_per_epoch=3, batch_size=4,
        input_size=SIZE, base=4, cache_dir=cache_dir, progress=False, lr=3e-3, threads=2,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def seg_checkpoint(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    """best.pt of a tiny segmentation run."""
    out = tmp_path_factory.mktemp("seg-run")
    return train(tiny_config("segmentation", out, cache_dir)).best_checkpoint


@pytest.fixture(scope="session")
def det_checkpoint(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    """best.pt of a tiny detection run."""
    out = tmp_path_factory.mktemp("det-run")
    return train(tiny_config("detection", out, cache_dir)).best_checkpoint
