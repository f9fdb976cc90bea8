"""Per-image outcomes in results.json: boolean tensors as packed hex, floats rounded.

The verdicts' bootstrap intervals resample the attacked images, so results.json keeps every
image's outcome, not only the means: a later analysis (or a reader) can recompute every
interval from the file alone. Booleans are packed 8 to a byte (numpy.packbits, big-endian
bit order) and written as hex with their shape.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def pack_bits(t: Tensor) -> dict:
    """{"shape": [...], "hex": "…"} of a boolean tensor (any shape)."""
    arr = t.detach().to("cpu", torch.bool).numpy()
    return {"shape": list(arr.shape), "hex": np.packbits(arr.reshape(-1)).tobytes().hex()}


def unpack_bits(d: dict) -> Tensor:
    """The boolean tensor ``pack_bits`` wrote."""
    shape = [int(s) for s in d["shape"]]
    count = int(np.prod(shape)) if shape else 1
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(d["hex"]), dtype=np.uint8))[:count]
    if bits.size != count:
        raise ValueError(f"packed bits hold {bits.size} values, shape {shape} needs {count}")
    return torch.from_numpy(bits.astype(bool).reshape(shape))


def floats(t: Tensor, digits: int = 5) -> list:
    """A float tensor as (nested) lists rounded to ``digits``, NaN as None (valid JSON)."""
    arr = t.detach().to("cpu", torch.float64).numpy().round(digits)
    out = arr.tolist()

    def clean(v):
        if isinstance(v, list):
            return [clean(u) for u in v]
        return None if v != v else v

    return clean(out)


def from_floats(v: list) -> Tensor:
    """The tensor ``floats`` wrote (None back to NaN)."""

    def fill(u):
        if isinstance(u, list):
            return [fill(w) for w in u]
        return float("nan") if u is None else u

    return torch.tensor(fill(v), dtype=torch.float64)
