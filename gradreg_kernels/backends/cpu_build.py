"""Builds and loads the C++ CPU extension (csrc/cpu/*.cpp, csrc/common/*.h) on first use.

The sources are compiled with ``torch.utils.cpp_extension.load`` (ninja) into a folder of
the shared build cache (native_build: one cache folder, ``GRADREG_KERNELS_CACHE``; one cache
key over the sources, toolchain, flags and CPU features; one lock). The build uses
``-march=native``; it happens on the machine that runs it, so a cache shared between
different CPUs gets one build per CPU kind. A finished build is marked by a stamp file
written atomically; later processes import the module straight from the cache without
running ninja, so an unchanged source is never rebuilt. The first build says so on stderr
(it takes about a minute).

Where the sources live: ``csrc/cpu`` at the repository root; the package carries a link
``gradreg_kernels/csrc`` to it, which setuptools turns into copied package data in a wheel.
The loader looks in the package first, then at the repository root
(``GRADREG_KERNELS_CSRC`` overrides both).
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path
from types import ModuleType

from . import native_build
from .native_build import compiler

EXT_PREFIX = "gradreg_cpu"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)


class CpuBuildError(RuntimeError):
    """The C++ CPU extension could not be built or loaded (the "torch" backend still works)."""


def source_dir() -> Path:
    """The folder holding the extension's .cpp/.h files."""
    env = os.environ.get("GRADREG_KERNELS_CSRC")
    candidates = [Path(env) / "cpu"] if env else []
    pkg = Path(__file__).resolve().parent.parent
    candidates += [pkg / "csrc" / "cpu", pkg.parent / "csrc" / "cpu"]
    for c in candidates:
        if (c / "bindings.cpp").is_file():
            return c
    raise CpuBuildError("C++ sources not found; looked in " + ", ".join(map(str, candidates)))


def sources() -> list[Path]:
    """The translation units, sorted."""
    return sorted(source_dir().glob("*.cpp"))


def key_files() -> list[Path]:
    """Every file the binary depends on: the sources, their headers and the shared ones."""
    d = source_dir()
    return sources() + sorted(d.glob("*.h")) + sorted((d.parent / "common").glob("*.h"))


def build_key() -> str:
    """The cache key of this source tree, toolchain and machine (native_build.build_key)."""
    return native_build.build_key(key_files(), CFLAGS + LDFLAGS, toolchain=(compiler(),))


def _check_toolchain() -> None:
    cxx = compiler()
    if shutil.which(cxx.split()[0]) is None:
        raise CpuBuildError(
            f"no C++ compiler found (CXX={cxx!r} is not on PATH); the 'cpu' backend needs "
            "one to build its extension; install g++ or clang++, or use backend='torch'")
    native_build.ensure_ninja_on_path()
    if shutil.which("ninja") is None:
        raise CpuBuildError("ninja not found; `pip install ninja`, or use backend='torch'")
    if not sysconfig.get_paths().get("include"):
        raise CpuBuildError("Python headers not found; they are needed to build the extension")


def build_dir() -> Path:
    """The cache folder of this source tree's build."""
    return native_build.cache_root() / f"cpu-{build_key()}"


def load_extension(verbose: bool = False) -> ModuleType:
    """Import the extension, building it first if this exact source was never built here."""
    out = build_dir()
    name = out.name.replace("cpu-", EXT_PREFIX + "_")
    module = native_build.import_built(name, out)
    if module is not None:
        return module
    _check_toolchain()
    with native_build.locked(out.with_name(out.name + ".lock")):
        module = native_build.import_built(name, out)  # another process may have built it
        return module if module is not None else _build(name, out, verbose)


def _build(name: str, out: Path, verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    if out.exists():  # a half-finished build of a crashed process
        shutil.rmtree(out)
    out.mkdir(parents=True)
    native_build.announce_build("C++ CPU", out)
    try:
        module = load(name=name, sources=[str(p) for p in sources()],
                      extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                      build_directory=str(out), verbose=verbose)
    except Exception as e:  # compiler errors arrive as RuntimeError / CalledProcessError
        raise CpuBuildError(f"building the C++ CPU extension in {out} failed: {e}") from e
    native_build.write_atomic(out / native_build.STAMP,
                              native_build.stamp_of(out / f"{name}.so"))
    return module
