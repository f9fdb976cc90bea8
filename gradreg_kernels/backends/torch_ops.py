"""The portable backend: every primitive kernel of the four passes in plain torch ops.

Faster backends subclass ``TorchBackend`` and replace kernels one by one; rules call only
these methods, so a backend never changes the math, only how a step is computed.

Shapes: Linear operands are 2-D, ``a``: (N, in), ``d``: (N, out), ``w``: (out, in).
Convolution operands are NCHW; ``geom`` is (stride, padding, dilation, groups).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rules.activation_math import ActivationSpec

ConvGeom = tuple[tuple[int, int], tuple[int, int], tuple[int, int], int]


class TorchBackend:
    """Reference implementation of the primitive kernels (any device, any float dtype)."""

    name = "torch"

    # ---- products -------------------------------------------------------------------
    def linear(self, a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """a wᵀ + b: (N, in) → (N, out)."""
        return F.linear(a, w, b)

    def linear_input_grad(self, d: Tensor, w: Tensor) -> Tensor:
        """d w: (N, out) → (N, in); the transpose of ``linear`` without bias."""
        return d.mm(w)

    def linear_weight_grad(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Σ_k d_kᵀ a_k over the pairs: (out, in). Two pairs are one doubled-batch product."""
        d0, a0 = pairs[0]
        out = d0.t().mm(a0)
        for d, a in pairs[1:]:
            out.addmm_(d.t(), a)
        return out

    def conv2d(self, a: Tensor, w: Tensor, b: Tensor | None, geom: ConvGeom) -> Tensor:
        """2-D cross-correlation (N, C, H, W) → (N, O, H', W')."""
        stride, padding, dilation, groups = geom
        return F.conv2d(a, w, b, stride, padding, dilation, groups)

    def conv2d_input_grad(
        self, d: Tensor, w: Tensor, input_shape: Sequence[int], geom: ConvGeom
    ) -> Tensor:
        """The transposed convolution: (N, O, H', W') → (N, C, H, W)."""
        stride, padding, dilation, groups = geom
        return torch.ops.aten.convolution_backward(
            d, d.new_empty((1,) * len(input_shape)).expand(input_shape), w, None, stride, padding, dilation,
            False, (0, 0), groups, (True, False, False),
        )[0]

    def conv2d_weight_grad(
        self, pairs: Sequence[tuple[Tensor, Tensor]], w: Tensor, geom: ConvGeom
    ) -> Tensor:
        """Σ_k of the weight gradient of ⟨d_k, conv(a_k, W)⟩: the shape of ``w``."""
        stride, padding, dilation, groups = geom
        out = None
        for d, a in pairs:
            gw = torch.ops.aten.convolution_backward(
                d, a, w, None, stride, padding, dilation, False, (0, 0), groups,
                (False, True, False),
            )[1]
            out = gw if out is None else out.add_(gw)
        return out

    # ---- elementwise activation steps -------------------------------------------------
    def act_forward(self, spec: ActivationSpec, z: Tensor) -> tuple[Tensor, object]:
        """y = σ(z) and what later passes need (here z itself, or a mask for ReLU)."""
        if spec.name == "relu":
            mask = z > 0
            return z * mask, mask
        return spec.value(z), z

    def act_chain(self, spec: ActivationSpec, saved: object, d: Tensor) -> Tensor:
        """σ'(z) ⊙ d."""
        if spec.name == "relu":
            return d * saved
        return spec.d1(saved) * d

    def act_tangent(
        self, spec: ActivationSpec, saved: object, r: Tensor, u: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """(σ'(z) ⊙ r, σ''(z) ⊙ u ⊙ r); the second is None for piecewise-linear σ."""
        if spec.name == "relu":
            return r * saved, None
        z = saved
        s = spec.d2(z) * u * r if spec.smooth else None
        return spec.d1(z) * r, s

    def act_backward(
        self, spec: ActivationSpec, saved: object, abar: Tensor, s: Tensor | None
    ) -> Tensor:
        """σ'(z) ⊙ ā + s."""
        out = self.act_chain(spec, saved, abar)
        return out if s is None else out.add_(s)

    # ---- heads ------------------------------------------------------------------------
    def softmax_ce(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-example CE_n = logsumexp(z_n) − z_{n,y_n} (N,) and p = softmax(z) (N, K)."""
        logp = torch.log_softmax(z, dim=1)
        return -logp.gather(1, y[:, None]).squeeze(1), logp.exp()

    def softmax_head(
        self, z: Tensor, y: Tensor, uniform: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """CE_n (N,), p = softmax(z), ∇CE = p − e_y and ∇ℓ (p − 1/K if uniform, else ∇CE)."""
        ce, p = self.softmax_ce(z, y)
        data_grad = p.clone()
        data_grad[torch.arange(z.shape[0], device=z.device), y] -= 1
        pen_grad = p - 1.0 / z.shape[1] if uniform else data_grad
        return ce, p, data_grad, pen_grad

    def softmax_hvp(self, p: Tensor, t: Tensor) -> Tensor:
        """Hessian of −log softmax times t: p ⊙ t − p (pᵀt), row by row (N, K)."""
        return p * (t - (p * t).sum(1, keepdim=True))

    # ---- dropout ----------------------------------------------------------------------
    def dropout_forward(self, a: Tensor, p: float) -> tuple[Tensor, object]:
        """y = a ⊙ m, m ∈ {0, 1/(1−p)} drawn exactly as torch's dropout draws it; saves m."""
        with torch.no_grad():
            mask = F.dropout(torch.ones_like(a), p, True)
        return a * mask, mask

    def dropout_apply(self, saved: object, t: Tensor) -> Tensor:
        """t ⊙ m with the mask saved by ``dropout_forward``."""
        return t * saved

    # ---- pooling ----------------------------------------------------------------------
    def max_pool2d(
        self, a: Tensor, kernel, stride, padding, dilation, ceil_mode: bool
    ) -> tuple[Tensor, Tensor]:
        """Max pooling and the flat (per plane) index of each maximum."""
        return F.max_pool2d(a, kernel, stride, padding, dilation, ceil_mode, return_indices=True)

    def pool_gather(self, r: Tensor, idx: Tensor) -> Tensor:
        """out[n, c, i] = r[n, c, idx[n, c, i]]: (N, C, H, W) → idx's shape."""
        return r.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)

    def pool_scatter(self, d: Tensor, idx: Tensor, input_shape: Sequence[int]) -> Tensor:
        """The transpose of ``pool_gather``: sums d into the input positions idx points to."""
        n, c = input_shape[0], input_shape[1]
        out = d.new_zeros(n, c, input_shape[2] * input_shape[3])
        out.scatter_add_(2, idx.flatten(2), d.flatten(2))
        return out.view(input_shape)

    # ---- train-mode batch norm (per channel; reduced over every dim but 1) ----------------
    @staticmethod
    def _cmean(t: Tensor) -> Tensor:
        dims = [0] + list(range(2, t.dim()))
        return t.mean(dim=dims, keepdim=True)

    def bn_train_forward(
        self, a: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """y = γ x̂ + β with x̂ = (a − μ)/σ, σ = √(var + eps) over the batch.

        Returns y, x̂, 1/σ (broadcastable), μ and the biased variance (both (C,)).
        """
        mean = self._cmean(a)
        xc = a - mean
        var = self._cmean(xc * xc)
        inv_std = torch.rsqrt(var + eps)
        xhat = xc * inv_std
        y = xhat if gamma is None else xhat * _chan(gamma, a) + _chan(beta, a)
        return y, xhat, inv_std, mean.flatten(), var.flatten()

    def bn_project(self, v: Tensor, xhat: Tensor) -> tuple[Tensor, Tensor]:
        """P v = v − mean(v) − x̂ mean(x̂ v) per channel, and S = Σ x̂ v per channel."""
        m = self._cmean(v)
        mx = self._cmean(xhat * v)
        return v - m - xhat * mx, mx

    def bn_second_order(
        self, xhat: Tensor, inv_std: Tensor, gamma_c: Tensor, delta: Tensor, r: Tensor,
        p_delta: Tensor, p_r: Tensor, mx_delta: Tensor, mx_r: Tensor,
    ) -> Tensor:
        """∂/∂a ⟨δ, (γ/σ) P ṙ⟩ = −(γ/(Nσ²)) [x̂ ⟨δ, Pṙ⟩ + S_r Pδ + S_δ Pṙ] (see rules/norm.py).

        Written with per-channel means (S = N · mean(x̂ ·)), so N cancels once.
        """
        dots = self._cmean(delta * p_r)  # ⟨δ, Pṙ⟩ / N
        coef = -gamma_c * inv_std * inv_std
        return coef * (xhat * dots + mx_r * p_delta + mx_delta * p_r)


def _chan(v: Tensor, like: Tensor) -> Tensor:
    """A (C,) vector shaped to broadcast over channel dim 1 of ``like``."""
    return v.view([1, -1] + [1] * (like.dim() - 2))
