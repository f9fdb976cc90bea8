"""gradreg-kernels: exact input-gradient regularization at close to twice a training step.

    from gradreg_kernels import gradreg_loss
    out = gradreg_loss(model, x, y, lam=100.0)
    out.loss.backward()
"""

from .auto_capture import AutoCapture
from .backends import backend_names, get_backend, register_backend
from .checks import NonFiniteLossError
from .loss import FallbackWarning, GradRegOutput, gradreg_loss
from .loss_module import GradRegLoss
from .plan import UnsupportedModelError, build_plan

__all__ = [
    "AutoCapture",
    "FallbackWarning",
    "GradRegLoss",
    "GradRegOutput",
    "NonFiniteLossError",
    "UnsupportedModelError",
    "backend_names",
    "build_plan",
    "get_backend",
    "gradreg_loss",
    "register_backend",
]
__version__ = "0.1.0"
