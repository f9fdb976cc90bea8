"""What the C++ CPU and the CUDA extension builds share: the cache folder, the cache key,
the lock, the finished-build stamp and the notice that a build is running.

Cache folder: ``$GRADREG_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/gradreg_kernels``, else
``~/.cache/gradreg_kernels``; each build lives in ``<cache>/<kind>-<key>``.

Cache key (``build_key``): SHA-256, 16 hex digits, of every input that shapes the binary:
the name and bytes of each source and header, torch's and Python's versions, the
toolchain (compiler, CUDA version), the flags, this CPU's instruction-set flags and
machine type, and, for CUDA, the GPU architectures it is compiled for. An edit, another
compiler or another CPU kind gets its own build; an unchanged tree reuses the build.

Lock (``locked``): an exclusive ``fcntl`` lock on ``<cache>/<kind>-<key>.lock``, held while
building, together with a lock for the threads of this process, so that concurrent
processes and threads get one build (a killed holder releases the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

import torch

#: the one environment variable naming the cache folder
CACHE_ENV = "GRADREG_KERNELS_CACHE"
#: the file whose content marks a finished build (see ``stamp_of``)
STAMP = "build.ok"

_THREAD_LOCK = threading.Lock()
_ANNOUNCED: set[str] = set()


def cache_root() -> Path:
    """The folder holding every build (see the module docstring)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gradreg_kernels"


def compiler() -> str:
    """The C++ compiler torch's builder will call (``CXX`` or ``c++``)."""
    return os.environ.get("CXX", "c++")


def cpu_features() -> str:
    """This CPU's instruction-set flags (/proc/cpuinfo), or the processor's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_arch() -> str:
    """The GPU architectures a CUDA build targets: $TORCH_CUDA_ARCH_LIST where set (torch's
    builder reads it), else the compute capability of each visible device."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if not torch.cuda.is_available():
        return ""
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{a}.{b}" for a, b in sorted(caps))


def build_key(files: Iterable[Path], flags: Sequence[str], toolchain: Sequence[str] = (),
              gpu: str = "") -> str:
    """SHA-256 (16 hex digits) of the files' names and bytes, torch's and Python's versions,
    the toolchain, the flags, this CPU's features and machine type and the GPU architecture."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: (p.parent.name, p.name)):
        h.update(f"{p.parent.name}/{p.name}".encode())
        h.update(p.read_bytes())
    for part in (torch.__version__, sys.version, *toolchain, " ".join(flags), cpu_features(),
                 platform.machine(), gpu):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold this process's build lock and an exclusive ``fcntl`` lock on ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _THREAD_LOCK, open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def announce_build(what: str, out: Path) -> None:
    """Tell the user, once per process and extension, that a first build is running."""
    if what in _ANNOUNCED:
        return
    _ANNOUNCED.add(what)
    print(f"gradreg_kernels: building the {what} extension in {out} (about a minute, once "
          "per source version and machine) ...", file=sys.stderr, flush=True)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def stamp_of(so: Path) -> str:
    """What the stamp records of a finished build: the library's name, size and SHA-256."""
    return f"{so.name}\n{so.stat().st_size}\n{hashlib.sha256(so.read_bytes()).hexdigest()}\n"


def import_so(name: str, so: Path) -> ModuleType:
    """Import the extension module ``name`` from the shared library ``so``."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(so))
    spec = importlib.util.spec_from_file_location(name, str(so), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def import_built(name: str, out: Path) -> ModuleType | None:
    """The cached module, or None when there is none or its library is not the one the
    build finished with (truncated or corrupted on disk by a crash or a full disk, which
    would crash the process when loaded): it is rebuilt then."""
    so, stamp = out / f"{name}.so", out / STAMP
    if not (stamp.is_file() and so.is_file()) or stamp.read_text() != stamp_of(so):
        return None
    try:
        return import_so(name, so)
    except (ImportError, OSError):
        return None


def ensure_ninja_on_path() -> None:
    """Put the ninja of the ``ninja`` pip package on PATH where it is installed."""
    try:
        import ninja  # the pip package ships the binary
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
