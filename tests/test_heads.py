"""Heads beyond softmax cross-entropy: the named heads "mse" and "bce", cross-entropy with
label smoothing, class weights and probability targets, user callables head(z, y) -> (B,)
and a separate data term (``data=``), each against the float64 oracle (which computes them
with torch.nn.functional, sharing no code with the package) on the C++ ``cpu`` backend in
float32 and the portable one in float64, the penalty's own gradient included
(value_weight=0); and the errors a wrong head gets."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from oracle_check import check_against_oracle
from torch import nn

from gradreg_kernels import gradreg_loss

B, D, K = 7, 6, 5


def _mlp(act=nn.Tanh) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 9), act(), nn.Linear(9, 8), act(), nn.Linear(8, K))


def _cnn() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, K))


def _x(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if isinstance(model[0], nn.Conv2d):
        return torch.randn(B, 2, 6, 6, generator=g)
    return torch.randn(B, D, generator=g)


def _targets(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "labels":
        return torch.randint(0, K, (B,), generator=g)
    if kind == "probs":
        return torch.softmax(torch.randn(B, K, generator=g), dim=1)
    if kind == "real":
        return torch.randn(B, K, generator=g)
    return torch.rand(B, K, generator=g)  # "unit": multi-label targets in [0, 1]


def huber(z, y):
    return F.huber_loss(z, y, reduction="none", delta=0.5).mean(1)


def mse(z, y):
    return ((z - y) ** 2).mean(1)


def bce(z, y):
    return F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(1)


def smoothed_ce(z, y):
    return F.cross_entropy(z, y, label_smoothing=0.2, reduction="none")


def soft_kl(z, q):
    """The distillation student's loss: KL(q ‖ softmax z) per example."""
    return F.kl_div(F.log_softmax(z, dim=1), q, reduction="none").sum(1)


#: (id, head, targets, options): every named head and option, and callables
CASES = [
    ("mse", "mse", "real", {}),
    ("bce", "bce", "unit", {}),
    ("ce-smoothing", "ce", "labels", {"label_smoothing": 0.15}),
    ("ce-weight", "ce", "labels", {"class_weight": torch.tensor([0.5, 2.0, 1.0, 0.1, 3.0])}),
    ("ce-probs", "ce", "probs", {}),
    ("ce-all", "ce", "probs", {"label_smoothing": 0.1,
                               "class_weight": torch.tensor([1.5, 0.2, 1.0, 2.0, 0.7])}),
    ("logprob_sum-smoothing", "logprob_sum", "labels", {"label_smoothing": 0.3}),
    ("callable-mse", mse, "real", {}),
    ("callable-huber", huber, "real", {}),
    ("callable-bce", bce, "unit", {}),
    ("callable-smoothed-ce", smoothed_ce, "labels", {}),
    ("callable-soft-kl", soft_kl, "probs", {}),
    ("callable-kl-with-ce-data", soft_kl, "probs", {"data": "ce"}),
    ("mse-with-callable-data", "mse", "real", {"data": huber}),
]


@pytest.mark.parametrize("value_weight", [1.0, 0.0])
@pytest.mark.parametrize("backend,dtype", [("cpu", torch.float32), ("torch", torch.float64)])
@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name,head,targets,options", CASES, ids=[c[0] for c in CASES])
def test_head_matches_the_oracle(name, head, targets, options, make, backend, dtype,
                                 value_weight):
    model = make().train()
    y = _targets(targets)
    # λ so that the penalty is a visible share of the total
    out = check_against_oracle(model, _x(model), y, lam=3.0, head=head, dtype=dtype,
                               backend=backend, value_weight=value_weight, **options)
    assert out.backend == backend


@pytest.mark.parametrize("name,head,targets,options", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_head_in_the_autograd_fallback_matches_the_oracle(name, head, targets, options):
    """A model that falls back (a layer without a rule) takes the same heads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Hardshrink(), nn.Linear(8, K))
    y = _targets(targets)
    x = _x(_mlp())
    with warnings.catch_warnings():  # the FallbackWarning, once per model type
        warnings.simplefilter("ignore")
        out = gradreg_loss(model, x, y, 2.0, head=head, **options)
    assert out.backend == "autograd"
    out.loss.backward()
    from reference import oracle_grads
    ref, loss, *_ = oracle_grads(model, x, y, 2.0, head, **options)
    assert torch.allclose(out.loss.detach(), loss, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6)


def test_mask_with_a_named_head_penalises_the_masked_gradient():
    """"Right for the right reasons" with a regression head: the mask selects the inputs."""
    model = _mlp()
    mask = (torch.arange(D) % 2).float().expand(B, D)
    check_against_oracle(model, _x(model), _targets("real"), lam=2.0, head="mse", mask=mask,
                         dtype=torch.float64)


def test_a_head_whose_hessian_is_zero_runs_without_pass_three_terms():
    """A head linear in z (a weighted score) has H = 0: hvp is None and the result is the
    oracle's."""
    w = torch.linspace(-1, 1, K)

    def score(z, y):
        return z @ w.to(z.dtype)

    check_against_oracle(_mlp(), _x(_mlp()), None, lam=1.5, head=score, dtype=torch.float64)


# ---- errors --------------------------------------------------------------------------

class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z.pow(3).sum(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return 3 * z.pow(2) * g[:, None]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("head,y,error,match", [
    (lambda z, y: F.mse_loss(z, y), _targets("real"), ValueError,
     r"must return per-example losses of shape \(B,\) = \(7,\), got \(\)"),
    (lambda z, y: ((z - z.mean(0)) ** 2).sum(1), None, ValueError, "is not per-example"),
    (lambda z, y: _OnceDifferentiable.apply(z), None, ValueError,
     "is not twice differentiable"),
    (lambda z, y: 3.0, None, TypeError, "must return a tensor of per-example losses"),
    (lambda z, y: torch.ones(z.shape[0]), None, ValueError, "do not depend on the logits"),
    ("mse", _targets("real")[:, :3], ValueError, "needs targets y of the logits' shape"),
    ("bce", _targets("labels"), TypeError, "needs floating-point targets y"),
    ("mse", None, ValueError, "needs targets y"),
    ("nope", None, ValueError, "head must be one of"),
])
def test_a_wrong_head_gets_a_named_error(head, y, error, match, backend):
    model = _mlp()
    with pytest.raises(error, match=match):
        out = gradreg_loss(model, _x(model), y, 1.0, head=head, backend=backend)
        out.loss.backward()


@pytest.mark.parametrize("options,match", [
    ({"label_smoothing": 1.5}, r"label_smoothing must lie in \[0, 1\]"),
    ({"label_smoothing": 0.1, "head": "mse"}, "apply to head 'ce' or 'logprob_sum'"),
    ({"class_weight": torch.ones(K, 2)}, "class_weight must be a 1-D floating-point tensor"),
    ({"class_weight": torch.ones(3)}, "class_weight has 3 weights"),
])
def test_wrong_cross_entropy_options_get_a_named_error(options, match):
    model = _mlp()
    options = dict(options)
    head = options.pop("head", "ce")
    y = _targets("real" if head == "mse" else "labels")
    with pytest.raises(ValueError, match=match):
        gradreg_loss(model, _x(model), y, 1.0, head=head, **options)


def test_probability_targets_must_match_the_logits():
    model = _mlp()
    with pytest.raises(ValueError, match="probability targets y of the logits' shape"):
        gradreg_loss(model, _x(model), _targets("probs")[:, :3], 1.0, head="ce")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_heads_run_in_float32_under_autocast(backend):
    """Under CPU autocast to bf16 the head runs in float32 (torch's policy for losses): the
    data term is float32 and the gradient is near the float64 oracle's."""
    from reference import oracle_grads
    model = _mlp(nn.ReLU)
    x, y = _x(model), _targets("real")
    for head in ("mse", mse):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gradreg_loss(model, x, y, 1.0, head=head, backend=backend)
        assert out.ce.dtype == torch.float32
        out.loss.backward()
        ref, *_ = oracle_grads(_mlp(nn.ReLU).double(), x.double(), y.double(), 1.0, "mse")
        for n, p in model.named_parameters():
            err = (p.grad.double() - ref[n]).norm() / ref[n].norm()
            assert err < 0.1, (head, n, float(err))
