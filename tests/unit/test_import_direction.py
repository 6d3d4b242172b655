"""The direction of imports (ARCHITECTURE.md) is enforced by the import-linter contracts in pyproject.toml."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("stream", "models", "edge", "central", "edgeline")
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--no-logo", "pyproject.toml"], cwd=root,
                          capture_output=True, text=True, timeout=240)


def copy_sources(target: Path) -> Path:
    """The five packages' Python files and pyproject.toml, nothing else (no model weights, no data)."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, target / package, ignore=lambda _d, names: [
            n for n in names if not (n.endswith(".py") or (Path(_d) / n).is_dir()) or n == "__pycache__"])
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def test_the_imports_keep_their_direction() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("stream/rules.py", "import edge.outbox", "layers:"),
    ("edge/gate.py", "import edgeline.config", "layers:"),
    ("central/tokens.py", "import edge.outbox", "layers:"),
    ("models/segmentation.py", "import edge.outbox", "training never imports"),
    ("edge/gate.py", "import models.segmentation", "edge and central use models only"),
    ("models/package/preprocess.py", "import models.segmentation", "models.package imports no training"),
    ("stream/rules.py", "import models.package", "layers:"),
    ("edge/gate.py", "import torch", "the edge install is torch-free"),
])
def test_a_wrong_way_import_breaks_a_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    """The contracts are not vacuous: one import against the direction, added to a copy, is reported."""
    root = copy_sources(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # against the direction\n")
    result = lint(root)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
