"""Small reference models built from torch.nn layers (convert them with ``convert``).

dcgan_critic: the DCGAN discriminator for 64×64 images, a scalar score per image.
cifar_resnet: a CIFAR-sized ResNet (3 stages of BasicBlocks, widths w, 2w, 4w).
"""

from __future__ import annotations

from torch import nn

from .residual import BasicBlock


def dcgan_critic(channels: int = 3, width: int = 64, slope: float = 0.2) -> nn.Sequential:
    """(B, channels, 64, 64) → (B, 1) score.

    conv4×4/2 → LeakyReLU, then three conv4×4/2 → BatchNorm → LeakyReLU (widths w, 2w, 4w,
    8w at 32², 16², 8², 4²), then a 4×4 valid convolution to one channel, flattened.
    """
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1, bias=False),
                               nn.LeakyReLU(slope)]
    w = width
    for _ in range(3):
        layers += [nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w),
                   nn.LeakyReLU(slope)]
        w *= 2
    layers += [nn.Conv2d(w, 1, 4, 1, 0, bias=False), nn.Flatten()]
    return nn.Sequential(*layers)


def cifar_resnet(blocks_per_stage: int = 1, width: int = 16, num_classes: int = 10,
                 channels: int = 3) -> nn.Sequential:
    """(B, channels, 32, 32) → (B, num_classes) logits.

    conv3×3 → BN → ReLU, three stages of ``blocks_per_stage`` BasicBlocks (widths w, 2w, 4w;
    stride 2 at the start of stages 2 and 3), global average pooling (an 8×8 AvgPool2d),
    flatten, linear. blocks_per_stage=1 is a ResNet-8, 2 a ResNet-14, 3 a ResNet-20.
    """
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU()]
    inplanes = width
    for stage, planes in enumerate((width, 2 * width, 4 * width)):
        for i in range(blocks_per_stage):
            stride = 2 if stage > 0 and i == 0 else 1
            layers.append(BasicBlock(inplanes, planes, stride))
            inplanes = planes
    layers += [nn.AvgPool2d(8), nn.Flatten(), nn.Linear(inplanes, num_classes)]
    return nn.Sequential(*layers)
