"""The package layers import one way only: methods <- flops <- benchmarks <- run_bench.py; plots reads stored files
and imports none of them (run_bench.py alone imports plots, to draw at the end of a run). Every import counts, also
those inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = {"methods": 0, "flops": 1, "benchmarks": 2, "run_bench": 3}  # a module may import its own layer or lower
PACKAGES = (*LAYERS, "plots")


def project_modules() -> list[Path]:
    files = [REPO / "run_bench.py"]
    for pkg in PACKAGES:
        files += sorted(f for f in (REPO / pkg).rglob("*.py") if ".venv" not in f.parts)
    return [f for f in files if f.name != "run_bench.py" or f.parent == REPO]


def imported_packages(path: Path) -> set[str]:
    """Top-level names of the project's packages that `path` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(PACKAGES)


def upward_edges(path: Path, root: Path = REPO) -> list[str]:
    """The imports of `path` (a file under `root`) that break the layering, as 'a -> b'."""
    own = path.stem if path.parent == root else path.relative_to(root).parts[0]
    bad = []
    for target in sorted(imported_packages(path)):
        if own == "plots" and target != "plots":
            bad.append(f"{own} -> {target} (plots reads stored files only)")
        elif target == "plots" and own not in ("plots", "run_bench"):
            bad.append(f"{own} -> plots (only run_bench.py draws)")
        elif target in LAYERS and own in LAYERS and LAYERS[target] > LAYERS[own]:
            bad.append(f"{own} -> {target} (upward)")
    return bad


@pytest.mark.parametrize("path", project_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_go_one_way(path):
    assert not upward_edges(path), f"{path.relative_to(REPO)}: {upward_edges(path)}"


def test_the_checks_can_fail(tmp_path):
    """The walks find an upward edge hidden inside a function or under TYPE_CHECKING, a plot that imports the
    harness, and a private function with seven parameters (so the tests above can fail)."""
    (tmp_path / "methods").mkdir()
    (tmp_path / "plots").mkdir()
    probe = tmp_path / "methods" / "probe.py"
    probe.write_text("def f():\n    from benchmarks.plan import RunSpec\n    return RunSpec\n")
    assert upward_edges(probe, tmp_path) == ["methods -> benchmarks (upward)"]
    probe.write_text("import typing\nif typing.TYPE_CHECKING:\n    import flops.analytic\n")
    assert upward_edges(probe, tmp_path) == ["methods -> flops (upward)"]
    plot = tmp_path / "plots" / "probe.py"
    plot.write_text("from methods import create_reducer\n")
    assert upward_edges(plot, tmp_path) == ["plots -> methods (plots reads stored files only)"]
    probe.write_text("class A:\n    def _f(self, a, b, c, d, e, f, g):\n        pass\n")
    assert list(private_functions(probe)) == [("_f", 7)]


def private_functions(path: Path):
    """(name, parameters besides self/cls) of every private function and method in `path`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("_") \
                and not node.name.startswith("__"):
            a = node.args
            params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + [p.arg for p in (a.vararg, a.kwarg) if p]
            yield node.name, len([p for p in params if p not in ("self", "cls")])


@pytest.mark.parametrize("path", project_modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_function_takes_more_than_six_parameters(path):
    """Long positional lists become typed state (a small dataclass) instead."""
    long = [f"{name} ({n})" for name, n in private_functions(path) if n > 6]
    assert not long, f"{path.relative_to(REPO)}: {long}"
