"""JSMA: a naive one-image, all-pairs, full-Jacobian reference; the γ·D bound; chunking."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from attack_models import images, tiny_cnn

from gradreg_kernels.attacks import jsma

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def naive_jsma(model, x, t, theta, gamma):
    """Papernot et al.'s Algorithm 3 read literally: one image, full Jacobian, every pair."""
    model = copy.deepcopy(model).eval()
    shape = x.shape
    xa = x.flatten().clone()
    d = xa.numel()
    domain = {p for p in range(d) if (xa[p] < 1 if theta > 0 else xa[p] > 0)}
    for _ in range(math.floor(gamma * d / 2)):
        logits = model(xa.view(1, *shape))[0]
        if int(logits.argmax()) == t:
            break
        jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, *shape))[0], xa)
        best, pair = -math.inf, None
        for p, q in itertools.combinations(sorted(domain), 2):
            a = float(jac[t, p] + jac[t, q])
            b = float(sum(jac[k, p] + jac[k, q] for k in range(jac.shape[0]) if k != t))
            ok = (a > 0 and b < 0) if theta > 0 else (a < 0 and b > 0)
            if ok and -a * b > best:
                best, pair = -a * b, (p, q)
        if pair is None:
            break
        for f in pair:
            xa[f] = (xa[f] + theta).clamp(0, 1)
            domain.discard(f)
    return xa.view(shape)


@pytest.mark.parametrize("theta", [1.0, -1.0, 0.4])
def test_jsma_matches_naive_reference(theta):
    model = tiny_cnn(side=4, classes=4, seed=2)
    x = images(6, side=4, seed=3)
    t = torch.tensor([0, 1, 2, 3, 1, 2])
    res = jsma(model, x, t, theta=theta, gamma=0.75)
    for n in range(6):
        ref = naive_jsma(model, x[n], int(t[n]), theta, 0.75)
        assert torch.allclose(res.x_adv[n], ref, atol=1e-12, rtol=0), n


@pytest.mark.parametrize("budget", [3, 40, 1 << 22])
def test_chunked_pair_search_gives_the_same_answer(budget):
    model = tiny_cnn(side=5, classes=5, seed=4)
    x = images(9, side=5, seed=5)
    t = torch.arange(9) % 5
    full = jsma(model, x, t, gamma=0.6)
    part = jsma(model, x, t, gamma=0.6, pair_budget=budget)
    assert torch.equal(full.x_adv, part.x_adv)
    assert torch.equal(full.success, part.success) and torch.equal(full.l0, part.l0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma", [0.05, 0.2, 0.5])
def test_jsma_changes_at_most_gamma_d_features_and_reports_truthfully(device, gamma):
    model = tiny_cnn(side=7, classes=5, seed=6, dtype=torch.float32).to(device)
    x = images(15, side=7, seed=7, dtype=torch.float32).to(device) * 0.5
    t = (torch.arange(15) % 5).to(device)
    res = jsma(model, x, t, gamma=gamma)
    d = x[0].numel()
    changed = (res.x_adv != x).flatten(1).sum(1)
    assert torch.equal(changed, res.l0)
    assert int(res.l0.max()) <= gamma * d
    assert bool((res.l0 <= 2 * res.iterations).all())
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    with torch.no_grad():
        pred = model.eval()(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred == t)
    # θ = +1 only ever raises features, to 1
    moved = res.x_adv != x
    assert bool((res.x_adv[moved] == 1).all())


def test_jsma_raises_target_probability_and_mostly_succeeds_with_room():
    model = tiny_cnn(side=6, classes=5, seed=8)
    x = images(20, side=6, seed=9) * 0.3
    with torch.no_grad():
        t = (model.eval()(x).argmax(1) + 1) % 5
        p0 = model(x).softmax(1).gather(1, t[:, None])[:, 0]
    res = jsma(model, x, t, gamma=1.0)
    with torch.no_grad():
        p1 = model(res.x_adv).softmax(1).gather(1, t[:, None])[:, 0]
    assert bool((res.iterations > 0).all())
    assert res.success.float().mean() >= 0.5
    # logit saliency raises Z_t − Σ_{k≠t} Z_k, not p_t itself: p_t must rise where the attack
    # succeeds and on average, but a third class can gain more on a failed example
    assert bool((p1[res.success] > p0[res.success]).all())
    assert p1.mean() > 2 * p0.mean()


def test_jsma_skips_examples_already_at_target_and_restores_mode():
    model = tiny_cnn(side=4, classes=3, seed=10)
    model.train()
    x = images(5, side=4, seed=11)
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    model.train()
    res = jsma(model, x, pred)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(res.x_adv, x) and bool(res.success.all()) and int(res.l0.sum()) == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"theta": 0.0}, "theta must be a non-zero"),
    ({"theta": 2.0}, "theta must be a non-zero"),
    ({"gamma": 1.5}, "gamma"),
    ({"pair_budget": 0}, "pair_budget"),
])
def test_jsma_bad_arguments(kwargs, match):
    model = tiny_cnn(side=4, classes=3)
    with pytest.raises(ValueError, match=match):
        jsma(model, images(2, side=4), torch.tensor([0, 1]), **kwargs)


def test_jsma_bad_target_is_named():
    model = tiny_cnn(side=4, classes=3)
    with pytest.raises(ValueError, match=r"target must lie in \[0, 3\)"):
        jsma(model, images(2, side=4), torch.tensor([0, 3]))
