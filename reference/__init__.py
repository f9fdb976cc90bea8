"""The plain-autograd oracle that every fast path is checked against."""

from .oracle import oracle_grads, oracle_loss, user_step

__all__ = ["oracle_grads", "oracle_loss", "user_step"]
