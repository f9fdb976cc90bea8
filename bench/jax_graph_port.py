"""JAX ports of the graph models' ResNet-18 and UNet (tests/graph_models.py), for the jax.jit
peer of the benchmark.

``port_resnet18(model)`` and ``port_unet(model)`` turn the torch model into
``(params, apply)`` like ``jax_port.port``: ``params`` is a flat dict keyed by the torch
parameter names (``"layer1.0.conv1.weight"``), copied from the model, and
``apply(params, x, key, train_dropout=True) → logits`` runs NCHW like torch, with train-mode
batch norm on batch statistics (running statistics are neither used nor updated; neither
model has dropout, so ``key`` and ``train_dropout`` are unused). ``make_steps`` (from
jax_port) gives the package's loss, mean_n CE_n + λ · mean_n ‖∇_{x_n} Σ_m CE_m‖², and its
jitted jax.grad. ``check_port(model, x)`` compares the port's logits (and loss and parameter
gradients) with torch's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from jax_port import make_steps, to_jax
from torch import nn

__all__ = ["check_port", "make_steps", "port_any", "port_resnet18", "port_unet", "to_jax"]

Params = dict[str, jnp.ndarray]
Apply = Callable[..., jnp.ndarray]


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


def _params_of(model: nn.Module) -> Params:
    """Every parameter of ``model`` as a jnp array, keyed by its torch name."""
    return {name: jnp.asarray(p.detach().cpu().numpy()) for name, p in model.named_parameters()}


def _conv_spec(m: nn.Conv2d | nn.ConvTranspose2d) -> tuple:
    """Static (stride, padding, dilation) of a torch convolution; groups must be 1."""
    if m.groups != 1:
        raise TypeError(f"no JAX port for a grouped {type(m).__name__}")
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        raise TypeError(f"no JAX port for padding={m.padding!r}, mode={m.padding_mode!r}")
    spec = (tuple(m.stride), tuple(m.padding), tuple(m.dilation))
    if isinstance(m, nn.ConvTranspose2d):
        spec += (tuple(m.output_padding),)
    return spec


def _conv(ps: Params, name: str, spec: tuple, a: jnp.ndarray) -> jnp.ndarray:
    """torch.nn.Conv2d ``name`` (OIHW weight, optional bias) on NCHW ``a``."""
    stride, pad, dil = spec
    out = jax.lax.conv_general_dilated(
        a, ps[f"{name}.weight"], stride, [(pad[0], pad[0]), (pad[1], pad[1])],
        rhs_dilation=dil, dimension_numbers=("NCHW", "OIHW", "NCHW"))
    bias = ps.get(f"{name}.bias")
    return out if bias is None else out + bias[None, :, None, None]


def _conv_transpose(ps: Params, name: str, spec: tuple, a: jnp.ndarray) -> jnp.ndarray:
    """torch.nn.ConvTranspose2d ``name`` (weight (in, out, kH, kW)) on NCHW ``a``: a
    stride-1 conv of the stride-dilated input with the flipped, transposed kernel."""
    stride, pad, dil, out_pad = spec
    w = ps[f"{name}.weight"]
    k = w.shape[2:]
    w = jnp.flip(w, (2, 3)).transpose(1, 0, 2, 3)
    lo = [dil[i] * (k[i] - 1) - pad[i] for i in range(2)]
    out = jax.lax.conv_general_dilated(
        a, w, (1, 1), [(lo[0], lo[0] + out_pad[0]), (lo[1], lo[1] + out_pad[1])],
        lhs_dilation=stride, rhs_dilation=dil, dimension_numbers=("NCHW", "OIHW", "NCHW"))
    bias = ps.get(f"{name}.bias")
    return out if bias is None else out + bias[None, :, None, None]


def _bn(ps: Params, name: str, eps: float, a: jnp.ndarray) -> jnp.ndarray:
    """Train-mode BatchNorm2d ``name``: batch mean and biased variance over (N, H, W)."""
    mu = a.mean((0, 2, 3), keepdims=True)
    var = ((a - mu) ** 2).mean((0, 2, 3), keepdims=True)
    g = ps[f"{name}.weight"][None, :, None, None]
    b = ps[f"{name}.bias"][None, :, None, None]
    return (a - mu) * jax.lax.rsqrt(var + eps) * g + b


def _bn_eps(m: nn.Module) -> float:
    """The eps of an affine BatchNorm2d (anything else has no port)."""
    if not isinstance(m, nn.BatchNorm2d) or not m.affine:
        raise TypeError(f"no JAX port for {type(m).__name__} as a norm layer")
    return float(m.eps)


def _max_pool2(a: jnp.ndarray) -> jnp.ndarray:
    """F.max_pool2d(a, 2): 2x2 windows, stride 2, the remainder dropped."""
    return jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2),
                                 "VALID")


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch's nearest source index for an output ``size``: min(floor(i · in/out), in − 1),
    in float32 as torch computes it."""
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def _interpolate_nearest(a: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """F.interpolate(a, size=size, mode="nearest") on NCHW ``a`` (shapes are static)."""
    a = jnp.take(a, jnp.asarray(_nearest_index(a.shape[2], size[0])), axis=2)
    return jnp.take(a, jnp.asarray(_nearest_index(a.shape[3], size[1])), axis=3)


def _upsample2(a: jnp.ndarray) -> jnp.ndarray:
    """nn.Upsample(scale_factor=2, mode="nearest"): each pixel repeated 2x2."""
    return jnp.repeat(jnp.repeat(a, 2, axis=2), 2, axis=3)


# --------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------


def port_resnet18(model: nn.Module) -> tuple[Params, Apply]:
    """(params, apply) of a graph_models.ResNet of BasicBlocks (resnet18, resnet_small)."""
    stem = _conv_spec(model.conv1)
    stem_eps = _bn_eps(model.bn1)
    stages: list[list[tuple]] = []
    for i in range(model.num_stages):
        blocks = []
        for j, blk in enumerate(getattr(model, f"layer{i + 1}")):
            if type(blk).__name__ != "BasicBlock":
                raise TypeError(f"no JAX port for a {type(blk).__name__} block")
            down = None
            if blk.downsample is not None:
                conv, bn = blk.downsample
                down = (_conv_spec(conv), _bn_eps(bn))
            blocks.append((f"layer{i + 1}.{j}", _conv_spec(blk.conv1), _bn_eps(blk.bn1),
                           _conv_spec(blk.conv2), _bn_eps(blk.bn2), down))
        stages.append(blocks)

    def apply(ps: Params, x: jnp.ndarray, key: Any = None,
              train_dropout: bool = True) -> jnp.ndarray:
        a = jax.nn.relu(_bn(ps, "bn1", stem_eps, _conv(ps, "conv1", stem, x)))
        for blocks in stages:
            for name, c1, e1, c2, e2, down in blocks:
                out = jax.nn.relu(_bn(ps, f"{name}.bn1", e1, _conv(ps, f"{name}.conv1", c1, a)))
                out = _bn(ps, f"{name}.bn2", e2, _conv(ps, f"{name}.conv2", c2, out))
                if down is not None:
                    dc, de = down
                    a = _bn(ps, f"{name}.downsample.1", de,
                            _conv(ps, f"{name}.downsample.0", dc, a))
                a = jax.nn.relu(out + a)
        a = a.mean((2, 3))
        return a @ ps["fc.weight"].T + ps["fc.bias"]

    return _params_of(model), apply


# --------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------


def _double_conv_spec(m: nn.Module) -> tuple:
    """Static specs of a graph_models.DoubleConv: (conv, BN eps) twice."""
    seq = m.double_conv
    kinds = [type(layer) for layer in seq]
    if kinds != [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2:
        raise TypeError(f"no JAX port for a DoubleConv of {[k.__name__ for k in kinds]}")
    return (_conv_spec(seq[0]), _bn_eps(seq[1]), _conv_spec(seq[3]), _bn_eps(seq[4]))


def _double_conv(ps: Params, name: str, spec: tuple, a: jnp.ndarray) -> jnp.ndarray:
    """graph_models.DoubleConv ``name``: (conv → BN → ReLU) twice."""
    c1, e1, c2, e2 = spec
    p = f"{name}.double_conv"
    a = jax.nn.relu(_bn(ps, f"{p}.1", e1, _conv(ps, f"{p}.0", c1, a)))
    return jax.nn.relu(_bn(ps, f"{p}.4", e2, _conv(ps, f"{p}.3", c2, a)))


def port_unet(model: nn.Module) -> tuple[Params, Apply]:
    """(params, apply) of a graph_models.UNet."""
    if model.up2.mode != "nearest" or model.up2.scale_factor not in (2, 2.0, (2.0, 2.0)):
        raise TypeError("no JAX port for this UNet's up2 (nearest, scale 2 only)")
    specs = {n: _double_conv_spec(getattr(model, n))
             for n in ("inc", "down1", "bottleneck", "dec2", "dec1")}
    up1 = _conv_spec(model.up1)
    outc = _conv_spec(model.outc)

    def apply(ps: Params, x: jnp.ndarray, key: Any = None,
              train_dropout: bool = True) -> jnp.ndarray:
        skip1 = _double_conv(ps, "inc", specs["inc"], x)
        skip2 = _double_conv(ps, "down1", specs["down1"], _max_pool2(skip1))
        a = _double_conv(ps, "bottleneck", specs["bottleneck"], _max_pool2(skip2))
        up = _upsample2(a)
        a = _double_conv(ps, "dec2", specs["dec2"], jnp.concatenate([up, skip2], axis=1))
        up = _conv_transpose(ps, "up1", up1, a)
        up = _interpolate_nearest(up, skip1.shape[2:])
        a = _double_conv(ps, "dec1", specs["dec1"], jnp.concatenate([up, skip1], axis=1))
        return _conv(ps, "outc", outc, a).mean((2, 3))

    return _params_of(model), apply


# --------------------------------------------------------------------------------------
# Check
# --------------------------------------------------------------------------------------

_PORTS: dict[str, Callable[[nn.Module], tuple[Params, Apply]]] = {
    "ResNet": port_resnet18, "UNet": port_unet}


def port_any(model: nn.Module) -> tuple[Params | list, Apply]:
    """The JAX port of any benchmark model: the graph models' ResNet and UNet here, an
    nn.Sequential through ``jax_port.port``."""
    from jax_port import port

    ports = {"ResNet": port_resnet18, "UNet": port_unet}
    return ports.get(type(model).__name__, port)(model)


def check_port(model: nn.Module, x: torch.Tensor, lam: float = 0.1, tol: float = 1e-4,
               port: Callable[[nn.Module], tuple[Params, Apply]] | None = None,
               ) -> dict[str, float]:
    """Compare the JAX port of ``model`` with torch on ``x`` in train mode, float32.

    Returns relative errors (max |difference| / max |torch value|): ``logits``; ``loss``,
    the gradreg loss with weight ``lam`` on labels drawn from a fixed seed; ``grads``, the
    worst over parameters of its gradient. Raises AssertionError when the logits' error is
    ``tol`` or more. ``model`` is copied (its BN running statistics are left as they were);
    ``port`` defaults to the one for the model's class (ResNet or UNet).
    """
    net = copy.deepcopy(model).float().train()
    x = x.detach().float()
    if port is None:
        port = _PORTS[type(model).__name__]
    params, apply = port(net)
    xr = x.clone().requires_grad_(True)
    z = net(xr)
    y = torch.randint(0, z.shape[1], (x.shape[0],), generator=torch.Generator().manual_seed(0))
    ce = F.cross_entropy(z, y, reduction="none")
    (g,) = torch.autograd.grad(ce.sum(), xr, create_graph=True)
    loss = ce.mean() + lam * g.pow(2).sum() / x.shape[0]
    names = [n for n, _ in net.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in net.named_parameters()])

    def rel(a: np.ndarray, b: torch.Tensor) -> float:
        ref = b.detach().double().numpy()
        return float(np.abs(np.asarray(a, dtype=np.float64) - ref).max()
                     / max(np.abs(ref).max(), 1e-30))

    key = jax.random.PRNGKey(0)
    xj, yj = to_jax(x), jnp.asarray(y.numpy())
    with jax.default_matmul_precision("highest"):
        zj = jax.jit(apply)(params, xj, key)
        loss_fn, grad_fn, _ = make_steps(apply, lam)
        lj = jax.jit(loss_fn)(params, xj, yj, key)
        gj = grad_fn(params, xj, yj, key)
    errors = {
        "logits": rel(zj, z),
        "loss": rel(lj, loss),
        "grads": max(rel(gj[n], gr) for n, gr in zip(names, grads, strict=True)),
    }
    assert errors["logits"] < tol, f"JAX port logits differ from torch's: {errors}"
    return errors


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import graph_models as gmods

    gen = torch.Generator().manual_seed(0)
    cases = [
        ("resnet_small", gmods.tiny("resnet_small"), (6, 3, 9, 9)),
        ("resnet18", gmods.tiny("resnet18"), (4, 2, 11, 11)),
        ("resnet18 32x32 w8", gmods.resnet18(num_classes=10, width=8), (4, 3, 32, 32)),
        ("unet", gmods.tiny("unet"), (6, 3, 9, 13)),
        ("unet 32x32 w4", gmods.UNet(num_classes=10, width=4), (4, 3, 32, 32)),
    ]
    for label, m, shape in cases:
        errs = check_port(m, torch.randn(*shape, generator=gen))
        print(f"{label:20s} " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))
