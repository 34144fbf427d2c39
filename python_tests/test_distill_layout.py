"""The trainer layer's dependencies: ``kdkernels.distill`` never imports ``kdkernels.bench`` (what both need, device
naming and the results directory, lives in ``kdkernels._results``)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import kdkernels

PACKAGE = Path(kdkernels.__file__).resolve().parent
DISTILL_SOURCES = sorted((PACKAGE / "distill").rglob("*.py"))


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])


def imported_modules(source: str, package: str) -> list[str]:
    """Absolute names of every module an ``import`` or ``from … import`` statement of ``source`` names (relative
    imports resolved against ``package``; ``from kdkernels import bench`` gives ``kdkernels.bench``)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def imports_bench(name: str) -> bool:
    return name == "kdkernels.bench" or name.startswith("kdkernels.bench.")


@pytest.mark.parametrize("source, expected", [
    ("import kdkernels.bench.report", True), ("from kdkernels import bench", True),
    ("from kdkernels.bench.timing import QUANTILES", True), ("from ...bench import run", True),
    ("def f():\n    import kdkernels.bench", True), ("from .. import bench", False),
    ("from ..recipe import Stage", False), ("import kdkernels.benchmarks", False),
    ("from kdkernels import _results", False)])
def test_the_scan_sees_every_form_of_import(source, expected):
    names = imported_modules(source, "kdkernels.distill.methods")   # as if in kdkernels/distill/methods/
    assert any(imports_bench(name) for name in names) == expected, names


@pytest.mark.parametrize("path", DISTILL_SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_distill_module_imports_bench(path):
    offending = [name for name in imported_modules(path.read_text(), package_of(path)) if imports_bench(name)]
    assert not offending, f"{path.relative_to(PACKAGE.parent)} imports {offending}"


def test_importing_every_distill_module_loads_no_bench_module():
    """Also indirectly: a module that distill imports must not pull kdkernels.bench in either."""
    script = ("import importlib, pkgutil, sys\n"
              "import kdkernels.distill as d\n"
              "for m in pkgutil.walk_packages(d.__path__, 'kdkernels.distill.'):\n"
              "    importlib.import_module(m.name)\n"
              "print(sorted(n for n in sys.modules if n == 'kdkernels.bench' or n.startswith('kdkernels.bench.')))\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               cwd=PACKAGE.parent)
    assert completed.stdout.strip() == "[]", completed.stdout
