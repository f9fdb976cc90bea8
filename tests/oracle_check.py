"""Oracle comparison helpers: every fast path is checked against the float64 oracle."""

from __future__ import annotations

import copy

import torch
from torch import nn

from gradreg_kernels import gradreg_loss
from reference import oracle_grads, oracle_loss

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
FLOOR = {torch.float64: 1e-3, torch.float32: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """‖a − b‖ / max(‖b‖, floor), computed in float64; NaN never passes."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-300))


def randomize_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)


def check_against_oracle(model, x, y, *, lam=0.7, head="ce", mask=None, dtype=torch.float64,
                         seed=0, backend="torch", value_weight=1.0, plain=None, tol=None,
                         **head_options):
    """Run the fused path in ``dtype`` and the oracle in float64 on upcast copies; compare.

    ``plain``: the torch model the oracle runs instead of a copy of ``model`` (for a model
    converted to the package's drop-ins: the oracle shares no code with the package).
    ``tol``: the relative tolerance instead of TOL[dtype] (random tiny models whose norms
    see a handful of values amplify rounding). ``head_options``: gradreg_loss's data,
    label_smoothing and class_weight, given to the oracle too (floating targets y and the
    class weights in each side's dtype).

    Returns the fused output. Every parameter's gradient must be within TOL[dtype] relative
    of the oracle's, relative to max(‖ref_p‖, FLOOR[dtype] · max_p ‖ref_p‖): a gradient that
    is exactly zero in theory (a bias right before train-mode BatchNorm) is pure rounding
    noise on both sides, so it is judged on the scale of the model's gradient. Loss parts
    and running statistics likewise.
    """
    model = model.to(dtype)
    ref_model = copy.deepcopy(model if plain is None else plain).double()
    x = x.to(dtype)
    mask64 = None if mask is None else mask.double()
    mask_t = None if mask is None else mask.to(dtype)
    for p in model.parameters():
        p.grad = None
    def cast(v, dt):
        return v.to(dt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    torch.manual_seed(seed)
    out = gradreg_loss(model, x, cast(y, dtype), lam, head=head, mask=mask_t, backend=backend,
                       value_weight=value_weight,
                       **{k: cast(v, dtype) for k, v in head_options.items()})
    out.loss.backward()
    torch.manual_seed(seed)
    ref, loss, ce, pen = oracle_grads(ref_model, x.double(), cast(y, torch.float64), lam, head,
                                      mask64, value_weight,
                                      **{k: cast(v, torch.float64)
                                         for k, v in head_options.items()})
    tol = TOL[dtype] if tol is None else tol
    assert out.backend != "autograd"
    assert rel_err(out.loss.detach(), loss) < tol
    assert rel_err(out.ce, ce) < tol
    assert rel_err(out.penalty, pen, 1e-12) < tol
    scale = max(float(g.norm()) for g in ref.values())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None
            continue
        err = rel_err(p.grad, ref[name], FLOOR[dtype] * scale)
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"
    for b1, b2 in zip(model.buffers(), ref_model.buffers()):
        assert rel_err(b1, b2.to(b1.dtype), 1e-12) < tol, "running statistics differ"
    return out


def check_matches_autograd(model, x, y, lam, out, head="ce") -> None:
    """The gradients ``out.loss.backward()`` left in ``model`` equal the oracle's on the same
    model and inputs (for the autograd fallback: same dtype, 1e-12)."""
    out.loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref, *_ = oracle_loss(model, x, y, lam, head)
    ref.backward()
    for a, p in zip(got, model.parameters()):
        assert rel_err(a, p.grad) < 1e-12
