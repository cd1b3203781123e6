"""The package's import graph, read from the source with ``ast`` (nothing is imported): intra-package imports name
existing modules, no module imports from a layer above its own, there are no import cycles, and nothing in the data
layer trains a model."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "mmexperts"

# Lowest first: (layer, modules, why). A listed module covers its submodules (the root covers only its __init__); a
# module belongs to its longest listed match and may import from its own layer or below.
LAYERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("core", ("mmexperts.errors", "mmexperts.atomic", "mmexperts.checksums", "mmexperts.context",
              "mmexperts.registry", "mmexperts.docstrings", "mmexperts.renames", "mmexperts.metrics", "mmexperts.plots",
              "mmexperts.retrieval"),
     "utilities that know no model: errors, file safety, call context, PEFT types, config docs and renamed fields, "
     "metrics, plots and the vector store"),
    ("moe", ("mmexperts.moe",),
     "routers, experts and their losses on plain tensors"),
    ("models", ("mmexperts.towers", "mmexperts.conditioning", "mmexperts.prefix", "mmexperts.modeling"),
     "tower anatomy (finding, conditioning and prompting towers) and the base models the adapters wrap"),
    ("methods", ("mmexperts.tuners", "mmexperts.mope", "mmexperts.s3", "mmexperts.altmoe"),
     "the PEFT adapters, built on the towers and the MoE parts"),
    ("data", ("mmexperts.data", "mmexperts.offline", "mmexperts.offline.synthetic", "mmexperts.offline.factors"),
     "tasks in standard columns and the generators of the offline kit; they know no model"),
    ("training", ("mmexperts.training", "mmexperts.offline.backbones", "mmexperts.offline.real_towers",
                  "mmexperts.hub"),
     "fitting models: the engine and its runs, the towers a run starts from (pretrained with the engine, or "
     "fetched), and publishing the adapters it trains"),
    ("api", (ROOT,),
     "the package root: re-exports and PEFT registration of every method"),
)

# (importer, imported): edges that break the rules, each with the reason it stands and its fix.
LAYER_INDEX = {layer: index for index, (layer, _, _) in enumerate(LAYERS)}
DATA_LAYER = "data"
# Model training that the data layer must not import or use.
TRAINING = ("torch.optim", "transformers.Trainer", "transformers.trainer", "accelerate", "mmexperts.training")


@cache
def modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module under src/mmexperts by dotted name, with its file and syntax tree."""
    found = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def imports(name: str) -> list[tuple[str, str | None, int]]:
    """The imports of one module, at any depth (in functions too): (module, imported name or None, line); relative
    imports are resolved against the module's package."""
    path, tree = modules()[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level <= len(package), f"{path}:{node.lineno}: relative import beyond the {ROOT} package"
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found += [(module, alias.name, node.lineno) for alias in node.names]
    return found


def internal(module: str) -> bool:
    return module == ROOT or module.startswith(ROOT + ".")


@cache
def graph() -> dict[str, dict[str, int]]:
    """Intra-package edges: importer -> {imported module: first line}. ``from package import submodule`` is an edge
    to the submodule; importing a submodule implicitly runs its parent packages, which is not counted as an edge."""
    known = modules()
    edges: dict[str, dict[str, int]] = {name: {} for name in known}
    for name in known:
        for module, imported, line in imports(name):
            if not internal(module):
                continue
            target = f"{module}.{imported}" if imported and f"{module}.{imported}" in known else module
            edges[name].setdefault(target, line)
    return edges


def covers(listed: str, module: str) -> bool:
    return module == listed or (listed != ROOT and module.startswith(listed + "."))


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the module's longest listed match; None when no layer lists it."""
    matches = [(len(listed), index) for index, (_, listed_modules, _) in enumerate(LAYERS)
               for listed in listed_modules if covers(listed, module)]
    return max(matches)[1] if matches else None


def where(importer: str, line: int) -> str:
    return f"{modules()[importer][0].relative_to(SRC.parent)}:{line}"


def test_the_graph_is_read():
    names = modules()
    assert {ROOT, "mmexperts.data.loading", "mmexperts.modeling", "mmexperts.training.loop"} <= set(names)
    assert graph()[ROOT]  # the root re-exports
    assert "mmexperts.data.loading" in graph()["mmexperts.training.loop"]


def test_intra_package_imports_name_existing_modules():
    known = modules()
    missing = [f"{where(importer, line)}: {target}" for importer, targets in graph().items()
               for target, line in targets.items() if target not in known]
    assert not missing, "Imports of modules that do not exist under src/mmexperts:\n" + "\n".join(missing)


def test_every_module_has_a_layer():
    unplaced = sorted(name for name in modules() if layer_of(name) is None)
    assert not unplaced, f"Modules in no layer: {unplaced}. Add each to LAYERS in {Path(__file__).name}."


def test_no_module_imports_from_a_layer_above_its_own():
    violations = []
    for importer, targets in graph().items():
        own = layer_of(importer)
        for target, line in targets.items():
            above = layer_of(target)
            if None not in (own, above) and above > own:
                violations.append(f"{where(importer, line)}: {importer} ({LAYERS[own][0]}) imports {target} "
                                  f"({LAYERS[above][0]})")
    order = " < ".join(layer for layer, _, _ in LAYERS)
    assert not violations, (f"Imports from a higher layer ({order}); move the imported code down a layer or the "
                            "import up:\n" + "\n".join(violations))


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(edges):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(edges[start]))]
        state[start] = 1
        while stack:
            target = next(stack[-1], None)
            if target is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(target) == 1:
                return path[path.index(target):] + [target]
            elif target not in state and target in edges:
                state[target] = 1
                path.append(target)
                stack.append(iter(sorted(edges[target])))
    return None


def test_no_import_cycles():
    edges = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "Import cycle:\n" + "\n".join(
        f"{where(a, edges[a][b])}: {a} imports {b}" for a, b in zip(cycle, cycle[1:]))


def test_find_cycle_reports_the_cycle():
    edges = {"a": {"b": 1}, "b": {"c": 1, "d": 1}, "c": {"a": 1}, "d": {}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1}}) is None
    assert find_cycle({"a": {"a": 1}}) == ["a", "a"]


@pytest.mark.parametrize("name", sorted(n for n in modules() if layer_of(n) == LAYER_INDEX[DATA_LAYER]))
def test_the_data_layer_trains_nothing(name):
    def training(module: str) -> bool:
        return any(module == t or module.startswith(t + ".") for t in TRAINING)

    found = [f"{where(name, line)}: imports {module}" + (f".{imported}" if imported else "")
             for module, imported, line in imports(name)
             if training(module) or (imported is not None and training(f"{module}.{imported}"))]
    _, tree = modules()[name]
    found += [f"{where(name, node.lineno)}: uses torch.optim" for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and node.attr == "optim" and isinstance(node.value, ast.Name)
              and node.value.id == "torch"]
    assert not found, f"{name} is in the data layer, which builds tasks and trains no model:\n" + "\n".join(found)
