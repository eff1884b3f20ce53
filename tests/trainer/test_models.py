"""Model shapes, BatchNorm folding and the detector's output contract."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from trainer.models import CenterNet, UNet, build_model, fold_batchnorm  # noqa: E402


def test_unet_shapes_and_levels() -> None:
    m = UNet(base=4)
    assert m(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 64, 64)
    assert len(m.encoder) == 4
    assert UNet()(torch.zeros(1, 1, 256, 256)).shape == (1, 1, 256, 256)


def test_centernet_contract() -> None:
    torch.manual_seed(0)
    m = CenterNet(num_classes=2, base=4).eval()
    with torch.no_grad():
        hm, size, off = m(torch.randn(1, 1, 64, 64))
    assert hm.shape == (1, 2, 16, 16) and size.shape == (1, 2, 16, 16) and off.shape == (1, 2, 16, 16)
    assert float(hm.min()) >= 0 and float(hm.max()) <= 1  # sigmoid inside the model
    m.emit_logits = True
    with torch.no_grad():
        logits, _, _ = m(torch.randn(1, 1, 64, 64))
    assert float(logits.max()) < 0  # logits (prior -2.19), not probabilities


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_fold_batchnorm_is_exact(task: str) -> None:
    torch.manual_seed(1)
    m = build_model(task, base=4)
    m.train()
    for _ in range(3):  # give BN non-trivial running statistics
        m(torch.randn(4, 1, 64, 64) * 3 + 1)
    m.eval()
    folded = fold_batchnorm(m)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in folded.modules())
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        a, b = m(x), folded(x)
    a = [a] if isinstance(a, torch.Tensor) else a
    b = [b] if isinstance(b, torch.Tensor) else b
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)
