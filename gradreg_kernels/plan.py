"""The plan: a user's nn.Module tree → a list of layer rules, or the module that stops it.

Supported: nested nn.Sequential (not subclasses with their own forward) of Linear, Conv2d
(zero padding), ReLU, LeakyReLU, Softplus, Tanh, Sigmoid, GELU, ELU, MaxPool2d, AvgPool2d,
Flatten, Identity, Dropout, BatchNorm1d/2d. A module with forward hooks is not supported
(the fused step does not call forward, so the hooks would silently not run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from .rules.activation import ActivationRule
from .rules.activation_math import activation_spec
from .rules.base import Rule
from .rules.conv import Conv2dRule, conv_padding
from .rules.dropout import DropoutRule
from .rules.linear import LinearRule
from .rules.norm import BatchNormEvalRule, BatchNormTrainRule, uses_batch_stats
from .rules.pool import AvgPool2dRule, MaxPool2dRule
from .rules.reshape import FlattenRule, IdentityRule


class UnsupportedModelError(TypeError):
    """The model holds a module the fused schedule cannot run (raised with strict=True)."""


@dataclass(frozen=True)
class Unsupported:
    """Where and why a model cannot run fused."""

    path: str
    module_type: str
    reason: str

    def __str__(self) -> str:
        return f"module {self.path!r} ({self.module_type}): {self.reason}"


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _is_plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _leaves(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    if _is_plain_sequential(module) and not _has_hooks(module):
        for name, child in module.named_children():
            yield from _leaves(child, f"{path}.{name}" if path else name)
    else:
        yield path or "<model>", module


def _rule_factory(m: nn.Module) -> Callable[[object], Rule] | str:
    """A maker of the rule for one leaf module, or the reason it has none."""
    if _has_hooks(m):
        return "has forward hooks, which the fused step would not run"
    if type(m) is nn.Linear:
        return lambda bk: LinearRule(m, bk)
    if type(m) is nn.Conv2d:
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} (only 'zeros' runs fused)"
        if conv_padding(m) is None:
            return "padding='same' with an even kernel extent needs asymmetric padding"
        return lambda bk: Conv2dRule(m, bk)
    spec = activation_spec(m)
    if spec is not None:
        return lambda bk: ActivationRule(m, spec, bk)
    if type(m) is nn.MaxPool2d:
        if m.return_indices:
            return "return_indices=True returns a tuple"
        return lambda bk: MaxPool2dRule(m, bk)
    if type(m) is nn.AvgPool2d:
        return lambda bk: AvgPool2dRule(m, bk)
    if type(m) is nn.Flatten:
        return lambda bk: FlattenRule(m, bk)
    if type(m) is nn.Identity:
        return lambda bk: IdentityRule(m, bk)
    if type(m) is nn.Dropout:
        return lambda bk: DropoutRule(m, bk)
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
        if uses_batch_stats(m):
            return lambda bk: BatchNormTrainRule(m, bk)
        return lambda bk: BatchNormEvalRule(m, bk)
    return "no fused rule for this module type"


@dataclass
class Plan:
    """The rule makers of a supported model, in execution order."""

    makers: list[Callable[[object], Rule]]
    paths: list[str]

    def rules(self, bk) -> list[Rule]:
        """Fresh rule objects for one call of the schedule on backend ``bk``."""
        return [make(bk) for make in self.makers]


def build_plan(model: nn.Module) -> Plan | Unsupported:
    """The plan of ``model``, or the first module it cannot run and why."""
    makers, paths = [], []
    for path, m in _leaves(model, ""):
        made = _rule_factory(m)
        if isinstance(made, str):
            return Unsupported(path, type(m).__name__, made)
        makers.append(made)
        paths.append(path)
    return Plan(makers, paths)
