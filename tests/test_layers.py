"""The structure of src/privimage, read from the source with `ast`: an import graph with no cycle, no
import tucked inside a function to break one, and no arrow from a lower layer up to a higher one; and stage
and method names compared in their tables (methods.py) only.

Imports under `if TYPE_CHECKING:` are left out: they name types for annotations and never run.
"""

import ast
from pathlib import Path

import privimage
from privimage.methods import METHODS, STAGE_TABLE

ROOT = Path(privimage.__file__).parent
PACKAGE = ROOT.name

# From the top down; a module may import only from its own layer or the layers below it. Modules in none
# (methods.py's tables and the cores: data/, diffusion/, privacy/, evaluation/, ...) sit below them all.
# The stages read the config (pipeline.Pipeline hands it to them); the cores take plain arguments.
LAYERS = (
    ("privimage.__main__", "privimage.cli"),
    ("privimage.api", "privimage.bench", "privimage.audit"),
    ("privimage.pipeline",),
    ("privimage.stages",),
    ("privimage.planning", "privimage.builders", "privimage.config"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> set[str]:
    """The privimage modules an import statement loads (`from P import M` loads P and, if it is one, P.M),
    less the importer's own packages, which Python loads before the importer whatever it imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
    return {name for name in names if name in MODULES and not importer.startswith(name + ".") and name != importer}


def imports(module: str) -> tuple[set[str], set[str]]:
    """(what `module` imports when it is loaded, what its functions and methods import when they run)."""
    loaded, deferred = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (deferred if in_function else loaded).update(_targets(child, module))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(MODULES[module].read_text()), False)
    return loaded, deferred


GRAPH = {module: imports(module) for module in MODULES}


def reaches(start: str, goal: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path of imports from `start` to `goal`, or None."""
    stack, came_from = [start], {start: None}
    while stack:
        node = stack.pop()
        if node == goal:
            path = [node]
            while came_from[path[-1]] is not None:
                path.append(came_from[path[-1]])
            return path[::-1]
        for nxt in graph[node]:
            if nxt not in came_from:
                came_from[nxt] = node
                stack.append(nxt)
    return None


def layer(module: str) -> int | None:
    if module == PACKAGE:  # `privimage.PrivImage` is the API's, loaded on first use: the top
        return 0
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    return None  # the cores (data/, diffusion/, privacy/, ...): below every listed layer


def test_the_graph_reads_every_module_and_sees_the_pipeline_load_its_stages():
    assert len(MODULES) > 40
    assert "privimage.stages.registry" in GRAPH["privimage.pipeline"][0]
    assert "privimage.stages.finetune" in GRAPH["privimage.stages.registry"][0]


def test_the_module_level_import_graph_has_no_cycle():
    loaded = {module: edges[0] for module, edges in GRAPH.items()}
    cycles = []
    for module, edges in loaded.items():
        for target in edges:
            back = reaches(target, module, loaded)
            if back is not None:
                cycles.append(" -> ".join([module, *back]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))


def test_no_import_inside_a_function_would_close_a_cycle_if_it_were_at_the_top():
    """A function-level import may defer a slow import (the CLI's start-up), never hide a cycle."""
    loaded = {module: edges[0] for module, edges in GRAPH.items()}
    hidden = [f"{module} imports {target} in a function: " + " -> ".join(back)
              for module, (_, deferred) in GRAPH.items() for target in sorted(deferred)
              if (back := reaches(target, module, loaded)) is not None]
    assert not hidden, "\n".join(hidden)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
              for module, (loaded, deferred) in GRAPH.items() for target in loaded | deferred
              if layer(target) is not None and (layer(module) is None or layer(target) < layer(module))]
    assert not upward, "\n".join(sorted(upward))


TABLE_NAMES = {*STAGE_TABLE, *METHODS, *(m.pretraining_data for m in METHODS.values() if m.pretraining_data)}


def _names_a_table_entry(node: ast.AST) -> bool:
    if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
        return any(_names_a_table_entry(element) for element in node.elts)
    return isinstance(node, ast.Constant) and node.value in TABLE_NAMES


def name_comparisons(source: str) -> list[str]:
    """Comparisons (==, !=, in, not in, a set's & and -) with a stage name, a method name or a kind of
    pretraining data."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.Sub)):
            sides = [node.left, node.right]
        else:
            continue
        if any(_names_a_table_entry(side) for side in sides):
            found.append(ast.unparse(node))
    return sorted(found)


def test_the_name_check_sees_a_stage_name_compared_however_it_is_written():
    source = 'a = stage == "pretrain"\nb = "warmstart" in stages\nc = {"dpmerf", "x"} & s if m != "pdp" else 0\n'
    assert name_comparisons(source) == ["'warmstart' in stages", "m != 'pdp'", "stage == 'pretrain'",
                                        "{'dpmerf', 'x'} & s"]
    assert name_comparisons('ledger.find("finetune")\nd = {"pretrain": 1}\n') == []


def test_stage_and_method_names_are_compared_in_the_tables_only():
    """What code needs to know of a stage or a method is a field or a property of its row in methods.py."""
    compared = [f"{module}: {comparison}" for module, path in MODULES.items() if module != "privimage.methods"
                for comparison in name_comparisons(path.read_text())]
    assert not compared, "\n".join(compared)
