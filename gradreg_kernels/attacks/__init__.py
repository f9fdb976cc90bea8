"""Adversarial attacks on classifiers with inputs in [0, 1]: FGSM, TGSM, PGD, JSMA.

All attacks take a batch x (B, ...) on any device, put the model in eval mode for their
duration (restoring each submodule's training flag), never touch parameter gradients, and
return examples clipped to [0, 1].
"""

from ._common import eval_mode, loss_grad, margin_loss
from .black_box import random_search
from .fgsm import fgsm, iterated_tgsm, next_class_target, tgsm
from .jsma import JSMAResult, jsma
from .pgd import pgd

__all__ = [
    "JSMAResult",
    "eval_mode",
    "fgsm",
    "iterated_tgsm",
    "jsma",
    "loss_grad",
    "margin_loss",
    "next_class_target",
    "pgd",
    "random_search",
    "tgsm",
]
