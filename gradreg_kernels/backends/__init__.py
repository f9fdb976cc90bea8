"""Backends: the primitive kernels of the four passes, chosen by name or automatically.

"torch" (portable, any device) is always present; faster backends register themselves
with ``register_backend`` and are tried in order of preference by ``backend="auto"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .torch_ops import TorchBackend


@dataclass
class BackendEntry:
    name: str
    factory: Callable[[], TorchBackend]
    device_types: tuple[str, ...]
    available: Callable[[], str | None]  # None when usable, else the reason it is not
    priority: int = 0
    #: its first use compiles a native extension (minutes): "auto" measures it only once
    #: it is built
    builds_on_first_use: bool = False


_REGISTRY: dict[str, BackendEntry] = {}
_INSTANCES: dict[str, TorchBackend] = {}
#: (name, device type, the environment variables that switch backends) → the entry chosen;
#: a drop-in Function resolves its backend on every call, so the choice is remembered
_RESOLVED: dict[tuple, BackendEntry] = {}
_SWITCHES = ("GRADREG_KERNELS_CPU_EXT", "TRITON_INTERPRET")


def _switch_values() -> tuple:
    """The values of the ``_SWITCHES`` in the environment (None where unset).

    Read from the dict that ``os.environ`` keeps of its encoded names and values, where
    CPython keeps one: one lookup each. ``os.environ.get`` runs half a dozen Python calls
    (encode the name, look up, decode the value), which inside a training step, whose
    products have just swept the caches, is measurable (bench/front_end_cost.py).
    """
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and _ENCODED_SWITCHES is not None:
        return tuple(data.get(k) for k in _ENCODED_SWITCHES)
    return tuple(os.environ.get(k) for k in _SWITCHES)


try:
    _ENCODED_SWITCHES: tuple | None = tuple(os.environ.encodekey(k) for k in _SWITCHES)
except AttributeError:  # an os.environ without CPython's encodekey: read it the usual way
    _ENCODED_SWITCHES = None


def register_backend(entry: BackendEntry) -> None:
    """Add a backend; ``auto`` picks the highest priority one usable on the device."""
    _REGISTRY[entry.name] = entry
    _RESOLVED.clear()


register_backend(BackendEntry("torch", TorchBackend, ("cpu", "cuda", "mps", "xpu"),
                              lambda: None, priority=0))


def _cpu_available() -> str | None:
    try:
        from . import cpu
    except Exception as e:  # e.g. a platform without fcntl
        return f"the cpu backend cannot be imported: {e}"
    return cpu.available()


def _cpu_factory() -> TorchBackend:
    from .cpu import CpuBackend

    return CpuBackend()


# C++ kernels + oneDNN products; built on first use, so importing the package never compiles.
register_backend(BackendEntry("cpu", _cpu_factory, ("cpu",), _cpu_available, priority=10))


def unregister_backend(name: str) -> None:
    """Remove a registered backend (and its instance); for tests and plug-ins."""
    _REGISTRY.pop(name, None)
    _INSTANCES.pop(name, None)
    _RESOLVED.clear()


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str, device: torch.device) -> TorchBackend:
    """The backend called ``name`` (or the best for ``device`` when name is "auto").

    The choice is remembered per name, device type and backend switches of the environment
    (a registered backend's availability is settled once it has been built)."""
    key = (name, device.type, *_switch_values())
    e = _RESOLVED.get(key)
    if e is None or _REGISTRY.get(e.name) is not e:
        e = _RESOLVED[key] = _resolve(name, device)
    return _instance(e)


def _resolve(name: str, device: torch.device) -> BackendEntry:
    if name == "auto":
        candidates = sorted((e for e in _REGISTRY.values() if device.type in e.device_types),
                            key=lambda e: -e.priority)
        for e in candidates:
            if e.available() is None:
                return e
        return _REGISTRY["torch"]
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {backend_names()} or 'auto'")
    e = _REGISTRY[name]
    if device.type not in e.device_types:
        raise ValueError(f"backend {name!r} runs on {e.device_types}, not on {device.type}: "
                         f"move the model and tensors there, or use backend='auto'")
    why = e.available()
    if why is not None:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    return e


def measurable_backends(device: torch.device) -> list[str]:
    """The backends "auto" may measure on ``device``: usable there, highest priority first,
    without those whose first use would build an extension that is not built yet."""
    entries = sorted((e for e in _REGISTRY.values() if device.type in e.device_types),
                     key=lambda e: -e.priority)
    return [e.name for e in entries
            if (not e.builds_on_first_use or e.name in _INSTANCES) and e.available() is None]


def _instance(e: BackendEntry) -> TorchBackend:
    if e.name not in _INSTANCES:
        _INSTANCES[e.name] = e.factory()
    return _INSTANCES[e.name]


def _register_gpu_backends() -> None:
    from . import gpu_entries as g

    register_backend(BackendEntry("triton", g.make_triton, g.triton_device_types(),
                                  g.triton_unavailable, priority=20))
    register_backend(BackendEntry("cuda", g.make_cuda, ("cuda",), g.cuda_unavailable,
                                  priority=15, builds_on_first_use=True))


_register_gpu_backends()
