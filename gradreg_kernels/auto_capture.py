"""The fused step captured in CUDA graphs on demand, keyed on what would make a replay wrong.

    step = AutoCapture(GradRegLoss(model, lam=100.0))   # or GradRegLoss(...).captured()
    for x, y in loader:
        opt.zero_grad()
        loss = step(x, y)      # first call of a key: warm up, capture, replay; then replays
        opt.step()

In the style of ``torch.compile(mode="reduce-overhead")``: each call computes a key of
everything a captured graph has baked in, replays the graph of that key, or captures one:

- the inputs' shapes, dtypes and devices (x, y, mask);
- the loss's options (λ, value weight, head, data term, label smoothing, class weights,
  backend), read from the GradRegLoss at each call, so a λ schedule re-captures;
- the autocast state of the device;
- the plan signature (gradreg_kernels.plan.plan_signature: the modules, their types,
  train / eval flags, hooks and parameter identities);
- where every parameter and buffer lives (``p.data = ...`` or ``.to()`` moves a storage).

All graphs share one memory pool. At most ``max_graphs`` are kept: a key beyond them is
refused with an error naming what changed since the last call. The warm-up calls run on the
user's batch, and what they changed is put back before the capture: BatchNorm running
statistics and batch counts, and the random-number generators (so no extra dropout draw).
Each call therefore makes exactly one training step's updates, as an uncaptured
step does. The finite checks read values back to the host and cannot run in a graph: the
captured step runs without them (check ``loss`` yourself where it matters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .graphs import CapturedStep, _CudaGraph
from .loss import GradRegOutput
from .loss_module import GradRegLoss
from .model_state import ModelState
from .plan import plan_signature

#: the parts of a key, in order, as the refusal names them
KEY_PARTS = ("x", "y", "mask", "loss options", "autocast", "plan signature",
             "parameter and buffer storage")


def _spec(t: Tensor | None) -> tuple | None:
    return None if t is None else (tuple(t.shape), t.dtype, t.device)


def _autocast_state(device: torch.device) -> tuple:
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return (False,)
    return True, torch.get_autocast_dtype(kind)


@dataclass
class _Entry:
    step: CapturedStep
    has_y: bool
    has_mask: bool


class AutoCapture:
    """``loss = step(x, y=None, mask=None)``: the GradRegLoss's fused forward and backward,
    captured once per key (module docstring) and replayed; returns the loss (a static
    tensor, overwritten by the next replay of the same key: copy it to keep it) and leaves
    each parameter's gradient in ``p.grad``. ``step.out`` is the last call's GradRegOutput,
    ``step.captures`` how many graphs were captured."""

    def __init__(self, loss_fn: GradRegLoss, *, max_graphs: int = 8, warmup: int = 2,
                 _recorder: Callable[[torch.device, object], object] | None = None) -> None:
        if not isinstance(loss_fn, GradRegLoss):
            raise TypeError("AutoCapture wraps a GradRegLoss (gradreg_kernels.GradRegLoss("
                            f"model, lam, ...)), got {type(loss_fn).__name__}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.loss_fn, self.max_graphs, self.warmup = loss_fn, max_graphs, warmup
        self._recorder = _recorder
        self._pool = None
        self._graphs: dict[tuple, _Entry] = {}
        self._last_key: tuple | None = None
        self.captures = 0
        self.out: GradRegOutput | None = None

    @property
    def model(self) -> nn.Module:
        return self.loss_fn.model

    def _options(self) -> tuple:
        f = self.loss_fn
        cw = f._class_weight()
        return (float(f.lam), float(f.value_weight), f.head, f.data, f.label_smoothing,
                f.backend, None if cw is None else (cw.data_ptr(), _spec(cw)))

    def key(self, x: Tensor, y: Tensor | None = None, mask: Tensor | None = None) -> tuple:
        """The key of a call (KEY_PARTS, in order)."""
        m = self.model
        storage = (tuple(p.data_ptr() for p in m.parameters())
                   + tuple(b.data_ptr() for b in m.buffers()))
        return (_spec(x), _spec(y), _spec(mask), self._options(), _autocast_state(x.device),
                plan_signature(m), storage)

    def __call__(self, x: Tensor, y: Tensor | None = None, mask: Tensor | None = None
                 ) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self._recorder is None and not x.is_cuda:
            raise ValueError(f"AutoCapture captures CUDA graphs: x is on {x.device} (call the "
                             "GradRegLoss itself there)")
        key = self.key(x, y, mask)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                raise RuntimeError(self._refusal(key))
            entry = self._graphs[key] = self._capture(x, y, mask)
        self._last_key = key
        args = [x] + ([y] if entry.has_y else []) + ([mask] if entry.has_mask else [])
        self.out = entry.step(*args)
        return self.out.loss.detach()

    def _refusal(self, key: tuple) -> str:
        changed = [name for name, a, b in zip(KEY_PARTS, key, self._last_key or key) if a != b]
        what = ", ".join(changed) if changed else "the key"
        return (f"AutoCapture holds its {self.max_graphs} graphs (max_graphs) and this call "
                f"needs another: {what} changed since the last call. Raise max_graphs, keep "
                "shapes and options fixed, or call the GradRegLoss uncaptured")

    def _capture(self, x: Tensor, y: Tensor | None, mask: Tensor | None) -> _Entry:
        """Warm up, capture and put back what the warm-up changed; a new graph."""
        f, model = self.loss_fn, self.model
        has_y, has_mask = y is not None, mask is not None

        def step(xx: Tensor, *rest: Tensor) -> GradRegOutput:
            yy = rest[0] if has_y else None
            mm = rest[-1] if has_mask else None
            model.zero_grad(set_to_none=True)
            # forward, not the module call: a GradRegLoss hook would run at the capture only
            out = f.forward(xx, yy, mm, check_finite=False)
            out.loss.backward()
            return out

        if self._pool is None and x.is_cuda:
            self._pool = torch.cuda.graph_pool_handle()
        recorder = (self._recorder or _CudaGraph)(x.device, self._pool)
        saved = ModelState(model, x.device)
        examples = [x] + ([y] if has_y else []) + ([mask] if has_mask else [])
        captured = CapturedStep(step, *examples, warmup=self.warmup,
                                params=model.parameters(), _recorder=recorder)
        saved.restore()
        self.captures += 1
        return _Entry(captured, has_y, has_mask)
