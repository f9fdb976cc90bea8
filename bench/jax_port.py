"""The same networks and loss in JAX, for the jax.jit peer of the benchmark.

``port(model)`` turns a torch nn.Sequential of Linear / Conv2d / BatchNorm (train mode) /
GroupNorm / LayerNorm (last dimension) / ReLU / Softplus / SiLU / GELU / MaxPool2d /
Flatten / Dropout (nested Sequentials walked to their leaves) into (params, apply), NCHW
like torch. The loss is the package's: mean_n CE_n + λ · mean_n ‖∇_{x_n} Σ_m CE_m‖²,
differentiated by jax.grad.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from torch import nn


def _arr(t) -> jnp.ndarray:
    return jnp.asarray(t.detach().cpu().numpy())


def port(model: nn.Sequential):
    """(params: list of dicts, apply(params, x, key, train_dropout) → logits)."""
    layers, params = [], []
    for m in model.modules():
        if list(m.children()):
            continue  # a container: its leaves follow
        if isinstance(m, nn.Linear):
            layers.append(("linear", None))
            params.append({"w": _arr(m.weight), "b": _arr(m.bias)})
        elif isinstance(m, nn.Conv2d):
            layers.append(("conv", (tuple(m.stride), tuple(m.padding))))
            params.append({"w": _arr(m.weight), "b": _arr(m.bias)})
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            layers.append(("bn", m.eps))
            params.append({"g": _arr(m.weight), "b": _arr(m.bias)})
        elif isinstance(m, nn.ReLU):
            layers.append(("relu", None))
            params.append({})
        elif isinstance(m, nn.Softplus) and m.beta == 1:
            layers.append(("softplus", None))
            params.append({})
        elif isinstance(m, nn.SiLU):
            layers.append(("silu", None))
            params.append({})
        elif isinstance(m, nn.GELU) and m.approximate == "none":
            layers.append(("gelu", None))
            params.append({})
        elif isinstance(m, nn.GroupNorm):
            layers.append(("groupnorm", (m.num_groups, m.eps)))
            params.append({"g": _arr(m.weight), "b": _arr(m.bias)})
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            layers.append(("layernorm", m.eps))
            params.append({"g": _arr(m.weight), "b": _arr(m.bias)})
        elif isinstance(m, nn.MaxPool2d):
            layers.append(("maxpool", int(m.kernel_size)))
            params.append({})
        elif isinstance(m, nn.Flatten):
            layers.append(("flatten", None))
            params.append({})
        elif isinstance(m, nn.Dropout):
            layers.append(("dropout", float(m.p)))
            params.append({})
        else:
            raise TypeError(f"no JAX port for {type(m).__name__}")

    def apply(ps, x, key, train_dropout=True):
        a = x
        for (kind, arg), p in zip(layers, ps, strict=True):
            if kind == "linear":
                a = a @ p["w"].T + p["b"]
            elif kind == "conv":
                stride, pad = arg
                a = jax.lax.conv_general_dilated(
                    a, p["w"], stride, [(pad[0], pad[0]), (pad[1], pad[1])],
                    dimension_numbers=("NCHW", "OIHW", "NCHW")) + p["b"][None, :, None, None]
            elif kind == "bn":
                axes = (0,) if a.ndim == 2 else (0, 2, 3)
                shape = (1, -1) + (1,) * (a.ndim - 2)
                mu = a.mean(axes, keepdims=True)
                var = ((a - mu) ** 2).mean(axes, keepdims=True)
                a = (a - mu) * jax.lax.rsqrt(var + arg) * p["g"].reshape(shape) \
                    + p["b"].reshape(shape)
            elif kind == "relu":
                a = jax.nn.relu(a)
            elif kind == "softplus":
                a = jax.nn.softplus(a)
            elif kind == "silu":
                a = jax.nn.silu(a)
            elif kind == "gelu":
                a = jax.nn.gelu(a, approximate=False)
            elif kind == "groupnorm":
                groups, eps = arg
                g = a.reshape(a.shape[0], groups, -1)
                mu = g.mean(2, keepdims=True)
                var = ((g - mu) ** 2).mean(2, keepdims=True)
                shape = (1, -1) + (1,) * (a.ndim - 2)
                a = ((g - mu) * jax.lax.rsqrt(var + eps)).reshape(a.shape) \
                    * p["g"].reshape(shape) + p["b"].reshape(shape)
            elif kind == "layernorm":
                mu = a.mean(-1, keepdims=True)
                var = ((a - mu) ** 2).mean(-1, keepdims=True)
                a = (a - mu) * jax.lax.rsqrt(var + arg) * p["g"] + p["b"]
            elif kind == "maxpool":
                a = jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 1, arg, arg),
                                          (1, 1, arg, arg), "VALID")
            elif kind == "flatten":
                a = a.reshape(a.shape[0], -1)
            elif kind == "dropout" and train_dropout and arg > 0:
                key, sub = jax.random.split(key)
                keep = jax.random.bernoulli(sub, 1.0 - arg, a.shape)
                a = jnp.where(keep, a / (1.0 - arg), 0.0)
        return a

    return params, apply


def make_steps(apply, lam: float, train_dropout: bool = True):
    """(gradreg loss, jit grad of it, jit grad of the plain mean CE) for ``apply``."""

    def per_example_ce(ps, x, y, key):
        z = apply(ps, x, key, train_dropout)
        return -jnp.take_along_axis(jax.nn.log_softmax(z, axis=1), y[:, None], axis=1)[:, 0]

    def loss(ps, x, y, key):
        g = jax.grad(lambda xx: per_example_ce(ps, xx, y, key).sum())(x)
        b = x.shape[0]
        return per_example_ce(ps, x, y, key).mean() + lam * (g ** 2).sum() / b

    def plain(ps, x, y, key):
        return per_example_ce(ps, x, y, key).mean()

    return loss, jax.jit(jax.grad(loss)), jax.jit(jax.grad(plain))


def to_jax(t) -> jnp.ndarray:
    return jnp.asarray(np.ascontiguousarray(t.detach().cpu().numpy()))
