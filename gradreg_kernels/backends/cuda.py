"""CudaBackend: the activation steps and the softmax-CE head as CUDA C++ kernels.

The extension (csrc/cuda: activation.cu, softmax_head.cu, binding.cpp; the package reaches
it through the link gradreg_kernels/csrc) is built on first use with
torch.utils.cpp_extension.load and ninja, once per process, into a cache folder named by
the hash of its sources (so an edit rebuilds and an unchanged tree reuses the build);
torch's own file lock in that folder serialises concurrent builds. Everything else
(products, BatchNorm, pooling) runs as in TorchBackend.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ..rules.activation_math import ActivationSpec, values_at_infinity
from .torch_ops import TorchBackend

SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
SOURCES = ("activation.cu", "softmax_head.cu", "binding.cpp")
HEADERS = ("common.cuh",)

ACT_CODES = {"relu": 0, "leaky_relu": 1, "softplus": 2, "tanh": 3, "sigmoid": 4, "gelu": 5,
             "gelu_tanh": 6, "elu": 7, "silu": 8, "mish": 9, "hardswish": 10}
PIECEWISE = (0, 1)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_LOCK = threading.Lock()
_MODULE: ModuleType | None = None


def source_hash() -> str:
    """Hash of the sources and headers (12 hex digits): the build's cache key."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    """Where builds are kept: $GRADREG_CACHE_DIR or ~/.cache/gradreg_kernels."""
    root = os.environ.get("GRADREG_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "gradreg_kernels")
    return Path(root)


def load_extension(verbose: bool = False) -> ModuleType:
    """The compiled extension, built on first call (minutes) and cached by source hash."""
    global _MODULE
    with _LOCK:
        if _MODULE is None:
            from torch.utils.cpp_extension import load

            key = source_hash()
            build = cache_dir() / f"cuda-{key}"
            build.mkdir(parents=True, exist_ok=True)
            _MODULE = load(name=f"gradreg_cuda_{key}",
                           sources=[str(SOURCE_DIR / s) for s in SOURCES],
                           extra_include_paths=[str(SOURCE_DIR)],
                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
                           build_directory=str(build), verbose=verbose)
        return _MODULE


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _ok(*ts: Tensor | None) -> bool:
    real = [t for t in ts if t is not None]
    return all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in real) and \
        all(t.dtype == real[0].dtype and t.shape == real[0].shape for t in real)


class CudaBackend(TorchBackend):
    """CUDA C++ kernels for the elementwise activation steps and the softmax-CE head."""

    name = "cuda"

    def __init__(self) -> None:
        self.ext = load_extension()

    # ---- elementwise activation steps -------------------------------------------------
    def act_forward(self, spec: ActivationSpec, z: Tensor) -> tuple[Tensor, object]:
        code = ACT_CODES.get(spec.name)
        if code is None or not _ok(z):
            return super().act_forward(spec, z)
        z = z.contiguous()
        p0, p1 = _params(spec.params)
        v_pos, v_neg = values_at_infinity(spec)
        y, mask = self.ext.act_forward(z, code, p0, p1, v_pos, v_neg, code in PIECEWISE,
                                       _stream(z))
        return y, (code, spec.params, mask if code in PIECEWISE else z, z.dtype)

    def _run_chain(self, spec, saved, d: Tensor, s: Tensor | None) -> Tensor | None:
        """σ'(z) ⊙ d (+ s) by the kernel, or None where the operands don't fit it.

        The kernel writes d's dtype; TorchBackend promotes with z's dtype except for ReLU,
        so where those differ the portable path runs (the dtypes downstream stay the same).
        """
        if not (isinstance(saved, tuple) and len(saved) == 4):
            return None
        code, params, state, zdtype = saved
        if not _ok(d, s) or state.numel() != d.numel():
            return None
        if code != 0 and torch.promote_types(zdtype, d.dtype) != d.dtype:
            return None
        if code not in PIECEWISE and state.dtype != d.dtype:
            return None
        p0, p1 = _params(params)
        return self.ext.act_chain(state, d.contiguous(), None if s is None else s.contiguous(),
                                  code, p0, p1, _stream(d))

    def act_chain(self, spec: ActivationSpec, saved: object, d: Tensor) -> Tensor:
        out = self._run_chain(spec, saved, d, None)
        return out if out is not None else super().act_chain(spec, _portable(saved), d)

    def act_tangent(self, spec: ActivationSpec, saved: object, r: Tensor, u: Tensor | None
                    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(saved, tuple) and saved[0] in PIECEWISE:
            out = self._run_chain(spec, saved, r, None)
            if out is not None:
                return out, None
        elif isinstance(saved, tuple) and _ok(saved[2], r, u):
            code, params, z, _ = saved
            p0, p1 = _params(params)
            out, s = self.ext.act_tangent(z, r.contiguous(), u.contiguous(), code, p0, p1,
                                          _stream(r))
            return out, s
        return super().act_tangent(spec, _portable(saved), r, u)

    def act_backward(self, spec: ActivationSpec, saved: object, abar: Tensor, s: Tensor | None
                     ) -> Tensor:
        out = self._run_chain(spec, saved, abar, s)
        if out is not None:
            return out
        return super().act_backward(spec, _portable(saved), abar, s)

    # ---- heads ------------------------------------------------------------------------
    def softmax_ce(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if z.dim() != 2 or not _ok(z):
            return super().softmax_ce(z, y)
        ce, p = self.ext.softmax_ce(z.contiguous(), y.long().contiguous(), _stream(z))
        return ce, p

    def softmax_hvp(self, p: Tensor, t: Tensor) -> Tensor:
        if p.dim() != 2 or p.dtype != torch.float32 or not (_ok(p) and _ok(t)) \
                or p.shape != t.shape:
            return super().softmax_hvp(p, t)
        return self.ext.softmax_hvp(p.contiguous(), t.contiguous(), _stream(p))


def _params(params: tuple[float, ...]) -> tuple[float, float]:
    p = tuple(float(v) for v in params) + (0.0, 0.0)
    return p[0], p[1]


def _portable(saved: object) -> object:
    """The state as TorchBackend's steps read it: ReLU's bool mask, or z, for which a 0/1
    mask in z's dtype stands (LeakyReLU's σ' depends only on the sign)."""
    if not (isinstance(saved, tuple) and len(saved) == 4):
        return saved
    code, _, state, zdtype = saved
    if code == 0:
        return state.bool()  # ReLU's portable state is its mask
    return state.to(zdtype) if code in PIECEWISE else state
