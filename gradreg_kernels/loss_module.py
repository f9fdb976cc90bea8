"""The module form of the loss, for wrappers that need a module to run: DistributedDataParallel.

    loss_fn = GradRegLoss(model, lam=100.0)
    ddp = torch.nn.parallel.DistributedDataParallel(loss_fn)
    out = ddp(x, y)            # the fused step, with DDP's forward around it
    out.loss.backward()        # DDP all-reduces the gradients (bucketed) when they arrive

DDP needs its own forward to run around the model's (its hooks prepare the reducer), so
``gradreg_loss(DDP(model), ...)`` cannot reach the model; ``DDP(GradRegLoss(model))`` can:
the fused step runs inside DDP's forward on the wrapped model, its parameters are DDP's
parameters, and their gradients arrive at DDP's hooks when the fused backward returns
(docs/distributed.md).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .loss import GradRegOutput, gradreg_loss

Head = str | Callable[[Tensor, Tensor | None], Tensor]


class GradRegLoss(nn.Module):
    """``forward(x, y=None, mask=None)`` returns ``gradreg_loss(model, x, y, lam, ...)``.

    The model is a submodule (``self.model``): ``.to()``, ``state_dict()`` and the
    parameters are the model's, and ``class_weight`` is a buffer, moved with it. Every
    keyword is gradreg_loss's; ``lam`` and ``value_weight`` may be changed between steps
    (a warm-up schedule)."""

    def __init__(self, model: nn.Module, lam: float = 1.0, *, head: Head = "ce",
                 data: Head | None = None, value_weight: float = 1.0,
                 label_smoothing: float = 0.0, class_weight: Tensor | None = None,
                 backend: str = "auto", strict: bool = False, check_finite: bool = True,
                 keep_saved: bool = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.lam, self.value_weight = lam, value_weight
        self.head, self.data, self.label_smoothing = head, data, label_smoothing
        self.backend, self.strict = backend, strict
        self.check_finite, self.keep_saved = check_finite, keep_saved
        self.register_buffer("class_weight", class_weight)

    def forward(self, x: Tensor, y: Tensor | None = None, mask: Tensor | None = None, *,
                check_finite: bool | None = None) -> GradRegOutput:
        """The loss on (x, y[, mask]) with this module's options; ``check_finite`` given
        overrides the module's ``check_finite`` for this call (a captured step passes
        False: the checks read values back to the host)."""
        if check_finite is None:
            check_finite = self.check_finite
        return gradreg_loss(self.model, x, y, self.lam, head=self.head, mask=mask,
                            backend=self.backend, strict=self.strict,
                            value_weight=self.value_weight, check_finite=check_finite,
                            keep_saved=self.keep_saved, data=self.data,
                            label_smoothing=self.label_smoothing,
                            class_weight=self._class_weight())

    def captured(self, *, max_graphs: int = 8, warmup: int = 2):
        """This loss's whole training step (forward and backward), captured in CUDA graphs
        on demand and replayed: ``loss = step(x, y)`` (gradreg_kernels.auto_capture)."""
        from .auto_capture import AutoCapture

        return AutoCapture(self, max_graphs=max_graphs, warmup=warmup)

    def _class_weight(self) -> Tensor | None:
        w = self._buffers.get("class_weight")
        return w if isinstance(w, Tensor) else None

    def extra_repr(self) -> str:
        head = self.head if isinstance(self.head, str) else getattr(self.head, "__name__", "fn")
        return f"lam={self.lam}, head={head!r}, value_weight={self.value_weight}"
