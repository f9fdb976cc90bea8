"""FGSM, TGSM, PGD and the black-box random search: known properties and naive references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from attack_models import images, tiny_cnn

from gradreg_kernels.attacks import (
    fgsm,
    iterated_tgsm,
    margin_loss,
    next_class_target,
    pgd,
    random_search,
    tgsm,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def naive_grad(model, x, label):
    """Per-example input gradient of CE, one example at a time, eval-mode copy."""
    model = tiny_copy_eval(model)
    rows = []
    for n in range(x.shape[0]):
        xn = x[n:n + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(model(xn), label[n:n + 1])
        rows.append(torch.autograd.grad(loss, xn)[0])
    return torch.cat(rows)


def tiny_copy_eval(model):
    import copy
    m = copy.deepcopy(model)
    m.eval()
    return m


@pytest.mark.parametrize("device", DEVICES)
def test_fgsm_is_exactly_eps_sign_of_the_per_example_gradient(device):
    model = tiny_cnn().to(device)
    # dyadic pixels and ε: x ± ε is exact, so the step must be exactly ε·sign(g)
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(0, 257, (7, 1, 6, 6), generator=g).double() / 256).to(device)
    y = torch.randint(0, 5, (7,), generator=g).to(device)
    eps = 0.125
    adv = fgsm(model, x, y, eps)
    ref = (x + eps * naive_grad(model, x, y).sign()).clamp(0, 1)
    assert torch.equal(adv, ref)
    interior = (x >= eps) & (x <= 1 - eps)
    step = (adv - x)[interior].abs()
    assert torch.equal(step, torch.full_like(step, eps))
    assert adv.min() >= 0 and adv.max() <= 1


def test_fgsm_targeted_and_tgsm_step_against_target_gradient():
    model = tiny_cnn()
    x = images(9)
    y = torch.arange(9) % 5
    t = next_class_target(y, 5)
    assert torch.equal(t, (y + 1) % 5)
    adv = tgsm(model, x, y, 0.2)
    ref = (x - 0.2 * naive_grad(model, x, t).sign()).clamp(0, 1)
    assert torch.allclose(adv, ref, atol=1e-12, rtol=0)
    assert torch.equal(adv, fgsm(model, x, y, 0.2, target=t))


def test_targeted_attacks_raise_target_probability():
    model = tiny_cnn(seed=4)
    x = images(11, lo=0.1, hi=0.9, seed=5)
    y = torch.arange(11) % 5
    with torch.no_grad():
        t = (model.eval()(x).argmax(1) + 2) % 5  # not reached yet (PGD stops at the goal)
        p0 = model(x).softmax(1).gather(1, t[:, None])[:, 0]
    for adv in (fgsm(model, x, y, 1e-3, target=t), tgsm(model, x, y, 1e-3, target=t),
                pgd(model, x, y, 1e-3, steps=3, target=t, random_start=False),
                iterated_tgsm(model, x, t, step=1e-3, steps=2, stop_at_target=False)):
        with torch.no_grad():
            p1 = model(adv).softmax(1).gather(1, t[:, None])[:, 0]
        assert bool((p1 > p0).all()), (p1 - p0)


def test_fgsm_untargeted_lowers_true_probability():
    model = tiny_cnn(seed=6)
    x = images(10, lo=0.1, hi=0.9, seed=7)
    y = torch.arange(10) % 5
    with torch.no_grad():
        p0 = model.eval()(x).softmax(1).gather(1, y[:, None])[:, 0]
        p1 = model(fgsm(model, x, y, 1e-3)).softmax(1).gather(1, y[:, None])[:, 0]
    assert bool((p1 < p0).all())


def test_model_mode_restored_and_parameter_grads_untouched():
    model = tiny_cnn()
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    x, y = images(5), torch.arange(5)
    a1 = fgsm(model, x, y, 0.1)
    a2 = fgsm(model, x, y, 0.1)  # dropout off during the attack: deterministic
    assert torch.equal(a1, a2)
    pgd(model, x, y, 0.1, steps=2)
    iterated_tgsm(model, x, (y + 1) % 5, steps=2)
    random_search(model, x, y, 0.1, queries=3)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


def naive_pgd(model, x, y, eps, steps, alpha):
    """One example at a time, no random start: first misclassified iterate, else the last."""
    model = tiny_copy_eval(model)
    out = []
    for n in range(x.shape[0]):
        x0, xa = x[n:n + 1], x[n:n + 1].clone()
        found = None
        for i in range(steps + 1):
            if model(xa).argmax(1).item() != y[n].item():
                found = xa
                break
            if i == steps:
                break
            g = naive_grad(model, xa, y[n:n + 1])
            xa = torch.min(torch.max(xa + alpha * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)
        out.append(found if found is not None else xa)
    return torch.cat(out)


def test_pgd_matches_naive_reference_without_random_start():
    model = tiny_cnn(seed=8)
    x, y = images(13, seed=9), torch.arange(13) % 5
    adv = pgd(model, x, y, 0.15, steps=7, step_size=0.04, random_start=False)
    ref = naive_pgd(model, x, y, 0.15, 7, 0.04)
    assert torch.allclose(adv, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_stays_in_eps_ball_and_unit_box(device, loss):
    model = tiny_cnn(seed=10).to(device)
    x, y = images(17, seed=11).to(device), (torch.arange(17) % 5).to(device)
    eps = 0.07
    gen = torch.Generator().manual_seed(0)
    adv = pgd(model, x, y, eps, steps=5, restarts=2, loss=loss, generator=gen)
    assert (adv - x).abs().max() <= eps + 1e-12
    assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)


def naive_cosine_pgd(model, x, y, eps, steps, alpha0):
    """One example at a time, no random start, α_i = α0·½(1 + cos(π i/steps))."""
    import math

    model = tiny_copy_eval(model)
    out = []
    for n in range(x.shape[0]):
        x0, xa = x[n:n + 1], x[n:n + 1].clone()
        for i in range(steps + 1):
            if model(xa).argmax(1).item() != y[n].item() or i == steps:
                break
            a = alpha0 * 0.5 * (1 + math.cos(math.pi * i / steps))
            g = naive_grad(model, xa, y[n:n + 1])
            xa = torch.min(torch.max(xa + a * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)
        out.append(xa)
    return torch.cat(out)


def test_pgd_cosine_schedule_matches_naive_reference():
    model = tiny_cnn(seed=8)
    x = images(13, seed=9)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)  # correctly classified: most need several steps
    adv = pgd(model, x, y, 0.15, steps=7, step_size=0.03, random_start=False,
              schedule="cosine")
    ref = naive_cosine_pgd(model, x, y, 0.15, 7, 0.03)
    assert torch.allclose(adv, ref, atol=1e-12, rtol=0)
    assert not torch.allclose(adv, pgd(model, x, y, 0.15, steps=7, step_size=0.03,
                                       random_start=False))


def test_pgd_restarts_only_add_successes_and_search_the_survivors():
    model = tiny_cnn(seed=12)
    x = images(64, seed=13)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    eps = 0.3  # tiny steps: success rests on the random start, which restarts redraw

    def fooled(restarts):
        adv = pgd(model, x, y, eps, steps=1, step_size=1e-3, restarts=restarts,
                  generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return model(adv).argmax(1) != y

    one, many = fooled(1), fooled(6)
    assert bool((one <= many).all())  # the first start is the same; restarts add only
    assert int(many.sum()) > int(one.sum()) and not bool(many.all())


def test_pgd_is_at_least_as_strong_as_fgsm_here():
    model = tiny_cnn(seed=12)
    x, y = images(64, seed=13), torch.arange(64) % 5
    with torch.no_grad():
        model.eval()
        y = model(x).argmax(1)  # start from correctly classified points
        acc_f = (model(fgsm(model, x, y, 0.05)).argmax(1) == y).float().mean()
        acc_p = (model(pgd(model, x, y, 0.05, steps=20)).argmax(1) == y).float().mean()
    assert acc_p <= acc_f
    assert acc_p < 1


def test_pgd_margin_loss_sees_through_saturated_softmax():
    """Scaling logits by 1e4 makes float32 CE gradients vanish; the margin loss still works."""
    model = tiny_cnn(seed=14, dtype=torch.float32)
    scaled = torch.nn.Sequential(model, ScaleBy(1e4))
    x = images(32, seed=15, dtype=torch.float32)
    with torch.no_grad():
        y = scaled.eval()(x).argmax(1)
    ce_adv = pgd(scaled, x, y, 0.2, steps=10, random_start=False)
    margin_adv = pgd(scaled, x, y, 0.2, steps=10, random_start=False, loss="margin")
    with torch.no_grad():
        acc_ce = (scaled(ce_adv).argmax(1) == y).float().mean()
        acc_margin = (scaled(margin_adv).argmax(1) == y).float().mean()
    assert acc_margin < acc_ce


class ScaleBy(torch.nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, z):
        return z * self.c


def test_iterated_tgsm_stops_at_target_and_respects_eps():
    model = tiny_cnn(seed=16)
    x, y = images(20, seed=17), torch.arange(20) % 5
    t = next_class_target(y, 5)
    adv = iterated_tgsm(model, x, t, step=0.05, steps=30)
    with torch.no_grad():
        pred = model.eval()(adv).argmax(1)
    assert (pred == t).float().mean() > 0.8
    capped = iterated_tgsm(model, x, t, step=0.05, steps=30, eps=0.1)
    assert (capped - x).abs().max() <= 0.1 + 1e-12
    assert capped.min() >= 0 and capped.max() <= 1


def test_random_search_stays_in_ball_raises_margin_and_queries_only_outputs():
    torch.manual_seed(18)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 5)).double()
    x = images(24, seed=19)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    adv = random_search(model, x, y, 0.2, queries=60, generator=torch.Generator().manual_seed(1))
    assert (adv - x).abs().max() <= 0.2 + 1e-12 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        fooled = (model(adv).argmax(1) != y).float().mean()
        m0, m1 = margin_loss(model(x), y), margin_loss(model(adv), y)
    assert fooled > 0
    assert m1.mean() > m0.mean()


@pytest.mark.parametrize("call, match", [
    (lambda m, x, y: fgsm(m, x * 2, y, 0.1), r"\[0, 1\]"),
    (lambda m, x, y: fgsm(m, x, y, -0.1), "eps must be finite and >= 0"),
    (lambda m, x, y: fgsm(m, x, y[:2], 0.1), "y must have shape"),
    (lambda m, x, y: fgsm(m, x, y.double(), 0.1), "integer tensor"),
    (lambda m, x, y: fgsm(m, x, y + 7, 0.1), r"y must lie in \[0, 5\)"),
    (lambda m, x, y: tgsm(m, x, y, 0.1, target=y + 9), r"target must lie in \[0, 5\)"),
    (lambda m, x, y: pgd(m, x, y, 0.1, steps=0), "steps must be a positive int"),
    (lambda m, x, y: pgd(m, x, y, 0.1, loss="hinge"), "loss must be 'ce' or 'margin'"),
    (lambda m, x, y: pgd(m, x, y, 0.1, schedule="linear"),
     "schedule must be 'constant' or 'cosine'"),
    (lambda m, x, y: fgsm(m, x.long(), y, 0.1), "floating-point"),
    (lambda m, x, y: fgsm(m, x.float(), y, 0.1), "float64 but x is torch.float32"),
])
def test_bad_inputs_get_named_errors(call, match):
    model = tiny_cnn()
    x, y = images(4), torch.arange(4)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(model, x, y)
