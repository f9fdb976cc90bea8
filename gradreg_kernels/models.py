"""The classifiers of the experiments, all plain nested nn.Sequential so gradreg_loss fuses them.

Names (``make_model``), for inputs (C, H, W) with H, W >= 4:
- ``paper-cnn``: the MNIST CNN of Ross & Doshi-Velez (2018):
  conv 5×5×32 (same) → BN → ReLU → maxpool 2 → conv 5×5×64 (same) → BN → ReLU → maxpool 2
  → flatten (64·⌊H/4⌋·⌊W/4⌋: 3 136 at 28×28, 256 at 8×8) → FC width (1 024) → BN1d → ReLU
  → dropout 0.5 → FC K.
- ``lenet``: LeNet-5 size, no BN: conv 5×5×6 (same) → ReLU → maxpool 2 → conv 5×5×16 (same)
  → ReLU → maxpool 2 → flatten (16·⌊H/4⌋·⌊W/4⌋) → FC width (120) → ReLU → FC 84 → ReLU → FC K.
  Both convolutions pad to "same" so the model also fits 8×8 inputs.
- ``mlp``: flatten → FC width (512) → ReLU → FC width → ReLU → FC K.
"""

from __future__ import annotations

from torch import nn

MODEL_NAMES = ("paper-cnn", "lenet", "mlp")


def _check_shape(name: str, in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(in_shape) != 3 or any(int(s) < 1 for s in in_shape):
        raise ValueError(f"in_shape must be (channels, height, width), got {in_shape}")
    c, h, w = (int(s) for s in in_shape)
    if name != "mlp" and (h < 4 or w < 4):
        raise ValueError(f"{name} pools twice by 2 and needs images of at least 4×4, "
                         f"got {h}×{w}")
    return c, h, w


def paper_cnn(in_shape: tuple[int, int, int], num_classes: int, width: int = 1024
              ) -> nn.Sequential:
    c, h, w = _check_shape("paper-cnn", in_shape)
    flat = 64 * (h // 4) * (w // 4)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(c, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.MaxPool2d(2)),
        nn.Flatten(),
        nn.Sequential(nn.Linear(flat, width), nn.BatchNorm1d(width), nn.ReLU(),
                      nn.Dropout(0.5)),
        nn.Linear(width, num_classes),
    )


def lenet(in_shape: tuple[int, int, int], num_classes: int, width: int = 120
          ) -> nn.Sequential:
    c, h, w = _check_shape("lenet", in_shape)
    flat = 16 * (h // 4) * (w // 4)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Flatten(),
        nn.Sequential(nn.Linear(flat, width), nn.ReLU(), nn.Linear(width, 84), nn.ReLU()),
        nn.Linear(84, num_classes),
    )


def mlp(in_shape: tuple[int, int, int], num_classes: int, width: int = 512) -> nn.Sequential:
    c, h, w = _check_shape("mlp", in_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, num_classes),
    )


_MAKERS = {"paper-cnn": paper_cnn, "lenet": lenet, "mlp": mlp}


def make_model(name: str, in_shape: tuple[int, int, int], num_classes: int,
               width: int | None = None) -> nn.Sequential:
    """A fresh model ``name`` for images of shape in_shape = (C, H, W) and num_classes outputs.

    ``width`` is the hidden width (paper-cnn: its FC layer, 1 024; lenet: its first FC layer,
    120; mlp: both hidden layers, 512); None keeps the default. Initialization draws from
    torch's global generator (seed it with torch.manual_seed for a reproducible model).
    """
    if name not in _MAKERS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if width is not None:
        if int(width) < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        return _MAKERS[name](tuple(in_shape), int(num_classes), int(width))
    return _MAKERS[name](tuple(in_shape), int(num_classes))
