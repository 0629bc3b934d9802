"""Data flows down: no module imports a higher layer, lazily (inside a function) or not.

The layers, top to bottom (README "Layout"):

    cli, api           the command line and the one-call Python API
    study, compression flows built on training
    report             HTML pages (and the run's report callback the layers above attach)
    training           the loop, callbacks, loggers, distributed set-up
    plan               one plan(request) over the engine
    memory             the engine: tracker, estimator, counted step, overhead, OOM
    hardware           detection, device profiles, doctor
    runs               the run folder: layout, weights in and out, rebuilding a run's model
    config             the run config (TrainConfig)
    models             specs, builtins, LoRA/QLoRA, checkpointing, generation, prepare_model
    data               sources, splits, cache
    step               the one training step and its primitives
    leaves             settings, names, errors, units, trust, paths, _optional, configs (model folders)

Every import is read from the source with ``ast`` (nothing is imported), so an import inside a
function counts as much as one at the top.
"""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "tightfit"

LAYERS = [
    ("cli", "api", "__main__"),
    ("study", "compression"),
    ("report",),
    ("training",),
    ("plan",),
    ("memory",),
    ("hardware",),
    ("runs",),
    ("config",),
    ("models",),
    ("data",),
    ("step",),
    ("settings", "names", "errors", "units", "trust", "paths", "_optional", "configs", "__init__"),
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path`` (the module ``module``), relative ones resolved."""
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from tightfit import plan`` names a submodule: count it as one
            found += [
                (node.lineno, f"{target}.{alias.name}" if target == "tightfit" else target) for alias in node.names
            ]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "tightfit":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, list[tuple[int, str]]]:
    return {_module_name(path): _imports(path) for path in sorted(SOURCE.rglob("*.py"))}


def test_every_package_has_a_layer():
    unranked = sorted({_layer(name) for name in _graph()} - set(RANK))
    assert unranked == [], f"give these a layer in LAYERS (and the README's layout): {unranked}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, imports in _graph().items():
        own = RANK[_layer(module)]
        for line, target in imports:
            layer = _layer(target)
            if layer is not None and layer in RANK and RANK[layer] < own:
                upward.append(f"{module}:{line} imports {target} ({layer} is above {_layer(module)})")
    assert upward == [], "imports against the flow of data:\n" + "\n".join(upward)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts with more than one member (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                part.append(member)
                if member == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("package", ["training", "data", "models", "runs", "plan", "memory"])
def test_no_import_circle_inside_a_layer(package):
    """Within one layer the modules import each other in one direction too (the trainer and the
    learning-rate finder, the data sources and their registry once imported each other)."""
    graph = _graph()
    prefix = f"tightfit.{package}"
    modules = {name for name in graph if name == prefix or name.startswith(prefix + ".")}
    edges = {
        name: {target for _, target in graph[name] if target in modules and target != name and target != prefix}
        for name in modules
    }
    assert _cycles(edges) == []


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    """A checker that read only top-level imports would miss the arrows the issue found."""
    file = tmp_path / "lazy.py"
    file.write_text(
        "import torch\n\n\ndef build():\n    from ..training.trainer import Trainer\n\n    return Trainer\n"
    )
    imports = _imports(file, module="tightfit.models.lazy")
    assert imports == [(1, "torch"), (5, "tightfit.training.trainer")]
    assert RANK[_layer(imports[1][1])] < RANK["models"]
