"""The layout's one rule: the certification core (dssn_kernels/ at the top, ops/, triton/)
never imports the research workflow (dssn_kernels/workflow/); only ``python -m
dssn_kernels`` (__main__.py) starts the workflow's command."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dssn_kernels"
CORE = sorted(p for p in PACKAGE.rglob("*.py")
              if "workflow" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py")


def imported_modules(source: str, package: list[str]) -> list[str]:
    """Every module a file of ``package`` (e.g. ["dssn_kernels", "ops"]) imports, absolute,
    relative imports resolved."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.append(mod)
            out += [f"{mod}.{alias.name}" for alias in node.names]
    return out


def core_imports(path: Path) -> list[str]:
    package = list(path.relative_to(PACKAGE.parent).parts[:-1])
    return imported_modules(path.read_text(encoding="utf-8"), package)


def test_the_core_files_are_found():
    names = {p.relative_to(PACKAGE).as_posix() for p in CORE}
    assert {"certify.py", "pipeline.py", "checks.py", "ops/vote.py", "triton/expand.py"} <= names
    assert not any(n.startswith("workflow/") for n in names)


def test_no_core_module_imports_the_workflow():
    offenders = {p.relative_to(PACKAGE).as_posix(): m for p in CORE for m in core_imports(p)
                 if m == "dssn_kernels.workflow" or m.startswith("dssn_kernels.workflow.")}
    assert offenders == {}


def test_the_checker_resolves_relative_imports():
    top, ops = ["dssn_kernels"], ["dssn_kernels", "ops"]
    assert "dssn_kernels.workflow" in imported_modules("from .workflow import cli\n", top)
    assert "dssn_kernels.workflow.cli" in imported_modules("from . import workflow\n"
                                                          "from .workflow.cli import main\n", top)
    assert "dssn_kernels.workflow" in imported_modules("from ..workflow import data\n", ops)
    assert "dssn_kernels.spec" in imported_modules("from ..spec import value_table\n", ops)
    assert imported_modules("import dssn_kernels.workflow.cli\n", ops) == ["dssn_kernels.workflow.cli"]


def test_importing_the_package_loads_no_workflow_module():
    code = ("import sys, dssn_kernels as dk; "
            "print(sorted(m for m in sys.modules if m.startswith('dssn_kernels.workflow')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
