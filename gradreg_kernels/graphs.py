"""A whole training step captured once in a CUDA graph and replayed for new batches.

For static shapes on a GPU, the many small kernel launches of a step cost more than the
kernels themselves at small batches; replaying a captured graph launches them all at once.

The fused step:

    step = GraphedStep(model, x, y, lam)       # warms up, then captures (x, y: examples)
    for x, y in loader:                        # same shapes, dtypes and device every time
        loss = step(x, y)                      # p.grad now holds this batch's gradient
        opt.step()                             # do NOT zero_grad(set_to_none=True)

A user's own step (a converted model's forward, ``autograd.grad(create_graph=True)``,
penalty, backward), any function of tensors that runs on one device without reading values
back to the host:

    step = CapturedStep(lambda x: r1_step(critic, x), x)
    for x in loader:
        loss = step(x)                         # a static tensor: copy it to keep it
        opt.step()

Each replay overwrites p.grad in place (no accumulation across replays), updates
BatchNorm running statistics and draws fresh dropout masks, as an uncaptured step would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .loss import gradreg_loss


class CapturedStep:
    """``fn(*inputs)`` captured once in a CUDA graph; each call copies new inputs into the
    captured ones and replays it.

    ``fn`` must run on the inputs' GPU without host read-backs (``.item()``, printing a
    value, data-dependent shapes); its tensors' shapes, dtypes and devices must not change
    between calls. What it returns (a tensor, or a structure of them) is the captured output:
    the same tensors, overwritten by every replay. Gradients it fills (p.grad) are
    overwritten likewise, so a ``zero_grad(set_to_none=True)`` inside ``fn`` is right (it
    runs at capture), and one between replays is not (the replays write into the captured
    p.grad). ``warmup`` uncaptured calls on a side stream come first: kernels compile and
    autotune there, and the allocator settles.
    """

    def __init__(self, fn: Callable[..., object], *inputs: Tensor, warmup: int = 3) -> None:
        if not inputs or not all(isinstance(t, Tensor) for t in inputs):
            raise TypeError("CapturedStep needs the example inputs as tensors after fn")
        if not all(t.is_cuda for t in inputs):
            devices = sorted({str(t.device) for t in inputs})
            raise ValueError(f"CapturedStep needs CUDA tensors, got inputs on {devices}")
        if len({t.device for t in inputs}) != 1:
            raise ValueError("CapturedStep needs every input on the same GPU")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (kernels compile before capture), "
                             f"got {warmup}")
        self.fn = fn
        self.inputs = tuple(t.detach().clone() for t in inputs)
        device = self.inputs[0].device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> object:
        """Copy ``inputs`` into the captured inputs, replay, and return the captured output."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"CapturedStep was captured with {len(self.inputs)} inputs, "
                             f"got {len(inputs)}")
        for i, (new, old) in enumerate(zip(inputs, self.inputs)):
            if not isinstance(new, Tensor) or new.shape != old.shape or new.dtype != old.dtype:
                what = (f"{tuple(new.shape)} {new.dtype}" if isinstance(new, Tensor)
                        else type(new).__name__)
                raise ValueError(f"CapturedStep input {i} was captured as "
                                 f"{tuple(old.shape)} {old.dtype}, got {what}")
            old.copy_(new)
        self.graph.replay()
        return self.output


class GraphedStep:
    """gradreg_loss(model, x, y, lam, ...).loss.backward() as one replayable CUDA graph."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor | None, lam: float, *,
                 head: str = "ce", mask: Tensor | None = None, backend: str = "auto",
                 value_weight: float = 1.0, warmup: int = 3) -> None:
        if not x.is_cuda:
            raise ValueError(f"GraphedStep needs CUDA tensors, got x on {x.device}")
        self.model, self.lam, self.head, self.backend = model, lam, head, backend
        self.value_weight = value_weight
        self.has_y, self.has_mask = y is not None, mask is not None
        examples = [x] + ([y] if self.has_y else []) + ([mask] if self.has_mask else [])
        model.zero_grad(set_to_none=True)
        self.captured = CapturedStep(self._step, *examples, warmup=warmup)

    def _step(self, x: Tensor, *rest: Tensor):
        y = rest[0] if self.has_y else None
        mask = rest[-1] if self.has_mask else None
        self.model.zero_grad(set_to_none=True)
        out = gradreg_loss(self.model, x, y, self.lam, head=self.head, mask=mask,
                           backend=self.backend, value_weight=self.value_weight,
                           check_finite=False)
        out.loss.backward()
        return out

    def __call__(self, x: Tensor, y: Tensor | None = None, mask: Tensor | None = None
                 ) -> Tensor:
        """Run the step on (x, y[, mask]); returns the loss (a static tensor: copy to keep)."""
        if self.has_y and y is None:
            raise ValueError("GraphedStep was captured with labels y; pass them")
        if self.has_mask and mask is None:
            raise ValueError("GraphedStep was captured with a mask; pass one")
        args = [x] + ([y] if self.has_y else []) + ([mask] if self.has_mask else [])
        return self.captured(*args).loss.detach()

    @property
    def out(self):
        """The captured GradRegOutput (its tensors are overwritten by every replay)."""
        return self.captured.output

    @property
    def backend_name(self) -> str:
        return self.out.backend
