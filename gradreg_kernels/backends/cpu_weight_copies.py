"""The products' bf16 copies of the weights, made by the parameter check's own sweep.

Under CPU autocast with native bf16 products every step reads each float32 weight twice:
once to check that it is finite (gradreg_loss's parameter check) and once to cast it to
bf16 for the products. ``narrowed_all_finite`` does both in one sweep; its copies wait here
until the layer's rule asks for its weight (``CpuBackend.product_weight``), which takes
each at most once.

A copy is handed out only for the very weight it was made from, unchanged since: the same
storage, shape and strides (a rule's detached weight shares them), the source tensor still
alive (a weak reference: a freed weight's address may be reused), and the same version
counter (an in-place update, as an optimizer step makes, bumps it). Anything else casts
afresh. Copies nobody took are dropped by the next check.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from torch import Tensor


def _key(t: Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


class WeightCopies:
    """bf16 copies keyed by the float32 tensor they were made from."""

    def __init__(self) -> None:
        self._copies: dict[tuple, tuple[weakref.ref, int, Tensor]] = {}

    def replace(self, sources: Sequence[Tensor], copies: Sequence[Tensor]) -> None:
        """Forget the previous copies and keep these (copies[i] made from sources[i])."""
        self._copies = {_key(s): (weakref.ref(s), s._version, c)
                        for s, c in zip(sources, copies)}

    def clear(self) -> None:
        self._copies = {}

    def take(self, w: Tensor) -> Tensor | None:
        """The copy made from w as it is now, or None (each copy is handed out once)."""
        hit = self._copies.pop(_key(w), None)
        if hit is None:
            return None
        ref, version, copy = hit
        src = ref()
        if src is None or src._version != version or w._version != version:
            return None
        return copy
