"""Compact models: a 4-level U-Net, a CenterNet-style anchor-free detector and a ResNet-style classifier.

All use only Conv, BatchNorm (folded into Conv at export), ReLU, MaxPool,
AveragePool, nearest-neighbour Resize, Concat, Add, Mul, ReduceMean and Sigmoid: ops that
export to ONNX opset 17, quantize to explicit Q/DQ with ONNX Runtime, and
build in TensorRT without plugins.

The three share one encoder layout: ``encoder[i]`` holds two 3x3 Conv+BN
blocks named ``encoder.<i>.0`` and ``encoder.<i>.1`` with ``base * 2**i``
channels, so a classifier can start from the detector's or the segmenter's
encoder weights (:func:`transfer_encoder`).

Examples
--------
>>> import torch
>>> from trainer.models import UNet, CenterNet, Classifier
>>> UNet()(torch.zeros(1, 1, 256, 256)).shape
torch.Size([1, 1, 256, 256])
>>> [t.shape[1:] for t in CenterNet(num_classes=1)(torch.zeros(1, 1, 256, 256))]
[torch.Size([1, 64, 64]), torch.Size([2, 64, 64]), torch.Size([2, 64, 64])]
>>> clf = Classifier(num_classes=1)
>>> clf(torch.zeros(2, 1, 256, 256)).shape
torch.Size([2, 1])
>>> clf.emit_cam = True
>>> [t.shape for t in clf(torch.zeros(2, 1, 256, 256))]
[torch.Size([2, 1]), torch.Size([2, 1, 16, 16])]
"""

from __future__ import annotations

import copy
import logging
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = [
    "TASK_NAMES",
    "UNet",
    "CenterNet",
    "Classifier",
    "CAM_STRIDE",
    "build_model",
    "fold_batchnorm",
    "transfer_encoder",
    "SIZE_SCALE",
]

_log = logging.getLogger(__name__)

#: The tasks :func:`build_model` knows.
TASK_NAMES = ("segmentation", "detection", "classification")
#: The classifier's feature map (and so its class activation map) is 1/16 of the input.
CAM_STRIDE = 16

#: The detector's size head predicts ``size / SIZE_SCALE``; the scale is applied
#: inside the model so its ``size`` output is in model-input pixels.
SIZE_SCALE = 16.0


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


class _DoubleConv(nn.Sequential):
    """Two 3x3 conv + BN + ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout))


class _Up(nn.Module):
    """Nearest x2 upsample, 3x3 conv to ``cout``, concat the skip, double conv."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.reduce = _conv_bn_relu(cin, cout)
        self.fuse = _DoubleConv(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.reduce(self.up(x))
        return self.fuse(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """Compact U-Net: ``levels`` resolutions, channels ``base * 2**i``.

    The default (4 levels, base 16) maps ``[N, 1, 256, 256]`` to logits
    ``[N, out_channels, 256, 256]``. ``encoder`` holds the contracting path
    (what ``--freeze-encoder`` freezes).

    Parameters
    ----------
    in_channels, out_channels : int
        Input planes and output logit planes.
    base : int
        Channels at full resolution.
    levels : int
        Number of resolutions (the deepest is the bottleneck).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base: int = 16, levels: int = 4) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels {levels} is not >= 2.")
        chs = [base * 2**i for i in range(levels)]
        self.encoder = nn.ModuleList()
        cin = in_channels
        for c in chs:
            self.encoder.append(_DoubleConv(cin, c))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.decoder = nn.ModuleList(
            _Up(chs[i + 1], chs[i], chs[i]) for i in reversed(range(levels - 1))
        )
        self.head = nn.Conv2d(chs[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, out_channels, H, W]`` (H and W divisible by ``2**(levels-1)``)."""
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)


class CenterNet(nn.Module):
    """Compact anchor-free detector with stride-4 outputs.

    Outputs ``heatmap`` ``[N, K, H/4, W/4]`` (probabilities: the sigmoid is
    inside the model), ``size`` ``[N, 2, H/4, W/4]`` (box width, height in
    model-input pixels) and ``offset`` ``[N, 2, H/4, W/4]`` (sub-cell centre
    offset in cells). :meth:`forward_train` (and :meth:`forward` while
    ``emit_logits`` is set, as during training, also under DDP) returns the
    heatmap as logits for a numerically stable focal loss.

    Parameters
    ----------
    num_classes : int
        Heatmap planes (one per label).
    in_channels : int
        Input planes.
    base : int
        Channels at stride 2; doubled at each of strides 4, 8, 16.
    """

    def __init__(self, num_classes: int = 1, in_channels: int = 1, base: int = 16) -> None:
        super().__init__()
        c1, c2, c3, c4 = base, base * 2, base * 4, base * 8
        self.encoder = nn.ModuleList(
            [
                nn.Sequential(_conv_bn_relu(in_channels, c1, 2), _conv_bn_relu(c1, c1)),  # /2
                nn.Sequential(_conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c2)),  # /4
                nn.Sequential(_conv_bn_relu(c2, c3, 2), _conv_bn_relu(c3, c3)),  # /8
                nn.Sequential(_conv_bn_relu(c3, c4, 2), _conv_bn_relu(c4, c4)),  # /16
            ]
        )
        self.up16 = _Up(c4, c3, c3)  # /16 -> /8
        self.up8 = _Up(c3, c2, c2)  # /8 -> /4
        self.hm = nn.Sequential(_conv_bn_relu(c2, c2), nn.Conv2d(c2, num_classes, 1))
        self.wh = nn.Sequential(_conv_bn_relu(c2, c2), nn.Conv2d(c2, 2, 1))
        self.off = nn.Sequential(_conv_bn_relu(c2, c2), nn.Conv2d(c2, 2, 1))
        # Focal-loss prior: start with a low foreground probability (CenterNet's -2.19).
        nn.init.constant_(self.hm[-1].bias, -2.19)
        self.emit_logits = False

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        f2 = self.encoder[0](x)
        f4 = self.encoder[1](f2)
        f8 = self.encoder[2](f4)
        f16 = self.encoder[3](f8)
        return self.up8(self.up16(f16, f8), f4)

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(heatmap_logits, size, offset)``."""
        f = self._features(x)
        return self.hm(f), self.wh(f) * SIZE_SCALE, self.off(f)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(heatmap, size, offset)`` with the heatmap as probabilities (logits if ``emit_logits``)."""
        logits, size, offset = self.forward_train(x)
        if self.emit_logits:
            return logits, size, offset
        return torch.sigmoid(logits), size, offset


class _ResidualStage(nn.Sequential):
    """A stride-2 residual block: 3x3 Conv+BN+ReLU (stride 2), 3x3 Conv+BN, plus a projection
    shortcut (2x2 average pool, 1x1 Conv+BN, as in ResNet-D); ReLU after the sum.

    The main path's two blocks are items ``0`` and ``1`` (a ``Sequential``),
    so their parameters carry the names and shapes of the detector's and the
    U-Net's encoder blocks. (The shortcut pools before its 1x1 convolution
    rather than striding it: PyTorch 2.13's CPU backward of a stride-2 1x1
    convolution on channels-last tensors with 2-4 input channels corrupts
    the heap.)
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(_conv_bn_relu(cin, cout, 2), _conv_bn(cout, cout))
        self.shortcut = nn.Sequential(
            nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.relu(self[1](self[0](x)) + self.shortcut(x))


class Classifier(nn.Module):
    """Compact ResNet-style classifier: four residual stages, global average pooling, linear head.

    ``encoder`` holds the stages (channels ``base * 2**i`` at strides 2, 4,
    8 and 16); ``logits`` ``[N, K]`` are the linear head
    ``nn.Linear(8 * base, num_classes)`` on the globally average-pooled
    features. The same head applied at every feature-map location is the
    class activation map ``cam`` ``[N, K, H/16, W/16]``
    (``W_k . f(x, y) + b_k``); the head is linear, so the CAM's spatial mean
    is the logit. :meth:`forward` returns ``logits``, or ``(logits, cam)``
    while ``emit_cam`` is set (export: two outputs of one graph, computed on
    separate branches so that neither output feeds the other).

    Parameters
    ----------
    num_classes : int
        Logits: 1 for a binary classifier (sigmoid), ``C`` >= 2 for softmax.
    in_channels : int
        Input planes.
    base : int
        Channels at stride 2.
    """

    def __init__(self, num_classes: int = 1, in_channels: int = 1, base: int = 16) -> None:
        super().__init__()
        chs = [base * 2**i for i in range(4)]
        cins = [in_channels, *chs[:-1]]
        self.encoder = nn.ModuleList(_ResidualStage(ci, co) for ci, co in zip(cins, chs))
        self.head = nn.Linear(chs[-1], num_classes)
        self.emit_cam = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map ``[N, 8 * base, H/16, W/16]``."""
        for stage in self.encoder:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``logits`` ``[N, K]``, or ``(logits, cam)`` while ``emit_cam`` is set."""
        f = self.features(x)
        logits = self.head(f.mean(dim=(2, 3)))
        if not self.emit_cam:
            return logits
        return logits, F.conv2d(f, self.head.weight[:, :, None, None], self.head.bias)


def build_model(task: str, num_classes: int = 1, in_channels: int = 1, base: int = 16) -> nn.Module:
    """The default model for ``task`` (``segmentation``, ``detection`` or ``classification``)."""
    if task == "segmentation":
        return UNet(in_channels=in_channels, out_channels=num_classes, base=base)
    if task == "detection":
        return CenterNet(num_classes=num_classes, in_channels=in_channels, base=base)
    if task == "classification":
        return Classifier(num_classes=num_classes, in_channels=in_channels, base=base)
    raise ValueError(f"task {task!r} is not one of {', '.join(TASK_NAMES)}.")


def transfer_encoder(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy into ``model`` every ``encoder.*`` tensor of ``state_dict`` that matches by name and shape.

    The classifier's stages name their main path like the detector's and
    the U-Net's encoder blocks, so their convolution and BatchNorm tensors
    (weights and running statistics) carry over; the classifier's own
    shortcuts and head stay as initialised. Returns the names taken, sorted.
    """
    own = model.state_dict()
    taken = {
        k: v for k, v in state_dict.items()
        if k.startswith("encoder.") and k in own and tuple(own[k].shape) == tuple(v.shape)
    }
    model.load_state_dict(taken, strict=False)
    return sorted(taken)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every Conv+BatchNorm pair folded into one Conv."""
    m = copy.deepcopy(model).eval()

    def _fold(module: nn.Module) -> None:
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
        for child in module.children():
            _fold(child)

    _fold(m)
    return m
