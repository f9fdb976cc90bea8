"""The "cpu" backend: fused C++ kernels (csrc/cpu) and oneDNN products for float32 on CPU.

Same kernels, same math as ``TorchBackend``; only how each step runs changes:

- on AVX-512 CPUs products go through oneDNN (``torch.ops.mkldnn._linear_pointwise``),
  about twice MKL's sgemm rate there; elsewhere (AVX2) they stay on MKL, as fast or
  faster (bench/RESULTS.md, "How the cpu backend chooses its products"; ``ONEDNN_PRODUCTS``,
  ``GRADREG_KERNELS_PRODUCTS=onednn|mkl`` overrides). oneDNN's linear reads its weight
  through strides, so ``d W`` runs on the view Wᵀ with no copy, and the doubled-batch weight
  product ``[z̄; δ]ᵀ [a; r]`` copies only the narrower side transposed (``transpose_cat``)
  and reads the other as a view. Products below ``ONEDNN_MIN_WORK`` multiply-adds stay on
  MKL, whose call costs less;
- every elementwise step is one C++ sweep: ReLU / LeakyReLU / Dropout keep a packed bit
  mask (1 bit per element); smooth activations keep their output y where σ', σ'' are
  functions of it, else z, and recompute σ', σ'' inside each later sweep; the
  softmax head gives CE, p, ∇CE and ∇ℓ in one row sweep; max-pool gather / scatter and the
  train-mode batch-norm steps run per plane / per channel.

Under CPU autocast to a dtype this CPU multiplies natively (bf16 with AVX-512 BF16 / AMX;
cpu_autocast.py), the products run in it through oneDNN (float32 accumulation) on weights
cast once per step (``product_weight``), and the masked, pooling and reduction kernels read
and write bf16 directly; the heads, the few-output products, batch norm, the smooth
activations and every parameter gradient stay float32 (docs/math.md, "Precision").

Anything else (other dtypes, non-contiguous operands that would need a copy anyway,
convolutions, which torch already runs through oneDNN) goes to ``TorchBackend``.
Its between-pass states (``_Masked``, ``_SmoothState``, ``_BnChain``) are private to it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activation_math import ActivationSpec, derivs_from_output
from ..activation_table import ACTIVATIONS
from ..backend_protocol import BackendState, KeptDelta, Saved, TransposedDelta
from ..tensor_ops import ConvGeom, channel_view
from . import cpu_autocast, cpu_chain
from .cpu_build import CpuBuildError, load_extension
from .cpu_weight_copies import WeightCopies
from .torch_ops import NonFinite, TorchBackend

# Below this many multiply-adds a product runs on MKL, whose call costs less than oneDNN's
# (the crossover measured for bench/RESULTS.md, "How the cpu backend chooses its products").
ONEDNN_MIN_WORK = 600_000


def _onednn_products() -> bool:
    """Whether the float32 linear products above ONEDNN_MIN_WORK run on oneDNN: on CPUs
    where torch dispatches AVX-512 kernels (oneDNN 1.2-2.5× MKL's sgemm rate measured
    there), not on AVX2 ones (MKL 5-30 % faster alone at the MLPs' sizes, oneDNN up to
    10 % at the paper CNN's FC layer; MKL 11 % faster in the B = 256 MLP's step).
    ``GRADREG_KERNELS_PRODUCTS=onednn`` or ``=mkl`` decides instead (any other value is
    named in a RuntimeWarning and the CPU decides)."""
    choice = os.environ.get("GRADREG_KERNELS_PRODUCTS", "")
    if choice in ("onednn", "mkl"):
        return choice == "onednn"
    if choice:
        warnings.warn(f"GRADREG_KERNELS_PRODUCTS must be 'onednn' or 'mkl', got {choice!r}; "
                      f"choosing by this CPU instead", RuntimeWarning, stacklevel=2)
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


ONEDNN_PRODUCTS = _onednn_products()

# A layer with at most this many outputs (a classifier's last Linear) runs its products in
# the extension's one-sweep kernels (thin_*): at K = 10 a library call costs several times the
# arithmetic.
THIN_MAX = 16

# Output rows per block of an accumulating weight product: a 256 × in block is half of a
# 512-row weight. Smaller blocks cost more per multiply-add (bench/HISTORY.md has the
# measurements behind the choice).
ACC_BLOCK_ROWS = 256

# Under autocast, the weight size (values) by which a Linear's tangent-pass weight term may
# exceed the memory rule's 2 n (in + out) (CpuBackend.weight_term_in_tangent_pass).
LOW_TERM_SLACK = 400_000

# the smooth kinds the C++ sweeps implement, by their table codes (ReLU / LeakyReLU run the
# mask kernels)
_SMOOTH_KINDS = {k.name: k.code for k in ACTIVATIONS if k.native and not k.piecewise}
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
class _Masked(BackendState):
    """A piecewise-linear step: out = t ⊙ (bit ? hi : lo) with 1 bit per element."""

    bits: Tensor
    hi: float
    lo: float


@dataclass
class _BnChain(BackendState):
    """What the fused batch-norm chain keeps for the tangent: δ and its channel means."""

    d: Tensor
    md: Tensor
    mxd: Tensor


@dataclass
class _SmoothState(BackendState):
    """The one tensor a smooth activation keeps (``tensor``): its output y where σ' and σ''
    are functions of it (``from_output``: Softplus, Tanh, Sigmoid, ELU; smooth_output.cpp),
    else its pre-activation z; σ', σ'' are recomputed from it inside each later sweep. Against
    keeping σ' and σ'' from the forward sweep: one kept tensor instead of two, each later
    sweep reads one operand less, and the step measured as fast or faster (bench/HISTORY.md)."""

    tensor: Tensor
    kind: int
    p0: float
    p1: float
    from_output: bool
    #: torch autograd's σ', σ'' at the non-finite elements of z, or None: the sweeps'
    #: formulas are exact for finite z only, and these few are set after them
    special: NonFinite | None = None

    def operand(self, t: Tensor | None) -> Tensor | None:
        """t as the sweeps read it: contiguous, in the kept tensor's dtype (float32, or bf16
        under autocast, where only an operand from a float32 thin layer is cast)."""
        return _as(t, self.tensor.dtype)

    def mul_add(self, ext, t: Tensor, s: Tensor | None) -> Tensor:
        """σ' ⊙ t (+ s)."""
        f = ext.output_mul_add if self.from_output else ext.z_mul_add
        nf = self.special
        if nf is None:
            return f(self.tensor, t, s, self.kind, self.p0, self.p1)
        fix = nf.d1 * nf.at(t) if s is None else nf.d1 * nf.at(t) + nf.at(s)
        return nf.fix(f(self.tensor, t, s, self.kind, self.p0, self.p1), fix)

    def tangent(self, ext, r: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        """(σ' ⊙ r, σ'' ⊙ u ⊙ r)."""
        f = ext.output_tangent if self.from_output else ext.z_tangent
        out, s = f(self.tensor, r, u, self.kind, self.p0, self.p1)
        nf = self.special
        if nf is not None:
            nf.fix(out, nf.d1 * nf.at(r))
            nf.fix(s, nf.d2 * nf.at(u) * nf.at(r))
        return out, s


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A contiguous operand in ``dtype`` (no copy when it is one already)."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


def _f32(t: Tensor | None) -> Tensor | None:
    """A contiguous float32 operand for the float32 kernels. The saved states are float32;
    under autocast a later step may hand in bf16, and computes in float32 as TorchBackend's
    promotion would."""
    return _as(t, torch.float32)


def _dense_of(dtypes: tuple[torch.dtype, ...], ts: Sequence[Tensor | None]) -> bool:
    """Whether every given operand is a contiguous CPU tensor of one of ``dtypes`` (None
    counts as one)."""
    return all(t is None or (t.dtype in dtypes and t.is_cpu and t.is_contiguous()) for t in ts)


def _dense(*ts: Tensor | None) -> bool:
    """Contiguous float32 or bf16 CPU operands (the dtypes the masked, pooling, batch-norm and
    reduction kernels read)."""
    return _dense_of((torch.float32, torch.bfloat16), ts)


def _dense_or_f32(t: Tensor) -> Tensor:
    """t as a kernel that reads float32 or bf16 takes it: itself when dense, else a
    contiguous float32 copy."""
    return t if _dense(t) else _f32(t)


def _bn_operand(t: Tensor, low: torch.dtype | None) -> bool:
    """Whether the batch-norm kernels read t: a float32 CPU tensor, or bf16 under autocast
    with native products (``low``)."""
    return t.is_cpu and t.dtype in (torch.float32, low)


def _widened(*ts: Tensor | None) -> list[Tensor | None]:
    """Under autocast with native products, bf16 operands as float32 (the kernels that read
    float32 only: heads, batch norm's s, channel sums); else the operands as they are."""
    if cpu_autocast.product_dtype() is None:
        return list(ts)
    return [_f32(t) if t is not None and t.dtype == torch.bfloat16 else t for t in ts]


def _without_history(t: Tensor | None) -> Tensor | None:
    """t without autograd history for oneDNN's ops, which have no derivative (the rules
    pass detached parameters already; only a tensor that requires grad is detached)."""
    return t.detach() if t is not None and t.requires_grad else t


def _product_path(out_f: int, work: int) -> str:
    """Where a linear product with ``out_f`` outputs and ``work`` multiply-adds runs: "thin"
    (the extension's one-sweep kernels), "mkl" (below ONEDNN_MIN_WORK, or where
    ONEDNN_PRODUCTS is off) or "onednn"."""
    if out_f <= THIN_MAX:
        return "thin"
    return "onednn" if ONEDNN_PRODUCTS and work >= ONEDNN_MIN_WORK else "mkl"


def _casts_weight(w: Tensor) -> bool:
    """Whether ``product_weight`` casts w under autocast: a float32 CPU weight, unless a layer
    with few outputs (its one-sweep kernels read float32)."""
    return (w.dtype == torch.float32 and w.is_cpu and w.dim() >= 2
            and not (w.dim() == 2 and w.shape[0] <= THIN_MAX))


def _f32_dense(*ts: Tensor | None) -> bool:
    """Contiguous float32 CPU operands (the dtype every other kernel reads)."""
    return _dense_of((torch.float32,), ts)


class CpuBackend(TorchBackend):
    """Fused C++ elementwise kernels and oneDNN products (float32, CPU)."""

    name = "cpu"

    def __init__(self) -> None:
        self.ext = extension()
        self._mm = torch.ops.mkldnn._linear_pointwise
        self._weight_copies = WeightCopies()  # made by the parameter check under autocast

    # ---- precision ------------------------------------------------------------------
    def precision_scope(self) -> contextlib.AbstractContextManager:
        """Autocast off for the step where its dtype has no native products here."""
        return cpu_autocast.float32_scope()

    def native_schedule(self, plan, x: Tensor, head, keep_saved: bool):
        """A plain Linear chain (ReLU, LeakyReLU or a smooth activation between the layers)
        under bf16 autocast: the extension's LinearChain (cpu_chain.py); any other plan:
        None (the Python schedule)."""
        return cpu_chain.schedule_for(self, plan, x, head, keep_saved, THIN_MAX, _SMOOTH_KINDS)

    # ---- products -------------------------------------------------------------------
    def product_weight(self, w: Tensor) -> Tensor:
        """Under autocast with native products, w in their dtype (one cast per step, where
        torch's autocast would cast a detached weight at every product); a layer with few
        outputs keeps float32 (its one-sweep kernels read float32)."""
        low = cpu_autocast.product_dtype()
        if low is None or not _casts_weight(w):
            return w
        copy = self._weight_copies.take(w)  # made by this step's parameter check
        return copy if copy is not None else w.to(low)

    def product_input(self, a: Tensor) -> Tensor:
        """Under autocast with native products, a float32 input in their dtype: cast once
        for the layer's forward and weight products (the thin kernels read it too)."""
        low = cpu_autocast.product_dtype()
        if low is None or a.dtype != torch.float32 or not a.is_cpu:
            return a
        return a.to(low)

    def linear(self, a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        low = cpu_autocast.product_dtype()
        if low is not None and a.is_cpu and a.dim() == 2:
            if w.shape[0] <= THIN_MAX:  # float32 logits, as autocast's losses want them
                return self.ext.thin_linear(_dense_or_f32(a), _f32(_without_history(w)),
                                            _f32(_without_history(b)))
            return self._low_product(_as(a, low), _as(_without_history(w), low).t(),
                                     _as(_without_history(b), low))
        path = _product_path(w.shape[0], a.numel() * w.shape[0])
        if not _f32_dense(a, w, b) or a.dim() != 2 or path == "mkl":
            return super().linear(a, w, b)
        if path == "thin":
            return self.ext.thin_linear(a, _without_history(w), _without_history(b))
        return self._mm(a, _without_history(w), _without_history(b), "none", [], "")

    def _low_product(self, a: Tensor, m: Tensor, b: Tensor | None) -> Tensor:
        """a m (+ b) in bf16 under autocast: oneDNN's matmul (torch.mm / addmm on bf16, which
        reads a transposed m through its strides). A call costs 5 µs where the linear
        primitive costs 18 µs at small sizes, as much at the MLPs' alone, and the step
        measured 5-8 % faster with it (bench/bf16_product_calls.py, bench/RESULTS.md)."""
        return torch.mm(a, m) if b is None else torch.addmm(b, a, m)

    def linear_input_grad(self, d: Tensor, w: Tensor) -> Tensor:
        low = cpu_autocast.product_dtype()
        if low is not None and d.is_cpu and d.dim() == 2:
            if w.shape[0] <= THIN_MAX:  # read in float32, written in the products' dtype
                return self.ext.thin_input_grad(_f32(d), _f32(_without_history(w)),
                                                low)
            return self._low_product(_as(d, low), _as(_without_history(w), low), None)
        path = _product_path(w.shape[0], d.numel() * w.shape[1])
        if not _f32_dense(d, w) or d.dim() != 2 or path == "mkl":
            return super().linear_input_grad(d, w)
        if path == "thin":
            return self.ext.thin_input_grad(d, _without_history(w))
        return self._mm(d, _without_history(w).t(), None, "none", [], "")  # Wᵀ as a strided view

    def linear_weight_grad(self, pairs: Sequence[tuple[Tensor, Tensor]],
                           acc: Tensor | None = None) -> Tensor:
        """Σ_k d_kᵀ a_k as one oneDNN product; with ``acc``, added to it in row blocks.

        oneDNN (as torch exposes it) writes a product only to a new buffer, so an
        accumulating product runs in blocks of ACC_BLOCK_ROWS output rows, each added to
        ``acc`` as it comes: the extra buffer is one block, not a second weight.
        """
        return self._weight_grad(pairs, acc, False)[0]

    def weight_term_in_tangent_pass(self, n: int, out_f: int, in_f: int) -> bool:
        """As TorchBackend's; under autocast with native products also for weights of up to
        LOW_TERM_SLACK values more: the term is a bf16 product that pass 4 sums with its own
        in one sweep, where the doubled-batch product would stack [a; r] and [z̄; d] first
        (two copies whose cost in a step is that of about this many weights' extra traffic:
        bench/HISTORY.md, "the bf16 autocast step, change by change")."""
        if super().weight_term_in_tangent_pass(n, out_f, in_f):
            return True
        return (cpu_autocast.product_dtype() is not None and out_f > THIN_MAX
                and out_f * in_f <= 2 * n * (out_f + in_f) + LOW_TERM_SLACK)

    def linear_weight_term(self, d: KeptDelta, a: Tensor) -> Tensor:
        """dᵀ a; under autocast with native products, the bf16 product itself (pass 4 sums
        it with its own product into the float32 gradient in one sweep)."""
        low = cpu_autocast.product_dtype()
        if (low is None or isinstance(d, TransposedDelta) or d.dim() != 2 or a.dim() != 2
                or not d.is_cpu or d.shape[1] <= THIN_MAX):
            return self.linear_weight_grad([(d, a)])
        return torch.mm(_as(d, low).t(), _as(a, low))

    def linear_param_grads(self, pairs: Sequence[tuple[Tensor, Tensor | None]],
                           acc: Tensor | None, need_w: bool, need_b: bool
                           ) -> tuple[Tensor | None, Tensor | None]:
        """As TorchBackend's; the bias gradient Σ_n z̄ comes out of the sweep that lays out
        z̄ᵀ for the weight product (no separate pass over z̄)."""
        if not need_w:
            return super().linear_param_grads(pairs, acc, need_w, need_b)
        return self._weight_grad(pairs, acc, need_b)

    def _weight_grad(self, pairs: Sequence[tuple[Tensor, Tensor]], acc: Tensor | None,
                     bias: bool) -> tuple[Tensor, Tensor | None]:
        """(Σ_k d_kᵀ a_k (+ acc), Σ_n d_1[n] when ``bias``); d_1 may be kept as δᵀ
        (``keep_delta``, one pair)."""
        low = cpu_autocast.product_dtype()
        if low is not None:
            return self._weight_grad_low(pairs, acc, bias, low)
        if any(isinstance(d, TransposedDelta) for d, _ in pairs):
            dk, a = pairs[0]
            if (len(pairs) == 1 and isinstance(dk, TransposedDelta) and acc is None and not bias
                    and _f32_dense(a) and a.dim() == 2):
                if ONEDNN_PRODUCTS:
                    return self._mm(dk.t, a.t(), None, "none", [], ""), None
                return torch.mm(dk.t, a), None
            # any other use reads δ back through a view of δᵀ
            pairs = [(d.delta() if isinstance(d, TransposedDelta) else d, a) for d, a in pairs]
        flat = [t for pair in pairs for t in pair]
        ds, as_ = [d for d, _ in pairs], [a for _, a in pairs]
        n, out_f, in_f = sum(d.shape[0] for d in ds), ds[0].shape[1], as_[0].shape[1]
        path = _product_path(out_f, n * out_f * in_f)
        if not _f32_dense(acc, *flat) or any(t.dim() != 2 for t in flat) or path == "mkl":
            gw = super().linear_weight_grad(pairs, acc)
            return gw, (ds[0].sum(0) if bias else None)
        if path == "thin":
            return self.ext.thin_weight_grad(ds, as_, acc, bias)
        # [d_1; d_2]ᵀ [a_1; a_2] as one product: the narrower side is copied transposed,
        # the other is read through a transposed view of its (stacked) rows
        dt, gb = self.ext.transpose_cat_sum(ds) if bias else (self.ext.transpose_cat(ds), None)
        at = _stacked_rows(as_).t() if out_f <= in_f else self.ext.transpose_cat(as_)
        if acc is None:
            return self._mm(dt, at, None, "none", [], ""), gb
        for lo in range(0, out_f, ACC_BLOCK_ROWS):
            hi = min(lo + ACC_BLOCK_ROWS, out_f)
            acc[lo:hi].add_(self._mm(dt[lo:hi], at, None, "none", [], ""))
        return acc, gb

    def _weight_grad_low(self, pairs: Sequence[tuple[KeptDelta, Tensor]], acc: Tensor | None,
                         bias: bool, low: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """``_weight_grad`` under autocast: [d_1; d_2]ᵀ [a_1; a_2] as one product in ``low``
        (float32 accumulation inside oneDNN, the result rounded once, as eager autocast's
        weight products are), added to a float32 gradient; few outputs: float32 kernels."""
        ds = [d.delta() if isinstance(d, TransposedDelta) else d for d, _ in pairs]
        as_ = [a for _, a in pairs]
        if any(t.dim() != 2 or not t.is_cpu for t in ds + as_):
            gw = TorchBackend.linear_weight_grad(self, list(zip(ds, as_)), acc)
            return gw.float(), (ds[0].sum(0, dtype=torch.float32) if bias else None)
        if ds[0].shape[1] <= THIN_MAX:  # a read as it comes (float32 or bf16)
            return self.ext.thin_weight_grad(
                [_f32(d) for d in ds],
                [_dense_or_f32(a) for a in as_], _f32(acc), bias)
        # oneDNN's matmul (torch.mm in bf16) reads [d]ᵀ through strides: no transposed copy
        gw = torch.mm(_stacked_rows([_as(d, low) for d in ds]).t(),
                      _stacked_rows([_as(a, low) for a in as_]))
        gb = None
        if bias:  # Σ_n z̄[n] in float32, one sweep over its rows
            d0 = ds[0]
            gb = self.ext.channel_sum(d0) if _dense(d0) else d0.sum(0, dtype=torch.float32)
        if acc is None:
            return gw.float(), gb
        if acc.dtype == torch.float32:
            return acc.add_(gw), gb
        return self.ext.widened_sum(_as(acc, acc.dtype), gw), gb  # a bf16 pass-3 term

    def keep_delta(self, d: Tensor, in_features: int) -> KeptDelta:
        """δᵀ, where the weight product would copy δ transposed anyway (oneDNN's path, δ the
        narrower side): made now, so that δ itself is released when pass 2 moves on. Under
        autocast the weight product stacks δ in its own dtype: δ as it is."""
        if cpu_autocast.product_dtype() is not None:
            return d
        if not _f32_dense(d) or d.dim() != 2 or d.shape[1] > in_features or _product_path(
                d.shape[1], d.shape[0] * d.shape[1] * in_features) != "onednn":
            return d
        return TransposedDelta(self.ext.transpose_cat([d]))

    def weight_grad_operands(self, a: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
        """a and r as the two row blocks of one (2N, in) buffer: the doubled-batch product then
        reads [a; r] as one view instead of stacking a copy next to the live r in pass 4
        (and a's own storage is freed here unless something else holds it); under autocast
        in the products' dtype."""
        low = cpu_autocast.product_dtype()
        if low is not None and a.is_cpu and a.dim() == 2 and a.shape == r.shape:
            ar = torch.cat([_as(a, low), _as(r, low)])
            return ar[: a.shape[0]], ar[a.shape[0]:]
        if not _f32_dense(a, r) or a.dim() != 2 or a.shape[1] != r.shape[1]:
            return a, r
        ar = torch.cat([a, r])
        return ar[: a.shape[0]], ar[a.shape[0]:]

    # ---- activations ----------------------------------------------------------------
    def act_forward(self, spec: ActivationSpec, z: Tensor) -> tuple[Tensor, Saved]:
        low = cpu_autocast.product_dtype()
        if not (_dense(z) if low is not None else _f32_dense(z)):
            return super().act_forward(spec, z)
        if spec.name in ("relu", "leaky_relu"):  # y in the products' dtype under autocast
            lo = 0.0 if spec.name == "relu" else spec.params[0]
            y, bits, finite = self.ext.mask_forward(z, lo, low)
            if not finite:
                self._torch_values_where_not_finite(spec, z, y)
            return y, _Masked(bits, 1.0, lo)
        kind = _SMOOTH_KINDS.get(spec.name)
        if kind is None:
            return super().act_forward(spec, z)
        if low is None or z.dtype != low:  # the sweeps read float32, or bf16 under autocast
            z = _f32(z)
        p = tuple(spec.params) + (0.0, 0.0)
        y = self.ext.smooth_value(z, kind, p[0], p[1])
        special = None if self.ext.all_finite(z) else NonFinite.of(spec, z)
        if special is not None:  # torch's σ there too (the kernel's selects are not)
            special.fix(y, spec.value(special.at(z)))
        from_output = derivs_from_output(spec)
        return y, _SmoothState(y if from_output else z, kind, p[0], p[1], from_output, special)

    @staticmethod
    def _torch_values_where_not_finite(spec: ActivationSpec, z: Tensor, y: Tensor) -> None:
        """Sets y to torch's own σ at every NaN / ±inf of z. The kernels' branch-free forms
        (selects for min / max, blends by 0/1 factors) are exact for finite z but would turn
        ReLU(−inf) into NaN; the mask sweep itself says whether z has such a value."""
        bad = ~torch.isfinite(z)
        y[bad] = spec.value(z[bad]).to(y.dtype)

    def _mask_apply(self, saved: _Masked, t: Tensor) -> Tensor:
        """t ⊙ (bit ? hi : lo). Under autocast with native products: read as t comes, written
        in the products' dtype. Else in float32; a ReLU step keeps t's dtype (bf16 from an
        autocast step's torch ops), the others promote to float32 as TorchBackend's do."""
        low = cpu_autocast.product_dtype()
        if low is not None and _dense(t):
            return self.ext.mask_apply(saved.bits, t, saved.hi, saved.lo, low)
        out = self.ext.mask_apply(saved.bits, _f32(t), saved.hi, saved.lo)
        if out.dtype == t.dtype or saved.hi != 1.0 or saved.lo != 0.0:
            return out
        return out.to(t.dtype)  # a ReLU step keeps a bf16 operand's dtype

    def act_chain(self, spec: ActivationSpec, saved: Saved, d: Tensor) -> Tensor:
        if isinstance(saved, _Masked):
            return self._mask_apply(saved, d)
        if isinstance(saved, _SmoothState):
            return saved.mul_add(self.ext, saved.operand(d), None)
        return super().act_chain(spec, saved, d)

    def act_tangent(
        self, spec: ActivationSpec, saved: Saved, r: Tensor, u: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(saved, _Masked):
            return self._mask_apply(saved, r), None
        if isinstance(saved, _SmoothState):
            return saved.tangent(self.ext, saved.operand(r), saved.operand(u))
        return super().act_tangent(spec, saved, r, u)

    def act_backward(
        self, spec: ActivationSpec, saved: Saved, abar: Tensor, s: Tensor | None
    ) -> Tensor:
        if isinstance(saved, _Masked):
            out = self._mask_apply(saved, abar)
            return out if s is None else out.add_(s)
        if isinstance(saved, _SmoothState):
            return saved.mul_add(self.ext, saved.operand(abar), saved.operand(s))
        return super().act_backward(spec, saved, abar, s)

    # ---- dropout ----------------------------------------------------------------------
    def dropout_forward(self, a: Tensor, p: float) -> tuple[Tensor, Saved]:
        """y = a ⊙ keep / (1 − p) in a's dtype (float32, or bf16 under autocast)."""
        ok = _dense(a) if cpu_autocast.product_dtype() is not None else _f32_dense(a)
        if not ok or p >= 1.0:
            return super().dropout_forward(a, p)
        keep = torch.empty(a.shape, dtype=torch.uint8).bernoulli_(1.0 - p)
        scale = 1.0 / (1.0 - p)
        y, bits = self.ext.dropout_forward(a, keep, scale)
        return y, _Masked(bits, scale, 0.0)

    def dropout_apply(self, saved: Saved, t: Tensor) -> Tensor:
        if isinstance(saved, _Masked):
            return self._mask_apply(saved, t)
        return super().dropout_apply(saved, t)

    # ---- the loss's scalars -------------------------------------------------------------
    #: the checks run before pass 1, each in one sweep (a read-back costs nothing on the
    #: CPU, and the parameter sweep makes the weights' bf16 copies under autocast)
    defers_finite_checks = False

    def all_finite(self, t: Tensor) -> bool:
        """One sweep of Σ (t − t), NaN as soon as one value is not finite (no temporary)."""
        if not _dense(t):
            return super().all_finite(t)
        return self.ext.all_finite(t)

    def all_finite_many(self, ts: Sequence[Tensor]) -> bool:
        """All of the tensors finite, in one call and one thread (the parameters). Under
        autocast with native products, the weights the products read in bf16 are checked by
        the sweep that makes their bf16 copies (kept for ``product_weight``)."""
        self._weight_copies.clear()
        plain = [t.detach() for t in ts]
        if not all(_f32_dense(t) for t in plain):
            return super().all_finite_many(plain)
        if cpu_autocast.product_dtype() is None:
            return self.ext.all_finite_many(plain)
        cast: list[int] = []  # the indices of the weights product_weight will ask for
        rest: list[Tensor] = []
        for i, t in enumerate(plain):
            if _casts_weight(t):
                cast.append(i)
            else:
                rest.append(t)
        copies, finite = self.ext.narrowed_all_finite([plain[i] for i in cast])
        if finite:
            self._weight_copies.replace([ts[i] for i in cast], copies)
        return finite and self.ext.all_finite_many(rest)

    def penalty_terms(self, g: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Without a mask: Σ g² in one sweep (double accumulation) and g itself as the seed
        (g float32, or bf16 under autocast; the sum float32)."""
        if mask is not None or not _dense(g):
            return super().penalty_terms(g, mask)
        return self.ext.sum_squares(g), g

    # ---- heads ------------------------------------------------------------------------
    def softmax_ce(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        (z,) = _widened(z)
        if not _f32_dense(z) or z.dim() != 2:
            return super().softmax_ce(z, y)
        ce, p, _, _ = self.ext.softmax_head(z, y, False)
        return ce, p

    def head_checks_labels(self, z: Tensor) -> bool:
        """The C++ softmax head validates every label itself (gradreg_loss's message)."""
        return _f32_dense(*_widened(z)) and z.dim() == 2

    def softmax_head(
        self, z: Tensor, y: Tensor, uniform: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        (z,) = _widened(z)
        if not _f32_dense(z) or z.dim() != 2:
            return super().softmax_head(z, y, uniform)
        ce, p, data_grad, pen_grad = self.ext.softmax_head(z, y, uniform)
        return ce, p, data_grad, pen_grad

    def target_head(self, kind: str, z: Tensor, y: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The mse / bce head in one C++ sweep per row (head.cpp)."""
        z, y = _widened(z, y)
        if not _f32_dense(z, y) or z.dim() != 2 or y.shape != z.shape:
            return super().target_head(kind, z, y)
        data, grad, d2 = self.ext.target_head(z, y, 0 if kind == "mse" else 1)
        return data, grad, (None if kind == "mse" else d2)

    def softmax_hvp(self, p: Tensor, t: Tensor) -> Tensor:
        p, t = _widened(p, t)
        if not _f32_dense(p) or p.dim() != 2 or t.shape != p.shape:
            return super().softmax_hvp(p, t)
        return self.ext.softmax_hvp(p, t.contiguous())

    # ---- convolutions ------------------------------------------------------------------
    def conv2d_bias_grad(self, d: Tensor) -> Tensor:
        """A bf16 d (autocast): Σ_{n,h,w} per channel in one sweep into float32, where torch
        would widen d first; float32 d: torch's own (cascade) sum."""
        if d.dtype != torch.bfloat16 or not _dense(d) or d.dim() != 4:
            return super().conv2d_bias_grad(d)
        return self.ext.channel_sum(d)

    def conv2d_weight_grad(self, pairs: Sequence[tuple[Tensor, Tensor]], w: Tensor,
                           geom: ConvGeom) -> Tensor:
        """As TorchBackend's; under autocast each pair's product (in bf16, as torch's) is
        summed into a float32 gradient."""
        low = cpu_autocast.product_dtype()
        if low is None:
            return super().conv2d_weight_grad(pairs, w, geom)
        out = None  # each pair in the products' dtype (a float32 δ from batch norm too)
        for d, a in pairs:
            gw = super().conv2d_weight_grad([(d.to(low), a.to(low))], w, geom)
            out = gw.float() if out is None else out.add_(gw)
        return out

    def conv2d_input_grad(
        self, d: Tensor, w: Tensor, input_shape: Sequence[int], geom: ConvGeom
    ) -> Tensor:
        """Wᵀ ⋆ d; as one product and a fold for a layer with few input channels, and as one
        product written to every s-th pixel for a strided 1×1 convolution.

        oneDNN's transposed convolution is slow when it produces only 1-3 channels (the
        input gradient of a network's first layer costs several forwards). There G = Wᵀ d,
        (C·kh·kw, O) × (O, H'·W') per image, is a product of the same size as the forward,
        and a fold sums G's columns back into the image (``_folded_input_grad``), which is
        faster on the paper CNN's and the DCGAN critic's first layers. Used where C ≤ 3 and
        O ≥ C·kh·kw (below that the fold costs more).
        """
        stride, padding, dilation, groups = geom
        o, c, kh, kw = w.shape
        low = cpu_autocast.product_dtype()
        if (low is not None and groups == 1 and c <= 3 and o >= c * kh * kw and d.dim() == 4
                and len(input_shape) == 4):
            # a first layer under autocast: G = Wᵀ d in bf16 and the fold (float32 sums)
            # beat bf16's transposed convolution (bench/RESULTS.md)
            return self._folded_input_grad(_as(d, low), _as(w.detach(), low), input_shape, geom)
        if groups != 1 or not _f32_dense(d, w) or d.dim() != 4 or len(input_shape) != 4:
            return super().conv2d_input_grad(d, w, input_shape, geom)
        n = d.shape[0]
        if kh == kw == 1 and padding == (0, 0) and stride != (1, 1):
            # a strided 1×1 convolution (a ResNet shortcut): Wᵀ d lands on every s-th pixel
            # and the rest is zero (faster than oneDNN's transposed convolution)
            out = d.new_zeros(input_shape)
            out[:, :, ::stride[0], ::stride[1]] = torch.matmul(
                w.detach().reshape(o, c).t(), d.reshape(n, o, -1)).view(n, c, *d.shape[2:])
            return out
        if c > 3 or o < c * kh * kw:
            return super().conv2d_input_grad(d, w, input_shape, geom)
        return self._folded_input_grad(d, w.detach(), input_shape, geom)

    def _folded_input_grad(self, d: Tensor, w: Tensor, input_shape: Sequence[int],
                           geom: ConvGeom) -> Tensor:
        """Wᵀ ⋆ d as G = Wᵀ d per image, (C·kh·kw, O) × (O, H'·W') in d's and w's dtype,
        folded into (N, C, H, W) float32: the extension's sweep for stride 1 and dilation 1
        (G float32 or bf16), else ``F.fold``."""
        stride, padding, dilation, _ = geom
        o, c, kh, kw = w.shape
        cols = torch.matmul(w.reshape(o, c * kh * kw).t(), d.reshape(d.shape[0], o, -1))
        h, wd = int(input_shape[2]), int(input_shape[3])
        if tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and _dense(cols):
            return self.ext.col_fold(cols, c, kh, kw, h, wd, int(padding[0]), int(padding[1]))
        return F.fold(cols.float(), (h, wd), (kh, kw), dilation=dilation, padding=padding,
                      stride=stride)

    # ---- pooling ----------------------------------------------------------------------
    def max_pool2d(
        self, a: Tensor, kernel, stride, padding, dilation, ceil_mode: bool
    ) -> tuple[Tensor, Tensor]:
        if not _dense(a) or a.dim() != 4:  # float32, or bf16 under autocast
            return super().max_pool2d(a, kernel, stride, padding, dilation, ceil_mode)
        k, s = _pair(kernel), _pair(stride if stride else kernel)
        p, d = _pair(padding), _pair(dilation)
        if p[0] * 2 > k[0] or p[1] * 2 > k[1]:  # torch's own error for this case
            return super().max_pool2d(a, kernel, stride, padding, dilation, ceil_mode)
        y, idx = self.ext.max_pool2d(a, k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1],
                                     bool(ceil_mode))
        return y, idx

    def pool_gather(self, r: Tensor, idx: Tensor) -> Tensor:
        if not _dense(r) or r.dim() != 4 or not idx.is_contiguous():
            return super().pool_gather(r, idx)
        return self.ext.pool_gather(r, idx)

    def pool_scatter(self, d: Tensor, idx: Tensor, input_shape: Sequence[int],
                     disjoint: tuple[int, int, int, int] | None = None) -> Tensor:
        if (d.dtype not in (torch.float32, torch.bfloat16) or d.dim() != 4
                or not idx.is_contiguous()):
            return super().pool_scatter(d, idx, input_shape, disjoint=disjoint)
        plane = int(input_shape[2]) * int(input_shape[3])
        return self.ext.pool_scatter(d.contiguous(), idx, plane).view(input_shape)

    # ---- train-mode batch norm ----------------------------------------------------------
    # BatchNorm1d on (N, C): the kernels sweep each channel's values as contiguous rows, so a
    # (N, C) operand runs as its channel-major copy (1, C, N); the copies cost a few
    # microseconds where a strided sweep would cost a cache line per value. x̂ and s, which
    # only these methods read, stay channel-major (returned as (N, C) views of it).
    # Under autocast with native products the kernels read bf16 operands as they come and
    # write y, x̂, k P(·) and s in bf16 (y and k P(·) the dtype the next product reads; x̂ and
    # s are read by the later sweeps only, which widen them); the statistics stay float32.
    def bn_train_forward(
        self, a: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        low = cpu_autocast.product_dtype()
        if not (_bn_operand(a, low) and _f32_dense(gamma, beta)):
            return super().bn_train_forward(a, gamma, beta, eps)
        y, xhat, inv_std, mean, var = self.ext.bn_forward(_cmajor(a), gamma, beta, eps, low)
        if y is xhat:  # no affine: y is x̂, kept once (row-major, the next layer reads it)
            y_r = xhat_r = _rmajor(y, a)
        else:
            y_r, xhat_r = _rmajor(y, a), _rmajor_view(xhat, a)
        return y_r, xhat_r, channel_view(inv_std, a), mean, var

    def bn_project(self, v: Tensor, xhat: Tensor) -> tuple[Tensor, Tensor]:
        xc = _cmajor(xhat)
        if not _dense(xc) or not _bn_operand(v, cpu_autocast.product_dtype()):
            return super().bn_project(v, xhat)
        pv, mx = self.ext.bn_project(_cmajor(v), xc)
        return _rmajor(pv, xhat), channel_view(mx, xhat)

    def bn_chain(self, d: Tensor, xhat: Tensor, k: Tensor
                 ) -> tuple[Tensor, Saved, tuple[Tensor, Tensor]]:
        low = cpu_autocast.product_dtype()
        xc = _cmajor(xhat)
        if not (_dense(xc) and _f32_dense(k)) or not _bn_operand(d, low):
            return super().bn_chain(d, xhat, k)
        d = _cmajor(d)
        out, md, mxd = self.ext.bn_chain(d, xc, k, low)
        return _rmajor(out, xhat), _BnChain(d, md, mxd), (md, mxd)

    def bn_tangent(
        self, saved: Saved, r: Tensor, xhat: Tensor, k: Tensor, inv_std: Tensor,
        gamma_c: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        low = cpu_autocast.product_dtype()
        xc = _cmajor(xhat)
        if not isinstance(saved, _BnChain) or not _bn_operand(r, low) or not _dense(xc):
            return super().bn_tangent(saved, r, xhat, k, inv_std, gamma_c)
        gamma = None if gamma_c.dim() == 0 else gamma_c.reshape(-1).contiguous()
        out, s, tan_gamma = self.ext.bn_tangent(_cmajor(r), xc, saved.d, k,
                                                inv_std.reshape(-1).contiguous(), gamma,
                                                saved.md, saved.mxd, low)
        return _rmajor(out, xhat), _rmajor_view(s, xhat), tan_gamma

    def bn_backward(self, abar: Tensor, xhat: Tensor, k: Tensor, s: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        low = cpu_autocast.product_dtype()
        xc = _cmajor(xhat)
        # the kernel reads s in x̂'s dtype (the tangent wrote it so)
        sc = None if s is None else _cmajor(s if s.dtype == xc.dtype else s.to(xc.dtype))
        if not (_dense(xc, sc) and _f32_dense(k)) or not _bn_operand(abar, low):
            return super().bn_backward(abar, xhat, k, s)
        out, g_xhat, g_sum = self.ext.bn_backward(_cmajor(abar), xc, k, sc, low)
        return _rmajor(out, xhat), g_xhat, g_sum

    def channel_dot(self, a: Tensor, b: Tensor) -> Tensor:
        """As TorchBackend's, in one sweep with no a ⊙ b temporary (sums in double)."""
        a, b = _widened(a, b)
        if not _f32_dense(a, b) or a.dim() < 2 or a.shape != b.shape:
            return super().channel_dot(a, b)
        return self.ext.channel_dot(a, b)


def _stacked_rows(parts: Sequence[Tensor]) -> Tensor:
    """[p_1; p_2; ...] as one (ΣN, C) tensor: the buffer itself when the parts already are
    its consecutive row blocks (the Linear rule's [a; r]), else a concatenation."""
    if len(parts) == 1:
        return parts[0]
    base = parts[0]._base
    if base is not None and base.dim() == 2 and base.is_contiguous() and all(
            p._base is base for p in parts) and sum(p.shape[0] for p in parts) == base.shape[0]:
        offset = base.storage_offset()
        for p in parts:
            if p.storage_offset() != offset:
                break
            offset += p.numel()
        else:
            return base
    return torch.cat(parts)


def _cmajor(t: Tensor) -> Tensor:
    """A (N, C) operand as its channel-major copy (1, C, N); (N, C, ...) ones as they are."""
    return t.t().contiguous().unsqueeze(0) if t.dim() == 2 else t.contiguous()


def _rmajor(t: Tensor, like: Tensor) -> Tensor:
    """The inverse of ``_cmajor`` for a result shaped like ``like``."""
    return t.squeeze(0).t().contiguous() if like.dim() == 2 else t


def _rmajor_view(t: Tensor, like: Tensor) -> Tensor:
    """``_rmajor`` as a view, for a result only these methods read back (x̂, s): their
    ``_cmajor`` of it is then the channel-major buffer itself, with no copy either way."""
    return t.squeeze(0).t() if like.dim() == 2 else t

