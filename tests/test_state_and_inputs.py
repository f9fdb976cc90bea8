"""Model state after a step, the gradient at the input, RNG use, and the fallback path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from oracle_check import check_matches_autograd, rel_err
from torch import nn

from gradreg_kernels import FallbackWarning, UnsupportedModelError, gradreg_loss
from reference import oracle_loss


def small_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Softplus(), nn.Dropout(0.3),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()


def test_parameters_untouched_and_buffers_like_a_forward():
    model = small_cnn()
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    torch.manual_seed(2)
    gradreg_loss(model, x, y, 1.0).loss.backward()
    torch.manual_seed(2)
    ref(x)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    for (n, b), b_ref in zip(model.named_buffers(), ref.buffers()):
        assert torch.allclose(b, b_ref, rtol=1e-12, atol=1e-14), n
    assert int(model[1].num_batches_tracked) == 1
    # the generator advanced exactly as a plain forward advances it
    torch.manual_seed(2)
    gradreg_loss(copy.deepcopy(ref), x, y, 1.0)
    after_fused = torch.rand(3)
    torch.manual_seed(2)
    ref(x)
    assert torch.equal(after_fused, torch.rand(3))


def test_input_gradient_when_x_requires_grad():
    model = small_cnn().eval()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (4,))
    mask = torch.rand(1, 2, 6, 6, dtype=torch.float64)
    gradreg_loss(model, x, y, 2.5, mask=mask, head="logprob_sum").loss.backward()
    x2 = x.detach().clone().requires_grad_(True)
    loss, *_ = _oracle_loss_with_x(model, x2, y, mask)
    (gx,) = torch.autograd.grad(loss, x2)
    assert rel_err(x.grad, gx) < 1e-10


def _oracle_loss_with_x(model, x, y, mask):
    z = model(x)
    logp = torch.log_softmax(z, 1)
    ce = -logp.gather(1, y[:, None]).squeeze(1)
    (g,) = torch.autograd.grad(-logp.mean(1).sum(), x, create_graph=True)
    return ce.mean() + 2.5 * ((g * mask) ** 2).flatten(1).sum(1).mean(), None


def test_grad_output_scaling():
    model = small_cnn().eval()
    x, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    (3.5 * gradreg_loss(model, x, y, 1.0).loss).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    gradreg_loss(model, x, y, 1.0).loss.backward()
    for a, p in zip(g1, model.parameters()):
        assert rel_err(a, 3.5 * p.grad) < 1e-12


@pytest.mark.parametrize("keep_saved", [False, True])
def test_pass3_seed_scales_g_in_place_unless_kept(keep_saved):
    """r = (2λ/B) g · go reuses g's buffer (no second g-sized tensor at the start of pass 3),
    except under keep_saved, where g must survive for a second backward."""
    model = small_cnn()
    x, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    out = gradreg_loss(model, x, y, 1.0, backend="torch", keep_saved=keep_saved)
    runner = out.loss.grad_fn.runner
    g = runner.g.clone()
    ptr = runner.g.data_ptr()
    r = runner._tangent_seed(torch.tensor(3.5, dtype=torch.float64), x.shape[0])
    assert rel_err(r, g * (3.5 * 2.0 / x.shape[0])) < 1e-15
    assert (r.data_ptr() == ptr) != keep_saved
    assert (runner.g is None) != keep_saved


def test_combines_with_other_losses_in_one_graph():
    model = small_cnn().eval()
    x, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    extra = sum(p.pow(2).sum() for p in model.parameters())
    (gradreg_loss(model, x, y, 1.0).loss + 0.1 * extra).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref, *_ = oracle_loss(model, x, y, 1.0)
    (ref + 0.1 * sum(p.pow(2).sum() for p in model.parameters())).backward()
    for a, p in zip(grads, model.parameters()):
        assert rel_err(a, p.grad) < 1e-10


class Sine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(torch.sin(x))


def test_unsupported_module_falls_back_once_and_matches():
    """A node without a rule: one warning naming the node, the function and the line of the
    forward it came from; the fallback's gradients are autograd's."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), Sine()).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    with pytest.warns(FallbackWarning, match=r"node 'sin' \(torch\.sin\).*"
                      r"test_state_and_inputs\.py:\d+: return self\.lin\(torch\.sin\(x\)\)"):
        out = gradreg_loss(model, x, y, 0.9)
    assert out.backend == "autograd"
    check_matches_autograd(model, x, y, 0.9, out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradreg_loss(model, x, y, 0.9)  # warned once already


def test_strict_raises_naming_the_module():
    model = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.Softmin(dim=1)), nn.Linear(5, 2))
    with pytest.raises(UnsupportedModelError, match=r"'1\.0' \(Softmin\)"):
        gradreg_loss(model, torch.randn(2, 4), torch.tensor([0, 1]), 1.0, strict=True)


def test_forward_hooks_are_not_silently_skipped():
    model = nn.Sequential(nn.Linear(4, 2))
    model[0].register_forward_hook(lambda *a: None)
    with pytest.raises(UnsupportedModelError, match="hooks"):
        gradreg_loss(model, torch.randn(2, 4), torch.tensor([0, 1]), 1.0, strict=True)


def test_sequential_subclass_with_own_forward_runs_its_forward():
    """Its forward is traced, not Sequential's: the ×3 is in the fused step."""
    class Scaled(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 3

    torch.manual_seed(0)
    model = Scaled(nn.Linear(4, 2)).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 1])
    out = gradreg_loss(model, x, y, 1.0, strict=True)
    out.loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref, *_ = oracle_loss(model, x, y, 1.0)
    ref.backward()
    assert out.backend != "autograd"
    for a, p in zip(got, model.parameters()):
        assert rel_err(a, p.grad) < 1e-12


def test_loss_parts_under_no_grad_for_logging():
    model = small_cnn().eval()
    x, y = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (3,))
    with torch.no_grad():
        out = gradreg_loss(model, x, y, 1.5)
    assert not out.loss.requires_grad
    _, ce, pen, _ = oracle_loss(model, x, y, 1.5)
    assert rel_err(out.ce, ce.detach()) < 1e-12 and rel_err(out.penalty, pen.detach()) < 1e-12


def test_torch_compiled_model_runs_as_the_module_it_wraps():
    """torch.compile(model) refuses double backward; gradreg_loss plans (or, for an
    unsupported model, differentiates twice) the wrapped module instead. Nothing is compiled:
    the fused step never calls forward."""
    torch.manual_seed(0)
    model = small_cnn()
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    ref = copy.deepcopy(model)
    torch.manual_seed(3)
    out = gradreg_loss(torch.compile(model), x, y, 0.7)
    out.loss.backward()
    assert out.backend != "autograd"
    torch.manual_seed(3)
    gradreg_loss(ref, x, y, 0.7).loss.backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-12

    class Unsupported(nn.Module):  # no fused rule: the fallback runs the eager module
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3).double()

        def forward(self, t):
            return self.lin(torch.sin(t))

    net = Unsupported()
    with pytest.warns(FallbackWarning):
        out = gradreg_loss(torch.compile(net), torch.randn(4, 5, dtype=torch.float64),
                           torch.randint(0, 3, (4,)), 0.7)
    out.loss.backward()
    assert out.backend == "autograd" and net.lin.weight.grad is not None


def _leaf_rules(rule) -> list:
    """The leaf rules under a rule (its sub-rules, recursively, for the composite ones)."""
    from gradreg_kernels.rules.residual import SequenceRule

    if isinstance(rule, SequenceRule):
        return [leaf for sub in rule.rules for leaf in _leaf_rules(sub)]
    return [rule]


@pytest.mark.parametrize("keep_saved", [False, True])
@pytest.mark.parametrize("model_name", ["mlp", "converted_mlp", "resnet"])
def test_pass4_releases_each_rule_once_its_step_is_done(monkeypatch, model_name, keep_saved):
    """When a rule's pass-4 step starts, every rule whose step is done is gone (with all it
    saved), unless keep_saved: nothing (a loop variable, a composite rule) holds one on."""
    import weakref

    from gradreg_kernels import schedule
    from gradreg_kernels.nn import cifar_resnet, convert

    torch.manual_seed(0)
    if model_name == "resnet":
        model, x = cifar_resnet(1, 4), torch.randn(2, 3, 32, 32)
    else:
        model, x = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(),
                                 nn.Linear(5, 3)), torch.randn(4, 6)
        if model_name == "converted_mlp":
            model = convert(model)
    y = torch.randint(0, 3, (x.shape[0],))
    done: list[weakref.ref] = []
    alive_at_start: list[int] = []

    def watch(rule) -> None:
        ref, step = weakref.ref(rule), type(rule).backward

        def backward(abar, need_input_grad=True):
            alive_at_start.append(sum(d() is not None for d in done))
            out = step(ref(), abar, need_input_grad)
            done.append(ref)
            return out

        rule.backward = backward  # holds the rule only weakly

    forward = schedule.Schedule.forward

    def forward_watching(self, x):  # the rules are made in pass 1
        z = forward(self, x)
        for rule in self.rules:
            if rule is not None:
                for leaf in _leaf_rules(rule):
                    watch(leaf)
        return z

    monkeypatch.setattr(schedule.Schedule, "forward", forward_watching)
    gradreg_loss(model, x, y, 1.0, backend="torch", keep_saved=keep_saved).loss.backward()
    assert len(alive_at_start) > 4
    if keep_saved:
        assert alive_at_start == list(range(len(alive_at_start)))
    else:
        assert alive_at_start == [0] * len(alive_at_start)
