"""The experiment models: shapes, the paper CNN's layers, and that gradreg_loss runs them fused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradreg_kernels import gradreg_loss
from gradreg_kernels.models import MODEL_NAMES, make_model
from reference import oracle_grads


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (1, 8, 8), (3, 9, 7)])
def test_models_run_fused_with_the_right_shapes(name, in_shape):
    torch.manual_seed(0)
    model = make_model(name, in_shape, 10, width=24)
    assert type(model) is nn.Sequential
    x, y = torch.rand(5, *in_shape), torch.randint(0, 10, (5,))
    out = gradreg_loss(model, x, y, lam=3.0, strict=True)
    assert out.backend != "autograd"
    assert out.logits.shape == (5, 10)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_paper_cnn_layers():
    model = make_model("paper-cnn", (1, 28, 28), 10)
    kinds = [type(m).__name__ for m in model.modules() if not isinstance(m, nn.Sequential)]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
                     "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten",
                     "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (32, (5, 5), (2, 2)), (64, (5, 5), (2, 2))]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(3136, 1024), (1024, 10)]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5]
    small = make_model("paper-cnn", (1, 8, 8), 10)
    assert [m for m in small.modules() if isinstance(m, nn.Linear)][0].in_features == 256


@pytest.mark.parametrize("name", ["paper-cnn", "lenet"])
def test_fused_matches_oracle_in_float64(name):
    """Train mode (BN on batch statistics, dropout): fused gradients equal plain autograd."""
    torch.manual_seed(1)
    model = make_model(name, (1, 9, 11), 10, width=13).double()
    x, y = torch.rand(6, 1, 9, 11, dtype=torch.float64), torch.randint(0, 10, (6,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    out = gradreg_loss(model, x, y, lam=2.5, strict=True)
    out.loss.backward()
    model.load_state_dict(state)         # undo the running-statistics update
    torch.manual_seed(7)                 # the same dropout mask
    ref, ref_loss, _, _ = oracle_grads(model, x, y, lam=2.5)
    assert abs(float(out.loss.detach()) - float(ref_loss)) <= 1e-12 * abs(float(ref_loss))
    # conv biases before train-mode BN have a zero gradient: measure against the whole scale
    scale = torch.sqrt(sum(g.pow(2).sum() for g in ref.values()))
    for n, p in model.named_parameters():
        err = (p.grad - ref[n]).norm() / scale
        assert err < 1e-12, (n, float(err))


def test_bad_model_requests():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        make_model("resnet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match="at least 4×4"):
        make_model("lenet", (1, 3, 3), 10)
    with pytest.raises(ValueError, match="in_shape must be"):
        make_model("mlp", (28, 28), 10)
    with pytest.raises(ValueError, match="width must be >= 1"):
        make_model("mlp", (1, 8, 8), 10, width=0)
