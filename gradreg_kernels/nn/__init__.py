"""Drop-in twice-differentiable modules (same constructor arguments and state_dict keys as
torch.nn's), ``convert`` to swap them into an existing model, residual blocks the fused
schedule understands, and two small reference models."""

from .convert import convert
from .models import cifar_resnet, dcgan_critic
from .modules import (
    CELU,
    ELU,
    GELU,
    SELU,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Hardsigmoid,
    Hardswish,
    Hardtanh,
    LeakyReLU,
    Linear,
    LogSigmoid,
    MaxPool2d,
    Mish,
    ReLU,
    ReLU6,
    Sigmoid,
    SiLU,
    Softplus,
    Softsign,
    Tanh,
    Tanhshrink,
)
from .residual import BasicBlock, Residual
from .sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = ["CELU", "ELU", "GELU", "SELU", "Hardsigmoid", "Hardswish", "Hardtanh", "Mish",
           "ReLU6", "BasicBlock", "BatchNorm1d", "BatchNorm2d", "Conv2d", "LeakyReLU",
           "Linear", "LogSigmoid", "MaxPool2d", "ReLU", "Residual", "Sigmoid", "SiLU", "Softplus",
           "Softsign", "SyncBatchNorm", "Tanh", "Tanhshrink", "convert_sync_batchnorm",
           "cifar_resnet", "convert", "dcgan_critic"]
