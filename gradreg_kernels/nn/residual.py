"""Residual blocks: y = f(x) + shortcut(x) (the fused step traces their forwards).

``Residual(f, shortcut=None)``: any f / shortcut made of supported layers (shortcut None is
the identity). ``BasicBlock``: the two-convolution block of ResNet-18/34 (torchvision's
layout and state_dict keys: conv1, bn1, conv2, bn2, downsample.0/1).
"""

from __future__ import annotations

from torch import Tensor, nn


class Residual(nn.Module):
    """y = f(x) + shortcut(x); shortcut None means the identity."""

    def __init__(self, f: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.f = f
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x) + (x if self.shortcut is None else self.shortcut(x))


def conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), 3×3 convolutions.

    The shortcut is the identity, or conv1x1(stride) + BN (``downsample``) when the stride
    is not 1 or the width changes.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        if downsample is None and (stride != 1 or inplanes != planes):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)
