"""The whole fused step (gradreg_loss and its backward) captured once in a CUDA graph.

For static shapes on a GPU, the many small kernel launches of a step cost more than the
kernels themselves at small batches; replaying a captured graph launches them all at once.

    step = GraphedStep(model, x, y, lam)       # warms up, then captures (x, y: examples)
    for x, y in loader:                        # same shapes, dtypes and device every time
        loss = step(x, y)                      # p.grad now holds this batch's gradient
        opt.step()                             # do NOT zero_grad(set_to_none=True)

Each replay overwrites p.grad in place (no accumulation across replays), updates
BatchNorm running statistics and draws fresh dropout masks, as an uncaptured step would.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .loss import gradreg_loss


class GraphedStep:
    """gradreg_loss(model, x, y, lam, ...).loss.backward() as one replayable CUDA graph."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor | None, lam: float, *,
                 head: str = "ce", mask: Tensor | None = None, backend: str = "auto",
                 value_weight: float = 1.0, warmup: int = 3) -> None:
        if not x.is_cuda:
            raise ValueError(f"GraphedStep needs CUDA tensors, got x on {x.device}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (kernels compile before capture), "
                             f"got {warmup}")
        self.model, self.lam, self.head, self.backend = model, lam, head, backend
        self.value_weight = value_weight
        self.x = x.detach().clone()
        self.y = None if y is None else y.detach().clone()
        self.mask = None if mask is None else mask.detach().clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                model.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream(x.device).wait_stream(side)
        model.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step()

    def _step(self):
        out = gradreg_loss(self.model, self.x, self.y, self.lam, head=self.head,
                           mask=self.mask, backend=self.backend,
                           value_weight=self.value_weight, check_finite=False)
        out.loss.backward()
        return out

    def __call__(self, x: Tensor, y: Tensor | None = None, mask: Tensor | None = None
                 ) -> Tensor:
        """Run the step on (x, y[, mask]); returns the loss (a static tensor: copy to keep)."""
        if x.shape != self.x.shape or x.dtype != self.x.dtype:
            raise ValueError(f"GraphedStep was captured for x of shape {tuple(self.x.shape)} "
                             f"and {self.x.dtype}, got {tuple(x.shape)} and {x.dtype}")
        self.x.copy_(x)
        if self.y is not None:
            if y is None or y.shape != self.y.shape:
                raise ValueError(f"GraphedStep needs labels of shape {tuple(self.y.shape)}")
            self.y.copy_(y)
        if self.mask is not None:
            if mask is None:
                raise ValueError("GraphedStep was captured with a mask; pass one")
            self.mask.copy_(mask)
        self.graph.replay()
        return self.out.loss.detach()

    @property
    def backend_name(self) -> str:
        return self.out.backend
