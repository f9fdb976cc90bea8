"""Residual blocks in the fused schedule: gradreg_loss on a small ResNet (BN in train and
eval mode) and on generic Residual(f, shortcut) blocks matches the float64 oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradreg_kernels import FallbackWarning, UnsupportedModelError, gradreg_loss
from gradreg_kernels.nn import BasicBlock, Residual, cifar_resnet, convert
from reference import oracle_grads, oracle_loss

HEADS = ["ce", "logprob_sum", "output"]


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()


def _check_against_oracle(model, x, y, head, lam=0.7, mask=None, plain=None):
    """The fused step on ``model`` against the oracle on ``plain`` (the torch model a
    converted one came from: the oracle never runs the package's own drop-ins), or on a
    copy of ``model``."""
    ref_model = copy.deepcopy(model if plain is None else plain)
    out = gradreg_loss(model, x, y, lam, head=head, mask=mask, strict=True)
    assert out.backend != "autograd"
    out.loss.backward()
    ref, loss, _, pen = oracle_grads(ref_model, x, y, lam, head=head, mask=mask)
    assert abs(float(out.loss.detach()) - float(loss)) <= 1e-10 * abs(float(loss))
    assert abs(float(out.penalty) - float(pen)) <= 1e-10 * abs(float(pen))
    # ‖ref‖ floored at 1e-6 of the whole gradient: a gradient that is zero in exact
    # arithmetic (a bias before train-mode BN) is rounding noise on both sides
    floor = 1e-6 * float(torch.cat([g.flatten() for g in ref.values()]).norm())
    for name, p in model.named_parameters():
        err = (p.grad - ref[name]).norm() / ref[name].norm().clamp_min(floor)
        assert err < 1e-10, (name, float(err))
    for (name, b), b_ref in zip(model.named_buffers(), ref_model.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("train", [True, False])
def test_small_resnet_fused_matches_oracle(train, head):
    torch.manual_seed(10)
    model = cifar_resnet(1, 3).double()
    _randomize_bn(model)
    model.train(train)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (3,))
    _check_against_oracle(model, x, None if head == "output" else y, head)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_resnet_with_global_adaptive_pooling(backend):
    """A torchvision-style head (AdaptiveAvgPool2d(1), Flatten, Linear) after BasicBlocks at an
    odd input size, float32 on each CPU backend, against the float64 oracle (x.grad too)."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          BasicBlock(6, 6), BasicBlock(6, 8, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    _randomize_bn(model)
    ref_model = copy.deepcopy(model).double()
    x = torch.randn(4, 3, 13, 11, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    out = gradreg_loss(model, x, y, 0.9, backend=backend, strict=True)
    assert out.backend == backend
    out.loss.backward()
    x64 = x.detach().double().requires_grad_(True)
    names, params = zip(*ref_model.named_parameters(), strict=True)
    *ref, ref_x = torch.autograd.grad(oracle_loss(ref_model, x64, y, 0.9)[0], [*params, x64])
    total = float(torch.cat([g.flatten() for g in ref]).norm())
    for (name, p), g in zip(model.named_parameters(), ref, strict=True):
        err = (p.grad.double() - g).norm() / g.norm().clamp_min(1e-3 * total)
        assert err < 1e-4, (name, float(err))
    assert (x.grad.double() - ref_x).norm() / ref_x.norm() < 1e-4


def test_converted_resnet_fused_matches_oracle():
    torch.manual_seed(11)
    plain = cifar_resnet(1, 3).double()
    model = convert(copy.deepcopy(plain))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _check_against_oracle(model, x, torch.randint(0, 10, (2,)), "ce", plain=plain)


@pytest.mark.parametrize("shortcut", ["identity", "linear"])
def test_generic_residual_with_smooth_branches(shortcut):
    """Second-order terms inside both branches (tanh, softplus, train-mode BN) and a mask."""
    torch.manual_seed(12)
    sc = None if shortcut == "identity" else nn.Sequential(nn.Linear(9, 9), nn.Softplus())
    model = nn.Sequential(
        nn.Linear(7, 9), nn.Tanh(),
        Residual(nn.Sequential(nn.Linear(9, 9, bias=False), nn.BatchNorm1d(9), nn.Tanh(),
                               nn.Linear(9, 9)),
                 sc),
        Residual(Residual(nn.Sequential(nn.Linear(9, 9), nn.GELU()))),
        nn.Linear(9, 4)).double()
    x = torch.randn(5, 7, dtype=torch.float64)
    mask = (torch.rand(1, 7) > 0.3).double()
    _check_against_oracle(model, x, torch.randint(0, 4, (5,)), "ce", mask=mask)


def test_residual_and_block_forward():
    torch.manual_seed(13)
    f = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(Residual(f)(x), f(x) + x)
    block = BasicBlock(4, 6, stride=2).eval()
    assert set(block.state_dict()) >= {"conv1.weight", "bn1.running_mean", "conv2.weight",
                                       "downsample.0.weight", "downsample.1.weight"}
    xi = torch.randn(2, 4, 9, 9)
    ref = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(xi)))))
                     + block.downsample(xi))
    torch.testing.assert_close(block(xi), ref)
    assert BasicBlock(4, 4).downsample is None


def test_unsupported_module_inside_a_branch_is_named():
    model = nn.Sequential(nn.Linear(3, 3), Residual(nn.Sequential(nn.Linear(3, 3),
                                                                  nn.Softmax(dim=1))))
    x, y = torch.randn(2, 3), torch.tensor([0, 2])
    with pytest.raises(UnsupportedModelError, match=r"'1\.f\.1' \(Softmax\)"):
        gradreg_loss(model, x, y, 1.0, strict=True)
    with pytest.warns(FallbackWarning, match="Softmax"):
        out = gradreg_loss(model, x, y, 1.0)
    assert out.backend == "autograd"
