"""The layout promises of ARCHITECTURE.md: one list of op families, one module per family in every layer, shared code
that belongs to no family, and no family reaching into another."""
import ast
import re
from pathlib import Path

from kdkernels.ops import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdkernels"
LAYERS = ("ops", "triton", "reference")
# reference modules that are official formulas of losses composed of other families' ops, not op families; and
# linear_kd, a specification that lands before its kernels make it a family (then it moves into ops.FAMILIES)
REFERENCE_EXTRAS = {"bake", "linear_kd"}


def modules(layer: str) -> set[str]:
    return {p.stem for p in (PACKAGE / layer).glob("*.py") if not p.stem.startswith("_")}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_layer_has_one_module_per_family():
    families = set(FAMILIES)
    assert {p.name for p in (ROOT / "csrc").iterdir() if p.is_dir() and p.name != "common"} == families
    assert modules("ops") == families
    assert modules("triton") == families
    assert modules("reference") == families | REFERENCE_EXTRAS


def test_a_family_module_imports_no_other_family():
    for layer in LAYERS:
        for path in (PACKAGE / layer).glob("[!_]*.py"):
            own = path.stem
            for name in imported_modules(path):
                match = re.fullmatch(r"kdkernels\.(ops|triton|reference)\.([a-z_]+)(\..*)?", name)
                if match and match.group(2) in FAMILIES:
                    assert match.group(2) == own, f"kdkernels/{layer}/{path.name} imports {name}"


def test_shared_python_code_imports_no_family():
    for path in [PACKAGE / "ops" / "_registration.py", PACKAGE / "ops" / "_checks.py", PACKAGE / "_validation.py",
                 *(PACKAGE / "triton").glob("_*.py"), *(PACKAGE / "losses").glob("_[!_]*.py")]:
        for name in imported_modules(path):
            match = re.fullmatch(r"kdkernels\.(ops|triton|reference|losses)\.([a-z_]+)(\..*)?", name)
            assert not match or match.group(2).startswith("_"), f"{path.relative_to(ROOT)} imports {name}"


def test_csrc_common_includes_no_family_and_no_family_includes_another():
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix not in (".h", ".cuh", ".cpp", ".cu"):
            continue
        folder = path.parent.name
        for target in re.findall(r'#include "([^"]+)"', path.read_text()):
            parts = Path(target).parts
            included_folder = parts[-2] if len(parts) > 1 else folder
            if folder == "common":
                assert included_folder == "common", f"{path.relative_to(ROOT)} includes {target}"
            elif path.parent != ROOT / "csrc":
                assert included_folder in (folder, "common"), f"{path.relative_to(ROOT)} includes {target}"


def test_triton_family_modules_register_no_fake_of_their_own():
    """One fake per op, shared by the C++ op and its Triton twin (kdkernels/ops/_registration.py)."""
    for path in (PACKAGE / "triton").glob("[!_]*.py"):
        assert "register_fake" not in path.read_text(), path.name
