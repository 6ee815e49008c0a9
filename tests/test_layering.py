"""The dependency arrows point down (docs/architecture.md, "Where code lives"): protocol/ is
the ground, tasks/ sits on it, services/ and trainer/ never import each other, rlrt/ is the
top. Read from the source with `ast`, function-level imports included, so a lazy import cannot
slip an upward arrow past the check."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "tasks", "services", "trainer", "rlrt")
# What each package may import from the project (besides itself).
ALLOWED = {
    "protocol": set(),
    "tasks": {"protocol"},
    "services": {"protocol", "tasks"},
    "trainer": {"protocol", "tasks"},
    "rlrt": {"protocol", "tasks", "services", "trainer"},
}


def project_imports(path: Path) -> set[str]:
    """The top-level project packages `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_upward_or_sideways_import(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for dep in project_imports(path) - ALLOWED[package] - {package}:
            bad.append(f"{path.relative_to(ROOT)} imports {dep}")
    assert not bad, "; ".join(bad)


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from trainer.main import run_trainer\n    import rlrt.cli\n")
    assert project_imports(f) == {"trainer", "rlrt"}
