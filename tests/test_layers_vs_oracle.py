"""Every supported layer kind, every head, with and without a mask, against the oracle."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle_check import check_against_oracle, randomize_bn
from torch import nn

from gradreg_kernels import FallbackWarning, UnsupportedModelError, gradreg_loss
from reference import oracle_grads

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.13),
    "softplus": lambda: nn.Softplus(beta=1.7, threshold=3.0),
    "tanh": lambda: nn.Tanh(),
    "sigmoid": lambda: nn.Sigmoid(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "elu": lambda: nn.ELU(alpha=0.8),
    "silu": lambda: nn.SiLU(),
    "relu6": lambda: nn.ReLU6(),
    "hardtanh": lambda: nn.Hardtanh(-0.4, 0.9),
    "hardswish": lambda: nn.Hardswish(),
    "mish": lambda: nn.Mish(),
    "selu": lambda: nn.SELU(),
    "logsigmoid": lambda: nn.LogSigmoid(),
    "softsign": lambda: nn.Softsign(),
    "tanhshrink": lambda: nn.Tanhshrink(),
}


def mlp(act: str, widths=(7, 13, 11, 5)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_activation_mlp(act, dtype):
    x = torch.randn(9, 7)
    y = torch.randint(0, 5, (9,))
    check_against_oracle(mlp(act), x, y, dtype=dtype)


class _ExactCELU(nn.Module):
    """CELU written out: torch's own double backward rounds 1/α to float32 (1.7e-8 off at
    α = 0.7), which a float64 comparison would charge to the fused path."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        neg = self.alpha * torch.expm1(torch.clamp(x, max=0) / self.alpha)
        return torch.where(x > 0, x, neg)


class _ExactHardsigmoid(nn.Module):
    """Hardsigmoid written out (torch's has no double backward at all)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (nn.functional.hardtanh(x, -3.0, 3.0) + 3.0) / 6.0


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act,exact", [(lambda: nn.CELU(0.7), lambda: _ExactCELU(0.7)),
                                       (nn.Hardsigmoid, _ExactHardsigmoid)],
                         ids=["celu", "hardsigmoid"])
def test_activation_against_a_written_out_oracle(act, exact, dtype, backend):
    """The fused step on CELU / Hardsigmoid against the oracle of the same network with the
    activation written in plain torch ops (same weights)."""
    if backend == "cpu" and dtype != torch.float32:
        pytest.skip("the cpu backend's kernels are float32")
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(7, 13), act(), nn.Linear(13, 11), act(), nn.Linear(11, 5))
    model.to(dtype)
    ref = nn.Sequential(*[exact() if type(m) is not nn.Linear else m for m in model])
    ref = copy.deepcopy(ref).double()
    x = torch.randn(9, 7, dtype=dtype) * 3  # reach both sides of the kinks at ±3
    y = torch.randint(0, 5, (9,))
    out = gradreg_loss(model, x, y, 0.7, backend=backend, strict=True)
    out.loss.backward()
    grads, loss, _, _ = oracle_grads(ref, x.double(), y, 0.7)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert abs(float(out.loss.detach()) - float(loss)) <= tol * abs(float(loss))
    for name, p in model.named_parameters():
        err = (p.grad.double() - grads[name]).norm() / grads[name].norm()
        assert err < tol, (name, float(err))


@pytest.mark.parametrize("head", ["ce", "logprob_sum", "output"])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_heads_masks_batches(head, with_mask, batch):
    widths = (7, 13, 11, 1 if head == "output" else 5)
    x = torch.randn(batch, 7)
    y = None if head == "output" else torch.randint(0, 5, (batch,))
    mask = (torch.rand(1, 7) > 0.3).double() if with_mask else None
    check_against_oracle(mlp("softplus", widths), x, y, head=head, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), stride=2, padding=(1, 0)),
        dict(kernel_size=3, dilation=2, padding=2, bias=False),
        dict(kernel_size=5, padding="same"),
        dict(kernel_size=3, padding="valid", stride=(1, 2)),
        dict(kernel_size=3, padding=1, groups=2),
    ],
    ids=["pad1", "stride2-rect", "dilated-nobias", "same", "valid", "groups"],
)
def test_conv2d(conv, dtype):
    model = nn.Sequential(nn.Conv2d(4, 6, **conv), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(3, 4, 9, 10)
    model(x)  # materialize the lazy layer
    check_against_oracle(model, x, torch.randint(0, 3, (3,)), dtype=dtype)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=4, stride=2, bias=False),
        dict(kernel_size=3, dilation=2, padding="same"),
        dict(kernel_size=3, padding="valid", groups=2),
    ],
    ids=["pad1", "stride2-nobias", "dilated-same", "groups"],
)
def test_conv1d(conv, backend):
    """Conv1d (a sequence model's layer) with BatchNorm1d over (N, C, L) and a Dropout1d."""
    dtype = torch.float32 if backend == "cpu" else torch.float64
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv1d(4, 6, **conv), nn.BatchNorm1d(6), nn.GELU(),
                          nn.Conv1d(6, 5, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(5, 4, 17)
    model(x)  # materialize the lazy layer
    randomize_bn(model)
    out = check_against_oracle(model, x, torch.randint(0, 3, (5,)), dtype=dtype,
                               backend=backend)
    assert out.backend == backend


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "pool",
    [
        lambda: nn.MaxPool1d(2),
        lambda: nn.MaxPool1d(3, stride=2, padding=1, dilation=2, ceil_mode=True),
        lambda: nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
        lambda: nn.AdaptiveAvgPool1d(4),
        lambda: nn.AdaptiveAvgPool1d(1),
    ],
    ids=["max2", "max3-dilated-ceil", "avg3-pad-ceil", "adaptive4", "adaptive1"],
)
def test_pooling_1d(pool, backend):
    dtype = torch.float32 if backend == "cpu" else torch.float64
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), nn.Softplus(), pool(), nn.Flatten(),
                          nn.LazyLinear(4))
    x = torch.randn(4, 3, 15)
    model(x)
    out = check_against_oracle(model, x, torch.randint(0, 4, (4,)), dtype=dtype,
                               backend=backend)
    assert out.backend == backend


def test_conv1d_needs_a_batched_input():
    model = nn.Sequential(nn.Flatten(0, 0), nn.Conv1d(4, 2, 3), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"Conv1d runs fused on batched inputs"):
        gradreg_loss(model, torch.randn(2, 4, 3, 1), torch.randint(0, 2, (2,)), 0.5)


@pytest.mark.parametrize(
    "pool",
    [
        lambda: nn.MaxPool2d(2),
        lambda: nn.MaxPool2d(3, stride=2, padding=1),
        lambda: nn.MaxPool2d(3, stride=1, dilation=2, ceil_mode=True),
        lambda: nn.AvgPool2d(2),
        lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
        lambda: nn.AvgPool2d(2, divisor_override=3),
        lambda: nn.AdaptiveAvgPool2d(1),
        lambda: nn.AdaptiveAvgPool2d((4, 2)),  # windows of uneven size that overlap (11 → 4)
        lambda: nn.AdaptiveAvgPool2d((None, 5)),
    ],
    ids=["max2", "max3-overlap", "max-dilated-ceil", "avg2", "avg3-pad-ceil", "avg-divisor",
         "adaptive1", "adaptive4x2", "adaptive-none-5"],
)
def test_pooling(pool):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Softplus(), pool(), nn.Flatten(),
                          nn.LazyLinear(4))
    x = torch.randn(3, 2, 11, 9)
    model(x)
    check_against_oracle(model, x, torch.randint(0, 4, (3,)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm2d(train, affine, dtype):
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, affine=affine), nn.Tanh(),
                          nn.Flatten(), nn.Linear(5 * 5 * 5, 4))
    randomize_bn(model)
    model.train(train)
    x = torch.randn(3, 3, 7, 7)
    check_against_oracle(model, x, torch.randint(0, 4, (3,)), dtype=dtype)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm1d(train, momentum):
    model = nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9, momentum=momentum), nn.GELU(),
                          nn.Linear(9, 4))
    randomize_bn(model)
    model.train(train)
    check_against_oracle(model, torch.randn(5, 6), torch.randint(0, 4, (5,)))


def test_batchnorm_without_running_stats():
    model = nn.Sequential(nn.Linear(6, 9), nn.BatchNorm1d(9, track_running_stats=False),
                          nn.ReLU(), nn.Linear(9, 4)).eval()
    check_against_oracle(model, torch.randn(5, 6), torch.randint(0, 4, (5,)))


def test_batchnorm1d_sequence_input():
    model = nn.Sequential(nn.Identity(), nn.BatchNorm1d(3),
                          nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4, 2))
    check_against_oracle(model, torch.randn(5, 3, 4), torch.randint(0, 2, (5,)))


def _randomize_affine(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm | nn.LayerNorm | nn.modules.instancenorm._InstanceNorm):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups,affine", [(1, True), (2, True), (3, False), (6, True)],
                         ids=["layer-like", "two", "three-noaffine", "instance-like"])
def test_group_norm(groups, affine, dtype, backend):
    if backend == "cpu" and dtype != torch.float32:
        pytest.skip("the cpu backend's kernels are float32")
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(groups, 6, affine=affine),
                          nn.SiLU(), nn.Flatten(), nn.Linear(6 * 5 * 7, 4))
    _randomize_affine(model)
    x = torch.randn(4, 3, 5, 7)
    check_against_oracle(model, x, torch.randint(0, 4, (4,)), dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,affine,bias", [((9,), True, True), ((4, 9), True, False),
                                               ((9,), False, False)],
                         ids=["last", "last-two-nobias", "noaffine"])
def test_layer_norm(shape, affine, bias, dtype, backend):
    if backend == "cpu" and dtype != torch.float32:
        pytest.skip("the cpu backend's kernels are float32")
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(9, 9), nn.LayerNorm(shape, elementwise_affine=affine,
                                                        bias=bias),
                          nn.GELU(), nn.Flatten(), nn.Linear(4 * 9, 3))
    _randomize_affine(model)
    x = torch.randn(5, 4, 9)  # a sequence of 4 tokens per sample: Linear runs on the last dim
    check_against_oracle(model, x, torch.randint(0, 3, (5,)), dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm(affine, backend):
    """InstanceNorm2d (a GAN critic's norm) and InstanceNorm1d, instance statistics only."""
    dtype = torch.float32 if backend == "cpu" else torch.float64
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.InstanceNorm2d(5, affine=affine),
                          nn.LeakyReLU(0.2), nn.Flatten(2), nn.InstanceNorm1d(5, affine=affine),
                          nn.Tanh(), nn.Flatten(), nn.Linear(5 * 5 * 4, 3))
    _randomize_affine(model)
    x = torch.randn(4, 3, 7, 6)
    check_against_oracle(model, x, torch.randint(0, 3, (4,)), dtype=dtype, backend=backend)


def test_instance_norm_with_running_stats_falls_back():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.InstanceNorm2d(5, track_running_stats=True),
                          nn.Flatten(), nn.Linear(5 * 5 * 4, 3))
    with pytest.raises(UnsupportedModelError, match="track_running_stats"):
        gradreg_loss(model, torch.randn(4, 3, 7, 6), torch.randint(0, 3, (4,)), 0.5,
                     strict=True)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_prelu(per_channel, backend):
    """PReLU's learnable slope (one, or one per channel), its gradient from both the backward
    and the tangent pass; the slopes start away from torch's 0.25 and one is negative."""
    dtype = torch.float32 if backend == "cpu" else torch.float64
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.PReLU(4 if per_channel else 1), nn.Flatten(),
                          nn.Linear(4 * 4 * 5, 6), nn.PReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight.uniform_(-0.3, 0.6)
        model[4].weight.fill_(-0.2)
    check_against_oracle(model, torch.randn(5, 2, 6, 7), torch.randint(0, 3, (5,)),
                         dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_norm_affine_with_zero_and_negative_gamma(backend):
    """A zero-initialized γ entry (the residual trick) keeps the affine's own δ; negative
    entries take the path through the normalization's δ' = γ δ."""
    dtype = torch.float32 if backend == "cpu" else torch.float64
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.Tanh(),
                          nn.Flatten(2), nn.LayerNorm(35), nn.Softplus(), nn.Flatten(),
                          nn.Linear(6 * 35, 4))
    _randomize_affine(model)
    with torch.no_grad():
        model[1].weight[2] = 0.0  # GroupNorm: d kept
        model[4].weight.uniform_(-1.5, -0.5)  # LayerNorm: all negative, divided
    check_against_oracle(model, torch.randn(4, 3, 5, 7), torch.randint(0, 4, (4,)), dtype=dtype,
                         backend=backend)


def test_layer_norm_rejects_a_mismatched_input():
    model = nn.Sequential(nn.LayerNorm(5), nn.Flatten(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"LayerNorm over \[5\]"):
        gradreg_loss(model, torch.randn(3, 4), torch.randint(0, 2, (3,)), 0.5)


@pytest.mark.parametrize("train", [True, False])
def test_dropout_mask_reused(train):
    model = nn.Sequential(nn.Linear(8, 16), nn.Softplus(), nn.Dropout(0.4), nn.Linear(16, 3))
    model.train(train)
    check_against_oracle(model, torch.randn(6, 8), torch.randint(0, 3, (6,)), seed=7)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_feature_dropout_mask_reused(train, backend):
    """Dropout2d and Dropout1d zero whole channels, drawn as torch draws them (same seed, same
    mask in the fused step and in the oracle's forward)."""
    dtype = torch.float32 if backend == "cpu" else torch.float64
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Softplus(), nn.Dropout2d(0.4), nn.Flatten(2),
                          nn.Linear(20, 6), nn.GELU(), nn.Dropout1d(0.3), nn.Flatten(),
                          nn.Linear(30, 3))
    model.train(train)
    out = check_against_oracle(model, torch.randn(6, 2, 6, 7), torch.randint(0, 3, (6,)),
                               seed=5, dtype=dtype, backend=backend)
    assert out.backend == backend


def test_feature_dropout_needs_a_batched_input():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout2d(0.5), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises(ValueError, match=r"Dropout2d runs fused on batched inputs of 4"):
        gradreg_loss(model, torch.randn(2, 3, 4), torch.randint(0, 2, (2,)), 0.5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_unflatten_and_constant_padding(backend):
    """Unflatten back to an image, zero padding, a constant pad that also crops (negative
    amounts), a 1-D pad on a sequence."""
    dtype = torch.float32 if backend == "cpu" else torch.float64
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(12, 2 * 4 * 5), nn.Tanh(), nn.Unflatten(1, (2, 4, 5)),
                          nn.ZeroPad2d((1, 2, 0, 1)), nn.Conv2d(2, 3, 3), nn.Softplus(),
                          nn.ConstantPad2d((-1, 1, 2, -1), 0.3), nn.Flatten(2),
                          nn.ConstantPad1d(2, -0.5), nn.GELU(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(5, 12)
    model(x)
    out = check_against_oracle(model, x, torch.randint(0, 4, (5,)), dtype=dtype,
                               backend=backend)
    assert out.backend == backend


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_conv2d_padding_modes_and_index_pads(mode, backend):
    """Conv2d with padding_mode reflect / replicate (also 'same' with an even kernel, whose
    padding is asymmetric), and the ReflectionPad / ReplicationPad modules in 1-D and 2-D."""
    dtype = torch.float32 if backend == "cpu" else torch.float64
    pad2d = nn.ReflectionPad2d if mode == "reflect" else nn.ReplicationPad2d
    pad1d = nn.ReflectionPad1d if mode == "reflect" else nn.ReplicationPad1d
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode=mode), nn.Softplus(),
                          nn.Conv2d(4, 3, 2, padding="same", padding_mode=mode), nn.Tanh(),
                          pad2d((2, 1, 1, 0)), nn.Conv2d(3, 3, 3, stride=2), nn.GELU(),
                          nn.Flatten(2), pad1d(2), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(4, 2, 7, 6)
    model(x)
    out = check_against_oracle(model, x, torch.randint(0, 4, (4,)), dtype=dtype,
                               backend=backend)
    assert out.backend == backend


def test_non_contiguous_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    x = torch.randn(7, 7, 3, 5).permute(3, 2, 0, 1)  # (5, 3, 7, 7), not contiguous
    assert not x.is_contiguous()
    check_against_oracle(model, x, torch.randint(0, 3, (5,)))


def test_value_weight_zero_is_penalty_alone():
    x = torch.randn(4, 7)
    check_against_oracle(mlp("tanh", (7, 9, 1)), x, None, head="output", value_weight=0.0)


def test_lam_zero_is_ordinary_gradient():
    check_against_oracle(mlp("relu"), torch.randn(5, 7), torch.randint(0, 5, (5,)), lam=0.0)


def test_frozen_parameters_get_no_gradient():
    model = mlp("tanh").double()
    model[0].weight.requires_grad_(False)
    out = check_against_oracle(model, torch.randn(4, 7), torch.randint(0, 5, (4,)))
    assert model[0].weight.grad is None
    assert out.backend == "torch"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_module_placed_twice_runs_twice_and_sums_its_gradients(backend):
    """Shared weights: a Linear, a Conv2d and a BatchNorm each placed at two slots of the
    Sequential run at both (as Sequential.forward runs them), and each parameter's gradient
    is the sum of both places' terms; so does one activation module reused after several
    layers, as models are often written."""
    dtype = torch.float32 if backend == "cpu" else torch.float64
    torch.manual_seed(4)
    conv, bn, lin = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(6, 6)
    act = nn.Tanh()
    model = nn.Sequential(conv, bn, act, conv, bn, nn.ELU(), nn.Flatten(2), lin, act, lin,
                          act, nn.Flatten(), nn.Linear(3 * 6, 4))
    x = torch.randn(5, 3, 2, 3)
    check_against_oracle(model, x, torch.randint(0, 4, (5,)), dtype=dtype, backend=backend)


class _ScaledTanh(nn.Tanh):
    """A user's activation that derives from a supported one but computes something else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * torch.tanh(x)


class _NamedTanh(nn.Tanh):
    """A subclass that only adds to the class: it computes what nn.Tanh computes."""

    label = "mine"


def test_an_activation_subclass_with_its_own_forward_falls_back():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), _ScaledTanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    model = model.double()
    with pytest.warns(FallbackWarning, match="its own forward"):
        out = gradreg_loss(model, x, y, 0.7)
    assert out.backend == "autograd"
    with pytest.raises(UnsupportedModelError, match="its own forward"):
        gradreg_loss(model, x, y, 0.7, strict=True)
    out.loss.backward()
    ref, *_ = oracle_grads(copy.deepcopy(model), x, y, 0.7, "ce", None, 1.0)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[name], rtol=1e-10, atol=1e-12)
    named = nn.Sequential(nn.Linear(4, 5), _NamedTanh(), nn.Linear(5, 3))
    assert check_against_oracle(named, x, y).backend == "torch"
