"""TritonBackend: the primitive kernels of the four passes as Triton kernels on CUDA tensors.

Replaces the elementwise activation steps, the softmax-CE head and its Hessian-vector
product, train-mode BatchNorm, the max-pool gather/scatter and the penalty reduction;
products and convolutions stay on cuBLAS/cuDNN (``matmul="triton"`` routes Linear's
forward products through the autotuned Triton product instead). Operands of other dtypes
(float64) take the portable path, so the backend is exact wherever it is used. Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors (for tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ...activation_math import (
    ActivationSpec,
    derivs_from_output,
    output_derivs,
    values_at_infinity,
)
from ...backend_protocol import BackendState, Saved
from ..torch_ops import TorchBackend
from . import batchnorm, elementwise, penalty, pool, softmax_head
from ._common import supported
from .matmul import linear_act


@dataclass
class ActState(BackendState):
    """What act_forward keeps: a packed bit mask (ReLU, LeakyReLU), the output y
    (``from_y``: activation_math.derivs_from_output, float32) or the pre-activation z;
    ``shape`` is z's."""

    code: int
    params: tuple[float, ...]
    tensor: Tensor
    zdtype: torch.dtype
    shape: torch.Size
    from_y: bool = False

    def out_dtype(self, *ts: Tensor | None) -> torch.dtype:
        """The dtype TorchBackend's step gives: ReLU keeps the operand's, others promote z's."""
        dt = ts[0].dtype
        for t in ts[1:]:
            if t is not None:
                dt = torch.promote_types(dt, t.dtype)
        relu = self.code == elementwise.ACT_CODES["relu"]
        return dt if relu else torch.promote_types(dt, self.zdtype)


def _portable(saved: ActState) -> Tensor:
    """The state as TorchBackend's steps read it: ReLU's bool mask, or z, for which a 0/1
    mask in z's dtype stands (LeakyReLU's σ' depends only on the sign)."""
    if saved.code in elementwise.PIECEWISE:
        mask = elementwise.unpack_mask(saved.tensor, saved.shape)
        return mask if saved.code == elementwise.ACT_CODES["relu"] else mask.to(saved.zdtype)
    return saved.tensor


class TritonBackend(TorchBackend):
    """Triton kernels for the elementwise, head, BatchNorm, pooling and penalty steps."""

    name = "triton"

    def __init__(self, matmul: str = "cublas") -> None:
        if matmul not in ("cublas", "triton"):
            raise ValueError(f"matmul must be 'cublas' or 'triton', got {matmul!r}")
        self.matmul = matmul

    # ---- products ---------------------------------------------------------------------
    def linear(self, a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if (self.matmul == "triton" and supported(a) and a.dtype == w.dtype
                and not torch.is_autocast_enabled(a.device.type)):
            return linear_act(a, w, b)[0]
        return super().linear(a, w, b)

    # ---- elementwise activation steps -------------------------------------------------
    def act_forward(self, spec: ActivationSpec, z: Tensor) -> tuple[Tensor, Saved]:
        code = elementwise.ACT_CODES.get(spec.name)
        if code is None or not supported(z):
            return super().act_forward(spec, z)
        # float32 only: in bf16 / fp16 y is too coarse near saturation (1 − y² of a rounded
        # tanh), so z is kept there
        from_y = z.dtype == torch.float32 and derivs_from_output(spec)
        y, t = elementwise.act_forward(code, spec.params, z, keep_output=from_y,
                                       at_infinity=values_at_infinity(spec))
        return y, ActState(code, spec.params, t, z.dtype, z.shape, from_y=from_y)

    def act_chain(self, spec: ActivationSpec, saved: Saved, d: Tensor) -> Tensor:
        if not isinstance(saved, ActState):
            return super().act_chain(spec, saved, d)
        if not supported(d) or d.shape != saved.shape:
            if saved.from_y:
                return output_derivs(spec, saved.tensor)[0] * d
            return super().act_chain(spec, _portable(saved), d)
        return elementwise.act_chain(saved.code, saved.params, saved.tensor, d,
                                     out_dtype=saved.out_dtype(d), from_y=saved.from_y)

    def act_tangent(self, spec: ActivationSpec, saved: Saved, r: Tensor, u: Tensor | None
                    ) -> tuple[Tensor, Tensor | None]:
        if not isinstance(saved, ActState):
            return super().act_tangent(spec, saved, r, u)
        if not supported(r, u) or r.shape != saved.shape:
            if saved.from_y:
                d1, d2 = output_derivs(spec, saved.tensor)
                return d1 * r, d2 * u * r
            return super().act_tangent(spec, _portable(saved), r, u)
        if saved.code in elementwise.PIECEWISE:
            out = elementwise.act_chain(saved.code, saved.params, saved.tensor, r,
                                        out_dtype=saved.out_dtype(r))
            return out, None
        return elementwise.act_tangent(saved.code, saved.params, saved.tensor, r, u,
                                       out_dtype=saved.out_dtype(r),
                                       s_dtype=saved.out_dtype(r, u), from_y=saved.from_y)

    def act_backward(self, spec: ActivationSpec, saved: Saved, abar: Tensor, s: Tensor | None
                     ) -> Tensor:
        if not isinstance(saved, ActState):
            return super().act_backward(spec, saved, abar, s)
        if not supported(abar, s) or abar.shape != saved.shape:
            if saved.from_y:
                out = output_derivs(spec, saved.tensor)[0] * abar
                return out if s is None else out + s
            return super().act_backward(spec, _portable(saved), abar, s)
        return elementwise.act_chain(saved.code, saved.params, saved.tensor, abar, s,
                                     out_dtype=saved.out_dtype(abar), from_y=saved.from_y)

    # ---- heads ------------------------------------------------------------------------
    def softmax_ce(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if z.dim() != 2 or not supported(z) or z.shape[1] > softmax_head.MAX_K:
            return super().softmax_ce(z, y)
        return softmax_head.softmax_ce(z, y)

    def softmax_head(
        self, z: Tensor, y: Tensor, uniform: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """TorchBackend.softmax_head's four results in one launch (softmax_head.py)."""
        if (z.dim() != 2 or not supported(z) or z.numel() == 0
                or z.shape[1] > softmax_head.MAX_K or y.shape != z.shape[:1]
                or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
            return super().softmax_head(z, y, uniform)
        return softmax_head.softmax_head(z, y, uniform)

    def target_head(self, kind: str, z: Tensor, y: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        if z.dim() != 2 or not supported(z, y) or y.shape != z.shape \
                or z.shape[1] > softmax_head.MAX_K or z.dtype != torch.float32:
            return super().target_head(kind, z, y)
        return softmax_head.target_head(kind, z, y)

    def softmax_hvp(self, p: Tensor, t: Tensor) -> Tensor:
        if p.dim() != 2 or not supported(p, t) or p.shape != t.shape \
                or p.shape[1] > softmax_head.MAX_K:
            return super().softmax_hvp(p, t)
        return softmax_head.softmax_hvp(p, t)

    # ---- the penalty ------------------------------------------------------------------
    def penalty_terms(self, g: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        if not supported(g, mask) or (mask is not None and mask.shape != g.shape):
            return super().penalty_terms(g, mask)
        return penalty.penalty_terms(g, mask)

    # ---- pooling ----------------------------------------------------------------------
    def pool_gather(self, r: Tensor, idx: Tensor) -> Tensor:
        if not supported(r) or r.dim() != 4:
            return super().pool_gather(r, idx)
        return pool.pool_gather(r, idx)

    def pool_scatter(self, d: Tensor, idx: Tensor, input_shape: Sequence[int],
                     disjoint: tuple[int, int, int, int] | None = None) -> Tensor:
        """Disjoint windows: one gather-style launch over the input; else atomics (pool.py)."""
        if not supported(d) or d.dim() != 4:
            return super().pool_scatter(d, idx, input_shape, disjoint=disjoint)
        if disjoint is not None and (d.shape != idx.shape or len(input_shape) != 4):
            disjoint = None
        return pool.pool_scatter(d, idx, input_shape, disjoint=disjoint)

    # ---- train-mode batch norm --------------------------------------------------------
    def bn_train_forward(self, a: Tensor, gamma: Tensor | None, beta: Tensor | None,
                         eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        if not supported(a, gamma, beta):
            return super().bn_train_forward(a, gamma, beta, eps)
        return batchnorm.bn_train_forward(a, gamma, beta, eps)

    def bn_project(self, v: Tensor, xhat: Tensor) -> tuple[Tensor, Tensor]:
        if not supported(v, xhat) or v.shape != xhat.shape:
            return super().bn_project(v, xhat)
        return batchnorm.bn_project(v, xhat)

    def bn_second_order(
        self, xhat: Tensor, inv_std: Tensor, gamma_c: Tensor, delta: Tensor, r: Tensor,
        p_delta: Tensor, p_r: Tensor, mx_delta: Tensor, mx_r: Tensor,
    ) -> Tensor:
        if not supported(xhat, delta, p_delta, p_r):
            return super().bn_second_order(xhat, inv_std, gamma_c, delta, r, p_delta, p_r,
                                           mx_delta, mx_r)
        return batchnorm.bn_second_order(xhat, inv_std, gamma_c, delta, p_delta, p_r,
                                         mx_delta, mx_r)

    def bn_chain(self, d: Tensor, xhat: Tensor, k: Tensor
                 ) -> tuple[Tensor, Saved, tuple[Tensor, Tensor]]:
        if not supported(d, xhat, k) or d.shape != xhat.shape:
            return super().bn_chain(d, xhat, k)
        return batchnorm.bn_chain(d, xhat, k)

    def bn_tangent(
        self, saved: Saved, r: Tensor, xhat: Tensor, k: Tensor, inv_std: Tensor,
        gamma_c: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if (not isinstance(saved, batchnorm.BnChainState) or not supported(r, xhat)
                or r.shape != xhat.shape):
            return super().bn_tangent(saved, r, xhat, k, inv_std, gamma_c)
        return batchnorm.bn_tangent(saved, r, xhat, k, inv_std, gamma_c)

    def bn_backward(self, abar: Tensor, xhat: Tensor, k: Tensor, s: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        if not supported(abar, xhat, k, s) or abar.shape != xhat.shape:
            return super().bn_backward(abar, xhat, k, s)
        return batchnorm.bn_backward(abar, xhat, k, s)

    def bn_update_running_stats(self, module: torch.nn.modules.batchnorm._BatchNorm,
                                mean: Tensor, var: Tensor, n: int) -> None:
        if not batchnorm.running_stats_supported(module, mean, var):
            return super().bn_update_running_stats(module, mean, var, n)
        batchnorm.update_running_stats(module, mean, var, n)
