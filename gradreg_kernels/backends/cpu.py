"""The "cpu" backend: fused C++ kernels (csrc/cpu) and oneDNN products for float32 on CPU.

Same kernels, same math as ``TorchBackend``; only how each step runs changes:

- products go through oneDNN (``torch.ops.mkldnn._linear_pointwise``), about twice MKL's
  sgemm rate on AVX-512 CPUs. oneDNN's linear takes its weight as (out, in) rows, so
  ``d W`` runs on a transposed copy of W, and the doubled-batch weight product
  ``[z̄; δ]ᵀ [a; r]`` writes both transposed operands straight into one buffer each
  (``transpose_cat``) before one product: a copy costs about a sixth of the product it
  feeds, where MKL's transposed sgemm would cost twice the product;
- every elementwise step is one C++ sweep: ReLU / LeakyReLU / Dropout keep a packed bit
  mask (1 bit per element); smooth activations keep σ' and σ'' from one forward sweep; the
  softmax head gives CE, p, ∇CE and ∇ℓ in one row sweep; max-pool gather / scatter and the
  train-mode batch-norm steps run per plane / per channel.

Anything else (other dtypes, non-contiguous operands that would need a copy anyway,
convolutions, which torch already runs through oneDNN) goes to ``TorchBackend``.
The ``saved`` objects of ``act_forward`` / ``dropout_forward`` are private to this backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..rules.activation_math import ActivationSpec
from .cpu_build import CpuBuildError, load_extension
from .torch_ops import TorchBackend

# Below this many rows, ``d W`` runs as MKL's transposed sgemm: on an AVX-512 CPU (2 threads)
# oneDNN's product plus the copy of W it needs only wins from about 128 rows on.
ONEDNN_MIN_ROWS = 128

_SMOOTH_KINDS = {"softplus": 0, "tanh": 1, "sigmoid": 2, "gelu": 3, "gelu_tanh": 4, "elu": 5}

_EXT = None
_EXT_ERROR: str | None = None


def extension():
    """The compiled extension module (built on first call; raises CpuBuildError)."""
    global _EXT, _EXT_ERROR
    if _EXT is None:
        if _EXT_ERROR is not None:
            raise CpuBuildError(_EXT_ERROR)
        try:
            _EXT = load_extension()
        except CpuBuildError as e:
            _EXT_ERROR = str(e)
            raise
    return _EXT


def available() -> str | None:
    """None when the backend can run here, else why not (for the registry).

    ``GRADREG_KERNELS_CPU_EXT=0`` turns the backend off (``auto`` then never builds it).
    """
    if os.environ.get("GRADREG_KERNELS_CPU_EXT", "1") == "0":
        return "turned off by GRADREG_KERNELS_CPU_EXT=0"
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    try:
        extension()
    except CpuBuildError as e:
        return str(e)
    return None


@dataclass
class _Masked:
    """A piecewise-linear step: out = t ⊙ (bit ? hi : lo) with 1 bit per element."""

    bits: Tensor
    hi: float
    lo: float


@dataclass
class _Smooth:
    """σ'(z) and σ''(z) of a smooth activation, from the forward sweep."""

    d1: Tensor
    d2: Tensor


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _fast(*ts: Tensor | None) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu"
                             and t.is_contiguous()) for t in ts)


class CpuBackend(TorchBackend):
    """Fused C++ elementwise kernels and oneDNN products (float32, CPU)."""

    name = "cpu"

    def __init__(self) -> None:
        self.ext = extension()
        self._mm = torch.ops.mkldnn._linear_pointwise

    # ---- products -------------------------------------------------------------------
    def linear(self, a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if not _fast(a, w, b) or a.dim() != 2:
            return super().linear(a, w, b)
        return self._mm(a, w.detach(), None if b is None else b.detach(), "none", [], "")

    def linear_input_grad(self, d: Tensor, w: Tensor) -> Tensor:
        if not _fast(d, w) or d.dim() != 2:
            return super().linear_input_grad(d, w)
        if d.shape[0] < ONEDNN_MIN_ROWS:  # the copy of W would cost more than MKL's slower rate
            return d.mm(w.detach())
        # oneDNN wants the weight as rows of the output: Wᵀ, copied per call (kept across
        # calls it would be a second copy of the weights held between steps)
        return self._mm(d, w.detach().t().contiguous(), None, "none", [], "")

    def linear_weight_grad(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        flat = [t for pair in pairs for t in pair]
        if not _fast(*flat) or any(t.dim() != 2 for t in flat):
            return super().linear_weight_grad(pairs)
        dt = self.ext.transpose_cat([d for d, _ in pairs])  # (out, ΣN)
        at = self.ext.transpose_cat([a for _, a in pairs])  # (in, ΣN)
        return self._mm(dt, at, None, "none", [], "")

    # ---- activations ----------------------------------------------------------------
    def act_forward(self, spec: ActivationSpec, z: Tensor) -> tuple[Tensor, object]:
        if not _fast(z):
            return super().act_forward(spec, z)
        if spec.name in ("relu", "leaky_relu"):
            lo = 0.0 if spec.name == "relu" else spec.params[0]
            y, bits = self.ext.mask_forward(z, lo)
            return y, _Masked(bits, 1.0, lo)
        kind = _SMOOTH_KINDS.get(spec.name)
        if kind is None:
            return super().act_forward(spec, z)
        p = tuple(spec.params) + (0.0, 0.0)
        y, d1, d2 = self.ext.smooth_forward(z, kind, p[0], p[1])
        return y, _Smooth(d1, d2)

    def act_chain(self, spec: ActivationSpec, saved: object, d: Tensor) -> Tensor:
        if isinstance(saved, _Masked):
            return self.ext.mask_apply(saved.bits, d.contiguous(), saved.hi, saved.lo)
        if isinstance(saved, _Smooth):
            return self.ext.mul_add(saved.d1, d.contiguous(), None)
        return super().act_chain(spec, saved, d)

    def act_tangent(
        self, spec: ActivationSpec, saved: object, r: Tensor, u: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(saved, _Masked):
            return self.ext.mask_apply(saved.bits, r.contiguous(), saved.hi, saved.lo), None
        if isinstance(saved, _Smooth):
            out, s = self.ext.smooth_tangent(saved.d1, saved.d2, r.contiguous(), u.contiguous())
            return out, s
        return super().act_tangent(spec, saved, r, u)

    def act_backward(
        self, spec: ActivationSpec, saved: object, abar: Tensor, s: Tensor | None
    ) -> Tensor:
        if isinstance(saved, _Masked):
            out = self.ext.mask_apply(saved.bits, abar.contiguous(), saved.hi, saved.lo)
            return out if s is None else out.add_(s)
        if isinstance(saved, _Smooth):
            return self.ext.mul_add(saved.d1, abar.contiguous(),
                                    None if s is None else s.contiguous())
        return super().act_backward(spec, saved, abar, s)

    # ---- dropout ----------------------------------------------------------------------
    def dropout_forward(self, a: Tensor, p: float) -> tuple[Tensor, object]:
        if not _fast(a) or p >= 1.0:
            return super().dropout_forward(a, p)
        keep = torch.empty(a.shape, dtype=torch.uint8).bernoulli_(1.0 - p)
        scale = 1.0 / (1.0 - p)
        y, bits = self.ext.dropout_forward(a, keep, scale)
        return y, _Masked(bits, scale, 0.0)

    def dropout_apply(self, saved: object, t: Tensor) -> Tensor:
        if isinstance(saved, _Masked):
            return self.ext.mask_apply(saved.bits, t.contiguous(), saved.hi, saved.lo)
        return super().dropout_apply(saved, t)

    # ---- heads ------------------------------------------------------------------------
    def softmax_ce(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not _fast(z) or z.dim() != 2:
            return super().softmax_ce(z, y)
        ce, p, _, _ = self.ext.softmax_head(z, y, False)
        return ce, p

    def softmax_head(
        self, z: Tensor, y: Tensor, uniform: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not _fast(z) or z.dim() != 2:
            return super().softmax_head(z, y, uniform)
        ce, p, data_grad, pen_grad = self.ext.softmax_head(z, y, uniform)
        return ce, p, data_grad, pen_grad

    def softmax_hvp(self, p: Tensor, t: Tensor) -> Tensor:
        if not _fast(p) or p.dim() != 2 or t.shape != p.shape:
            return super().softmax_hvp(p, t)
        return self.ext.softmax_hvp(p, t.contiguous())

    # ---- pooling ----------------------------------------------------------------------
    def max_pool2d(
        self, a: Tensor, kernel, stride, padding, dilation, ceil_mode: bool
    ) -> tuple[Tensor, Tensor]:
        if not _fast(a) or a.dim() != 4:
            return super().max_pool2d(a, kernel, stride, padding, dilation, ceil_mode)
        k, s = _pair(kernel), _pair(stride if stride else kernel)
        p, d = _pair(padding), _pair(dilation)
        if p[0] * 2 > k[0] or p[1] * 2 > k[1]:  # torch's own error for this case
            return super().max_pool2d(a, kernel, stride, padding, dilation, ceil_mode)
        y, idx = self.ext.max_pool2d(a, k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1],
                                     bool(ceil_mode))
        return y, idx

    def pool_gather(self, r: Tensor, idx: Tensor) -> Tensor:
        if not _fast(r) or r.dim() != 4 or not idx.is_contiguous():
            return super().pool_gather(r, idx)
        return self.ext.pool_gather(r, idx)

    def pool_scatter(self, d: Tensor, idx: Tensor, input_shape: Sequence[int]) -> Tensor:
        if d.dtype != torch.float32 or d.dim() != 4 or not idx.is_contiguous():
            return super().pool_scatter(d, idx, input_shape)
        plane = int(input_shape[2]) * int(input_shape[3])
        return self.ext.pool_scatter(d.contiguous(), idx, plane).view(input_shape)

    # ---- train-mode batch norm ----------------------------------------------------------
    def bn_train_forward(
        self, a: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        if not _fast(a, gamma, beta):
            return super().bn_train_forward(a, gamma, beta, eps)
        y, xhat, inv_std, mean, var = self.ext.bn_forward(a, gamma, beta, eps)
        return y, xhat, inv_std, mean, var

    def bn_project(self, v: Tensor, xhat: Tensor) -> tuple[Tensor, Tensor]:
        if not _fast(xhat) or v.dtype != torch.float32:
            return super().bn_project(v, xhat)
        pv, mx = self.ext.bn_project(v.contiguous(), xhat)
        return pv, mx

    def bn_second_order(
        self, xhat: Tensor, inv_std: Tensor, gamma_c: Tensor, delta: Tensor, r: Tensor,
        p_delta: Tensor, p_r: Tensor, mx_delta: Tensor, mx_r: Tensor,
    ) -> Tensor:
        if not _fast(xhat, p_delta, p_r) or delta.dtype != torch.float32:
            return super().bn_second_order(xhat, inv_std, gamma_c, delta, r, p_delta, p_r,
                                           mx_delta, mx_r)
        gamma = None if gamma_c.dim() == 0 else gamma_c.reshape(-1).contiguous()
        return self.ext.bn_second_order(xhat, inv_std, gamma, delta.contiguous(), p_delta, p_r,
                                        mx_delta, mx_r)
