"""The shape of the code: the library never imports the training jobs, modules import each
other without cycles, and functions stay short enough to read at once."""

import ast
import subprocess
import sys

import pytest

from processes import ROOT, subprocess_env

PACKAGES = ("transformer", "train")
LONGEST_FUNCTION = 60  # lines, docstring included


def modules(package: str) -> dict[str, ast.Module]:
    return {
        f"{package}.{path.stem}".removesuffix(".__init__"): ast.parse(path.read_text(), str(path))
        for path in sorted((ROOT / package).glob("*.py"))
    }


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules a module imports, at its top or inside functions (`from package
    import module` counts as importing the module, not the package's __init__)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            names |= submodules or {node.module}
    return names & known


def import_graph() -> dict[str, set[str]]:
    trees = {name: tree for package in PACKAGES for name, tree in modules(package).items()}
    return {name: imported(tree, set(trees)) - {name} for name, tree in trees.items()}


def test_the_library_never_imports_train():
    offenders = {name: sorted(i for i in deps if i.startswith("train")) for name, deps in import_graph().items()
                 if name.startswith("transformer")}
    assert not {name: deps for name, deps in offenders.items() if deps}


def test_every_library_module_imports_without_train():
    """Each module of transformer/ imports with `train` made unimportable."""
    names = sorted(modules("transformer"))
    code = (
        "import importlib, sys; sys.modules['train'] = None\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_modules_import_each_other_without_cycles():
    graph = import_graph()
    finished, path = set(), []

    def visit(name):
        if name in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in finished:
            return
        path.append(name)
        for dependency in sorted(graph[name]):
            visit(dependency)
        path.pop()
        finished.add(name)

    for name in sorted(graph):
        visit(name)


def test_functions_are_short():
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for package in PACKAGES
        for name, tree in modules(package).items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert not long, long
