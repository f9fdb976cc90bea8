"""Which rule runs each module type and each traced function or method: the one table that
the plan reads, and that the plan cache's signature is derived from.

Rules register themselves where they are defined (``rules/*.py``; the drop-in modules of
``gradreg_kernels.nn`` register their own types as aliases of the torch.nn classes they
repeat):

- ``register_module(*types, options=..., aliases=...)`` on a factory ``f(module)`` that
  returns a maker ``kernels -> Rule`` or a string saying why this module cannot run fused. A
  module is matched by the nearest registered class in its type's MRO. ``options(module)``
  returns whatever else (beyond the module's type, training flag, hooks and parameters) the
  factory's choice or refusal reads: the plan cache rebuilds a plan when it changes.
  ``aliases``: the rule's output may be a view of its input (Identity, Flatten), which an
  in-place operation after it would write through.
- ``register_function(*targets, ...)`` for traced calls: a target is a function (``F.relu``,
  ``torch.cat``, ``operator.add``) or a tensor method's name (``"relu"``, ``"view"``); the
  method form takes the tensor as its first argument, as the function does. Either
  ``module=ctor``: the call is the module ``ctor(*args, **kwargs)`` (its other arguments,
  which must be constants) run on the first argument, so the module's own entry decides;
  or ``factory=f``: ``f(call)`` returns a ``Made`` (the rule's tensor inputs and its maker)
  or a reason string.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

#: a rule maker: backend → a fresh rule object for one call of the schedule
Maker = Callable[[Any], Any]


@dataclass(frozen=True)
class ModuleEntry:
    """How one module type runs fused."""

    kind: type
    factory: Callable[[nn.Module], Maker | str]
    options: Callable[[nn.Module], object] | None = None
    aliases: bool = False


@dataclass(frozen=True)
class TensorArg:
    """A traced call's argument that is a tensor computed from the model's input."""

    index: int  # the value's number in the call's ``tensors``


@dataclass(frozen=True)
class HostArg:
    """A traced call's argument computed at run time on the host (a size read off a tensor,
    arithmetic on sizes): known in pass 1 only, through ``resolve``."""

    index: int


@dataclass
class Call:
    """One traced function or method call, its arguments normalized: tensors computed from
    the input are ``TensorArg``, run-time host values ``HostArg``, the rest constants
    (parameters read with get_attr included)."""

    target: object
    args: tuple
    kwargs: dict
    inplace: bool = False  # the call writes over its first argument (``add_``, ``+=``)

    def has_host_args(self) -> bool:
        return any(isinstance(a, HostArg) for a in flat_args((self.args, self.kwargs)))


@dataclass
class Made:
    """What a function entry gives for one call: the rule's tensor inputs, as the call's
    TensorArgs in the order the rule's passes take them, and the maker of the rule, given
    the backend and ``resolve`` (which maps HostArgs inside an object to their values)."""

    inputs: list[TensorArg]
    make: Callable[[Any, Callable[[object], object]], Any] | None
    aliases: bool = False  # the rule's output may be a view of its input
    #: for a call that returns a tuple of tensors (chunk, split): the Made of its i-th item
    pieces: Callable[[int], Made] | None = None


@dataclass(frozen=True)
class FunctionEntry:
    factory: Callable[[Call], Made | str] | None = None
    module: Callable[..., nn.Module] | None = None


_MODULES: dict[type, ModuleEntry] = {}
_ALIASES: dict[type, type] = {}
_FUNCTIONS: dict[object, FunctionEntry] = {}


def register_module(*types: type, options: Callable[[nn.Module], object] | None = None,
                    aliases: bool = False):
    """Decorator: ``factory(module) -> maker | reason`` runs every module of ``types``."""

    def deco(factory):
        for t in types:
            _MODULES[t] = ModuleEntry(t, factory, options, aliases)
        return factory

    return deco


def register_alias(cls: type, base: type) -> None:
    """``cls`` computes what ``base`` computes (a drop-in module): ``base``'s entry runs it."""
    _ALIASES[cls] = base


def register_function(*targets: object, factory: Callable[[Call], Made | str] | None = None,
                      module: Callable[..., nn.Module] | None = None) -> None:
    """Register traced calls of ``targets`` (functions, or tensor methods by name)."""
    if (factory is None) == (module is None):
        raise TypeError("register_function needs exactly one of factory= and module=")
    for t in targets:
        _FUNCTIONS[t] = FunctionEntry(factory, module)


def module_entry(cls: type) -> tuple[type, ModuleEntry] | None:
    """(the registered class, its entry) for the nearest registered class in ``cls``'s MRO,
    or None; an alias resolves to its base's entry."""
    _load_rules()
    for c in cls.__mro__:
        if c in _ALIASES:
            return c, _MODULES[_ALIASES[c]]
        if c in _MODULES:
            return c, _MODULES[c]
    return None


def function_entry(target: object) -> FunctionEntry | None:
    _load_rules()
    try:
        return _FUNCTIONS.get(target)
    except TypeError:  # an unhashable target
        return None


def module_options(m: nn.Module) -> object:
    """What the plan's decision for ``m`` reads beyond type, flags, hooks and parameters."""
    found = module_entry(type(m))
    if found is None or found[1].options is None:
        return None
    return found[1].options(m)


_LOADED = False


def _load_rules() -> None:
    """Import every rule module (each registers its kinds on import)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from . import rules  # noqa: F401  (rules/__init__ imports every rule file)


def flat_args(obj) -> list:
    """Every leaf of a nested tuple / list / dict / slice of arguments."""
    if isinstance(obj, (tuple, list)):
        return [y for x in obj for y in flat_args(x)]
    if isinstance(obj, dict):
        return [y for x in obj.values() for y in flat_args(x)]
    if isinstance(obj, slice):
        return flat_args((obj.start, obj.stop, obj.step))
    return [obj]
