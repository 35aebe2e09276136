"""The package's layers (docs/architecture.md): imports flow one way, from the experiment
layer down to the attention layer, with no cycle (imports inside functions included) and
no import inside a function but the three named below."""

import ast
from pathlib import Path

import sysattn_exp

PACKAGE = Path(sysattn_exp.__file__).parent
# Lowest first: a module may import only from its own layer or the layers before it.
LAYERS = ["base", "attention", "benchmarks", "models", "evaluation", "experiment", "commands"]
BASE = {"errors", "files"}
COMMANDS = {"__main__", "report", "sync", "locate"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "conf":
        return "commands" if len(parts) == 1 else "base"
    if parts[1] in BASE:
        return "base"
    if len(parts) == 2 and parts[1] not in LAYERS:
        return "commands" if parts[1] in COMMANDS else "base"
    return parts[1]


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported sysattn_exp module, at module level?) for every import in the file; imports
    under `if TYPE_CHECKING:` count as module level (they never run)."""
    tree = ast.parse(path.read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top.update(id(n) for n in ast.walk(node))
        else:
            top.add(id(node))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                names.append(candidate if is_module(candidate) else base)
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found += [(n, id(node) in top) for n in names if n.split(".")[0] == "sysattn_exp"]
    return found


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_module_is_in_a_layer():
    assert {layer_of(m) for m in MODULES} <= set(LAYERS)


def test_imports_flow_from_the_experiment_layer_down():
    upward = []
    for module, path in MODULES.items():
        for target, _ in imports(path):
            if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module)):
                upward.append(f"{module} -> {target}")
    assert upward == []


# The imports inside a function, and why. The entry point answers bad input (the config
# checked against its schema) before torch and transformers load, in a fraction of a
# second. The toy model draws on the benchmarks package (pandas, omegaconf), which GPU
# images running scripts/device_check.py lack: it is imported when builtin:toy is used.
# A layer sweep's starts (+sweep=layers / windows) need the model's depth from its config
# (transformers): read only when such a sweep starts, by the resolver the schema registers.
LATE = [
    "sysattn_exp.__main__ -> sysattn_exp.experiment.runner",
    "sysattn_exp.experiment.schema -> sysattn_exp.experiment.layer_sweeps",
    "sysattn_exp.models.loading -> sysattn_exp.models.toy_model",
]


def test_no_import_inside_a_function_but_the_entry_points():
    late = [f"{m} -> {t}" for m, p in MODULES.items() for t, top in imports(p) if not top]
    assert late == LATE


def test_no_import_cycle():
    graph = {m: {t for t, _ in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checks_see_what_they_look_for(tmp_path):
    """The parser finds imports at module level, under TYPE_CHECKING, inside functions."""
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from sysattn_exp.attention import rules\n"
        "from sysattn_exp.errors import UsageError\n"
        "if TYPE_CHECKING:\n"
        "    from sysattn_exp.benchmarks.base import Benchmark\n"
        "def late():\n"
        "    import sysattn_exp.experiment.report\n"
    )
    assert imports(source) == [
        ("sysattn_exp.attention.rules", True),
        ("sysattn_exp.errors", True),
        ("sysattn_exp.benchmarks.base", True),
        ("sysattn_exp.experiment.report", False),
    ]
    layers = [layer_of(m) for m, _ in imports(source)]
    assert layers == ["attention", "base", "benchmarks", "experiment"]
    assert layer_of("sysattn_exp.report") == "commands"
    assert layer_of("sysattn_exp.models") == "models"
