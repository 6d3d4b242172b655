"""``edgeline models eval-seg``: the metrics under the full package id (precision included), as a
whole table when piped or as JSON."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from models.seg_cli import register
from models.signing import BUILTIN_PACKAGES


def invoke(*args: str):
    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, list(args))


def test_eval_seg_names_the_package_with_its_precision():
    table = invoke("eval-seg", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--dataset", "synthetic")
    assert table.exit_code == 0, table.output
    assert "| metric " in table.stdout and "| seg-synth-1.0.0-int8 |" in table.stdout and "…" not in table.stdout
    raw = invoke("eval-seg", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--dataset", "synthetic", "--json")
    data = json.loads(raw.stdout)
    assert (data["package"], data["dataset"]) == ("seg-synth-1.0.0-int8", "synthetic")
    assert 0 < data["metrics"]["iou"] <= 1 and data["val_frames"] == data["metrics"]["val_images"]


def test_eval_seg_refuses_a_missing_package_in_one_line(tmp_path):
    result = invoke("eval-seg", str(tmp_path / "nope"), "--dataset", "synthetic")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
