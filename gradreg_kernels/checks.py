"""Argument checks of gradreg_loss: each bad input gets an error that names the problem."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


class NonFiniteLossError(FloatingPointError):
    """The loss came out NaN or infinite; raised before any gradient reaches the model."""


def _real(value: float, name: str) -> float:
    """value as a float: a Python or NumPy real number, or a one-element tensor (read as its
    value: a constant weight, not differentiated through); a bool, a string or a tensor of
    several values is a named error."""
    if isinstance(value, (bool, str, bytes)) or (isinstance(value, Tensor)
                                                  and value.numel() != 1):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be a real number, got {value!r}") from e


def check_nonnegative(value: float, name: str) -> float:
    """value as a float, or a named error unless it is a finite real number >= 0."""
    out = _real(value, name)
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {out}")
    return out


def check_lam(lam: float) -> float:
    return check_nonnegative(lam, "lam")


def check_value_weight(w: float) -> float:
    """The data term's weight: any finite real number (negative maximises the data term,
    e.g. a critic's score with head="output"; 0 leaves the penalty alone)."""
    out = _real(w, "value_weight")
    if not math.isfinite(out):
        raise ValueError(f"value_weight must be finite, got {out}")
    return out


def check_model_and_batch(model: nn.Module, x: Tensor) -> None:
    """model is a Module and x a non-empty floating-point batch (B, ...)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a batch of shape (B, ...) with B >= 1, got {tuple(x.shape)}")


def check_not_sharded(model: nn.Module) -> None:
    """FSDP shards each layer's parameters and gathers them in its own forward hooks, which
    the fused step (reading every layer's full parameters itself) and double
    backpropagation through FSDP's hooks cannot follow: a clear error instead of a wrong
    read of a sharded storage."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch without distributed support
        return
    for m in model.modules():
        if isinstance(m, (FSDPModule, FullyShardedDataParallel)):
            raise UnsupportedShardingError(
                f"gradreg_loss cannot run a model sharded by FSDP ({type(m).__name__}): the "
                "input-gradient penalty needs every layer's full parameters in all four "
                "passes. Replicate the model instead: DistributedDataParallel("
                "GradRegLoss(model)) (docs/distributed.md)")


class UnsupportedShardingError(TypeError):
    """The model's parameters are sharded (FSDP), which the fused step cannot read."""


def check_model_and_x(model: nn.Module, x: Tensor) -> list[nn.Parameter]:
    """check_model_and_batch, and every parameter on x's device with x's dtype.

    Returns the parameters that require a gradient, each once (a shared one too). The walk
    reads the modules' own parameter and child dicts (``named_parameters`` builds a name for
    every parameter, which costs more inside a step than the check itself); a mismatch walks
    again for the parameter's name.
    """
    check_model_and_batch(model, x)
    device, dtype = x.device, x.dtype
    trainable: list[nn.Parameter] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        for p in m._parameters.values():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.dtype != dtype or p.device != device:
                _raise_mismatch(model, x)
            if p.requires_grad:
                trainable.append(p)
        stack.extend(c for c in m._modules.values() if c is not None)
    return trainable


def _raise_mismatch(model: nn.Module, x: Tensor) -> None:
    """The error naming the first parameter not on x's device or not of x's dtype."""
    for name, p in model.named_parameters():
        if p.device != x.device:
            raise ValueError(f"model parameter {name!r} is on {p.device} but x is on {x.device}")
        if p.dtype != x.dtype:
            raise TypeError(f"model parameter {name!r} is {p.dtype} but x is {x.dtype}; "
                            "cast one to the other")


def check_labels(y: Tensor, x: Tensor, name: str = "y") -> Tensor:
    """y as int64, after checking it is a (B,) integer tensor on x's device."""
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16,
                                                    torch.uint8, torch.int8):
        what = y.dtype if isinstance(y, Tensor) else type(y).__name__
        raise TypeError(f"{name} must be an integer tensor of class labels, got {what}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name} must have shape (B,) = ({x.shape[0]},) to match x's batch, "
                         f"got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"{name} is on {y.device} but x is on {x.device}")
    return y.long()


def check_matrix_logits(logits: Tensor) -> None:
    """A softmax head's logits are (B, K)."""
    if logits.dim() != 2:
        raise ValueError("a softmax head needs (B, K) logits from the model, got shape "
                         f"{tuple(logits.shape)}")


def check_label_range(y: Tensor, logits: Tensor) -> None:
    check_matrix_logits(logits)
    check_labels_in_range(y, logits.shape[1])


def check_labels_in_range(y: Tensor, num_classes: int, name: str = "y") -> None:
    """Raise a ValueError naming the first label outside [0, num_classes)."""
    lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one read-back for both
    if lo < 0 or hi >= num_classes:
        bad = (y < 0) | (y >= num_classes)
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must lie in [0, {num_classes}) for the model's {num_classes} "
                         f"outputs; {name}[{i}] = {int(y[i])}")


def check_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x's shape "
                         f"{tuple(x.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
    return mask.to(x.dtype)


def all_finite(t: Tensor) -> bool:
    """Whether every value of t is finite.

    A NaN or ±inf anywhere makes the sum non-finite, so a finite sum (one cheap reduction,
    no mask tensor) settles it; only a non-finite sum (a bad value, or an overflow of large
    finite ones) takes the element-wise check.
    """
    if not t.is_floating_point() and not t.is_complex():
        return True
    if t.is_floating_point() and math.isfinite(float(t.detach().sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_finite_input(x: Tensor, mask: Tensor | None,
                       finite: Callable[[Tensor], bool] = all_finite) -> None:
    """x and mask hold no NaN or ±inf; ``finite`` is the test (a backend's faster one)."""
    if not finite(x):
        raise ValueError(f"x holds {int((~torch.isfinite(x)).sum())} non-finite values "
                         "(NaN or ±inf): clean the batch, or pass check_finite=False to let "
                         "them reach the loss as in plain PyTorch")
    if mask is not None and not finite(mask):
        raise ValueError("mask holds non-finite values")


def all_finite_many(ts: Sequence[Tensor]) -> bool:
    """Whether every value of every tensor is finite: one sum of their sums (one read-back),
    finite unless a value is not or the sum overflows; only then each tensor is swept."""
    if not ts:
        return True
    total = torch.stack([t.detach().sum().to(torch.float32) for t in ts]).sum()
    return math.isfinite(float(total)) or all(all_finite(t.detach()) for t in ts)


def check_finite_params(model: nn.Module, params: list[nn.Parameter],
                        finite_many: Callable[[Sequence[Tensor]], bool] = all_finite_many
                        ) -> None:
    """Every trainable parameter holds no NaN or ±inf: a diverged model gets an error naming
    the parameter, where its NaN would otherwise meet kernels (torch's as ours) whose
    answer at NaN and ±inf is a choice of each formula and could read as finite."""
    if finite_many(params):
        return
    for p in params:
        if not all_finite(p.detach()):
            name = next((n for n, q in model.named_parameters() if q is p), "?")
            bad = int((~torch.isfinite(p.detach())).sum())
            raise ValueError(f"parameter {name!r} holds {bad} non-finite values (the model "
                             "has diverged: restore a checkpoint, lower the learning rate or "
                             "lam)")


def check_finite_loss(loss: Tensor, data: Tensor, penalty: Tensor) -> None:
    """The 0-dim loss w · data + λ · penalty is finite (one read-back): a NaN or inf in
    either part, or λ · penalty overflowing the dtype, is a NonFiniteLossError naming the
    parts."""
    if not math.isfinite(float(loss)):
        raise NonFiniteLossError(
            f"non-finite loss {float(loss)}: data term = {float(data)}, penalty = "
            f"{float(penalty)}; no gradient was produced (lower the learning rate or lam, or "
            "check the inputs)")


class DeferredChecks:
    """The finite checks of one fused step as device values, read back once.

    On a GPU every check that reads a value back is a host synchronization. Here the sums
    that the immediate checks read one by one stay on the device: Σ x, Σ mask and Σ_p ‖p‖₁
    now, before pass 1; the data term, the penalty and the loss at ``settle``, after pass 2,
    which reads all of them in one ``tolist()``. Each sum is finite unless a value it covers
    is not (or the sum overflows, which the sweep of the failure path tells apart); a label
    outside [0, K) makes the softmax heads' data term NaN, so the labels need no read of their
    own. Only a non-finite value takes the failure path, which raises the error the immediate
    check would have raised (x, mask, parameter, label, loss, in that order). Nothing has
    touched the model by then: BatchNorm's running statistics are applied after ``settle``.
    """

    def __init__(self, model: nn.Module, x: Tensor, mask: Tensor | None,
                 params: Sequence[nn.Parameter]) -> None:
        self.model, self.x, self.mask, self.params = model, x, mask, params
        dt = torch.promote_types(x.dtype, torch.float32)
        self.parts = [x.detach().sum(dtype=dt)]
        if mask is not None:
            self.parts.append(mask.detach().sum(dtype=dt))
        if params:
            norms = torch._foreach_norm([p.detach() for p in params], 1)
            self.parts.append(torch.stack(norms).sum(dtype=dt))

    def settle(self, loss: Tensor, data: Tensor, penalty: Tensor,
               labels: tuple[Tensor, int] | None) -> None:
        """Raise the named error for the first non-finite value, after one read-back.

        ``labels``: (y, K) where the head reads class labels whose range was not checked."""
        values = torch.stack([*self.parts, data.detach(), penalty.detach(),
                              loss.detach()]).tolist()
        if all(math.isfinite(v) for v in values):
            return
        check_finite_input(self.x, self.mask)
        check_finite_params(self.model, list(self.params))
        if labels is not None:
            check_labels_in_range(*labels)
        check_finite_loss(loss, data, penalty)
