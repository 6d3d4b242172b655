"""ARCHITECTURE.md stays true: it names every module of the five packages, and every path it names exists."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("stream", "models", "edge", "central", "edgeline")
PATH = re.compile(r"`?((?:stream|models|edge|central|edgeline|tests|bench)/[\w/.-]*\w/?)`?")


def architecture() -> str:
    return (ROOT / "ARCHITECTURE.md").read_text()


def modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py")
                  if p.name != "__init__.py" and "packages" not in p.parts)


def test_every_module_is_placed() -> None:
    text = architecture()
    missing = [module for module in modules() if module not in text]
    assert not missing, f"ARCHITECTURE.md does not say where these live: {missing}"


def test_every_named_path_exists() -> None:
    named = set(PATH.findall(architecture()))
    assert len(named) > 40
    gone = sorted(path for path in named if not (ROOT / path).exists())
    assert not gone, f"ARCHITECTURE.md names paths that do not exist: {gone}"
