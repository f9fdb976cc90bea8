"""max_pool2d, twice differentiable: linear once the argmax indices are fixed.

y = gather(x, idx) with idx the flat per-plane position of each window's maximum, so
    backward:  dx = scatter(dy, idx)   (the transpose of gather)
and the backward of scatter is gather, the backward of gather is scatter: two Functions
that are each other's gradient, to any order (idx is piecewise constant in x).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch.nn.modules.utils import _pair

from ..autocast import Function
from ._common import apply, input_needed, record_inputs, resolve_backend


class PoolGather(Function):
    """out[n, c, i] = r[n, c, idx[n, c, i]]."""

    @staticmethod
    def forward(ctx, r: Tensor, idx: Tensor, kernels) -> Tensor:
        record_inputs(ctx, r, idx, kernels)
        ctx.idx, ctx.in_shape, ctx.kernels = idx, tuple(r.shape), kernels
        ctx.set_materialize_grads(False)
        return kernels.pool_gather(r, idx)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        if g is None or not input_needed(ctx, 0):
            return None, None, None
        return apply(PoolScatter, g, ctx.idx, ctx.in_shape, ctx.kernels), None, None


class PoolScatter(Function):
    """The transpose of PoolGather: sums d into the input positions idx points to."""

    @staticmethod
    def forward(ctx, d: Tensor, idx: Tensor, in_shape: Sequence[int], kernels) -> Tensor:
        record_inputs(ctx, d, idx, in_shape, kernels)
        ctx.idx, ctx.kernels = idx, kernels
        ctx.set_materialize_grads(False)
        return kernels.pool_scatter(d, idx, in_shape)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        if g is None or not input_needed(ctx, 0):
            return None, None, None, None
        return apply(PoolGather, g, ctx.idx, ctx.kernels), None, None, None


class MaxPool2d(Function):
    @staticmethod
    def forward(ctx, x: Tensor, args: tuple, kernels) -> Tensor:
        record_inputs(ctx, x, args, kernels)
        y, idx = kernels.max_pool2d(x, *args)
        ctx.idx, ctx.in_shape, ctx.kernels = idx, tuple(x.shape), kernels
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor | None):
        if dy is None or not input_needed(ctx, 0):
            return None, None, None
        return apply(PoolScatter, dy, ctx.idx, ctx.in_shape, ctx.kernels), None, None


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, backend: str = "auto") -> Tensor:
    """F.max_pool2d on x (N, C, H, W) (stride defaults to kernel_size); twice differentiable."""
    if x.dim() != 4:
        raise ValueError(f"max_pool2d needs x of shape (N, C, H, W), got {tuple(x.shape)}")
    k = tuple(_pair(kernel_size))
    s = k if stride is None or stride == [] or stride == () else tuple(_pair(stride))
    args = (k, s, tuple(_pair(padding)), tuple(_pair(dilation)), bool(ceil_mode))
    return apply(MaxPool2d, x, args, resolve_backend(backend, x.device))
