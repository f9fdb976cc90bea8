"""Autograd Functions whose backward runs under the autocast state of their forward.

Mixed precision is used as ``with torch.autocast(...): loss = f(x)`` and then
``loss.backward()`` outside the context. Built-in ops replay their forward's casts in the
backward; a custom Function's backward runs under whatever state is current, so bf16
tensors saved by an autocast forward would meet float32 weights in plain products and
fail. ``torch.amp.custom_fwd``/``custom_bwd`` fix that for one device type fixed at
decoration; these Functions take the device type from their first tensor argument.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

_any_autocast = torch._C._is_any_autocast_enabled  # one cheap call on the common path


def _device_type(args: tuple) -> str:
    for a in args:
        if isinstance(a, Tensor):
            return a.device.type
    return "cpu"


def _state(dev: str) -> tuple[str, torch.dtype | None]:
    """(device type, autocast dtype there, or None where autocast is off)."""
    return dev, (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)


def _remembering(forward):
    @functools.wraps(forward)
    def run(ctx, *args):
        ctx.autocast_state = _state(_device_type(args)) if _any_autocast() else None
        return forward(ctx, *args)

    return run


def _restoring(backward):
    @functools.wraps(backward)
    def run(ctx, *grads):
        state = getattr(ctx, "autocast_state", None)
        if state is None:
            if not _any_autocast():
                return backward(ctx, *grads)  # autocast off in both (the common case)
            with contextlib.ExitStack() as stack:  # the forward ran without autocast
                for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                    stack.enter_context(torch.autocast(device_type=dev, enabled=False))
                return backward(ctx, *grads)
        if _state(state[0]) == state:
            return backward(ctx, *grads)
        dev, dtype = state
        with torch.autocast(device_type=dev, dtype=dtype, enabled=dtype is not None):
            return backward(ctx, *grads)

    return run


class Function(torch.autograd.Function):
    """torch.autograd.Function whose subclasses' backward runs under the autocast state
    (enabled, dtype) their forward ran under, on the device of the first tensor argument."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name, wrap in (("forward", _remembering), ("backward", _restoring)):
            if name in cls.__dict__:
                fn = cls.__dict__[name]
                setattr(cls, name, staticmethod(wrap(getattr(fn, "__func__", fn))))
