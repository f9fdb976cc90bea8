"""The plan: a user's nn.Module tree → a list of layer rules, or the module that stops it.

Supported: nested nn.Sequential (not subclasses with their own forward) of Linear, Conv1d,
Conv2d (padding_mode zeros, reflect or replicate); the activations ReLU, LeakyReLU, PReLU,
ReLU6, Hardtanh, Hardsigmoid, Hardswish, Softplus, Tanh, Sigmoid, LogSigmoid, Softsign,
Tanhshrink, GELU, ELU, SELU, CELU, SiLU, Mish; MaxPool1d/2d, AvgPool1d/2d,
AdaptiveAvgPool1d/2d, Flatten, Unflatten, Identity, zero / constant / reflection /
replication padding, Dropout, Dropout1d/2d/3d, BatchNorm1d/2d, GroupNorm, LayerNorm,
InstanceNorm1d/2d (without running statistics); their drop-in versions from
gradreg_kernels.nn (a Linear / Conv2d with a fused activation is the layer and then the
activation); and the residual blocks Residual(f, shortcut) and BasicBlock, whose branches
are planned recursively. A module placed at several slots (shared weights) runs at each, as
Sequential.forward runs it, and its parameters' gradients are the sum over the slots. A
module with forward or backward hooks (or any module, while global module hooks are
registered), or whose forward is replaced on the instance, is not supported
(the fused step does not call forward, so either would silently not run); nor is an
activation's subclass with its own forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .nn.modules import DROP_IN_OF
from .nn.residual import BasicBlock, Residual
from .rules.activation import ActivationRule
from .rules.activation_math import activation_spec
from .rules.base import Rule
from .rules.conv import (
    Conv1dRule,
    Conv2dRule,
    UnpaddedConv2dRule,
    conv1d_padding,
    conv_padding,
)
from .rules.dropout import FEATURE_DROPOUT_RANK, DropoutRule, FeatureDropoutRule
from .rules.group_norm import group_norm_rule, instance_norm_rule, layer_norm_rule
from .rules.height_one import HeightOneRule
from .rules.linear import LinearRule
from .rules.norm import BatchNormEvalRule, BatchNormTrainRule, uses_batch_stats
from .rules.pool import AdaptiveAvgPool2dRule, AvgPool2dRule, MaxPool2dRule
from .rules.pool1d import pool1d_rule
from .rules.prelu import PReLURule
from .rules.reshape import (
    ConstantPadRule,
    FlattenRule,
    IdentityRule,
    IndexPadRule,
    UnflattenRule,
)
from .rules.residual import ResidualRule, SequenceRule

#: constant-value padding modules (ZeroPad is a ConstantPad with value 0)
_CONSTANT_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                  nn.ConstantPad3d)

#: reflection / replication padding modules → their F.pad mode
_INDEX_PADS = {nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect",
               nn.ReflectionPad3d: "reflect", nn.ReplicationPad1d: "replicate",
               nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate"}

#: drop-in class → the torch.nn class whose computation it repeats exactly
_TORCH_KIND = {dropin: base for base, dropin in DROP_IN_OF.items()}


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
    """Forward hooks, or the backward hooks that forward installs: none would run."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _global_hooks() -> int:
    """How many hooks ``torch.nn.modules.module.register_module_*_hook`` registered for every
    module's call (none would run in the fused step)."""
    g = torch.nn.modules.module
    return (len(g._global_forward_hooks) + len(g._global_forward_pre_hooks)
            + len(g._global_backward_hooks) + len(g._global_backward_pre_hooks))


def _is_plain_sequential(m: nn.Module) -> bool:
    return (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
            and "forward" not in m.__dict__)


def _leaves(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module]]:
    if _is_plain_sequential(module) and not _has_hooks(module):
        # every slot, as Sequential.forward runs them: a module placed twice (shared
        # weights) runs twice (named_children would yield it once)
        for name, child in module._modules.items():
            if child is not None:
                yield from _leaves(child, f"{path}.{name}" if path else name)
    else:
        yield path or "<model>", module


def _with_act(m: nn.Module, make: Callable[[object], Rule]) -> Callable[[object], Rule]:
    """The layer's rule, then its fused activation's (drop-in Linear / Conv2d with ``act``,
    read when the rules are made: a cached plan follows a changed ``act``)."""

    def made(bk) -> Rule:
        spec = getattr(m, "act", None)
        layer = make(bk)
        return layer if spec is None else SequenceRule([layer, ActivationRule(m, spec, bk)], m)

    return made


def _forward_is_its_kinds(m: nn.Module) -> bool:
    """Whether ``m`` computes what its torch.nn class computes: it is one of our drop-ins, or
    its forward is the one of the nearest torch.nn class it derives from (activations are
    recognised by isinstance, so a subclass that overrides forward must not be taken for
    its base)."""
    if type(m) in _TORCH_KIND:
        return True
    base = next((c for c in type(m).__mro__ if c.__module__.startswith("torch.nn.")), None)
    return base is not None and type(m).forward is base.forward


def _rule_factory(m: nn.Module, path: str) -> Callable[[object], Rule] | str | Unsupported:
    """A maker of the rule for one leaf module, or the reason it has none."""
    if _has_hooks(m):
        return "has hooks (forward hooks or backward hooks), which the fused step would not run"
    if "forward" in m.__dict__:
        return "its forward is replaced on the instance, which the fused step would not run"
    if type(m) in (Residual, BasicBlock):
        return _residual_factory(m, path)
    kind = _TORCH_KIND.get(type(m), type(m))
    if kind is nn.Linear:
        return _with_act(m, lambda bk: LinearRule(m, bk))
    if kind is nn.Conv2d:
        if m.padding_mode in ("reflect", "replicate"):  # torch pads, then convolves unpadded
            pad = tuple(m._reversed_padding_repeated_twice)
            return _with_act(m, lambda bk: SequenceRule(
                [IndexPadRule(m.padding_mode, pad), UnpaddedConv2dRule(m, bk)], m))
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} (zeros, reflect and replicate run fused)"
        if conv_padding(m) is None:
            return "padding='same' with an even kernel extent needs asymmetric padding"
        return _with_act(m, lambda bk: Conv2dRule(m, bk))
    if type(m) is nn.Conv1d:
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} (only 'zeros' runs fused)"
        if conv1d_padding(m) is None:
            return "padding='same' with an even kernel extent needs asymmetric padding"
        return lambda bk: HeightOneRule(Conv1dRule(m, bk), m)
    if activation_spec(m) is not None:  # its parameters are read when the rule is made
        if not _forward_is_its_kinds(m):
            return "a subclass of an activation with its own forward"
        return lambda bk: ActivationRule(m, activation_spec(m), bk)
    if type(m) is nn.PReLU:
        return lambda bk: PReLURule(m, bk)
    if kind is nn.MaxPool2d:
        if m.return_indices:
            return "return_indices=True returns a tuple"
        return lambda bk: MaxPool2dRule(m, bk)
    if type(m) is nn.AvgPool2d:
        return lambda bk: AvgPool2dRule(m, bk)
    if type(m) is nn.AdaptiveAvgPool2d:
        return lambda bk: AdaptiveAvgPool2dRule(m, bk)
    if type(m) in (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d):
        if getattr(m, "return_indices", False):
            return "return_indices=True returns a tuple"
        return lambda bk: pool1d_rule(m, bk)
    if type(m) is nn.Flatten:
        return lambda bk: FlattenRule(m, bk)
    if type(m) is nn.Identity:
        return lambda bk: IdentityRule(m, bk)
    if type(m) is nn.Unflatten:
        return lambda bk: UnflattenRule(m, bk)
    if type(m) in _CONSTANT_PADS:
        return lambda bk: ConstantPadRule(m, bk)
    if type(m) in _INDEX_PADS:
        return lambda bk: IndexPadRule(_INDEX_PADS[type(m)], m.padding, m)
    if type(m) is nn.Dropout:
        return lambda bk: DropoutRule(m, bk)
    if type(m) in FEATURE_DROPOUT_RANK:
        return lambda bk: FeatureDropoutRule(m, bk)
    if type(m) is nn.GroupNorm:
        return lambda bk: group_norm_rule(m, bk)
    if type(m) is nn.LayerNorm:
        return lambda bk: layer_norm_rule(m, bk)
    if type(m) in (nn.InstanceNorm1d, nn.InstanceNorm2d):
        if m.track_running_stats:
            return "track_running_stats=True (only instance statistics run fused)"
        return lambda bk: instance_norm_rule(m, bk)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
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


def _residual_factory(block: Residual | BasicBlock, path: str
                      ) -> Callable[[object], Rule] | Unsupported:
    """ResidualRule over the sub-plans of the block's branches, then its activation if any."""
    names = {id(c): n for n, c in block.named_children()}
    f, shortcut, post = block.branches()
    parts = []
    for branch in (f, shortcut, post):
        mods = [] if branch is None else (branch if isinstance(branch, list) else [branch])
        sub = _build([(f"{path}.{names.get(id(c), '?')}", c) for c in mods])
        if isinstance(sub, Unsupported):
            return sub
        parts.append(sub)
    f_plan, s_plan, post_plan = parts
    return lambda bk: SequenceRule(
        [ResidualRule(f_plan.rules(bk), s_plan.rules(bk), block)] + post_plan.rules(bk), block)


def _build(roots: list[tuple[str, nn.Module]]) -> Plan | Unsupported:
    makers, paths = [], []
    for root_path, root in roots:
        for path, m in _leaves(root, root_path):
            made = _rule_factory(m, path)
            if isinstance(made, Unsupported):
                return made
            if isinstance(made, str):
                return Unsupported(path, type(m).__name__, made)
            makers.append(made)
            paths.append(path)
    return Plan(makers, paths)


def build_plan(model: nn.Module) -> Plan | Unsupported:
    """The plan of ``model``, or the first module it cannot run and why."""
    if _global_hooks():
        return Unsupported("<model>", type(model).__name__, "module hooks are registered for "
                           "every module (register_module_forward_hook and the like), which "
                           "the fused step would not run")
    return _build([("", model)])


def _conv_options(m: nn.Module) -> tuple:
    return m.padding_mode, m.padding


def _bn_options(m: nn.Module) -> tuple:
    return m._buffers.get("running_mean") is None, m._buffers.get("running_var") is None


#: per module type, the options (beyond its type, training flag and hooks) on which the
#: plan's choice of rule, or its refusal, depends; everything else a rule reads (sizes,
#: eps, p, an activation's parameters, a drop-in's ``act``) is read when the rule is made
_OPTIONS: dict[type, Callable[[nn.Module], object]] = {
    nn.Conv1d: _conv_options, nn.Conv2d: _conv_options,
    nn.MaxPool1d: lambda m: m.return_indices, nn.MaxPool2d: lambda m: m.return_indices,
    nn.InstanceNorm1d: lambda m: m.track_running_stats,
    nn.InstanceNorm2d: lambda m: m.track_running_stats,
    nn.BatchNorm1d: _bn_options, nn.BatchNorm2d: _bn_options,
}
_OPTIONS.update({dropin: _OPTIONS[base] for base, dropin in DROP_IN_OF.items()
                 if base in _OPTIONS})


def _signature(model: nn.Module) -> list:
    """What ``build_plan(model)`` decides from: the number of global module hooks, and every
    module's name, identity, type, training flag, number of forward and backward hooks,
    whether its forward is replaced on the instance, and the ``_OPTIONS`` of its type, in a
    fixed walk order."""
    out: list = [_global_hooks()]
    stack = [("", model)]
    while stack:
        name, m = stack.pop()
        if m is None:  # a module slot set to None (an absent shortcut)
            out.append(name)
            continue
        d = m.__dict__
        options = _OPTIONS.get(type(m))
        out.append((name, id(m), type(m), d["training"],
                    len(d["_forward_hooks"]) + len(d["_forward_pre_hooks"])
                    + len(d["_backward_hooks"]) + len(d["_backward_pre_hooks"]), "forward" in d,
                    None if options is None else options(m)))
        if d["_modules"]:
            stack.extend(d["_modules"].items())
    return out


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_of(model: nn.Module) -> Plan | Unsupported:
    """``build_plan(model)``, remembered per model while its ``_signature`` is unchanged.

    Building a plan walks the module tree and dispatches on every layer (16 µs for the
    MLP 784-512-512-10 in a loop of its own, several times that inside a training step);
    the signature is a walk over the same tree that reads only what the plan's decisions
    depend on (2 µs). Replacing, adding or removing a module, switching train / eval,
    registering a forward hook, or changing one of the ``_OPTIONS`` rebuilds the plan.
    """
    sig = _signature(model)
    hit = _PLANS.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    plan = build_plan(model)
    # a plan's rule makers hold the modules they run, the model itself when it is run as one
    # layer (not a plain Sequential): such a plan, kept under the model's weak key, would keep
    # the model alive, so it is rebuilt on every call instead (one layer: a cheap plan)
    if isinstance(plan, Unsupported) or (_is_plain_sequential(model) and not _has_hooks(model)):
        _PLANS[model] = (sig, plan)
    return plan
