"""The plan: a user's model → a graph of layer rules (``Plan``), or the node that stops it.

The model's forward is traced with torch.fx (docs/math.md, "Graphs", says why fx and not an
ATen-level capture): every module with a registered rule (``registry``) is a leaf, every
other module (nn.Sequential, the user's own, the package's residual blocks) is traced
through, so that its forward's additions, concatenations, reshapes and functional calls
become nodes. Each node gets its rule from the registry; what it computes from sizes on the
host (``x.size(0)``, ``x.shape[2:]``) runs as a host step in pass 1. The plan is the
nodes in topological order as ``Step``s over numbered value slots (slot 0 is the input),
pruned to what reaches the output, with each slot's last reader known so the schedule
releases values as soon as it can.

A forward that cannot be traced, a node with no rule, a module with forward or backward
hooks (or any module, while global module hooks are registered), a forward replaced on the
instance, a subclass of a supported layer with its own forward, and an in-place write into
a value that is read through a view are not supported: the caller falls back to autograd
and names the node and the line of the forward it came from.
"""

from __future__ import annotations

import contextlib
import operator
import os
import threading
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn

from .registry import (
    Call,
    HostArg,
    Made,
    TensorArg,
    function_entry,
    module_entry,
    module_options,
)


class UnsupportedModelError(TypeError):
    """The model holds a module the fused schedule cannot run (raised with strict=True)."""


@dataclass(frozen=True)
class Unsupported:
    """Where and why a model cannot run fused."""

    path: str         # the module's path, or the traced node's name
    module_type: str  # the module's type, or the function / method called
    reason: str
    kind: str = "module"  # "module", "node" or "forward"

    def __str__(self) -> str:
        return f"{self.kind} {self.path!r} ({self.module_type}): {self.reason}"


@dataclass
class Step:
    """One node: ``out = rule(ins)`` for a rule step, ``out = host(env)`` for a host step.

    ``make(kernels, env)`` makes the node's rule in pass 1 (sizes computed on the host read from
    ``env``); ``free_fwd`` / ``free_tan``: the slots whose last reader in pass 1 / pass 3 this
    step is (released after it); ``module``: the module the rule runs, for a module step or a
    functional call run as a module (None for the others)."""

    ins: tuple[int, ...]
    out: int
    path: str
    make: Callable | None = None
    host: Callable | None = None
    multi: bool = False
    n_tensor_ins: int = 0  # ins[:n_tensor_ins] are the rule's tensors, the rest host values
    free_fwd: tuple[int, ...] = ()
    free_tan: tuple[int, ...] = ()
    module: nn.Module | None = None


@dataclass
class Plan:
    """The steps of a supported model in topological order, over ``n_slots`` value slots;
    slot 0 is the input and ``out`` the logits."""

    steps: list[Step]
    n_slots: int
    out: int

    def chain_modules(self) -> list[nn.Module] | None:
        """The modules of a plan that is one chain of module steps (each reading the one
        before, the first the input, the last giving the logits), in order; else None."""
        prev, mods = 0, []
        for st in self.steps:
            if st.module is None or st.host is not None or st.ins != (prev,):
                return None
            mods.append(st.module)
            prev = st.out
        return mods if prev == self.out else None


# --- what is a leaf, and a module's rule ---------------------------------------------------

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


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_leaf(m: nn.Module) -> bool:
    """Whether tracing stops at ``m``: it has a rule (or hooks / a replaced forward, which
    its step reports), or it is one of torch's modules without a rule (named as such)."""
    if _has_hooks(m) or "forward" in m.__dict__ or module_entry(type(m)) is not None:
        return True
    if type(m) in _CONTAINERS:
        return False
    return type(m).__module__.startswith("torch.")


def _without_resolver(made: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    """A module rule's maker ``made(kernels)`` as a step's ``make(kernels, resolve)``."""
    def make(kernels, resolve):
        return made(kernels)
    return make


def _module_maker(m: nn.Module) -> Callable | str:
    """The rule maker ``kernels -> Rule`` of a leaf module, or why it has none."""
    if _has_hooks(m):
        return "has hooks (forward hooks or backward hooks), which the fused step would not run"
    if "forward" in m.__dict__:
        return "its forward is replaced on the instance, which the fused step would not run"
    found = module_entry(type(m))
    if found is None:
        return "no fused rule for this module type"
    kind, entry = found
    if type(m).forward is not getattr(kind, "forward", None):
        return f"a subclass of {kind.__name__} with its own forward"
    return entry.factory(m)


# --- tracing -------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_leaf(m)


_INPLACE_OPS = {"__iadd__": operator.iadd, "__isub__": operator.isub,
                "__imul__": operator.imul, "__itruediv__": operator.itruediv}
_TRACE_LOCK = threading.Lock()


@contextlib.contextmanager
def _inplace_operators_recorded():
    """fx.Proxy has no ``__iadd__`` (``out += identity`` would be traced as ``out + identity``
    and lose that it writes over ``out``): while tracing, the in-place operators record
    themselves as operator.iadd & co."""
    def recorder(op):
        def method(self, other):
            return self.tracer.create_proxy("call_function", op, (self, other), {})
        return method

    with _TRACE_LOCK:
        saved = {name: fx.Proxy.__dict__.get(name) for name in _INPLACE_OPS}
        for name, op in _INPLACE_OPS.items():
            setattr(fx.Proxy, name, recorder(op))
        try:
            yield
        finally:
            for name, old in saved.items():
                if old is None:
                    delattr(fx.Proxy, name)
                else:
                    setattr(fx.Proxy, name, old)


_PACKAGE_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


def _user_line(frames) -> str:
    """' at FILE:LINE: CODE' for the innermost frame outside torch and this package."""
    for fr in reversed(frames):
        if not fr.filename.startswith(_PACKAGE_DIRS) and "<" not in fr.filename:
            return f" at {fr.filename}:{fr.lineno}: {(fr.line or '').strip()}"
    return ""


def _node_line(node: fx.Node) -> str:
    text = node.stack_trace or ""
    frames = []
    lines = text.splitlines()
    for i, ln in enumerate(lines):
        ln = ln.strip()
        if ln.startswith('File "'):
            try:
                fname, rest = ln[6:].split('", line ', 1)
                lineno = int(rest.split(",", 1)[0])
            except ValueError:
                continue
            code = lines[i + 1] if i + 1 < len(lines) else ""
            frames.append(traceback.FrameSummary(fname, lineno, "", line=code))
    return _user_line(frames)


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return str(node.target)
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", repr(t))
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch"):
        mod = mod.replace("torch.nn.functional", "F").replace("torch._C._nn", "F")
        mod = "torch" if mod.startswith("torch._") or mod == "torch.functional" else mod
        return f"{mod}.{name}"
    return name


# --- from the fx graph to steps -------------------------------------------------------------

_HOST_FUNCTIONS = {operator.getitem, operator.add, operator.sub, operator.mul,
                   operator.floordiv, operator.truediv, operator.mod, operator.neg, operator.pow,
                   getattr, len, int}
_METADATA_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_METADATA_ATTRS = {"shape", "ndim"}


def _map_args(obj, leaf: Callable):
    """``obj`` (nested tuples, lists, dicts, slices of arguments) with ``leaf`` applied to
    every leaf."""
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_args(v, leaf) for v in obj)
    if isinstance(obj, dict):
        return {k: _map_args(v, leaf) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(_map_args(obj.start, leaf), _map_args(obj.stop, leaf),
                     _map_args(obj.step, leaf))
    return leaf(obj)


def _resolver(tensor_slots: tuple[int, ...], host_slots: tuple[int, ...],
              env: list) -> Callable[[object], object]:
    """Maps every TensorArg / HostArg inside an object to its value in ``env``."""

    def leaf(a):
        if isinstance(a, HostArg):
            return env[host_slots[a.index]]
        if isinstance(a, TensorArg):
            return env[tensor_slots[a.index]]
        return a

    return lambda obj: _map_args(obj, leaf)


def _no_resolve(obj):
    return obj


def _is_inplace(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return getattr(module, "inplace", False) is True
    if node.kwargs.get("inplace") is True:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return (node.target in _INPLACE_OPS.values()
            or (isinstance(name, str) and name.endswith("_") and not name.endswith("__")))


class _Builder:
    """Walks the traced graph once, in its (topological) order, into steps."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps: list[Step] = []
        self.aliases: list[bool] = []   # per step: its output may be a view of its input
        self.kind: dict[fx.Node, tuple] = {}
        self.n_slots = 1
        self.inplace: list[tuple[int, int]] = []  # (step index, slot written over)

    def new_slot(self) -> int:
        self.n_slots += 1
        return self.n_slots - 1

    def fail(self, node: fx.Node, reason: str) -> Unsupported:
        kind = "module" if node.op == "call_module" else "node"
        what = (type(self.model.get_submodule(str(node.target))).__name__
                if node.op == "call_module" else _target_name(node))
        return Unsupported(str(node.target) if kind == "module" else node.name, what,
                           reason + _node_line(node), kind)

    def normalize(self, node: fx.Node) -> tuple[Call, list[int], list[int]] | str:
        """The node's call with TensorArg / HostArg / constants, and the slots behind them."""
        tensors: list[int] = []
        hosts: list[int] = []

        def leaf(a):
            if not isinstance(a, fx.Node):
                return a
            k = self.kind[a]
            if k[0] == "tensor":
                tensors.append(k[1])
                return TensorArg(len(tensors) - 1)
            if k[0] == "host":
                hosts.append(k[1])
                return HostArg(len(hosts) - 1)
            if k[0] == "const":
                return k[1]
            raise _PiecesUsed

        try:
            args, kwargs = _map_args(node.args, leaf), _map_args(dict(node.kwargs), leaf)
        except _PiecesUsed:
            return "uses the tuple of a chunk / split as a whole (index its pieces)"
        return Call(node.target, args, kwargs), tensors, hosts

    def add_rule(self, node: fx.Node, made: Made, tensors: list[int], hosts: list[int],
                 inplace: bool, module: nn.Module | None = None) -> None:
        ins = tuple(tensors[t.index] for t in made.inputs)
        host_slots = tuple(hosts)
        user_make = made.make
        make: Callable[..., Any]
        if host_slots:
            def make_with_hosts(kernels, env, _m=user_make, _s=host_slots):
                return _m(kernels, _resolver((), _s, env))
            make = make_with_hosts
        else:
            def make_plain(kernels, env, _m=user_make):
                return _m(kernels, _no_resolve)
            make = make_plain
        out = self.new_slot()
        self.steps.append(Step(ins + host_slots, out, node.name, make=make,
                               multi=len(ins) != 1, n_tensor_ins=len(ins), module=module))
        self.aliases.append(made.aliases)
        if inplace:
            self.inplace.append((len(self.steps) - 1, ins[0]))
        self.kind[node] = ("tensor", out)
        if inplace:  # later readers of the value written over read this step's output
            for n, k in list(self.kind.items()):
                if k == ("tensor", ins[0]) and n is not node:
                    self.kind[n] = ("tensor", out)

    def add_host(self, node: fx.Node, fn: Callable, call: Call, tensors: list[int],
                 hosts: list[int]) -> None:
        ts, hs = tuple(tensors), tuple(hosts)

        def host(env, _fn=fn, _c=call):
            resolve = _resolver(ts, hs, env)
            return _fn(*resolve(_c.args), **resolve(_c.kwargs))

        out = self.new_slot()
        self.steps.append(Step(ts + hs, out, node.name, host=host))
        self.aliases.append(False)
        self.kind[node] = ("host", out)

    def module_node(self, node: fx.Node) -> Unsupported | None:
        m = self.model.get_submodule(str(node.target))
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node) \
                or self.kind[node.args[0]][0] != "tensor":
            return self.fail(node, "called with other than one tensor computed from the input")
        made = _module_maker(m)
        if isinstance(made, str):
            return self.fail(node, made)
        slot = self.kind[node.args[0]][1]
        entry = module_entry(type(m))
        assert entry is not None  # module_maker found it
        self.add_rule(node, Made([TensorArg(0)], _without_resolver(made),
                                 aliases=entry[1].aliases), [slot], [], _is_inplace(node, m), m)
        return None

    def call_node(self, node: fx.Node) -> Unsupported | None:
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and self.kind[node.args[0]][0] == "pieces":
            _, made, tensors, hosts = self.kind[node.args[0]]
            if not isinstance(node.args[1], int):
                return self.fail(node, "indexes the pieces of a chunk / split at run time")
            self.add_rule(node, made.pieces(node.args[1]), tensors, hosts, False)
            return None
        norm = self.normalize(node)
        if isinstance(norm, str):
            return self.fail(node, norm)
        call, tensors, hosts = norm
        target = node.target
        first_is_tensor = bool(call.args) and isinstance(call.args[0], TensorArg)
        if not tensors:
            fn = cast(Callable[..., Any], target) if node.op == "call_function" else None
            if node.op == "call_method" and hosts:
                fn = _method_caller(str(target))
            if fn is None or (node.op == "call_function" and fn not in _HOST_FUNCTIONS):
                return self.fail(node, "makes a tensor that is not computed from the input")
            self.add_host(node, fn, call, tensors, hosts)
            return None
        if first_is_tensor and (
                (node.op == "call_method" and target in _METADATA_METHODS)
                or (target is getattr and call.args[1] in _METADATA_ATTRS)):
            fn = getattr if target is getattr else _method_caller(str(target))
            self.add_host(node, fn, call, tensors, hosts)
            return None
        if target is operator.getitem:
            return self.fail(node, "indexes a tensor computed from the input")
        entry = function_entry(target)
        if entry is None:
            return self.fail(node, f"no fused rule for {_target_name(node)}")
        inplace = _is_inplace(node, None)
        if entry.module is not None:
            if not first_is_tensor or len(tensors) != 1 or hosts:
                return self.fail(node, "only its first argument may be computed from the input; "
                                 "the others must be constants")
            kwargs = {k: v for k, v in call.kwargs.items()}
            try:
                shim = entry.module(*call.args[1:], **kwargs)
            except (TypeError, ValueError) as e:
                return self.fail(node, f"arguments not understood ({e})")
            made = _module_maker(shim)
            if isinstance(made, str):
                return self.fail(node, made)
            found = module_entry(type(shim))
            assert found is not None  # module_maker found it
            self.add_rule(node, Made([TensorArg(0)], _without_resolver(made),
                                     aliases=found[1].aliases), tensors, [], inplace, shim)
            return None
        assert entry.factory is not None  # an entry has a module or a factory
        made = entry.factory(call)
        if isinstance(made, str):
            return self.fail(node, made)
        if made.pieces is not None:
            self.kind[node] = ("pieces", made, tensors, hosts)
            return None
        self.add_rule(node, made, tensors, hosts, inplace)
        return None

    def build(self, graph: fx.Graph) -> Plan | Unsupported:
        out_slot = None
        first = True
        for node in graph.nodes:
            if node.op == "placeholder":
                if first:
                    self.kind[node] = ("tensor", 0)
                    first = False
                elif node.args:
                    self.kind[node] = ("const", node.args[0])
                else:
                    return Unsupported(node.name, "input", "the forward takes inputs besides "
                                       "x without defaults (the fused step passes x alone)",
                                       "node")
            elif node.op == "get_attr":
                self.kind[node] = ("const", _fetch(self.model, node.target))
            elif node.op == "call_module":
                why = self.module_node(node)
                if why:
                    return why
            elif node.op in ("call_function", "call_method"):
                why = self.call_node(node)
                if why:
                    return why
            elif node.op == "output":
                res = node.args[0]
                if not isinstance(res, fx.Node) or self.kind.get(res, ("",))[0] != "tensor":
                    return Unsupported("output", type(res).__name__, "the forward must return "
                                       "one tensor computed from the input", "node")
                out_slot = self.kind[res][1]
        if out_slot is None:
            return Unsupported("output", "-", "the forward returns nothing", "node")
        return self.finish(out_slot)

    def finish(self, out: int) -> Plan | Unsupported:
        why = self.check_inplace()
        if why:
            return why
        # keep what reaches the output
        needed = {out}
        keep = [False] * len(self.steps)
        for i in range(len(self.steps) - 1, -1, -1):
            if self.steps[i].out in needed:
                keep[i] = True
                needed.update(self.steps[i].ins)
        if 0 not in needed:
            return Unsupported("output", "Tensor", "the output does not depend on the input",
                               "node")
        steps = [s for s, k in zip(self.steps, keep) if k]
        last_fwd: dict[int, int] = {}
        last_tan: dict[int, int] = {}
        for i, st in enumerate(steps):
            for s in st.ins:
                last_fwd[s] = i
                if st.host is None and s in st.ins[:st.n_tensor_ins]:
                    last_tan[s] = i
        for i, st in enumerate(steps):
            st.free_fwd = tuple(s for s in set(st.ins) if last_fwd[s] == i and s != out)
            st.free_tan = tuple(s for s in set(st.ins) if last_tan.get(s) == i and s != out)
        return Plan(steps, self.n_slots, out)

    def check_inplace(self) -> Unsupported | None:
        """An in-place write into v is what eager computes when no view of v, and nothing v
        is a view of, is read after it (readers of v itself were redirected)."""
        for i, v in self.inplace:
            st = self.steps[i]
            if v == 0:
                return Unsupported(st.path, "in-place", "writes in place into the model's input",
                                   "node")
            producer = next((j for j, s in enumerate(self.steps) if s.out == v), None)
            viewed = producer is not None and self.aliases[producer]
            viewed = viewed or any(self.aliases[j] and v in s.ins for j, s in
                                   enumerate(self.steps[:i]))
            if viewed:
                return Unsupported(st.path, "in-place", "writes in place into a tensor that "
                                   "is also read through a view", "node")
        return None


class _PiecesUsed(Exception):
    pass


def _method_caller(name: str) -> Callable:
    def call(obj, *args, **kwargs):
        return getattr(obj, name)(*args, **kwargs)
    return call


def _fetch(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _single(model: nn.Module) -> Plan | Unsupported:
    """The plan of a model that is itself one layer with a rule."""
    made = _module_maker(model)
    if isinstance(made, str):
        return Unsupported("<model>", type(model).__name__, made)
    step = Step((0,), 1, "<model>", make=lambda kernels, env, _m=made: _m(kernels), n_tensor_ins=1)
    return Plan([step], 2, 1)


def build_plan(model: nn.Module) -> Plan | Unsupported:
    """The plan of ``model``, or the first node it cannot run and why."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"build_plan needs a torch.nn.Module, got {type(model).__name__}")
    if _global_hooks():
        return Unsupported("<model>", type(model).__name__, "module hooks are registered for "
                           "every module (register_module_forward_hook and the like), which "
                           "the fused step would not run")
    if _is_leaf(model):
        return _single(model)
    try:
        with _inplace_operators_recorded():
            graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001  (any failure to trace means: run autograd)
        where = _user_line(traceback.extract_tb(e.__traceback__))
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return Unsupported("<model>", type(model).__name__,
                           f"its forward cannot be traced ({type(e).__name__}: {msg}){where}",
                           "forward")
    return _Builder(model).build(graph)


# --- the plan cache -------------------------------------------------------------------------

def _signature(model: nn.Module) -> list:
    """What ``build_plan(model)`` decides from: the number of global module hooks, and every
    module's name, identity, type, training flag, number of forward and backward hooks,
    whether its forward is replaced on the instance, its parameters' identities and the
    registry's ``options`` of its type, in a fixed walk order."""
    out: list = [_global_hooks()]
    stack = [("", model)]
    while stack:
        name, m = stack.pop()
        if m is None:  # a module slot set to None (an absent shortcut)
            out.append(name)
            continue
        d = m.__dict__
        out.append((name, id(m), type(m), d["training"],
                    len(d["_forward_hooks"]) + len(d["_forward_pre_hooks"])
                    + len(d["_backward_hooks"]) + len(d["_backward_pre_hooks"]), "forward" in d,
                    tuple(map(id, d["_parameters"].values())), module_options(m)))
        if d["_modules"]:
            stack.extend(d["_modules"].items())
    return out


def plan_signature(model: nn.Module) -> tuple:
    """``_signature(model)`` as a hashable tuple: equal exactly when ``plan_of`` would give
    the same plan (a key for what was built from the plan, such as a captured graph)."""
    return tuple(_signature(model))


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan_of(model: nn.Module) -> Plan | Unsupported:
    """``build_plan(model)``, remembered per model while its ``_signature`` is unchanged.

    Tracing and building a plan costs milliseconds; the signature is a walk over the module
    tree that reads only what the plan's decisions depend on (microseconds). Replacing,
    adding or removing a module or a parameter, switching train / eval, registering a hook,
    or changing one of a type's registered ``options`` rebuilds the plan. What a forward
    reads besides these (a Python flag of the user's module) is fixed when it is traced.
    """
    sig = _signature(model)
    hit = _PLANS.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    plan = build_plan(model)
    # a plan's rule makers hold the modules they run, the model itself when it is one layer:
    # such a plan, kept under the model's weak key, would keep the model alive, so it is
    # rebuilt on every call instead (one layer: a cheap plan)
    if isinstance(plan, Unsupported) or not _is_leaf(model):
        _PLANS[model] = (sig, plan)
    return plan
