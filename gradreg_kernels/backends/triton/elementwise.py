"""Fused elementwise activation steps of the four passes, one kernel per step.

With z the pre-activation and σ one of the supported activations:
    forward:  y = σ(z), and the saved state (a 1-bit mask z > 0 for ReLU / LeakyReLU, bit
              i % 8 of byte i // 8 for element i;
              for float32 Softplus (threshold ≥ 15), Tanh, Sigmoid and ELU (α > 0) the
              output y itself, from which σ', σ'' are recomputed; z for the other smooth σ)
    chain:    σ'(z) ⊙ d (+ s)             (also the pass-4 backward, with s)
    tangent:  σ'(z) ⊙ r  and  s = σ''(z) ⊙ u ⊙ r   (s only for smooth σ)
Every kernel loads its operands once, computes in float32 and stores in the operand dtype.
Activation codes (constexpr ACT): the activation table's (activation_table.NATIVE_CODES).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...activation_table import NATIVE_CODES, PIECEWISE_CODES
from ._common import ELEMENT_BLOCK, flat_grid

ACT_CODES = NATIVE_CODES  # the activation table's codes these kernels implement
PIECEWISE = PIECEWISE_CODES  # codes whose state is a mask and whose σ'' is zero

# the codes as constexpr globals, the form a Triton kernel may read
_RELU = tl.constexpr(NATIVE_CODES["relu"])
_LEAKY_RELU = tl.constexpr(NATIVE_CODES["leaky_relu"])
_SOFTPLUS = tl.constexpr(NATIVE_CODES["softplus"])
_TANH = tl.constexpr(NATIVE_CODES["tanh"])
_SIGMOID = tl.constexpr(NATIVE_CODES["sigmoid"])
_GELU = tl.constexpr(NATIVE_CODES["gelu"])
_GELU_TANH = tl.constexpr(NATIVE_CODES["gelu_tanh"])
_ELU = tl.constexpr(NATIVE_CODES["elu"])
_SILU = tl.constexpr(NATIVE_CODES["silu"])
_MISH = tl.constexpr(NATIVE_CODES["mish"])
_HARDSWISH = tl.constexpr(NATIVE_CODES["hardswish"])

# Kernels spell their constants out (1/√2, 1/√(2π), √(2/π), GELU's 0.044715): Triton
# kernels may not read non-constexpr globals.


@triton.jit
def _tanh(x):
    """tanh(x) = 2 sigmoid(2x) − 1 (exact limits ±1, abs. error ~1e-7)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _mish_parts(z):
    """(t, 1 − t², s) of Mish from w = e^z alone: n = w (w + 2), t = tanh(softplus z) =
    n/(n + 2), 1 − t² = 4 (n + 1)/(n + 2)², s = sigmoid z (w clamped at e^20, above which
    1 − t² is taken as 0, as torch's is, so that z (1 − t²) vanishes at huge z)."""
    w = tl.exp(tl.minimum(z, 20.0))
    n = w * (w + 2.0)
    inv = 1.0 / (n + 2.0)
    g = tl.where(z > 20.0, 0.0, 4.0 * (n + 1.0) * inv * inv)
    return n * inv, g, w / (1.0 + w)


@triton.jit
def _act_value(z, ACT: tl.constexpr, p0, p1):
    """σ(z) in float32; p0, p1 the activation's parameters."""
    if ACT == _RELU:
        out = tl.where(z > 0, z, 0.0)
    elif ACT == _LEAKY_RELU:
        out = tl.where(z > 0, z, z * p0)
    elif ACT == _SOFTPLUS:
        bz = z * p0
        soft = (tl.maximum(bz, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(bz)))) / p0
        out = tl.where(bz > p1, z, soft)
    elif ACT == _TANH:
        out = _tanh(z)
    elif ACT == _SIGMOID:
        out = tl.sigmoid(z)
    elif ACT == _GELU:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == _GELU_TANH:
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == _ELU:
        out = tl.where(z > 0, z, p0 * (tl.exp(tl.minimum(z, 0.0)) - 1.0))
    elif ACT == _SILU:
        out = z * tl.sigmoid(z)
    elif ACT == _MISH:
        t, g, s = _mish_parts(z)
        out = z * t
    else:  # Hardswish
        out = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    return out


@triton.jit
def _act_d1(z, ACT: tl.constexpr, p0, p1):
    """σ'(z) of a smooth activation (codes ≥ 2), float32."""
    if ACT == _SOFTPLUS:
        bz = z * p0
        out = tl.where(bz > p1, 1.0, tl.sigmoid(bz))
    elif ACT == _TANH:
        t = _tanh(z)
        out = 1.0 - t * t
    elif ACT == _SIGMOID:
        s = tl.sigmoid(z)
        out = s * (1.0 - s)
    elif ACT == _GELU:
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        out = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * pdf
    elif ACT == _GELU_TANH:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    elif ACT == _ELU:
        out = tl.where(z > 0, 1.0, p0 * tl.exp(tl.minimum(z, 0.0)))
    elif ACT == _SILU:
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    elif ACT == _MISH:
        t, g, s = _mish_parts(z)
        out = t + z * s * g
    else:  # Hardswish (torch's convention: z/3 + 1/2 on [−3, 3])
        out = tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, z / 3.0 + 0.5, 1.0))
    return out


@triton.jit
def _act_d2(z, ACT: tl.constexpr, p0, p1):
    """σ''(z) of a smooth activation (codes ≥ 2), float32."""
    if ACT == _SOFTPLUS:
        bz = z * p0
        s = tl.sigmoid(bz)
        out = tl.where(bz > p1, 0.0, p0 * s * (1.0 - s))
    elif ACT == _TANH:
        t = _tanh(z)
        out = -2.0 * t * (1.0 - t * t)
    elif ACT == _SIGMOID:
        s = tl.sigmoid(z)
        out = s * (1.0 - s) * (1.0 - 2.0 * s)
    elif ACT == _GELU:
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        out = pdf * (2.0 - z * z)
    elif ACT == _GELU_TANH:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        ddu = 6.0 * 0.7978845608028654 * 0.044715 * z
        g = 1.0 - t * t
        gz = g * z  # first: where t = ±1 the products stay 0 until u' itself overflows
        out = g * du + 0.5 * gz * ddu - gz * t * du * du
    elif ACT == _ELU:
        out = tl.where(z > 0, 0.0, p0 * tl.exp(tl.minimum(z, 0.0)))
    elif ACT == _SILU:
        s = tl.sigmoid(z)
        out = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    elif ACT == _MISH:
        t, g, s = _mish_parts(z)
        out = s * g * (2.0 + z * (1.0 - s - 2.0 * t * s))
    else:  # Hardswish
        out = tl.where((z > -3.0) & (z < 3.0), 1.0 / 3.0, 0.0)
    return out


@triton.jit
def _softplus_s_from_y(y, p0):
    """sigmoid(βz) = 1 − e^{−βy} from y = softplus(z), keeping its relative accuracy near 0
    (a series below βy = 0.1, where 1 − e^{−βy} cancels)."""
    x = p0 * y
    series = x * (1.0 - x * (0.5 - x * (1.0 / 6.0 - x * (1.0 / 24.0 - x / 120.0))))
    return tl.where(x < 0.1, series, 1.0 - tl.exp(-x))


@triton.jit
def _act_d1_from_y(y, ACT: tl.constexpr, p0, p1):
    """σ'(z) from y = σ(z) for codes 2 (Softplus), 3 (Tanh), 4 (Sigmoid), 7 (ELU)."""
    if ACT == _SOFTPLUS:
        out = tl.where(p0 * y > p1, 1.0, _softplus_s_from_y(y, p0))
    elif ACT == _TANH:
        out = 1.0 - y * y
    elif ACT == _SIGMOID:
        out = y * (1.0 - y)
    else:
        out = tl.where(y > 0, 1.0, y + p0)
    return out


@triton.jit
def _act_d2_from_y(y, ACT: tl.constexpr, p0, p1):
    """σ''(z) from y = σ(z) (codes as _act_d1_from_y)."""
    if ACT == _SOFTPLUS:
        sg = _softplus_s_from_y(y, p0)
        out = tl.where(p0 * y > p1, 0.0, p0 * sg * (1.0 - sg))
    elif ACT == _TANH:
        out = -2.0 * y * (1.0 - y * y)
    elif ACT == _SIGMOID:
        out = y * (1.0 - y) * (1.0 - 2.0 * y)
    else:
        out = tl.where(y > 0, 0.0, y + p0)
    return out


@triton.jit
def _mask_bit(bits_ptr, offs, m):
    """Bit ``offs`` of the packed mask (bit i % 8 of byte i // 8), as 0 / 1 int32."""
    byte = tl.load(bits_ptr + offs // 8, mask=m, other=0).to(tl.int32)
    return (byte >> (offs % 8)) & 1


@triton.jit
def _saved_d1(saved_ptr, offs, m, ACT: tl.constexpr, FROM_Y: tl.constexpr, p0, p1):
    """σ'(z) from the saved state: the bit mask for piecewise-linear σ, else z (or y)."""
    if ACT == _RELU:
        out = _mask_bit(saved_ptr, offs, m).to(tl.float32)
    elif ACT == _LEAKY_RELU:
        out = tl.where(_mask_bit(saved_ptr, offs, m) != 0, 1.0, p0)
    elif FROM_Y:
        y = tl.load(saved_ptr + offs, mask=m, other=0.0).to(tl.float32)
        out = tl.where(y != y, y, _act_d1_from_y(y, ACT, p0, p1))
    else:  # σ'(NaN) = NaN, as torch's vectorized backward loops give for these kinds
        z = tl.load(saved_ptr + offs, mask=m, other=0.0).to(tl.float32)
        out = tl.where(z != z, z, _act_d1(z, ACT, p0, p1))
    return out


@triton.jit(do_not_specialize=["n"])
def _act_forward_kernel(z_ptr, y_ptr, mask_ptr, n, p0, p1, v_pos, v_neg, ACT: tl.constexpr,
                        SAVE_MASK: tl.constexpr, BLOCK: tl.constexpr):
    """y = σ(z), torch's σ(±inf) = (v_pos, v_neg) at the infinities and NaN at a NaN (the
    formulas' selects and blends would give finite values or 0 · inf there); for
    piecewise-linear σ also the packed mask (BLOCK // 8 bytes per program; bits past n are
    0): !(z <= 0) for ReLU, whose torch backward reads its output (on at a NaN), z > 0 for
    LeakyReLU, whose backward reads z (the slope at a NaN)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    z = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = _act_value(z, ACT, p0, p1)
    y = tl.where(z == float("inf"), v_pos, tl.where(z == -float("inf"), v_neg, y))
    y = tl.where(z != z, z, y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)
    if SAVE_MASK:
        on = (z <= 0) == 0 if ACT == _RELU else z > 0  # torch's bit at a NaN (see below)
        bits = tl.reshape(on.to(tl.int32), (BLOCK // 8, 8))
        byte = tl.sum(bits << tl.arange(0, 8)[None, :], axis=1)
        boffs = tl.program_id(0) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(mask_ptr + boffs, byte.to(tl.uint8), mask=boffs < (n + 7) // 8)


@triton.jit(do_not_specialize=["n"])
def _act_chain_kernel(saved_ptr, d_ptr, s_ptr, out_ptr, n, p0, p1, ACT: tl.constexpr,
                      FROM_Y: tl.constexpr, HAS_S: tl.constexpr, BLOCK: tl.constexpr):
    """out = σ'(z) ⊙ d (+ s)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    d = tl.load(d_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if ACT == _RELU:  # a select, as torch's: an off element is 0 even where d is NaN or ±inf
        out = tl.where(_mask_bit(saved_ptr, offs, m) != 0, d, 0.0)
    else:
        out = _saved_d1(saved_ptr, offs, m, ACT, FROM_Y, p0, p1) * d
    if HAS_S:
        out += tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["n"])
def _act_tangent_kernel(z_ptr, r_ptr, u_ptr, out_ptr, s_ptr, n, p0, p1, ACT: tl.constexpr,
                        FROM_Y: tl.constexpr, BLOCK: tl.constexpr):
    """Smooth σ: out = σ'(z) ⊙ r and s = σ''(z) ⊙ u ⊙ r, the state (z, or y) loaded once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    v = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if FROM_Y:
        d1 = _act_d1_from_y(v, ACT, p0, p1)
        d2 = _act_d2_from_y(v, ACT, p0, p1)
    else:
        d1 = _act_d1(v, ACT, p0, p1)
        d2 = _act_d2(v, ACT, p0, p1)
    d1 = tl.where(v != v, v, d1)  # NaN at a NaN state, as torch's vectorized loops give
    d2 = tl.where(v != v, v, d2)
    tl.store(out_ptr + offs, (d1 * r).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + offs, (d2 * u * r).to(s_ptr.dtype.element_ty), mask=m)


def unpack_mask(bits: Tensor, shape: Sequence[int]) -> Tensor:
    """The packed mask as a bool tensor of ``shape`` (for the portable path)."""
    n = math.prod(shape)
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits[:, None] >> shifts) & 1).flatten()[:n].view(shape).bool()


def _params(params: tuple[float, ...]) -> tuple[float, float]:
    p = tuple(float(v) for v in params) + (0.0, 0.0)
    return p[0], p[1]


def act_forward(code: int, params: tuple[float, ...], z: Tensor, keep_output: bool = False,
                at_infinity: tuple[float, float] = (math.nan, math.nan)
                ) -> tuple[Tensor, Tensor]:
    """y = σ(z) (z's dtype) and the state: the packed bit mask ((n + 7) // 8 uint8,
    piecewise σ), y itself (smooth σ with ``keep_output``) or z (contiguous).
    ``at_infinity``: torch's (σ(+inf), σ(−inf)) (activation_math.values_at_infinity)."""
    z = z.contiguous()
    y = torch.empty_like(z)
    piecewise = code in PIECEWISE
    if piecewise:
        mask = torch.empty((z.numel() + 7) // 8, dtype=torch.uint8, device=z.device)
    else:
        mask = y if keep_output else z
    n = z.numel()
    p0, p1 = _params(params)
    _act_forward_kernel[flat_grid(n)](z, y, mask, n, p0, p1, at_infinity[0], at_infinity[1],
                                      ACT=code, SAVE_MASK=piecewise, BLOCK=ELEMENT_BLOCK)
    return y, mask


def act_chain(code: int, params: tuple[float, ...], saved: Tensor, d: Tensor,
              s: Tensor | None = None, out_dtype: torch.dtype | None = None,
              from_y: bool = False) -> Tensor:
    """σ'(z) ⊙ d (+ s), in out_dtype (d's dtype by default); ``saved`` is y if from_y."""
    d = d.contiguous()
    out = torch.empty_like(d, dtype=out_dtype or d.dtype)
    s_arg = d if s is None else s.contiguous()
    n = d.numel()
    p0, p1 = _params(params)
    _act_chain_kernel[flat_grid(n)](saved, d, s_arg, out, n, p0, p1, ACT=code, FROM_Y=from_y,
                                    HAS_S=s is not None, BLOCK=ELEMENT_BLOCK)
    return out


def act_tangent(code: int, params: tuple[float, ...], z: Tensor, r: Tensor, u: Tensor,
                out_dtype: torch.dtype | None = None, s_dtype: torch.dtype | None = None,
                from_y: bool = False) -> tuple[Tensor, Tensor]:
    """(σ'(z) ⊙ r, σ''(z) ⊙ u ⊙ r) for a smooth σ, in out_dtype and s_dtype (r's default);
    ``z`` is the state: z, or y if from_y."""
    r, u = r.contiguous(), u.contiguous()
    out = torch.empty_like(r, dtype=out_dtype or r.dtype)
    s = torch.empty_like(r, dtype=s_dtype or r.dtype)
    n = r.numel()
    p0, p1 = _params(params)
    _act_tangent_kernel[flat_grid(n)](z, r, u, out, s, n, p0, p1, ACT=code, FROM_Y=from_y,
                                      BLOCK=ELEMENT_BLOCK)
    return out, s
