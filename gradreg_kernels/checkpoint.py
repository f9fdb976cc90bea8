"""Atomic files and training checkpoints.

Every file is written to a temporary name in the same folder, flushed to disk, then renamed
over the target (``os.replace`` is atomic on POSIX): a crash at any moment leaves either the
old file or the new one, never a torn one. Checkpoints hold only tensors and plain Python
values, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "gradreg-kernels-checkpoint/1"
MODEL_FORMAT = "gradreg-kernels-model/1"


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or belongs to a different training run."""


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Create ``path`` atomically: ``write(f)`` fills a temporary file that is then renamed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_jsonl(records: list[dict], path: str | Path) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text), mode="w")


def remove_stale_temp_files(folder: Path, name: str) -> None:
    """Delete temporaries of ``name`` left by a process killed while writing it."""
    for p in folder.glob(f".{name}.*.tmp"):
        p.unlink(missing_ok=True)


def rng_states(device: torch.device) -> dict[str, Any]:
    """The generator states a training step draws from (dropout masks, initialization)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


_REQUIRED = ("format", "config", "model", "optimizer", "rng", "epoch", "step",
             "step_in_epoch", "phase", "metrics", "sums")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``, or CheckpointError saying why it cannot be used."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a torn or foreign file
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). It was left as is; "
            "move it away to start afresh, or point --out to another folder") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return ckpt


def check_same_run(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...],
                   path: Path) -> None:
    """Raise CheckpointError when the checkpoint's settings differ from the current ones."""
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]
    if diff:
        raise CheckpointError(f"checkpoint {path} belongs to a different run ("
                              + "; ".join(diff) + "); use the same settings or another --out")
