"""The models benchmark runs tiny end to end: one row per variant (the previous package's net
first, the reference of the ratios; the shipped packages; every cross-validated variant found, with
its CV figures; then candidate widths), the runtime rows at batch 1 and 4, one JSON. The CV results it reads are real
fold reports: a tiny native net scored on fold 0 of a few real tiles by models.seg_cv.score_fold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.models import PREVIOUS
from models.package.preprocess import reference_input
from models.package import BUILTIN_PACKAGES, load_package
from tests.tiny_tiles import tiny_tiles_root

pytestmark = pytest.mark.skipif(not (BUILTIN_PACKAGES / "seg-tiles-fp32").exists(),
                                reason="no seg-tiles packages (run: edgeline models train-seg)")


def scored_fold(tmp_path: Path) -> tuple[Path, tuple[int, ...]]:
    """``<results>/baseline/fold0.json`` of an untrained (4,4,4,4) native net on a few real tiles."""
    torch = pytest.importorskip("torch")
    from models import seg_cv
    from models import segmentation as seg

    root = tiny_tiles_root(tmp_path, per_class=5, free=25)
    widths = (4, 4, 4, 4)
    torch.manual_seed(0)
    model = seg.TileUNet(widths).eval()
    config = seg.SegTrainConfig(resize="native", widths=widths)
    report = seg_cv.score_fold(seg.export_for(model, config), config, 0, root=root)
    results = tmp_path / "seg_cv"
    seg_cv.write_fold(report | {"recipe": "baseline", "steps": 0}, "baseline", 0, results)
    return results, widths


def test_models_benchmark_writes_one_json(tmp_path: Path) -> None:
    from bench.models import main
    from models.seg_cv import recipe_summary
    from models.segmentation import TileUNet, conv_flops

    results, widths = scored_fold(tmp_path)
    out = tmp_path / "models.json"
    main(seconds=0.05, out=out, results=results, candidates="8,16,32,48")
    result = json.loads(out.read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    first = result["rows"][0]
    assert first["variant"] == PREVIOUS and first["x_base_1t"] == first["x_base_2t"] == 1.0
    assert (first["widths"], first["input"], first["precision"]) == ("16,32,64,96", "256x256", "int8")
    shipped = load_package(BUILTIN_PACKAGES / "seg-tiles-fp32").manifest.preprocess
    assert rows["seg-tiles-fp32 (shipped)"]["input"] == "x".join(map(str, reference_input(shipped)))
    cv = rows["baseline"]
    summary = recipe_summary("baseline", results)
    mean, std = summary["mean"]["iou_defect_images"], summary["std"]["iou_defect_images"]
    assert cv["folds"] == 1 and cv["iou_defect"] == f"{mean:.3f}±{std:.3f}"
    assert cv["alarm_rule"] == summary["alarm_rule"]
    assert cv["widths"] == "4,4,4,4" and cv["input"] == "336x272"
    assert cv["gflop"] == pytest.approx(conv_flops(TileUNet(widths), (1, 1, 336, 272)) / 1e9)
    assert cv["x_base_1t"] == pytest.approx(cv["ms_1t"] / first["ms_1t"])
    candidates = [row for row in result["rows"] if row["variant"].startswith("candidate")]
    assert {(row["widths"], row["precision"]) for row in candidates} == {("8,16,32,48", "fp32"), ("8,16,32,48", "int8")}
    assert all(row["iou_defect"] == "-" and row["folds"] == 0 for row in candidates)
    assert all(row["ms_1t"] > 0 and row["ms_2t"] > 0 and row["gflop"] > 0 for row in result["rows"])
    shipped_recipe = load_package(BUILTIN_PACKAGES / "seg-tiles-fp32").manifest.training.get("cv_recipe")
    assert {entry["variant"] for entry in result["cv"]} == {"baseline"} | ({shipped_recipe} - {None})
    runtimes = {row["runtime"] for row in result["runtime_rows"]}
    assert {"ORT fp32", "ORT int8 U8S8", "ORT int8 S8S8"} <= runtimes
    assert {row["batch"] for row in result["runtime_rows"]} == {1, 4}
    assert all(row["ms_per_frame"] > 0 and row["pct_of_matmul_peak"] > 0 for row in result["runtime_rows"])
    assert "matmul fp32 peak" in result["notes"]
    assert "lstm_rows" in result


def test_without_cv_results_the_shipped_rows_carry_their_recorded_figures(tmp_path: Path) -> None:
    """No fold files and no candidates: the reference row (where torch builds it) and the shipped
    packages, each with the recorded CV figures of the recipe its manifest names ('-' if none)."""
    from bench.models import main
    from models.seg_cv import recipe_summary

    out = tmp_path / "models.json"
    main(seconds=0.05, out=out, results=tmp_path / "none", candidates="", runtimes=False)
    result = json.loads(out.read_text())
    shipped = [p for p in ("int8", "fp32", "fp16") if (BUILTIN_PACKAGES / f"seg-tiles-{p}").exists()]
    reference = [PREVIOUS] if _torch() else []
    assert [row["variant"] for row in result["rows"]] == reference + [f"seg-tiles-{p} (shipped)" for p in shipped]
    for row in result["rows"][len(reference):]:
        recipe = load_package(BUILTIN_PACKAGES / f"seg-tiles-{row['precision']}").manifest.training.get("cv_recipe")
        summary = recipe_summary(recipe, tmp_path / "none") if recipe else None
        if summary and summary["alarm_rule"]:
            mean, std = summary["mean"]["iou_defect_images"], summary["std"]["iou_defect_images"]
            assert row["iou_defect"] == f"{mean:.3f}±{std:.3f}"
        else:
            assert row["iou_defect"] == "-"
        assert row["ms_1t"] > 0
    assert result["runtime_rows"] == []


def _torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
