"""The base install, honestly: the CLI runs in a subprocess in which the optional extras' modules
cannot be imported (a ``sys.meta_path`` finder refuses them). Each command that needs an extra
says which, and how to install it, in one line and exits 2; the central client commands work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXTRAS_MODULES = ("fastapi", "sqlalchemy", "uvicorn", "psycopg", "kafka", "aiokafka", "torch", "onnx",
                  "grafana_foundation_sdk", "grafana_client")
BASE_INSTALL = f"""
import runpy, sys

class RefuseExtras:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {EXTRAS_MODULES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, RefuseExtras())
sys.argv[0] = "edgeline"
runpy.run_module("edgeline.cli", run_name="__main__")
"""


def edgeline_without_extras(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BASE_INSTALL, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("site") / "site.yaml"
    path.write_text("site: s1\n")
    return path


@pytest.mark.parametrize(("command", "extra"), [
    ("grafana build --out {tmp}/dashboards", "central"),
    ("grafana provision --url http://127.0.0.1:9 --token t", "central"),
    ("stream bridge -c {site}", "kafka"),
    ("stream worker -c {site}", "kafka"),
    ("central serve -c {site}", "central"),
    ("models build --out {tmp}/packages", "models"),
    ("models train-seg --preset synthetic --out {tmp}/packages", "models"),
    ("models train-anomaly {tmp}/plant.csv --name press --out {tmp}/packages", "models"),
    ("models quantize models/packages/seg-synth-fp32 --out {tmp}/packages", "models"),
])
def test_a_command_that_needs_an_extra_says_which_in_one_line(command: str, extra: str, site: Path,
                                                               tmp_path: Path) -> None:
    args = command.format(site=site, tmp=tmp_path).split()
    done = edgeline_without_extras(*args)
    name = " ".join(args[:2])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"edgeline {name} needs the '{extra}' extra (no module '")
    assert line.endswith(f"): pip install 'edgeline[{extra}]'")


def test_the_central_client_commands_need_only_the_base_install() -> None:
    listed = edgeline_without_extras("central", "--help")
    assert listed.returncode == 0, listed.stderr
    for command in ("machines", "models", "upload", "rollout", "rollouts", "rollout-status", "rollout-control"):
        assert f"  {command} " in listed.stdout
    helped = edgeline_without_extras("central", "machines", "--help")
    assert helped.returncode == 0 and "--json" in helped.stdout, helped.stderr
    unreachable = edgeline_without_extras("central", "machines", "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 2 and "cannot reach http://127.0.0.1:9/machines" in unreachable.stderr
