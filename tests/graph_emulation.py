"""A CUDA graph's replay contract emulated on the CPU, for testing the bookkeeping around
captured steps (gradreg_kernels.graphs, gradreg_kernels.auto_capture) without a GPU."""

from __future__ import annotations

import torch

from gradreg_kernels.model_state import ModelState


class EmulatedGraph:
    """A CUDA graph's contract on the CPU, for the bookkeeping around replays.

    ``record`` runs the step once and restores the module buffers and the CPU generator
    it changed (a capture runs no kernel); ``replay`` runs it again and copies every result
    into the recorded tensors (the output's and the gradients the recording made, which
    keep their identity as a graph's do) while each ``p.grad`` attribute is left as it was
    before the replay, as a real replay leaves it."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params, self.model = list(model.parameters()), model

    def warm(self, fn, times: int) -> None:
        for _ in range(times):
            fn()

    def record(self, fn):
        saved = ModelState(self.model, torch.device("cpu"))
        self.fn, self.out = fn, fn()
        saved.restore()
        self.grads = [p.grad for p in self.params]
        return self.out

    def replay(self) -> None:
        attached = [p.grad for p in self.params]
        new = self.fn()
        for name in ("loss", "ce", "penalty", "logits"):
            getattr(self.out, name).detach().copy_(getattr(new, name).detach())
        for p, g, a in zip(self.params, self.grads, attached):
            if g is not None:
                g.copy_(p.grad)
            p.grad = a
