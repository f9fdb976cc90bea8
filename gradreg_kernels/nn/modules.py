"""Drop-in modules: torch.nn's Linear, Conv2d, BatchNorm1d/2d, MaxPool2d and activations,
running the twice-differentiable Functions of ``gradreg_kernels.functional``.

Each class subclasses its torch.nn counterpart, so constructor arguments, parameters,
buffers and state_dict keys are identical; only ``forward`` changes. Linear and Conv2d
take an optional fused activation (``act``: an ActivationSpec, set by ``convert`` when an
activation module follows them). ``backend`` ("auto" by default) picks the kernels.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as GF
from ..activation_math import ActivationSpec, activation_spec
from ..registry import register_alias
from ..rules.conv import conv_padding


class DropIn:
    """Mixin of the drop-in modules: the backend name and, for products, a fused activation."""

    backend: str = "auto"
    act: ActivationSpec | None = None

    def set_dropin(self, backend: str = "auto", act: ActivationSpec | None = None) -> None:
        self.backend, self.act = backend, act

    @staticmethod
    def _graph_view(p: Tensor | None) -> Tensor | None:
        """A view of a parameter, so the backward can ask the engine whether its gradient
        is wanted (under autograd.grad(out, x) it is not, and its product is skipped)."""
        return None if p is None else p.view_as(p)

    def _act_repr(self) -> str:
        if self.act is None:
            return ""
        params = ", ".join(f"{v:g}" for v in self.act.params)
        return f", act={self.act.name}" + (f"({params})" if params else "")


class Linear(DropIn, nn.Linear):
    """nn.Linear, optionally with a fused activation: y = σ(x Wᵀ + b)."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self._graph_view(self.weight), self._graph_view(self.bias)
        return GF.linear_act(x, w, b, self.act, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._act_repr()


class Conv2d(DropIn, nn.Conv2d):
    """nn.Conv2d, optionally with a fused activation: y = σ(W ⋆ x + b).

    Zero padding (symmetric) runs the drop-in Functions; other padding modes and 'same'
    padding that needs asymmetric pads run torch's own convolution.
    """

    def forward(self, x: Tensor) -> Tensor:
        pad = conv_padding(self) if self.padding_mode == "zeros" else None
        w, b = self._graph_view(self.weight), self._graph_view(self.bias)
        if pad is None:
            z = self._conv_forward(x, self.weight, self.bias)
            return z if self.act is None else GF.bias_act(z, None, self.act,
                                                          backend=self.backend)
        return GF.conv2d_act(x, w, b, self.stride, pad, self.dilation, self.groups, self.act,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._act_repr()


class _BatchNorm(DropIn):
    """nn.BatchNorm's forward (momentum / cumulative average, batch or running statistics)
    on the drop-in batch_norm Function."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return GF.batch_norm(x, self.running_mean if keep else None,
                             self.running_var if keep else None,
                             self._graph_view(self.weight), self._graph_view(self.bias),
                             batch_stats, factor, self.eps, backend=self.backend)


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """nn.BatchNorm1d on the drop-in batch_norm."""


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """nn.BatchNorm2d on the drop-in batch_norm."""


class MaxPool2d(DropIn, nn.MaxPool2d):
    """nn.MaxPool2d on the drop-in max_pool2d (return_indices=True runs torch's own)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices:
            return super().forward(x)
        return GF.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                             self.ceil_mode, backend=self.backend)


class _Activation(DropIn):
    """σ(x) through bias_act, the spec read from the module's own hyper-parameters."""

    def forward(self, x: Tensor) -> Tensor:
        return GF.bias_act(x, None, activation_spec(self), backend=self.backend)


class ReLU(_Activation, nn.ReLU):
    """nn.ReLU (``inplace`` is accepted and ignored: the Function keeps its input)."""


class LeakyReLU(_Activation, nn.LeakyReLU):
    """nn.LeakyReLU (``inplace`` accepted and ignored)."""


class Softplus(_Activation, nn.Softplus):
    """nn.Softplus."""


class Tanh(_Activation, nn.Tanh):
    """nn.Tanh."""


class Sigmoid(_Activation, nn.Sigmoid):
    """nn.Sigmoid."""


class GELU(_Activation, nn.GELU):
    """nn.GELU (exact or tanh approximation)."""


class ELU(_Activation, nn.ELU):
    """nn.ELU (``inplace`` accepted and ignored)."""


class SiLU(_Activation, nn.SiLU):
    """nn.SiLU, x · sigmoid(x) (``inplace`` accepted and ignored)."""


class Hardtanh(_Activation, nn.Hardtanh):
    """nn.Hardtanh (``inplace`` accepted and ignored)."""


class ReLU6(_Activation, nn.ReLU6):
    """nn.ReLU6 (``inplace`` accepted and ignored)."""


class Hardsigmoid(_Activation, nn.Hardsigmoid):
    """nn.Hardsigmoid (twice differentiable here; torch's own is not)."""


class Hardswish(_Activation, nn.Hardswish):
    """nn.Hardswish."""


class Mish(_Activation, nn.Mish):
    """nn.Mish, x · tanh(softplus(x))."""


class SELU(_Activation, nn.SELU):
    """nn.SELU."""


class CELU(_Activation, nn.CELU):
    """nn.CELU."""


class LogSigmoid(_Activation, nn.LogSigmoid):
    """nn.LogSigmoid."""


class Softsign(_Activation, nn.Softsign):
    """nn.Softsign."""


class Tanhshrink(_Activation, nn.Tanhshrink):
    """nn.Tanhshrink."""


#: torch.nn class → its drop-in class
DROP_IN_OF: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: Linear, nn.Conv2d: Conv2d, nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d, nn.MaxPool2d: MaxPool2d, nn.ReLU: ReLU,
    nn.LeakyReLU: LeakyReLU, nn.Softplus: Softplus, nn.Tanh: Tanh, nn.Sigmoid: Sigmoid,
    nn.GELU: GELU, nn.ELU: ELU, nn.SiLU: SiLU, nn.Hardtanh: Hardtanh, nn.ReLU6: ReLU6,
    nn.Hardsigmoid: Hardsigmoid, nn.Hardswish: Hardswish, nn.Mish: Mish, nn.SELU: SELU,
    nn.CELU: CELU, nn.LogSigmoid: LogSigmoid, nn.Softsign: Softsign, nn.Tanhshrink: Tanhshrink,
}

for _base, _dropin in DROP_IN_OF.items():  # each drop-in runs fused as the class it repeats
    register_alias(_dropin, _base)
