"""gradreg_loss keeps a model's plan while the model is unchanged (plan.plan_of), and builds
it again after any change that decides which rules run: the result must always match the
float64 oracle, and an unsupported change must be refused."""

from __future__ import annotations

import copy
import gc
import weakref
from collections import OrderedDict

import pytest
import torch
from oracle_check import check_against_oracle
from torch import nn

from gradreg_kernels import FallbackWarning, UnsupportedModelError, gradreg_loss
from gradreg_kernels import plan as plan_mod
from gradreg_kernels.activation_math import spec_by_name
from gradreg_kernels.nn import convert


def _cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.Tanh(),
                         nn.Linear(5, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(6, 2, 7, 6, generator=g), torch.randint(0, 3, (6,), generator=g)


@pytest.fixture
def builds(monkeypatch):
    """The number of times a plan is built from scratch."""
    count = [0]
    real = plan_mod.build_plan

    def counting(model):
        count[0] += 1
        return real(model)

    monkeypatch.setattr(plan_mod, "build_plan", counting)
    return count


def test_plan_is_built_once_for_an_unchanged_model(builds):
    torch.manual_seed(0)
    model = _cnn()
    x, y = _batch()
    for _ in range(3):
        check_against_oracle(model, x, y)
    assert builds[0] == 1
    assert plan_mod.plan_of(model) is plan_mod.plan_of(model)


def _replace_activation(m):
    m[6] = nn.Sigmoid()


def _append_layer(m):
    m.append(nn.Softplus())
    m.append(nn.Linear(3, 3))


def _eval_mode(m):
    m.eval()


def _bn_without_running_stats(m):
    m.eval()  # eval mode with no running statistics uses the batch's: the train-mode rule
    m[1].running_mean = m[1].running_var = None


def _swap_nested(m):
    m[5] = nn.Sequential(nn.Linear(4 * 3 * 3, 5), nn.Identity())


@pytest.mark.parametrize("change", [_replace_activation, _append_layer, _eval_mode,
                                    _bn_without_running_stats, _swap_nested])
def test_a_change_to_the_model_rebuilds_its_plan(builds, change):
    torch.manual_seed(0)
    model = _cnn()
    x, y = _batch()
    check_against_oracle(model, x, y)
    before = plan_mod.plan_of(model)
    change(model)
    check_against_oracle(model, x, y)
    assert plan_mod.plan_of(model) is not before
    assert builds[0] == 2


def _forward_hook(m):
    m[2].register_forward_hook(lambda *args: None)


def _circular_padding(m):
    m[0].padding_mode = "circular"


def _pool_indices(m):
    m[3].return_indices = True


def _backward_hook(m):
    m[5].register_full_backward_hook(lambda *args: None)


def _patched_forward(m):
    m[6].forward = lambda x: 2 * torch.tanh(x)  # as instrumentation libraries patch modules


@pytest.mark.parametrize("change,why", [(_forward_hook, "forward hooks"),
                                        (_backward_hook, "backward hooks"),
                                        (_patched_forward, "replaced on the instance"),
                                        (_circular_padding, "circular"),
                                        (_pool_indices, "return_indices")])
def test_a_change_that_cannot_run_fused_is_refused(change, why):
    torch.manual_seed(0)
    model = _cnn()
    x, y = _batch()
    gradreg_loss(model, x, y, 0.5, strict=True).loss.backward()
    change(model)
    with pytest.raises(UnsupportedModelError, match=why):
        gradreg_loss(model, x, y, 0.5, strict=True)


def test_parameters_read_when_the_rules_are_made(builds):
    """An activation's parameters and a drop-in layer's fused activation are not part of the
    cached plan: changing them takes effect at the next step without a rebuild."""
    torch.manual_seed(0)
    model = _cnn()
    x, y = _batch()
    check_against_oracle(model, x, y)
    model[2].negative_slope = 0.3
    check_against_oracle(model, x, y)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(84, 6), nn.Linear(6, 3))
    dropin = convert(copy.deepcopy(plain))
    check_against_oracle(dropin, x, y, plain=plain)
    dropin[1].act = spec_by_name("tanh")  # a fused activation, as convert sets it
    with_tanh = nn.Sequential(OrderedDict(  # the same parameter names
        [("0", plain[0]), ("1", plain[1]), ("tanh", nn.Tanh()), ("2", plain[2])]))
    out = check_against_oracle(dropin, x, y, plain=with_tanh)
    assert out.backend == "torch"
    assert builds[0] == 2  # one build per model


def test_a_cached_plan_does_not_keep_the_model_alive():
    model = _cnn()
    x, y = _batch()
    gradreg_loss(model, x, y, 0.5).loss.backward()
    layer = nn.Sequential(nn.Flatten(), nn.Linear(84, 3))[1]  # a model that is one layer
    gradreg_loss(layer, x.flatten(1), y, 0.5).loss.backward()
    refs = [weakref.ref(model), weakref.ref(layer)]
    del model, layer
    gc.collect()
    assert all(r() is None for r in refs)


def test_global_module_hooks_send_every_model_to_autograd():
    """A hook registered for every module's call would not run in the fused step: while one
    is registered the model falls back, and runs fused again once it is removed."""
    torch.manual_seed(0)
    model = _cnn()
    x, y = _batch()
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(UnsupportedModelError, match="every module"):
            gradreg_loss(model, x, y, 0.5, strict=True)
        with pytest.warns(FallbackWarning):
            out = gradreg_loss(model, x, y, 0.5)
        assert out.backend == "autograd" and calls
    finally:
        handle.remove()
    assert check_against_oracle(model, x, y).backend == "torch"


def test_a_model_that_falls_back_never_resolves_a_backend(monkeypatch):
    """The fallback needs no fused backend: resolving one (building the C++ extension on
    first use) would cost a model that never runs fused a compile."""
    import gradreg_kernels.loss as loss_mod

    def refuse(*args):
        raise AssertionError("a backend was resolved for a model that falls back")

    monkeypatch.setattr(loss_mod, "get_backend", refuse)
    model = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1))
    with pytest.warns(FallbackWarning):
        out = gradreg_loss(model, torch.randn(5, 4), torch.randint(0, 3, (5,)), 0.5)
    assert out.backend == "autograd"
