"""The shape of the code (docs/architecture.md): imports point one way, jobs -> pipeline -> io -> algorithm ->
ops -> kernels, with no import circle (function-level imports included), and no function of the
orchestrator is 50 lines or longer or takes more than 7 parameters (settings travel in a resolved Job or an
option object, not in long argument lists)."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the rooms, lowest first: a module imports only from its own room or lower ones
RANKS = [
    ("unipruning.kernels", 0),
    ("unipruning.errors", 1), ("unipruning.lazy", 1), ("unipruning.version", 1), ("unipruning.offline", 1),
    ("unipruning.progress", 1), ("unipruning.files", 1), ("unipruning.patterns", 1),
    ("unipruning.config", 2), ("unipruning.models", 2), ("unipruning.backends", 2), ("unipruning.targeting", 2),
    ("unipruning.data", 2), ("unipruning.llmc", 2),
    ("unipruning.ops", 3),
    ("unipruning.algorithm", 4),
    ("unipruning.io", 5),
    ("unipruning.pipeline", 6),
    ("unipruning.jobs", 7), ("unipruning.packing", 7), ("unipruning.evaluate", 7),
    ("unipruning.cli", 8), ("unipruning.demo", 8), ("unipruning.demo_model", 8), ("unipruning.__main__", 8),
    ("unipruning", 9),
]
MAX_FUNCTION_LINES = 50
MAX_PARAMETERS = 7  # self and cls not counted; *args and **kwargs count one each


def _modules() -> dict[str, str]:
    """{dotted module name: file} of the package (kernels/ is installed as unipruning.kernels)."""
    found = {}
    for top, package in (("unipruning", "unipruning"), ("kernels", "unipruning.kernels")):
        for root, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, name), os.path.join(ROOT, top))[:-3].split(os.sep)
                    parts = [package, *[p for p in rel if p != "__init__"]]
                    found[".".join(parts)] = os.path.join(root, name)
    return found


def _rank(module: str) -> int:
    return max(rank for prefix, rank in RANKS if module == prefix or module.startswith(prefix + "."))


def _imports(module: str, path: str, known: set[str]) -> set[str]:
    """The package modules `module` imports, anywhere in its file."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up level - 1 packages from this one
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the module; `from mod import name` the module holding the name
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
                     if a.name != "_C"]  # the compiled CUDA extension, a leaf
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def test_imports_point_one_way_without_circles():
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    upward = sorted(f"{m} imports {dep}" for m, deps in graph.items() for dep in deps
                    if _rank(dep) > _rank(m))
    assert not upward, upward
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in graph[m]:
            if state.get(dep) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[m] = 2

    for m in graph:
        if m not in state and m != "unipruning":  # the package root re-exports everything
            visit(m, [m])


def test_no_function_of_the_orchestrator_is_too_long():
    long = []
    for module, node in _orchestrator_functions():
        lines = node.end_lineno - node.lineno + 1
        if lines >= MAX_FUNCTION_LINES:
            long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long


def _orchestrator_functions():
    """(module, function node) of every function outside kernels/ (one Triton program per function there)."""
    for module, path in _modules().items():
        if module.startswith("unipruning.kernels"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield module, node


def test_no_function_of_the_orchestrator_takes_more_than_seven_parameters():
    long = []
    for module, node in _orchestrator_functions():
        args = node.args
        names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if a.arg not in ("self", "cls")]
        count = len(names) + (args.vararg is not None) + (args.kwarg is not None)
        if count > MAX_PARAMETERS:
            long.append(f"{module}.{node.name}: {count} parameters")
    assert not long, long


def test_no_triton_file_imports_the_oracle():
    """kernels/reference.py is the oracle the kernel tests compare with: a Triton launcher (or the Triton
    backend) that called into it would be compared with itself. What both need lives in kernels/shared.py."""
    modules = _modules()
    oracle = "unipruning.kernels.reference"
    triton_side = [m for m, p in modules.items() if m.startswith("unipruning.kernels.")
                   and ("import triton" in open(p).read() or m.endswith("triton_backend"))]
    assert len(triton_side) >= 7, triton_side  # act_stats, metrics, mirror, select, nm, obs, library, ...
    offenders = sorted(m for m in triton_side if oracle in _imports(m, modules[m], set(modules)))
    assert not offenders, offenders
