"""Transfer learning for the classifier: the bundled detector's encoder beats training from scratch.

160 synthetic radiographs (256 x 256 sources, 128 x 128 inputs: the detector's
own scale, 0.5 model-input pixels per source pixel, at a quarter of the
cost), 24 of them with nodules; 5 epochs of 10 steps; the same seed, data and
steps with and without ``init``. The comparison is relative (validation ROC
AUC of the best epoch, 9 positives of 64), never an absolute score: seeded runs
repeat on one CPU but not across CPU kernels.

Measured on the project's 2-core CPU (2026-11-30), default loss and sampler
(cross-entropy, balanced), seeds 0-3, best validation AUC with the detector's
encoder / from scratch: 0.62 / 0.49, 0.81 / 0.61, 0.67 / 0.59, 0.63 / 0.54.
About 25 s with one torch thread (60 s on a machine loaded by other work).
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from trainer.train import TrainConfig, load_checkpoint, train  # noqa: E402

DETECTOR = Path(__file__).resolve().parents[2] / "engines" / "xray-nodule-det" / "model.pt"


@pytest.mark.skipif(not DETECTOR.is_file(), reason="the bundled detector checkpoint is not in this checkout")
def test_detector_encoder_beats_scratch_on_a_small_set(tmp_path: Path, cache_dir: str) -> None:
    common = dict(
        task="classification", n_train=160, n_val=64, epochs=5, batch_size=16, input_size=(128, 128),
        synthetic_shape=(256, 256), cache_dir=cache_dir, progress=False, threads=1, amp="off", lr=2e-3,
        patience=100, seed=0,
    )
    init = train(TrainConfig(out_dir=tmp_path / "init", init=str(DETECTOR), **common))
    scratch = train(TrainConfig(out_dir=tmp_path / "scratch", **common))
    print(f"validation ROC AUC: detector encoder {init.best_score:.3f}, scratch {scratch.best_score:.3f}")
    rec = load_checkpoint(init.best_checkpoint)["training"]
    assert rec["init_task"] == "detection" and rec["init_tensors"] == 48
    assert "init_tensors" not in load_checkpoint(scratch.best_checkpoint)["training"]
    assert init.best_score > scratch.best_score, (init.best_score, scratch.best_score)
