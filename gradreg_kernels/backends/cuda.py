"""CudaBackend: the activation steps and the softmax-CE head as CUDA C++ kernels.

The extension (csrc/cuda: activation.cu, softmax_head.cu, binding.cpp, with the generated
csrc/common/activation_codes.h; the package reaches it through the link gradreg_kernels/csrc)
is built on first use with torch.utils.cpp_extension.load and ninja, once per process, into
a folder of the shared build cache (native_build: ``GRADREG_KERNELS_CACHE``, a key over the
sources, toolchain, flags, CPU features and GPU architecture, one lock), so an edit
rebuilds and an unchanged tree reuses the build. Everything else (products, BatchNorm,
pooling) runs as in TorchBackend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ..activation_math import ActivationSpec, values_at_infinity
from ..activation_table import NATIVE_CODES, PIECEWISE_CODES
from ..backend_protocol import BackendState, Saved
from . import native_build
from .torch_ops import TorchBackend

SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
SOURCES = ("activation.cu", "softmax_head.cu", "binding.cpp")
HEADERS = ("common.cuh", "../common/activation_codes.h")
FLAGS = ("-O3",)

ACT_CODES = NATIVE_CODES  # the activation table's codes the kernels implement
PIECEWISE = PIECEWISE_CODES
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_MODULE: ModuleType | None = None


def build_key() -> str:
    """The cache key of the sources, headers, CUDA toolchain, flags and GPU architecture."""
    toolchain = (str(torch.version.cuda), native_build.compiler())
    files = [(SOURCE_DIR / n).resolve() for n in SOURCES + HEADERS]
    return native_build.build_key(files, FLAGS, toolchain=toolchain, gpu=native_build.gpu_arch())


def load_extension(verbose: bool = False) -> ModuleType:
    """The compiled extension, built on first call (minutes) and cached by build key."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    key = build_key()
    build = native_build.cache_root() / f"cuda-{key}"
    with native_build.locked(build.with_name(build.name + ".lock")):
        if _MODULE is None:
            from torch.utils.cpp_extension import load

            build.mkdir(parents=True, exist_ok=True)
            if not any(build.glob("*.so")):
                native_build.announce_build("CUDA", build)
            native_build.ensure_ninja_on_path()
            _MODULE = load(name=f"gradreg_cuda_{key}",
                           sources=[str(SOURCE_DIR / s) for s in SOURCES],
                           extra_include_paths=[str(SOURCE_DIR)],
                           extra_cflags=list(FLAGS), extra_cuda_cflags=list(FLAGS),
                           build_directory=str(build), verbose=verbose)
        return _MODULE


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _ok(*ts: Tensor | None) -> bool:
    real = [t for t in ts if t is not None]
    return all(t.is_cuda and t.dtype in KERNEL_DTYPES for t in real) and \
        all(t.dtype == real[0].dtype and t.shape == real[0].shape for t in real)


@dataclass(frozen=True)
class CudaActState(BackendState):
    """What the CUDA activation forward keeps: the table ``code`` and hyper-parameters of
    the activation, ``state`` (a uint8 mask z > 0 for piecewise-linear codes, else z itself,
    contiguous) and z's dtype."""

    code: int
    params: tuple[float, ...]
    state: Tensor
    zdtype: torch.dtype


class CudaBackend(TorchBackend):
    """CUDA C++ kernels for the elementwise activation steps and the softmax-CE head."""

    name = "cuda"

    def __init__(self) -> None:
        self.ext = load_extension()

    # ---- elementwise activation steps -------------------------------------------------
    def act_forward(self, spec: ActivationSpec, z: Tensor) -> tuple[Tensor, Saved]:
        code = ACT_CODES.get(spec.name)
        if code is None or not _ok(z):
            return super().act_forward(spec, z)
        z = z.contiguous()
        p0, p1 = _params(spec.params)
        v_pos, v_neg = values_at_infinity(spec)
        y, mask = self.ext.act_forward(z, code, p0, p1, v_pos, v_neg, code in PIECEWISE,
                                       _stream(z))
        return y, CudaActState(code, spec.params, mask if code in PIECEWISE else z, z.dtype)

    def _run_chain(self, spec, saved, d: Tensor, s: Tensor | None) -> Tensor | None:
        """σ'(z) ⊙ d (+ s) by the kernel, or None where the operands don't fit it.

        The kernel writes d's dtype; TorchBackend promotes with z's dtype except for ReLU,
        so where those differ the portable path runs (the dtypes downstream stay the same).
        """
        if not isinstance(saved, CudaActState):
            return None
        code, params, state, zdtype = saved.code, saved.params, saved.state, saved.zdtype
        if not _ok(d, s) or state.numel() != d.numel():
            return None
        if code != ACT_CODES["relu"] and torch.promote_types(zdtype, d.dtype) != d.dtype:
            return None
        if code not in PIECEWISE and state.dtype != d.dtype:
            return None
        p0, p1 = _params(params)
        return self.ext.act_chain(state, d.contiguous(), None if s is None else s.contiguous(),
                                  code, p0, p1, _stream(d))

    def act_chain(self, spec: ActivationSpec, saved: Saved, d: Tensor) -> Tensor:
        out = self._run_chain(spec, saved, d, None)
        return out if out is not None else super().act_chain(spec, _portable(saved), d)

    def act_tangent(self, spec: ActivationSpec, saved: Saved, r: Tensor, u: Tensor | None
                    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(saved, CudaActState) and saved.code in PIECEWISE:
            out = self._run_chain(spec, saved, r, None)
            if out is not None:
                return out, None
        elif isinstance(saved, CudaActState) and _ok(saved.state, r, u):
            p0, p1 = _params(saved.params)
            out, s = self.ext.act_tangent(saved.state, r.contiguous(), u.contiguous(),
                                          saved.code, p0, p1, _stream(r))
            return out, s
        return super().act_tangent(spec, _portable(saved), r, u)

    def act_backward(self, spec: ActivationSpec, saved: Saved, abar: Tensor, s: Tensor | None
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


def _portable(saved: Saved) -> Saved:
    """The state as TorchBackend's steps read it: ReLU's bool mask, or z, for which a 0/1
    mask in z's dtype stands (LeakyReLU's σ' depends only on the sign)."""
    if not isinstance(saved, CudaActState):
        return saved
    code, state, zdtype = saved.code, saved.state, saved.zdtype
    if code == ACT_CODES["relu"]:
        return state.bool()  # ReLU's portable state is its mask
    return state.to(zdtype) if code in PIECEWISE else state
