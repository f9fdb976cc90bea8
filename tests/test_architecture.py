"""The import direction of docs/architecture.md, enforced by parsing every module's imports
(module level, function level and TYPE_CHECKING blocks alike) with ``ast``.

Layers, bottom up: leaf helpers → backends → rules (with the registry) → plan → schedule →
front end. A module may import its own layer and the layers below it, never one above; the
front end and the applications on top of it (attacks, training, experiments) are not
restricted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "gradreg_kernels"

#: leaf modules: torch-only helpers every layer may import
LEAF = {"activation_table", "activation_math", "tensor_ops", "backend_protocol", "checks",
        "autocast"}
#: layer name → (its top-level modules / packages, the layers it may import)
LAYERS: dict[str, tuple[set[str], set[str]]] = {
    "leaf": (LEAF, {"leaf"}),
    "backends": ({"backends"}, {"leaf", "backends"}),
    "rules": ({"rules", "registry"}, {"leaf", "rules"}),
    "plan": ({"plan"}, {"leaf", "rules", "plan"}),
    "schedule": ({"schedule"}, {"leaf", "rules", "plan", "schedule"}),
}


def layer_of(top: str) -> str | None:
    """The restricted layer a top-level module (``rules``, ``tensor_ops``, ...) belongs to."""
    for name, (members, _) in LAYERS.items():
        if top in members:
            return name
    return None


def package_imports(path: Path, module: str, source: str | None = None) -> set[str]:
    """The first component below ``gradreg_kernels`` of every package module ``source``
    (default: the file at ``path``) imports; ``module`` is its dotted name."""
    tree = ast.parse(source if source is not None else path.read_text())
    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [target + [a.name] for a in node.names]
            else:
                names = [(node.module or "").split(".")]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        for parts in names:
            if parts[0] == "gradreg_kernels" and len(parts) > 1:
                found.add(parts[1])
    return found


def violations(path: Path, module: str, source: str | None = None) -> list[str]:
    """'module imports gradreg_kernels.X (layer a may not import layer b)' for each import
    that points up or sideways out of the module's layer."""
    top = module.split(".")[1] if "." in module else ""
    layer = layer_of(top)
    if layer is None:
        return []
    allowed = LAYERS[layer][1]
    out = []
    for target in sorted(package_imports(path, module, source)):
        target_layer = layer_of(target)
        if target_layer not in allowed:
            out.append(f"{module} imports gradreg_kernels.{target} "
                       f"(layer {layer!r} may not import layer {target_layer or 'front end'!r})")
    return out


def _modules() -> list[tuple[Path, str]]:
    out = []
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((p, ".".join(parts)))
    return out


def test_every_module_imports_downward_only():
    bad = [v for path, module in _modules() for v in violations(path, module)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("module", "source"), [
    ("gradreg_kernels.backends.torch_ops", "from ..rules.base import Rule\n"),
    ("gradreg_kernels.rules.dropout", "def f():\n    from ..backends.torch_ops import T\n"),
    ("gradreg_kernels.tensor_ops", "import gradreg_kernels.plan\n"),
    ("gradreg_kernels.rules.base", "from gradreg_kernels.schedule import run\n"),
])
def test_the_check_catches_an_upward_import(module, source):
    path = PKG / (module.split(".", 1)[1].replace(".", "/") + ".py")
    assert violations(path, module, source)


def test_the_layers_cover_the_core():
    tops = {m.split(".")[1] for _, m in _modules() if "." in m}
    for members, _ in LAYERS.values():
        assert members <= tops


def test_every_backend_meets_the_contract():
    """TorchBackend (which the other backends subclass) has every method of the Protocol,
    with the Protocol's parameter names."""
    import inspect

    from gradreg_kernels.backend_protocol import Backend
    from gradreg_kernels.backends.torch_ops import TorchBackend

    for name, member in inspect.getmembers(Backend, inspect.isfunction):
        if name.startswith("_"):
            continue
        impl = getattr(TorchBackend, name)
        want = list(inspect.signature(member).parameters)
        assert list(inspect.signature(impl).parameters) == want, name
