"""requirements.lock agrees with pyproject.toml.

Every install goes through the lock (pip constraints), so a requirement that the lock does not pin,
or pins outside the range pyproject.toml asks for, would install something CI never tested. The
lock is refreshed with ``scripts/lock.sh``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCKED_EXTRAS = ("kafka", "central", "models", "dev")
"""The extras the lock resolves (`all` less `gpu`, which a CUDA/Jetson box brings itself)."""
SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13")


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        names += project["optional-dependencies"][extra]
    return [Requirement(name) for name in names]


def locked_pins(text: str) -> dict[str, list[tuple[Version, Marker | None]]]:
    """``name -> [(version, marker)]`` from uv's requirements output (a name may fork on a marker)."""
    pins: dict[str, list[tuple[Version, Marker | None]]] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;]+)\s*(?:;\s*(.+))?$", line.strip())
        if match:
            name, version, marker = match.groups()
            pins.setdefault(canonicalize_name(name), []).append((Version(version), Marker(marker) if marker else None))
    return pins


def direct_dependencies(text: str) -> set[str]:
    """Names the lock says it pinned because pyproject.toml asks for them (``# via edgeline``)."""
    direct: set[str] = set()
    current: str | None = None
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            current = canonicalize_name(re.split(r"[=\[ ;]", line, maxsplit=1)[0])
        elif current and re.search(r"#\s+(via\s+)?edgeline \(pyproject\.toml\)", line):
            direct.add(current)
    return direct


@pytest.fixture(scope="module")
def lock_text() -> str:
    path = REPO_ROOT / "requirements.lock"
    assert path.is_file(), "requirements.lock is missing: run scripts/lock.sh"
    return path.read_text()


def test_lock_was_made_by_the_documented_command(lock_text):
    assert "scripts/lock.sh" in lock_text.splitlines()[1], "refresh the lock with scripts/lock.sh, not by hand"


def applies(marker: Marker | None, python: str) -> bool:
    environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    return marker is None or marker.evaluate(environment)


@pytest.mark.parametrize("python", SUPPORTED_PYTHONS)
def test_every_requirement_is_pinned_inside_its_range(lock_text, python):
    pins = locked_pins(lock_text)
    problems = []
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        versions = [version for version, marker in pins.get(name, []) if applies(marker, python)]
        if not versions:
            problems.append(f"{requirement}: not pinned for Python {python}")
        problems += [f"{requirement}: locked at {version}" for version in versions
                     if not requirement.specifier.contains(version, prereleases=True)]
    assert not problems, "requirements.lock disagrees with pyproject.toml (run scripts/lock.sh):\n" + "\n".join(problems)


def test_the_lock_holds_no_direct_dependency_that_pyproject_dropped(lock_text):
    wanted = {canonicalize_name(requirement.name) for requirement in project_requirements()}
    stale = direct_dependencies(lock_text) - wanted
    assert not stale, f"requirements.lock pins {sorted(stale)} for edgeline, which pyproject.toml no longer asks for"


def test_the_parsers_see_the_lock(lock_text):
    """Guards the two tests above against passing on a lock they failed to read."""
    pins = locked_pins(lock_text)
    assert {"torch", "onnxruntime", "numpy", "aiokafka", "kafka-python"} <= set(pins)
    assert {"pydantic", "onnxruntime", "torch"} <= direct_dependencies(lock_text)
