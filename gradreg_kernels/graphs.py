"""A whole training step captured once in a CUDA graph and replayed for new batches.

For static shapes on a GPU, the many small kernel launches of a step cost more than the
kernels themselves at small batches; replaying a captured graph launches them all at once.

The fused step:

    step = GraphedStep(model, x, y, lam)       # warms up, then captures (x, y: examples)
    for x, y in loader:                        # same shapes, dtypes and device every time
        opt.zero_grad()                        # allowed: the gradients are re-attached
        loss = step(x, y)                      # p.grad now holds this batch's gradient
        opt.step()

A user's own step (a converted model's forward, ``autograd.grad(create_graph=True)``,
penalty, backward), any function of tensors that runs on one device without reading values
back to the host:

    step = CapturedStep(lambda x: r1_step(critic, x), x)
    for x in loader:
        loss = step(x)                         # a static tensor: copy it to keep it
        opt.step()

Each replay overwrites the captured gradient tensors in place (no accumulation across
replays), updates BatchNorm running statistics and draws fresh dropout masks, as an
uncaptured step would. After each replay every parameter whose gradient the step fills has
its captured gradient as ``p.grad`` again: ``zero_grad()`` (which sets ``p.grad = None``)
between replays is safe. A parameter whose storage was replaced since the capture
(``p.data = ...``, ``model.to(...)``) is refused with an error: the graph reads the old one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from .loss import gradreg_loss


class _CudaGraph:
    """How a step is recorded: warm-up calls on a side stream, then one CUDA-graph capture
    (which runs no kernel) into a shared memory pool; ``replay`` launches the recording."""

    def __init__(self, device: torch.device, pool=None) -> None:
        self.device, self.pool = device, pool
        self.graph = torch.cuda.CUDAGraph()

    def warm(self, fn: Callable[[], object], times: int) -> None:
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(times):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def record(self, fn: Callable[[], object]) -> object:
        with torch.cuda.graph(self.graph, pool=self.pool):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


def _spec(t: object, device: bool = True) -> str:
    """An input as a refusal names it: shape, dtype (and device), or its type."""
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {t.dtype}" + (f" on {t.device}" if device else "")


def _matches(new: object, old: Tensor, device: bool = True) -> bool:
    return (isinstance(new, Tensor) and new.shape == old.shape and new.dtype == old.dtype
            and (not device or new.device == old.device))


def _referenced_modules(fn: Callable[..., object]) -> list[nn.Module]:
    """The modules ``fn`` names: itself, its ``__self__``, a partial's arguments, the
    variables its code reads from enclosing scopes and globals (one level deep)."""
    objs: list[object] = [fn, getattr(fn, "__self__", None)]
    if isinstance(fn, functools.partial):
        objs += [fn.func, *fn.args, *fn.keywords.values()]
        fn = fn.func
    try:
        found = inspect.getclosurevars(fn)
        objs += [*found.nonlocals.values(), *found.globals.values()]
    except TypeError:  # a builtin or a callable object without code
        pass
    return [o for o in objs if isinstance(o, nn.Module)]


class CapturedStep:
    """``fn(*inputs)`` captured once in a CUDA graph; each call copies new inputs into the
    captured ones and replays it.

    ``fn`` must run on the inputs' GPU without host read-backs (``.item()``, printing a
    value, data-dependent shapes); its tensors' shapes, dtypes and devices must not change
    between calls. What it returns (a tensor, or a structure of them) is the captured output:
    the same tensors, overwritten by every replay. The gradients it fills are overwritten
    likewise (a ``zero_grad(set_to_none=True)`` inside ``fn`` makes each replay's gradient
    that batch's alone), and re-attached as ``p.grad`` after every replay, for ``params``
    and the parameters of every module ``fn`` names (in its closure, its globals, a
    partial's arguments or as its ``__self__``): pass ``params`` when it reaches its model
    some other way. ``warmup`` uncaptured calls on a side stream come first: kernels compile and
    autotune there, and the allocator settles.

    A call's inputs must match the captured ones in number, shape, dtype and device; a
    wrapper passes ``names`` (one per input) and ``owner`` (its class name) to have a wrong
    shape or dtype refused as ``"<owner> was captured for <name> of shape ..."``.
    """

    def __init__(self, fn: Callable[..., object], *inputs: Tensor, warmup: int = 3,
                 params: Iterable[Tensor] | None = None, names: Sequence[str] | None = None,
                 owner: str = "CapturedStep", _recorder=None) -> None:
        if not inputs or not all(isinstance(t, Tensor) for t in inputs):
            raise TypeError("CapturedStep needs the example inputs as tensors after fn")
        if _recorder is None and not all(t.is_cuda for t in inputs):
            devices = sorted({str(t.device) for t in inputs})
            raise ValueError(f"CapturedStep needs CUDA tensors, got inputs on {devices}")
        if len({t.device for t in inputs}) != 1:
            raise ValueError("CapturedStep needs every input on the same GPU")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (kernels compile before capture), "
                             f"got {warmup}")
        if names is not None and len(names) != len(inputs):
            raise ValueError(f"CapturedStep got {len(names)} names for {len(inputs)} inputs")
        self.fn, self.names, self.owner = fn, names, owner
        self.device = inputs[0].device
        self.inputs = tuple(t.detach().clone() for t in inputs)
        self.recorder = _recorder or _CudaGraph(self.device)
        given = list(params) if params is not None else []
        named = [p for m in _referenced_modules(fn) for p in m.parameters()]
        with self._guard():
            self.recorder.warm(self._run, warmup)
            self.output = self.recorder.record(self._run)
        by_id = {id(p): p for p in [*given, *named]}
        #: (parameter, its captured gradient) for every parameter the step fills
        self.grads = [(p, p.grad) for p in by_id.values() if p.grad is not None]
        self._storage = [(p, p.data_ptr()) for p in by_id.values()]

    def _run(self) -> object:
        return self.fn(*self.inputs)

    def _guard(self) -> contextlib.AbstractContextManager:
        """The context that makes the inputs' GPU current (a model on cuda:1 while cuda:0
        is); none off CUDA."""
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def _check_inputs(self, inputs: Sequence[object]) -> None:
        """Refuse ``inputs`` unless they match the captured inputs: their number, then (with
        ``names``) each one's shape and dtype by name, then each one's shape, dtype and
        device by position."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"CapturedStep was captured with {len(self.inputs)} inputs, "
                             f"got {len(inputs)}")
        pairs = list(zip(inputs, self.inputs))
        for name, (new, old) in zip(self.names or (), pairs):
            if not _matches(new, old, device=False):
                raise ValueError(f"{self.owner} was captured for {name} of shape "
                                 f"{_spec(old, device=False)}, got {_spec(new, device=False)}")
        for i, (new, old) in enumerate(pairs):
            if not _matches(new, old):
                raise ValueError(f"CapturedStep input {i} was captured as {_spec(old)}, "
                                 f"got {_spec(new)}")

    def __call__(self, *inputs: Tensor) -> object:
        """Copy ``inputs`` into the captured inputs, replay, re-attach the gradients and
        return the captured output."""
        self._check_inputs(inputs)
        for p, ptr in self._storage:
            if p.data_ptr() != ptr:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} was given new storage after the "
                    "capture (p.data = ..., model.to(...)); the graph reads the old one. "
                    "Capture the step again")
        with self._guard():
            for new, old in zip(inputs, self.inputs):
                old.copy_(new)
            self.recorder.replay()
        for p, g in self.grads:
            if p.grad is not g:
                p.grad = g
        return self.output


class GraphedStep:
    """gradreg_loss(model, x, y, lam, ...).loss.backward() as one replayable CUDA graph."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor | None, lam: float, *,
                 head: str = "ce", mask: Tensor | None = None, backend: str = "auto",
                 value_weight: float = 1.0, warmup: int = 3, _recorder=None) -> None:
        if _recorder is None and not x.is_cuda:
            raise ValueError(f"GraphedStep needs CUDA tensors, got x on {x.device}")
        self.model, self.lam, self.head, self.backend = model, lam, head, backend
        self.value_weight = value_weight
        self.has_y, self.has_mask = y is not None, mask is not None
        names = ["x"] + (["y"] if self.has_y else []) + (["mask"] if self.has_mask else [])
        examples = [x] + ([y] if self.has_y else []) + ([mask] if self.has_mask else [])
        model.zero_grad(set_to_none=True)
        self.captured = CapturedStep(self._step, *examples, warmup=warmup,
                                     params=model.parameters(), names=names,
                                     owner="GraphedStep", _recorder=_recorder)

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
