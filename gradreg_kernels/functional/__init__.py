"""Drop-in, twice-differentiable Functions for code that calls
``torch.autograd.grad(..., create_graph=True)`` itself (R1 / gradient penalties, any graph).

Each op is a torch.autograd.Function whose backward is made of other Functions with their
own backward (bilinear products reuse each other; second derivatives that are identically
zero, as for ReLU, are skipped). Every kernel comes from the chosen backend ("auto" picks
the fastest one usable on the tensor's device), the same kernels as the fused schedule.
Third derivatives are supported through the linear ops (products, pooling) but not through
activations, batch norm or the softmax head, which raise a clear error if asked.
"""

from .activation import bias_act
from .conv import conv2d_act
from .linear import linear_act
from .loss import softmax_cross_entropy
from .norm import batch_norm
from .pool import max_pool2d

__all__ = ["batch_norm", "bias_act", "conv2d_act", "linear_act", "max_pool2d",
           "softmax_cross_entropy"]
