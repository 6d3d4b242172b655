"""``edgeline models eval-seg``: the metrics under the full package id (precision included), as a
whole table when piped or as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from models.seg_cli import register
from models.package.signing import BUILTIN_PACKAGES


def invoke(*args: str):
    app = typer.Typer()
    register(app)
    return CliRunner().invoke(app, list(args))


def test_eval_seg_names_the_package_with_its_precision(tmp_path):
    table = invoke("eval-seg", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--dataset", "synthetic")
    assert table.exit_code == 0, table.output
    assert "| metric " in table.stdout and "| seg-synth-1.0.0-int8 |" in table.stdout and "…" not in table.stdout
    raw = invoke("eval-seg", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--dataset", "synthetic", "--json",
                 "--overlays", str(tmp_path), "--overlay-count", "1")
    data = json.loads(raw.stdout)
    assert (data["package"], data["dataset"]) == ("seg-synth-1.0.0-int8", "synthetic")
    assert 0 < data["metrics"]["iou"] <= 1 and data["val_frames"] == data["metrics"]["val_images"]
    assert data["alarm_source"] == "calibrated on train" and set(data["pr_curves"]) == {"Synthetic"}
    assert sorted(p.name.split("_")[0] for p in tmp_path.iterdir()) == ["best", "pr", "worst"]


def test_eval_seg_refuses_a_missing_package_in_one_line(tmp_path):
    result = invoke("eval-seg", str(tmp_path / "nope"), "--dataset", "synthetic")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


def test_eval_seg_on_a_folder_prints_the_table_and_json_with_pr_curves_and_pictures(tmp_path):
    from tests.unit.models.test_seg_eval import synthetic_folder

    folder = synthetic_folder(tmp_path / "frames", sub="Imgs")
    package = str(BUILTIN_PACKAGES / "seg-synth-int8")
    table = invoke("eval-seg", package, "--data", str(folder), "--threads", "1")
    assert table.exit_code == 0, table.output
    assert "| iou_defect_images " in table.stdout and "| ap_crack " in table.stdout
    assert "| Crack " in table.stdout and "| Free " in table.stdout
    assert "image alarm (the package's own)" in table.stdout
    raw = invoke("eval-seg", package, "--data", str(folder), "--threads", "1", "--json", "--overlays",
                 str(tmp_path / "ov"), "--overlay-count", "2")
    assert raw.exit_code == 0, raw.output
    data = json.loads(raw.stdout)
    assert (data["package"], data["data"], data["dataset"], data["alarm_source"]) == (
        "seg-synth-1.0.0-int8", str(folder), None, "package")
    assert data["images"] == sum(data["classes"].values()) == data["metrics"]["val_images"]
    assert set(data["classes"]) == {"Crack", "Free"}
    curve = data["pr_curves"]["Crack"]
    assert set(curve) == {"average_precision", "positives", "negatives", "operating_point", "points"}
    assert curve["positives"] == data["classes"]["Crack"] and curve["negatives"] == data["classes"]["Free"]
    assert all(len(p) == 3 and 0 <= p[1] <= 1 and 0 <= p[2] <= 1 for p in curve["points"])
    assert [p[0] for p in curve["points"]] == sorted((p[0] for p in curve["points"]), reverse=True)
    assert curve["average_precision"] == data["metrics"]["ap_crack"]
    assert curve["operating_point"]["recall"] == data["metrics"]["image_recall"]
    assert len(data["overlays"]) == 5 and data["overlays"][-1].endswith("pr_curve.png")
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in data["overlays"])


def test_eval_seg_refuses_a_folder_without_images_naming_it(tmp_path):
    (tmp_path / "empty" / "MT_Crack").mkdir(parents=True)
    result = invoke("eval-seg", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--data", str(tmp_path / "empty"))
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "empty") in result.stderr and "MT_<Class>/<stem>.jpg" in result.stderr


def test_eval_seg_refuses_a_missing_mask_naming_the_image(tmp_path):
    from tests.unit.models.test_seg_eval import synthetic_folder

    folder = synthetic_folder(tmp_path / "frames", frames=4)
    lonely = next(folder.glob("MT_*/*.png"))
    lonely.unlink()
    result = invoke("eval-seg", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--data", str(folder))
    assert result.exit_code == 2 and lonely.with_suffix(".jpg").name in result.stderr and "mask" in result.stderr


def test_eval_seg_takes_data_or_dataset_not_both(tmp_path):
    result = invoke("eval-seg", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--data", str(tmp_path), "--dataset",
                    "synthetic")
    assert result.exit_code == 2 and "not both" in result.stderr


def test_train_seg_never_overwrites_an_interrupted_run_and_resume_needs_its_checkpoint(tmp_path):
    import pytest

    pytest.importorskip("torch")
    (tmp_path / "w.run.pt").write_bytes(b"an interrupted run")
    refused = invoke("train-seg", "--preset", "synthetic", "--out", str(tmp_path / "out"),
                     "--save-checkpoint", str(tmp_path / "w.pt"))
    assert refused.exit_code == 2 and "w.run.pt holds an interrupted run: add --resume" in refused.output
    alone = invoke("train-seg", "--preset", "synthetic", "--out", str(tmp_path / "out"), "--resume")
    assert alone.exit_code == 2 and "--resume needs --save-checkpoint" in alone.output
    assert not (tmp_path / "out").exists() and (tmp_path / "w.run.pt").read_bytes() == b"an interrupted run"


def test_eval_seg_says_when_a_shipped_build_saw_the_val_split(tmp_path):
    import pytest

    from models import tiles
    from models.package import load_package, write_package

    if not tiles.tiles_available():
        pytest.skip(f"magnetic-tile data not under {tiles.tiles_dir()}")
    source = load_package(BUILTIN_PACKAGES / "seg-synth-int8")
    manifest = source.manifest.model_copy(update={"training": {"cv_recipe": "fixed256"}})
    shipped = write_package(tmp_path / "shipped", manifest, source.model_path.read_bytes())
    table = invoke("eval-seg", str(shipped.folder), "--threads", "1")
    assert table.exit_code == 0, table.output
    assert "on the shared tiles these figures are on images it saw" in table.output and "'fixed256'" in table.output
    plain = invoke("eval-seg", str(BUILTIN_PACKAGES / "seg-synth-int8"), "--dataset", "synthetic", "--json")
    assert json.loads(plain.stdout)["trained_on_every_shared_tile"] is False
