"""The benchmark models (torch): the GPU goals are stated on these.

mlp:        784-1024-1024-10, ReLU                        input (B, 784)
mnist_cnn:  the paper's MNIST network: conv 5×5×32 (same) → BN → ReLU → maxpool 2 →
            conv 5×5×64 (same) → BN → ReLU → maxpool 2 → flatten (3136) → FC 1024 → BN →
            ReLU → dropout 0.5 → FC 10                      input (B, 1, 28, 28)
cifar_cnn:  4 conv 3×3 layers (32, 32, 64, 64) each → BN → ReLU, maxpool 2 after the 2nd
            and 4th → flatten (4096) → FC 10                input (B, 3, 32, 32)
resnet18:   torchvision-style ResNet-18 for 32×32 inputs, its own forward (traced by the
            plan; tests/graph_models.py)                     input (B, 3, 32, 32)
unet:       a small UNet (width 16: nearest upsampling, a transposed convolution, skip
            concatenations), its own forward                 input (B, 3, 32, 32)
"""

from __future__ import annotations

import os
import sys

from torch import nn

from gradreg_kernels.models import make_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import graph_models  # noqa: E402  (the user-style models of the tests)


def mlp(width: int = 1024) -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def mnist_cnn(width: int = 1024) -> nn.Sequential:
    return make_model("paper-cnn", (1, 28, 28), 10, width)


def cifar_cnn() -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32), *block(32, 32), nn.MaxPool2d(2),
                         *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


#: name → (builder, input shape without the batch, batch sizes of the goals)
MODELS = {
    "mlp": (mlp, (784,), (256, 4096)),
    "mnist_cnn": (mnist_cnn, (1, 28, 28), (256,)),
    "cifar_cnn": (cifar_cnn, (3, 32, 32), (256,)),
    "resnet18": (lambda: graph_models.resnet18(num_classes=10), (3, 32, 32), (128,)),
    "unet": (lambda: graph_models.UNet(num_classes=10, width=16), (3, 32, 32), (128,)),
}
