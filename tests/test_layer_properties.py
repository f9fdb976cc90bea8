"""Property test of the fused step on random layer stacks: random depth, channels, kernel
sizes, strides, padding, groups, activations, norms, pools and dropout (eval), random batch
sizes and input sizes, heads, masks, λ and value_weight, against the float64 oracle on the
portable backend in float64 and the C++ ``cpu`` backend in float32. An invalid combination
(a norm over single values in training, which torch refuses) must be a clear ValueError,
never a crash, a silent NaN or a result where torch has none. Seeded and bounded
(``max_examples``); ``HYPOTHESIS_PROFILE=long`` runs more."""

from __future__ import annotations

import copy
import os

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from oracle_check import check_against_oracle, rel_err
from torch import nn

from gradreg_kernels import gradreg_loss
from reference import oracle_grads

settings.register_profile("long", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
EXAMPLES = 400 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 30

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


def _degenerate_norm_input(model: nn.Module, x: torch.Tensor) -> bool:
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


def _torch_refuses(model: nn.Module, x: torch.Tensor) -> str | None:
    """torch's own error for this input (a norm over single values in training), if any."""
    try:
        with torch.no_grad():
            copy.deepcopy(model)(x)
    except ValueError as e:
        return str(e)
    return None


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.lists(layer, min_size=1, max_size=3), c_in=st.integers(1, 3),
       hw=st.integers(3, 9), batch=st.integers(1, 4), k=st.integers(1, 4),
       head=st.sampled_from(["ce", "logprob_sum", "output"]), use_mask=st.booleans(),
       lam=st.floats(0.0, 5.0), value_weight=st.sampled_from([0.0, 1.0]),
       seed=st.integers(0, 2**16))
def test_random_layer_stacks_match_the_oracle(layers, c_in, hw, batch, k, head, use_mask, lam,
                                              value_weight, seed):
    k = 1 if head == "output" else max(k, 2)
    torch.manual_seed(seed)
    model = build(layers, c_in, hw, k).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, hw, hw, generator=g)
    y = None if head == "output" else torch.randint(0, k, (batch,), generator=g)
    mask = (torch.rand(x.shape, generator=g) > 0.3).double() if use_mask else None
    assume(not _degenerate_norm_input(model, x))
    refused = _torch_refuses(model, x)
    if refused is not None:  # the fused step refuses too, with a named error
        assert "more than 1" in refused
        for backend in ("torch", "cpu"):
            try:
                gradreg_loss(copy.deepcopy(model), x, y, lam, head=head, mask=mask,
                             backend=backend)
            except ValueError as e:
                assert "more than 1" in str(e), str(e)
            else:
                raise AssertionError(f"ran where torch refuses: {refused}")
        return
    # tolerances for tiny random stacks (norms over a handful of values amplify rounding);
    # a wrong term is off by far more
    check_against_oracle(copy.deepcopy(model), x, y, lam=lam, head=head, mask=mask,
                         dtype=torch.float64, backend="torch", value_weight=value_weight,
                         tol=1e-8)
    # the C++ kernels in float32: the whole gradient within 1e-2 of the oracle's
    fused = copy.deepcopy(model)
    out = gradreg_loss(fused, x, y, lam, head=head, mask=None if mask is None else mask.float(),
                       backend="cpu", value_weight=value_weight)
    out.loss.backward()
    assert out.backend == "cpu"
    ref, *_ = oracle_grads(copy.deepcopy(model).double(), x.double(), y, lam, head, mask,
                           value_weight)
    got = torch.cat([p.grad.double().flatten() for _, p in fused.named_parameters()])
    want = torch.cat([ref[n].flatten() for n, _ in fused.named_parameters()])
    assert rel_err(got, want, 1e-6) < 1e-2
