"""Plain-PyTorch models with their own ``forward``, for the fx-traced (graph) path.

Each class is written the way users and torchvision write models (in-place ReLUs,
``out += identity``, ``torch.cat`` skips, functional ops, ``x.view(x.size(0), -1)``), with no
import from gradreg_kernels. Every constructor takes size arguments: tests build tiny
versions (see ``MODEL_CASES`` and ``tiny``) and the benchmark builds full ones. Every model
runs in eager PyTorch, supports double backprop (``create_graph=True``) and traces with
``torch.fx.symbolic_trace``; ``python tests/graph_models.py`` checks all three.

Notes on tracing: fx freezes Python-level values at trace time, so ``F.dropout(x, p,
training=self.training)`` is recorded with the *constant* ``training`` of the traced
module (a GraphModule traced in train mode keeps dropping out after ``.eval()``), and
``out += identity`` is recorded as an out-of-place ``operator.add``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------
# ResNet (torchvision's BasicBlock / ResNet code, CIFAR stem)
# --------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, + identity, ReLU."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        # Both self.conv1 and self.downsample layers downsample the input when stride != 1
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """The residual block."""
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class ResNet(nn.Module):
    """torchvision's ResNet for 32x32 inputs: 3x3 stride-1 stem, no max-pool, one stage per
    entry of ``layers`` (widths ``width · 2^i``, stride 2 from the second stage on)."""

    def __init__(self, block: type[BasicBlock], layers: Sequence[int], num_classes: int = 10,
                 width: int = 64, in_channels: int = 3, zero_init_residual: bool = False,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer

        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1,
                               bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for i, n in enumerate(layers):
            stages.append(self._make_layer(block, width * 2 ** i, n, stride=1 if i == 0 else 2))
        self.num_stages = len(stages)
        for i, stage in enumerate(stages):
            self.add_module(f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 2 ** (len(layers) - 1) * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN in each residual branch, so that the residual branch
        # starts with zeros, and each residual block behaves like an identity.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block: type[BasicBlock], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        """One stage: ``blocks`` blocks, the first one striding / changing width."""
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )

        layers = []
        layers.append(block(self.inplanes, planes, stride, downsample, self.groups,
                            self.base_width, previous_dilation, norm_layer))
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))

        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        """Stem, stages, global average pool, fc."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)

        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)

        return x

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, num_classes) logits."""
        return self._forward_impl(x)


def resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) with the CIFAR stem."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=width,
                  in_channels=in_channels)


def resnet_small(num_classes: int = 10, width: int = 16, blocks: Sequence[int] = (1, 1),
                 in_channels: int = 3) -> ResNet:
    """A ResNet of the same classes with one stage per entry of ``blocks`` (2 by default)."""
    return ResNet(BasicBlock, list(blocks), num_classes=num_classes, width=width,
                  in_channels=in_channels)


# --------------------------------------------------------------------------------------
# VGG
# --------------------------------------------------------------------------------------


class VGGNet(nn.Module):
    """VGG: conv-BN-ReLU / max-pool features, view-flatten, Linear-ReLU-Dropout-Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 cfg: Sequence[int | str] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"),
                 image_size: tuple[int, int] = (32, 32), hidden: int = 512,
                 dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, (h, w) = in_channels, image_size
        for v in cfg:
            if v == "M":
                layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
                h, w = h // 2, w // 2
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c * h * w, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, num_classes) logits."""
        x = self.features(x)
        x = x.view(x.size(0), -1)
        x = self.classifier(x)
        return x


# --------------------------------------------------------------------------------------
# DenseNet
# --------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, its output concatenated to x."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1,
                               stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1,
                               padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C + growth_rate, H, W)."""
        new = self.conv1(self.relu1(self.norm1(x)))
        new = self.conv2(F.relu(self.norm2(new)))
        return torch.cat([x, new], 1)


class Transition(nn.Sequential):
    """DenseNet transition: BN, ReLU, 1x1 conv, 2x2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1,
                              stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNetBlockNet(nn.Module):
    """A small DenseNet-BC: stem conv, dense blocks separated by transitions, BN-ReLU,
    functional global average pool, flatten, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, growth_rate: int = 12,
                 block_config: Sequence[int] = (6, 6, 6), num_init_features: int = 24,
                 bn_size: int = 4, compression: float = 0.5) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, num_init_features, kernel_size=3, padding=1,
                               bias=False)
        blocks: list[nn.Module] = []
        c = num_init_features
        for i, n in enumerate(block_config):
            blocks.append(nn.Sequential(*[DenseLayer(c + j * growth_rate, growth_rate, bn_size)
                                          for j in range(n)]))
            c += n * growth_rate
            if i != len(block_config) - 1:
                out = max(1, int(c * compression))
                blocks.append(Transition(c, out))
                c = out
        self.features = nn.Sequential(*blocks)
        self.norm5 = nn.BatchNorm2d(c)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, num_classes) logits."""
        features = self.features(self.conv0(x))
        out = F.relu(self.norm5(features), inplace=True)
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


# --------------------------------------------------------------------------------------
# Inception
# --------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """torchvision Inception's conv (no bias) + BN + functional in-place ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        """conv → BN → ReLU."""
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class InceptionBlock(nn.Module):
    """Four branches (1x1; 1x1→3x3; 1x1→5x5; 3x3 max-pool→1x1) concatenated on channels."""

    def __init__(self, in_channels: int, b1: int, b3_red: int, b3: int, b5_red: int, b5: int,
                 pool_proj: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, b1, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, b3_red, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(b3_red, b3, kernel_size=3, padding=1)
        self.branch5x5_1 = BasicConv2d(in_channels, b5_red, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(b5_red, b5, kernel_size=5, padding=2)
        self.branch_pool = BasicConv2d(in_channels, pool_proj, kernel_size=1)
        self.out_channels = b1 + b3 + b5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, b1 + b3 + b5 + pool_proj, H, W)."""
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        outputs = [branch1x1, branch3x3, branch5x5, branch_pool]
        return torch.cat(outputs, 1)


class SplitBlock(nn.Module):
    """Channel split into a padded 1x3 and a padded 3x1 conv, concatenated and scaled by
    0.5, then a chunked gate (a · sigmoid(b)) and a residual ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split_sizes = [channels // 2, channels - channels // 2]
        self.conv_1x3 = BasicConv2d(self.split_sizes[0], self.split_sizes[0],
                                    kernel_size=(1, 3))
        self.conv_3x1 = BasicConv2d(self.split_sizes[1], self.split_sizes[1],
                                    kernel_size=(3, 1))
        self.mix = nn.Conv2d(channels, 2 * channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, C, H, W)."""
        left, right = torch.split(x, self.split_sizes, dim=1)
        left = self.conv_1x3(F.pad(left, (1, 1, 0, 0)))
        right = self.conv_3x1(F.pad(right, (0, 0, 1, 1)))
        y = torch.cat([left, right], 1) * 0.5
        value, gate = torch.chunk(self.mix(y), 2, dim=1)
        return F.relu(x + value * torch.sigmoid(gate))


class InceptionNet(nn.Module):
    """A small Inception-style net: stem, Inception block, "same"-padded stride-2 reduction
    (asymmetric F.pad), split/chunk block, Inception block, ``x.mean((2, 3))``, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        self.stem = BasicConv2d(in_channels, w, kernel_size=3, padding=1)
        self.inc1 = InceptionBlock(w, w // 2 + 1, w // 2, w, max(1, w // 4), w // 2 + 1,
                                   w // 2)
        c1 = self.inc1.out_channels
        self.reduce = BasicConv2d(c1, 2 * w, kernel_size=3, stride=2)
        self.split = SplitBlock(2 * w)
        self.inc2 = InceptionBlock(2 * w, w, w, w + 1, max(1, w // 4), w // 2, w)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(self.inc2.out_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, num_classes) logits."""
        x = self.stem(x)
        x = self.inc1(x)
        x = self.reduce(F.pad(x, (0, 1, 0, 1)))
        x = self.split(x)
        x = self.inc2(x)
        x = x.mean((2, 3))
        x = self.dropout(x)
        return self.fc(x)


# --------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------


class DoubleConv(nn.Module):
    """(conv3x3 → BN → ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in, H, W) → (B, out, H, W)."""
        return self.double_conv(x)


class UNet(nn.Module):
    """A two-level UNet with a classification head (1x1 conv to K maps, mean over H, W).

    Down: DoubleConv, F.max_pool2d, twice, then a bottleneck. Up: ``nn.Upsample`` (×2,
    nearest) at the deep level, ``nn.ConvTranspose2d`` (×2) then
    ``F.interpolate(size=skip.shape[2:])`` at the shallow one, ``torch.cat`` skips.
    The deep level needs ``(H // 2) % 2 == 0`` and ``(W // 2) % 2 == 0`` (e.g. 9, 13, 32).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        self.inc = DoubleConv(in_channels, w)
        self.down1 = DoubleConv(w, 2 * w)
        self.bottleneck = DoubleConv(2 * w, 4 * w)
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = DoubleConv(4 * w + 2 * w, 2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, kernel_size=2, stride=2)
        self.dec1 = DoubleConv(w + w, w)
        self.outc = nn.Conv2d(w, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, num_classes) logits."""
        skip1 = self.inc(x)
        skip2 = self.down1(F.max_pool2d(skip1, 2))
        x = self.bottleneck(F.max_pool2d(skip2, 2))

        up = self.up2(x)
        x = self.dec2(torch.cat([up, skip2], dim=1))

        up = self.up1(x)
        up = F.interpolate(up, size=skip1.shape[2:], mode="nearest")
        x = self.dec1(torch.cat([up, skip1], dim=1))

        logits = self.outc(x)
        return logits.mean(dim=(2, 3))


# --------------------------------------------------------------------------------------
# WGAN-GP critic
# --------------------------------------------------------------------------------------


def _conv_out(n: int, kernel: int = 3, stride: int = 2, padding: int = 1) -> int:
    """Spatial size after a convolution."""
    return (n + 2 * padding - kernel) // stride + 1


class WGANCritic(nn.Module):
    """A WGAN-GP critic: stride-2 convs with LayerNorm([C, H, W]) (none on the first) and
    LeakyReLU(0.2), flattened into a Linear to one score. Output (B, 1)."""

    def __init__(self, in_channels: int = 3, image_size: tuple[int, int] = (32, 32),
                 width: int = 64, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, (h, w) = in_channels, image_size
        for i in range(depth):
            out = width * 2 ** i
            h, w = _conv_out(h), _conv_out(w)
            layers.append(nn.Conv2d(c, out, kernel_size=3, stride=2, padding=1))
            if i > 0:
                layers.append(nn.LayerNorm([out, h, w]))
            layers.append(nn.LeakyReLU(0.2))
            c = out
        self.main = nn.Sequential(*layers)
        self.flat_features = c * h * w
        self.linear = nn.Linear(self.flat_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, 1) critic scores."""
        out = self.main(x)
        out = out.view(-1, self.flat_features)
        return self.linear(out)


# --------------------------------------------------------------------------------------
# MLPs
# --------------------------------------------------------------------------------------


class TanhSkipMLP(nn.Module):
    """A PINN-style tanh MLP with residual skips ``h = h + tanh(l(h))``. Output (B, K)."""

    def __init__(self, in_features: int = 2, hidden: int = 64, depth: int = 4,
                 num_classes: int = 1) -> None:
        super().__init__()
        self.l1 = nn.Linear(in_features, hidden)
        self.hidden = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_features) → (B, num_classes)."""
        h = torch.tanh(self.l1(x))
        for layer in self.hidden:
            h = h + torch.tanh(layer(h))
        return self.out(h)


class FunctionalMLP(nn.Module):
    """A conv + MLP written with torch.nn.functional calls on submodules' parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 image_size: tuple[int, int] = (28, 28), conv_channels: int = 8,
                 hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        h, w = image_size
        self.p = dropout
        self.conv = nn.Conv2d(in_channels, conv_channels, kernel_size=3, padding=1)
        self.l1 = nn.Linear(conv_channels * h * w, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, hidden)
        self.l4 = nn.Linear(hidden, hidden)
        self.l5 = nn.Linear(hidden, hidden)
        self.l6 = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images → (B, num_classes) logits."""
        x = F.relu(F.conv2d(x, self.conv.weight, self.conv.bias, padding=1))
        h = x.reshape(x.shape[0], -1)
        h = F.gelu(self.l1(h))
        h = F.dropout(h, self.p, training=self.training)
        h = F.silu(self.l2(h))
        h = F.leaky_relu(self.l3(h), 0.1)
        h = F.softplus(self.l4(h))
        h = F.elu(self.l5(h))
        h = F.relu(self.l6(h))
        h = h * torch.sigmoid(self.gate(h))
        return F.linear(h, self.out.weight, self.out.bias)


# --------------------------------------------------------------------------------------
# Test cases
# --------------------------------------------------------------------------------------

ModelCase = tuple[Callable[[], nn.Module], tuple[int, ...], int]

#: name → (constructor of a tiny model with odd sizes, input shape without batch, number
#: of outputs K). ``wgan_critic`` has K = 1 (a score: use head="output"); ``vgg`` and
#: ``functional_mlp`` have dropout > 0 (seed the RNG, or call .eval(), to compare runs).
MODEL_CASES: dict[str, ModelCase] = {
    "resnet18": (lambda: resnet18(num_classes=3, width=3, in_channels=2), (2, 11, 11), 3),
    "resnet_small": (lambda: resnet_small(num_classes=5, width=5, blocks=(1, 1)),
                     (3, 9, 9), 5),
    "vgg": (lambda: VGGNet(num_classes=7, in_channels=2, cfg=(5, "M", 7, 7, "M"),
                           image_size=(11, 13), hidden=9, dropout=0.25), (2, 11, 13), 7),
    "densenet": (lambda: DenseNetBlockNet(num_classes=5, in_channels=3, growth_rate=3,
                                          block_config=(2, 2), num_init_features=5,
                                          bn_size=2), (3, 9, 9), 5),
    "inception": (lambda: InceptionNet(num_classes=6, in_channels=3, width=5), (3, 9, 11), 6),
    "unet": (lambda: UNet(num_classes=4, in_channels=3, width=3), (3, 9, 13), 4),
    "wgan_critic": (lambda: WGANCritic(in_channels=3, image_size=(9, 11), width=5, depth=3),
                    (3, 9, 11), 1),
    "tanh_skip_mlp": (lambda: TanhSkipMLP(in_features=3, hidden=7, depth=3, num_classes=2),
                      (3,), 2),
    "functional_mlp": (lambda: FunctionalMLP(num_classes=5, in_channels=2, image_size=(5, 7),
                                             conv_channels=3, hidden=9, dropout=0.2),
                       (2, 5, 7), 5),
}


def tiny(name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
         perturb_norms: bool = True) -> nn.Module:
    """The tiny model ``MODEL_CASES[name]``, built from ``seed`` without touching the global
    RNG; with ``perturb_norms`` its BatchNorm / LayerNorm affine parameters and running
    statistics are drawn away from (1, 0) so that they matter."""
    ctor = MODEL_CASES[name][0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctor()
        if perturb_norms:
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                        m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                        m.bias.copy_(0.2 * torch.randn_like(m.bias))
                    if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                        m.running_mean.copy_(0.1 * torch.randn_like(m.running_mean))
                        m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    return model.to(dtype)


def example_batch(name: str, batch: int = 4, seed: int = 1,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(x, y) for ``MODEL_CASES[name]``: standard-normal inputs, labels in [0, K)."""
    _, shape, k = MODEL_CASES[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g).to(dtype)
    y = torch.randint(0, k, (batch,), generator=g)
    return x, y


def _self_check() -> None:
    """Forward, fx trace, traced-vs-eager outputs and double backprop of every tiny model."""
    import torch.fx

    for name, (_, _shape, k) in MODEL_CASES.items():
        model = tiny(name, dtype=torch.float64).train()
        x, y = example_batch(name, dtype=torch.float64)
        gm = torch.fx.symbolic_trace(model)
        torch.manual_seed(0)
        z = model(x)
        torch.manual_seed(0)
        zt = gm(x)
        assert z.shape == (x.shape[0], k), (name, z.shape)
        diff = (z - zt).abs().max().item()
        assert diff < 1e-12, (name, diff)
        grads = []
        for net in (model, gm):
            xx = x.clone().requires_grad_(True)
            torch.manual_seed(0)
            out = net(xx)
            ce = out.sum(1) if k == 1 else F.cross_entropy(out, y, reduction="none")
            (g,) = torch.autograd.grad(ce.sum(), xx, create_graph=True)
            loss = ce.mean() + (g ** 2).sum() / x.shape[0]
            ps = [p for p in net.parameters()]
            grads.append(torch.autograd.grad(loss, ps, allow_unused=True))
        unused = sum(gr is None for gr in grads[0])
        gdiff = max((a - b).abs().max().item() for a, b in zip(*grads) if a is not None)
        assert all(torch.isfinite(gr).all() for gr in grads[0] if gr is not None), name
        print(f"{name:15s} in {str(tuple(x.shape)):18s} out {str(tuple(z.shape)):8s} "
              f"fx nodes {len(gm.graph.nodes):4d}  params {len(grads[0]):3d} "
              f"(unused {unused})  traced-vs-eager grad diff {gdiff:.1e}")


if __name__ == "__main__":
    _self_check()
