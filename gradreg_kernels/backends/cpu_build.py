"""Builds and loads the C++ CPU extension (csrc/cpu/*.cpp) on first use.

The sources are compiled with ``torch.utils.cpp_extension.load`` (ninja) into a cache
directory keyed by a hash of everything that shapes the binary: the sources, torch and
Python versions, the compiler, the flags and this CPU's instruction-set flags (the build
uses ``-march=native``; it happens on the machine that runs it, so a cache shared between
different CPUs gets one build per CPU kind). A finished build is marked by a stamp file
written atomically; later processes import the module straight from the cache without
running ninja, so an unchanged source is never rebuilt. An exclusive ``fcntl`` lock on the
cache directory serialises builds, so two processes building at once get one build.

Where the sources live: ``csrc/cpu`` at the repository root; the package carries a link
``gradreg_kernels/csrc`` to it, which setuptools turns into copied package data in a wheel.
The loader looks in the package first, then at the repository root
(``GRADREG_KERNELS_CSRC`` overrides both).

Cache location: ``GRADREG_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/gradreg_kernels``, else
``~/.cache/gradreg_kernels``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

import torch

EXT_PREFIX = "gradreg_cpu"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-DNDEBUG")
LDFLAGS = ("-fopenmp",)
_STAMP = "build.ok"


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
    d = source_dir()
    return sorted(d.glob("*.cpp"))


def cache_root() -> Path:
    env = os.environ.get("GRADREG_KERNELS_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gradreg_kernels"


def compiler() -> str:
    """The C++ compiler torch's builder will call (``CXX`` or ``c++``)."""
    return os.environ.get("CXX", "c++")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_key() -> str:
    """Hash of the sources and of every input that changes the binary."""
    h = hashlib.sha256()
    d = source_dir()
    for p in sorted(list(d.glob("*.cpp")) + list(d.glob("*.h"))):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for part in (torch.__version__, sys.version, compiler(), " ".join(CFLAGS + LDFLAGS),
                 _cpu_flags(), platform.machine()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _import_so(name: str, so: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(so))
    spec = importlib.util.spec_from_file_location(name, str(so), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _ensure_ninja_on_path() -> None:
    try:
        import ninja  # the pip package ships the binary
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _check_toolchain() -> None:
    cxx = compiler()
    if shutil.which(cxx.split()[0]) is None:
        raise CpuBuildError(
            f"no C++ compiler found (CXX={cxx!r} is not on PATH); the 'cpu' backend needs "
            "one to build its extension; install g++ or clang++, or use backend='torch'")
    _ensure_ninja_on_path()
    if shutil.which("ninja") is None:
        raise CpuBuildError("ninja not found; `pip install ninja`, or use backend='torch'")
    if not sysconfig.get_paths().get("include"):
        raise CpuBuildError("Python headers not found; they are needed to build the extension")


def build_dir() -> Path:
    return cache_root() / f"cpu-{build_key()}"


def load_extension(verbose: bool = False) -> ModuleType:
    """Import the extension, building it first if this exact source was never built here."""
    key = build_key()
    out = cache_root() / f"cpu-{key}"
    name = f"{EXT_PREFIX}_{key}"
    so = out / f"{name}.so"
    module = _import_built(name, out, so)
    if module is not None:
        return module
    _check_toolchain()
    with _locked(cache_root() / f"cpu-{key}.lock"):  # flock: a killed holder releases it
        module = _import_built(name, out, so)  # another process may have built it meanwhile
        return module if module is not None else _build(name, out, verbose)


def _stamp_of(so: Path) -> str:
    """What the stamp records of a finished build: the library's name, size and SHA-256."""
    return f"{so.name}\n{so.stat().st_size}\n{hashlib.sha256(so.read_bytes()).hexdigest()}\n"


def _import_built(name: str, out: Path, so: Path) -> ModuleType | None:
    """The cached module, or None when there is none or its library is not the one the
    build finished with (truncated or corrupted on disk by a crash or a full disk, which
    would crash the process when loaded): it is rebuilt then."""
    stamp = out / _STAMP
    if not (stamp.is_file() and so.is_file()) or stamp.read_text() != _stamp_of(so):
        return None
    try:
        return _import_so(name, so)
    except (ImportError, OSError):
        return None


def _build(name: str, out: Path, verbose: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    if out.exists():  # a half-finished build of a crashed process
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        module = load(name=name, sources=[str(p) for p in sources()],
                      extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                      build_directory=str(out), verbose=verbose)
    except Exception as e:  # compiler errors arrive as RuntimeError / CalledProcessError
        raise CpuBuildError(f"building the C++ CPU extension in {out} failed: {e}") from e
    _write_atomic(out / _STAMP, _stamp_of(out / f"{name}.so"))
    return module
