"""Nearest-neighbour upsampling (nn.Upsample / nn.UpsamplingNearest2d with mode 'nearest' or
'nearest-exact', F.interpolate with those modes): y = U a, U a fixed gather of input positions
(N, C, *S) → (N, C, *S'), for 1, 2 or 3 spatial dimensions S. Exactly what
F.interpolate(a, size=size, scale_factor=scale_factor, mode=mode,
recompute_scale_factor=...) computes, a down-sampling size or scale (< 1) included.

chain:    Uᵀ d    tangent:  U r    backward: Uᵀ ā    (no parameters, no second-order term)

Uᵀ is ATen's upsampling backward (each output value summed back onto the input position it
was copied from), called with what torch's own autograd passes it: the output size S' of
the forward, the full input shape, and the scales F.interpolate passed to the forward —
the given scale factor per dimension, or None when an explicit size was given or
recompute_scale_factor=True (then ATen derives the source index from S / S'). With a
non-integer scale factor the two differ (1.7 on 5 rows gives 8, and 1/1.7 ≠ 5/8), so the
scales must be the forward's for Uᵀ to be U's transpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Call, HostArg, Made, TensorArg, flat_args, register_function, register_module
from .base import FixedLinearRule

#: the modes that run fused → (the prefix of their ATen backward op by spatial rank)
_NEAREST_MODES = {"nearest": "upsample_nearest", "nearest-exact": "_upsample_nearest_exact"}


def upsample_unsupported(mode: str, align_corners: bool | None = None,
                         recompute_scale_factor: bool | None = None,
                         size: object = None) -> str | None:
    """Why ``UpsampleNearestRule`` cannot run an upsampling with these settings (those of
    nn.Upsample / F.interpolate), or None when it can. Only the nearest modes run fused;
    align_corners must be None with them, and recompute_scale_factor=True needs a scale
    factor, not a size (F.interpolate raises on both)."""
    if mode not in _NEAREST_MODES:
        return f"mode={mode!r} (only mode='nearest' and 'nearest-exact' run fused)"
    if align_corners is not None:
        return f"align_corners={align_corners!r} is not meaningful for mode={mode!r}"
    if recompute_scale_factor and size is not None:
        return "recompute_scale_factor=True is not meaningful with an explicit size"
    return None


class UpsampleNearestRule(FixedLinearRule):
    """y = U a, nearest-neighbour upsampling of (N, C, L), (N, C, H, W) or (N, C, D, H, W)
    inputs as F.interpolate computes it (see the module docstring).

    ``size`` (int or one per spatial dimension) or ``scale_factor`` (float or one per
    spatial dimension): exactly one is given, as for nn.Upsample. ``mode`` and
    ``recompute_scale_factor`` default to the module's (when ``module`` has them), else
    'nearest' and None.
    """

    def __init__(self, size: int | Sequence[int] | None,
                 scale_factor: float | Sequence[float] | None,
                 module: nn.Module | None = None, *, mode: str | None = None,
                 recompute_scale_factor: bool | None = None) -> None:
        if mode is None:
            mode = getattr(module, "mode", "nearest")
        if recompute_scale_factor is None:
            recompute_scale_factor = getattr(module, "recompute_scale_factor", None)
        reason = upsample_unsupported(mode, getattr(module, "align_corners", None),
                                      recompute_scale_factor, size)
        if reason is None and (size is None) == (scale_factor is None):
            reason = "exactly one of size and scale_factor must be given"
        if reason is not None:
            raise ValueError(f"UpsampleNearestRule: {reason}")
        self.module, self.size, self.scale_factor = module, size, scale_factor
        self.mode, self.recompute_scale_factor = mode, recompute_scale_factor
        self.out_size: tuple[int, ...] = ()
        self.scales: list[float | None] = []

    def _scales(self, dim: int) -> list[float | None]:
        """The per-dimension scales F.interpolate hands the forward op (and autograd the
        backward): the scale factors, or None for each dimension when the output size is
        given or recomputed from them."""
        if self.scale_factor is None or self.recompute_scale_factor:
            return [None] * dim
        sf = self.scale_factor
        scales = list(sf) if isinstance(sf, (list, tuple)) else [sf] * dim
        return [float(s) for s in scales]

    def forward(self, a: Tensor) -> Tensor:
        """y = U a: (N, C, *S) → (N, C, *S'); keeps S, S' and the scales for Uᵀ."""
        dim = a.dim() - 2
        if dim not in (1, 2, 3):
            raise ValueError(f"UpsampleNearestRule: expected a 3-D, 4-D or 5-D input, got "
                             f"{a.dim()}-D")
        self.in_shape = a.shape
        y = self._apply(a)
        self.out_size = tuple(y.shape[2:])
        self.scales = self._scales(dim)
        self.aten_transpose = getattr(torch.ops.aten,
                                      f"{_NEAREST_MODES[self.mode]}{dim}d_backward")
        return y

    def _apply(self, t: Tensor) -> Tensor:
        return F.interpolate(t, size=self.size, scale_factor=self.scale_factor, mode=self.mode,
                             recompute_scale_factor=self.recompute_scale_factor)

    def _transpose(self, d: Tensor) -> Tensor:
        """Uᵀ d: (N, C, *S') → (N, C, *S), ATen's backward with torch's own arguments."""
        return self.aten_transpose(d, list(self.out_size), list(self.in_shape), *self.scales)


def _upsample(m: nn.Upsample):
    why = upsample_unsupported(m.mode, m.align_corners, m.recompute_scale_factor, m.size)
    return why or (lambda kernels: UpsampleNearestRule(m.size, m.scale_factor, m))


register_module(nn.Upsample, options=lambda m: (m.mode, m.align_corners,
                                                m.recompute_scale_factor))(_upsample)


def _interpolate(call: Call) -> Made | str:
    names = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
             "antialias")
    opts = dict(zip(names, call.args[1:]), **call.kwargs)
    mode = opts.get("mode", "nearest")
    if any(isinstance(v, (TensorArg, HostArg)) for v in flat_args(
            [opts.get(k) for k in names if k not in ("size", "scale_factor")])):
        return "options computed at run time"
    if any(isinstance(v, TensorArg) for v in flat_args((opts.get("size"),
                                                        opts.get("scale_factor")))):
        return "a size taken from a tensor's values"
    why = upsample_unsupported(mode, opts.get("align_corners"),
                               opts.get("recompute_scale_factor"), opts.get("size"))
    if why or opts.get("antialias"):
        return why or "antialias=True"
    size, scale = opts.get("size"), opts.get("scale_factor")
    return Made([call.args[0]], lambda kernels, resolve: UpsampleNearestRule(
        resolve(size), resolve(scale), mode=mode,
        recompute_scale_factor=opts.get("recompute_scale_factor")))


register_function(F.interpolate, F.upsample, F.upsample_nearest, factory=_interpolate)
