"""A model's state that trial steps change, saved once and put back after them.

``ModelState(model, device)`` saves copies of the model's buffers (BatchNorm running
statistics and batch counts) and the states of the CPU's random-number generator and, on a
CUDA ``device``, that device's; with ``grads=True`` also each parameter's ``.grad`` (a copy,
or None where it has none). ``restore()`` puts all of them back: the buffers and
generators by copying the saved states in, the gradients by attaching the saved copies
(a step that accumulates into ``.grad`` in place between two restores changes them, so
such steps start with ``zero_grad(set_to_none=True)``). Parameter values are not saved.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ModelState:
    """The buffers, generator states and (``grads=True``) gradients of ``model``, saved
    now and put back by ``restore``."""

    def __init__(self, model: nn.Module, device: torch.device, *, grads: bool = False
                 ) -> None:
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.grads: list[tuple[Tensor, Tensor | None]] = (
            [(p, None if p.grad is None else p.grad.detach().clone())
             for p in model.parameters()] if grads else [])
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        for p, g in self.grads:
            p.grad = g
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
