"""convert(model): swap supported torch.nn layers of an existing model for drop-in ones.

In place: each nn.Linear, Conv2d, BatchNorm1d/2d, MaxPool2d and activation module becomes
its drop-in class (``modules.DROP_IN_OF``) keeping the very same Parameter and buffer
objects, so weights, state_dict keys, hooks, train/eval mode and an optimizer built before
the call all stay valid. Inside a plain nn.Sequential, a Linear or Conv2d directly followed
by an activation module takes that activation as its fused ``act`` and the activation's slot
becomes nn.Identity (it has no state, so state_dict keys do not change).
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from ..activation_math import activation_spec
from .modules import DROP_IN_OF, DropIn

_PRODUCTS = (nn.Linear, nn.Conv2d)


def _exact_supported(m: nn.Module, kinds: tuple[type, ...]) -> bool:
    """m is one of ``kinds`` exactly (or its drop-in), not a user subclass with its own forward."""
    return any(type(m) is k or type(m) is DROP_IN_OF.get(k) for k in kinds)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def _fuse_pairs(model: nn.Module, uses: Counter) -> int:
    """Fuse product + activation pairs inside plain Sequentials; returns how many."""
    fused = 0
    for seq in list(model.modules()):
        if not (isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward):
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:], strict=False):
            prod, act = seq._modules[first], seq._modules[second]
            if prod is None or act is None or not _exact_supported(prod, _PRODUCTS):
                continue
            spec = activation_spec(act)
            if spec is None or getattr(prod, "act", None) is not None:
                continue
            if type(act) not in DROP_IN_OF and type(act) not in DROP_IN_OF.values():
                continue
            if _hooked(prod) or _hooked(act) or uses[id(prod)] > 1:
                continue
            prod.act = spec
            seq._modules[second] = nn.Identity()
            fused += 1
    return fused


def convert(model: nn.Module, backend: str = "auto", fuse_activations: bool = True
            ) -> nn.Module:
    """Make ``model`` run the twice-differentiable drop-in Functions; returns ``model``.

    Outputs and every gradient (first and second order) are unchanged up to rounding.
    Modules of other types are left as they are (they keep working through autograd).

    Speed: bench/RESULTS.md ("Drop-in Functions") compares converted models with eager
    double backprop on the CPU and a GPU. On a GPU at small batches each drop-in Function's
    Python bookkeeping can cost more than its kernels, so measure your own step before
    converting a GPU model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    uses = Counter(id(m) for m in model.modules(remove_duplicate=False))
    for m in model.modules():
        target = DROP_IN_OF.get(type(m))
        if target is not None:
            m.__class__ = target
            m.set_dropin(backend)
        elif isinstance(m, DropIn):
            m.backend = backend
    if fuse_activations:
        _fuse_pairs(model, uses)
    return model
