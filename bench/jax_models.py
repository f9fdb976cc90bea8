"""The benchmark's torch models rewritten in JAX, on the same weights (NCHW, train-mode BN).

``jax_params(model)`` copies the weights; ``jax_forward(model)`` gives f(params, x, drop)
with ``drop`` the dropout multiplier (0 or 1/(1−p)) of the layer after the last BN.
Supports the layer kinds of bench/cpu_workloads.py only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from torch import nn


def jax_params(model: nn.Sequential) -> list:
    return [jnp.asarray(p.detach().numpy()) for p in model.parameters()]


def _conv(x, w, b, pad):
    out = jax.lax.conv_general_dilated(x, w, (1, 1), [(pad, pad), (pad, pad)],
                                       dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return out + b[None, :, None, None]


def _bn(x, g, b, eps):
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    mu = x.mean(axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axes, keepdims=True)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mu) * jax.lax.rsqrt(var + eps) * g.reshape(shape) + b.reshape(shape)


def _pool(x, k):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, k, k), (1, 1, k, k), "VALID")


def jax_forward(model: nn.Sequential):
    layers = [m for m in model.modules() if not list(m.children())]

    def f(params, x, drop):
        it = iter(params)
        for m in layers:
            if isinstance(m, nn.Linear):
                w, b = next(it), next(it)
                x = x @ w.T + b
            elif isinstance(m, nn.Conv2d):
                w, b = next(it), next(it)
                x = _conv(x, w, b, m.padding[0])
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                g, b = next(it), next(it)
                x = _bn(x, g, b, m.eps)
            elif isinstance(m, nn.ReLU):
                x = jax.nn.relu(x)
            elif isinstance(m, nn.Softplus):
                x = jax.nn.softplus(x)
            elif isinstance(m, nn.MaxPool2d):
                x = _pool(x, m.kernel_size)
            elif isinstance(m, nn.Flatten):
                x = x.reshape(x.shape[0], -1)
            elif isinstance(m, nn.Dropout):
                x = x * drop
            else:
                raise TypeError(f"no JAX version of {type(m).__name__}")
        return x

    return f
