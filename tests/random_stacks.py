"""Random layer stacks for the property tests: a hypothesis strategy for one layer
(a Conv2d with its kernel, stride, padding and groups, an activation, a norm, a pool and an
eval-mode dropout), the builder that keeps each layer's sizes valid for the running
spatial size, and the test for inputs on which a norm decides on rounding noise."""

from __future__ import annotations

import copy

import torch
from hypothesis import strategies as st
from torch import nn

ACTS = [nn.ReLU, lambda: nn.LeakyReLU(0.2), nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.ELU,
        nn.SiLU, nn.Mish, nn.Hardswish, nn.SELU, nn.Softsign]
NORMS = ["none", "batch", "group", "instance", "layer"]
POOLS = ["none", "max", "avg", "adaptive"]

layer = st.fixed_dictionaries({
    "out": st.integers(1, 5), "k": st.integers(1, 3), "stride": st.integers(1, 2),
    "pad": st.integers(0, 1), "grouped": st.booleans(), "act": st.integers(0, len(ACTS) - 1),
    "norm": st.sampled_from(NORMS), "pool": st.sampled_from(POOLS), "drop": st.booleans()})


def build(layers: list[dict], c_in: int, hw: int, k: int) -> nn.Sequential:
    """The stack, each layer's sizes kept valid for the running spatial size."""
    mods: list[nn.Module] = []
    c = c_in
    for spec in layers:
        groups = c if spec["grouped"] and c > 1 and c <= spec["out"] * c else 1
        out = spec["out"] * groups if groups > 1 else spec["out"]
        ks = min(spec["k"], hw + 2 * spec["pad"])
        mods.append(nn.Conv2d(c, out, ks, stride=spec["stride"], padding=spec["pad"],
                              groups=groups))
        hw = (hw + 2 * spec["pad"] - ks) // spec["stride"] + 1
        c = out
        if spec["norm"] == "batch":
            mods.append(nn.BatchNorm2d(c))
        elif spec["norm"] == "group" and c % 2 == 0:
            mods.append(nn.GroupNorm(2, c))
        elif spec["norm"] == "instance" and hw > 1:
            mods.append(nn.InstanceNorm2d(c, affine=True))
        elif spec["norm"] == "layer":
            mods.append(nn.LayerNorm([c, hw, hw]))
        mods.append(ACTS[spec["act"]]())
        if spec["pool"] == "max" and hw >= 2:
            mods.append(nn.MaxPool2d(2))
            hw //= 2
        elif spec["pool"] == "avg" and hw >= 2:
            mods.append(nn.AvgPool2d(2, ceil_mode=True))
            hw = (hw + 1) // 2
        elif spec["pool"] == "adaptive":
            mods.append(nn.AdaptiveAvgPool2d(max(1, hw // 2)))
            hw = max(1, hw // 2)
        if spec["drop"]:
            mods.append(nn.Dropout(0.3).eval())
    return nn.Sequential(*mods, nn.Flatten(), nn.Linear(c * hw * hw, k))


def degenerate_norm_input(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether a norm sees a (nearly) constant group of values: x̂ is then rounding noise
    amplified by 1/√ε, and a ReLU after it decides on that noise, in the oracle as in any
    float32 path (a tie at the kink, not a property of the schedule)."""
    flat: list[bool] = []

    def hook(m, args):
        a = args[0].double()
        if isinstance(m, nn.BatchNorm2d):
            groups = a.transpose(0, 1).flatten(1)
        elif isinstance(m, nn.GroupNorm):
            groups = a.reshape(a.shape[0] * m.num_groups, -1)
        elif isinstance(m, nn.LayerNorm):
            groups = a.reshape(a.shape[0], -1)
        else:  # InstanceNorm2d
            groups = a.flatten(2).flatten(0, 1)
        scale = groups.abs().amax(1).clamp_min(1e-30)
        flat.append(bool((groups.std(1, unbiased=False) < 1e-4 * scale).any()))

    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
    probe = copy.deepcopy(model)
    hooks = [m.register_forward_pre_hook(hook) for m in probe.modules() if isinstance(m, norms)]
    try:
        with torch.no_grad():
            probe(x)
    except ValueError:
        return False  # torch refuses: checked below
    finally:
        for h in hooks:
            h.remove()
    return any(flat)
