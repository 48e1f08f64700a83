"""The package's layers, read from the source: every import runs from a higher layer to a lower one
(LAYERS), nothing imports the CLI, the techniques never import the launchers, and no module reaches
itself through imports. Every import counts: at the top of a module or inside a function, and a
module named by a string (importlib.import_module, a table of command modules), since each of those
is an arrow a reader has to follow."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "shoal"
# Lower layers that must not know how a run is started (DESIGN.md, "Contracts every part keeps").
BELOW_LAUNCH = ("parallel", "sync", "fault", "sites", "data")
# The layers from the bottom up (DESIGN.md's layout): a module may import its own package and the
# packages of lower layers, never a higher layer nor another package of its own layer. "" is the
# package's public face (shoal/__init__.py); an entry point (`python -m`, a __main__ module) is the top.
LAYERS = (
    ("config",),                        # the settings, read by everything
    ("runtime",),                       # who am I: env, mesh, the launcher-worker protocol, checkpoints, preemption
    ("data",),                          # sources, samplers, loaders
    ("observe",),                       # metrics, events, run directories, reports
    ("models",),                        # reference models and Hugging Face models as they are
    ("parallel", "sync"),               # how one model is split; how replicas agree
    ("fault", "federated", "plan"),     # per-step fault tolerance; federated rounds; the planner
    ("sites", "export", "selfplay"),    # the cross-site plane; using a trained model; self-play's processes
    ("train",),                         # the Trainer
    ("worker",),                        # one worker process
    ("launch",),                        # starting a run
    ("api",),                           # shoal.train() for Python callers
    ("",),                              # shoal/__init__.py
    ("cli",),                           # the `shoal` command
)
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def owner(name: str) -> str | None:
    """The module that `name` (a module, or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported(module: str) -> set[str]:
    """Every shoal module `module` imports, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    names: list[str] = []
    for node in tree.body:  # a module-level table of module names, imported by name later
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List)) and node.value.elts:
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.value.elts]
            if all(isinstance(i, str) and i in MODULES for i in items):
                names += items
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            # `from shoal import config` imports the module shoal.config, not the package's __init__
            names += [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
    return {found for name in names if name.startswith("shoal") and (found := owner(name)) not in (None, module)}


GRAPH = {module: imported(module) for module in MODULES}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def rank(module: str) -> int:
    return len(LAYERS) if module.endswith(".__main__") else RANK[layer(module)]


def upward_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The imports that run up, or sideways into another package of the same layer."""
    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if layer(m) != layer(t) and rank(m) <= rank(t))


def test_every_package_has_a_layer():
    unplaced = sorted({layer(m) for m in MODULES} - set(RANK))
    assert unplaced == [], f"packages in no layer of LAYERS (place each where its imports allow): {unplaced}"


def test_imports_run_only_down_the_layers():
    upward = upward_arrows(GRAPH)
    assert upward == [], f"imports from a lower layer to a higher one (or sideways), importer -> imported: {upward}"


def test_the_layer_check_sees_an_upward_arrow():
    # the check above would have caught the last two that were fixed: a model reaching up into
    # parallel/ for a layout check, and observe/ importing fault/'s store keys
    assert upward_arrows({"shoal.models.hf": {"shoal.parallel.blocks"}}) == [("shoal.models.hf", "shoal.parallel.blocks")]
    assert upward_arrows({"shoal.observe.fleet": {"shoal.fault.keys"}}) != []
    assert upward_arrows({"shoal.sync.diloco": {"shoal.parallel.shard"}}) != []  # sideways, same layer
    assert upward_arrows({"shoal.parallel.compose": {"shoal.models.hf"}}) == []


def test_nothing_imports_the_cli():
    # a `python -m` entry point (shoal/federated/__main__.py) is the top too, beside the CLI
    importers = sorted(m for m, targets in GRAPH.items() if "shoal.cli" in targets and not m.endswith("__main__"))
    assert importers == [], f"{importers} import shoal.cli: move the shared step down (shoal/launch/run.py)"


def test_techniques_never_import_the_launchers():
    upward = sorted((m, t) for m, targets in GRAPH.items() for t in targets
                    if layer(m) in BELOW_LAUNCH and layer(t) == "launch")
    assert upward == [], f"lower layers import shoal.launch: {upward}"


def test_no_import_cycles():
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert cycles == [], f"modules that import each other (directly or around a loop): {cycles}"


def test_the_graph_sees_lazy_and_named_imports():
    # the checks above are only as good as the graph: a function-level import and a module named
    # in a string (the CLI's table of feature commands) are both arrows in it
    assert "shoal.launch.run" in GRAPH["shoal.api"]
    assert "shoal.plan.cli" in GRAPH["shoal.cli"]
    assert "shoal.parallel.hf_layout" in GRAPH["shoal.parallel.compose"]  # inside check_layout
