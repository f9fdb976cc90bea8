"""``backend="auto"`` on a GPU: the backend whose whole fused step is fastest, measured.

Which backend is fastest on a GPU without capture depends on the model and batch: for small
steps the host's cost per launch decides (the portable backend's torch ops cost less host
time per launch than a Triton call), for large ones the kernels do. So the first
``backend="auto"`` call of a (device, plan signature, batch) key times the whole training
step (forward and backward) on each usable backend of the device, on the caller's batch,
and remembers the fastest; it says which, with the times, in one ``AutoBackendChoice``
warning. The measurement puts back what its steps changed: BatchNorm running statistics,
the parameters' gradients, the random-number generators. It is skipped (the priority order
of ``register_backend`` decides) while a CUDA graph is being captured, with gradients
disabled, in a distributed run (every rank must run the same backend, and a measured
backward would fire DistributedDataParallel's hooks), or with
``GRADREG_KERNELS_AUTO=priority`` in the environment.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .model_state import ModelState
from .plan import plan_signature

#: device types on which "auto" is measured (elsewhere the priority order decides)
MEASURED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
#: timed steps per backend, after one warm-up step (the least counts)
REPEATS = 3

_CHOICES: dict[tuple, str] = {}


class AutoBackendChoice(Warning):
    """Which backend ``backend="auto"`` measured fastest for a model and batch, and the
    times."""


def measured(device: torch.device) -> bool:
    """Whether "auto" on ``device`` is decided by measuring (``choose``)."""
    return (device.type in MEASURED_DEVICE_TYPES
            and os.environ.get("GRADREG_KERNELS_AUTO", "measure") != "priority"
            and not _distributed())


def _can_measure_now(device: torch.device) -> bool:
    """Steps can be run and timed here: gradients enabled, no CUDA graph being captured."""
    return torch.is_grad_enabled() and not (
        device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of ``step``, the device's queue drained before and after."""
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def choose(model: nn.Module, x: Tensor, candidates: Callable[[], list[str]],
           run: Callable[[str], None], extra_key: tuple = (),
           timer: Callable[[Callable[[], None], torch.device], float] | None = None) -> str:
    """The fastest of the backends ``candidates()`` names for (model, x), measured once per
    key and remembered ("auto", the priority order, where nothing is remembered and steps
    cannot run now or ``candidates()`` names none).

    ``candidates`` is called only where nothing is remembered for the key. ``run(name)``
    makes one whole step (forward and backward) on backend ``name``; a backend whose step
    raises is left out. ``timer`` times one call (``time_step`` by default)."""
    key = (x.device.type, x.device.index, tuple(x.shape), x.dtype, plan_signature(model),
           extra_key)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    if not _can_measure_now(x.device):
        return "auto"  # the priority order
    names = candidates()
    if not names:
        return "auto"
    timer = timer or time_step
    state = ModelState(model, x.device, grads=True)
    times: dict[str, float] = {}
    failed: dict[str, str] = {}
    for name in names:
        try:
            run(name)  # compiles, autotunes, allocates
            times[name] = min(timer(lambda n=name: run(n), x.device) for _ in range(REPEATS))
        except Exception as e:  # noqa: BLE001 - such a backend is not chosen
            failed[name] = f"{type(e).__name__}: {e}"
        finally:
            state.restore()
    if not times:
        raise RuntimeError("backend='auto': no backend ran the step: "
                           + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    best = min(times, key=times.__getitem__)
    _CHOICES[key] = best
    said = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in sorted(times.items(),
                                                                 key=lambda kv: kv[1]))
    warnings.warn(f"backend='auto' measured the fused step of {type(model).__name__} on "
                  f"{_device_name(x.device)} for x {tuple(x.shape)}: {said}; it runs on "
                  f"{best!r} (GRADREG_KERNELS_AUTO=priority skips the measurement)",
                  AutoBackendChoice, stacklevel=3)
    return best


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


def forget() -> None:
    """Drop every remembered choice (the next "auto" call of each key measures again)."""
    _CHOICES.clear()
