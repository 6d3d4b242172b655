"""The magnetic-tile split is deterministic and stratified; masks are thresholded at >127."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from models import tiles

needs_data = pytest.mark.skipif(
    not tiles.tiles_available(), reason=f"magnetic-tile data not under {tiles.tiles_dir()} (set EDGELINE_DATA)"
)


def _fake_items(counts: dict[str, int]) -> list[tiles.TileItem]:
    return [tiles.TileItem(cls, Path(f"MT_{cls}/img_{cls}_{i}.jpg"), Path(f"MT_{cls}/img_{cls}_{i}.png"))
            for cls, n in counts.items() for i in range(n)]


def test_split_is_deterministic_and_independent_of_order():
    items = _fake_items({"Blowhole": 50, "Free": 200})
    train, val = tiles.split_items(items)
    train2, val2 = tiles.split_items(list(reversed(items)))
    assert {it.image for it in val} == {it.image for it in val2}
    assert {it.image for it in train} == {it.image for it in train2}
    assert not {it.image for it in train} & {it.image for it in val}


def test_split_keeps_each_class_on_both_sides():
    items = _fake_items({"Blowhole": 88, "Fray": 3, "Crack": 2, "Free": 300})
    train, val = tiles.split_items(items, val_fraction=0.2)
    for cls in ("Blowhole", "Fray", "Crack", "Free"):
        n_val = sum(it.cls == cls for it in val)
        n_train = sum(it.cls == cls for it in train)
        assert n_val >= 1 and n_train >= 1, cls
    share = sum(it.cls == "Free" for it in val) / 300
    assert 0.12 < share < 0.28


def test_adding_files_does_not_move_others():
    items = _fake_items({"Break": 40})
    _, val = tiles.split_items(items)
    _, val_more = tiles.split_items(items + _fake_items({"Break": 60})[40:])
    assert {it.image for it in val} <= {it.image for it in val_more}


def test_masks_are_thresholded_above_127(tmp_path):
    raw = np.array([[0, 127, 128, 255]], np.uint8)
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), raw)
    assert tiles.read_mask(path).tolist() == [[0, 0, 1, 1]]


def test_missing_data_raises_a_clear_error(tmp_path):
    with pytest.raises(tiles.TilesMissing, match="EDGELINE_DATA"):
        tiles.list_items(tmp_path)


def _score(cls: str, areas: tuple[int, ...], pixels: int = 100) -> tiles.ImageScore:
    return tiles.ImageScore(cls, 0, areas[0], areas[0], 0, pixels, areas)


def test_area_threshold_keeps_false_alarms_within_budget():
    ratios = [0.0] * 80 + [r / 100 for r in range(1, 21)]
    t = tiles.calibrate_area_threshold(ratios, 0.05)
    assert 4 <= sum(r > t for r in ratios) <= 5


def test_alarm_picks_the_pixel_threshold_that_finds_most_defects_within_the_budget():
    n = len(tiles.ALARM_THRESHOLDS)
    # clean tiles: speckles at low confidence only; defects: small but confident
    free = [_score("Free", (20 + i % 10,) + (0,) * (n - 1)) for i in range(40)]
    defect = [_score("Crack", (25,) + (5,) * (n - 1)) for _ in range(10)]
    alarm = tiles.calibrate_alarm(free + defect, 0.05)
    assert alarm.pixel_threshold > tiles.ALARM_THRESHOLDS[0]
    metrics = tiles.tile_metrics(free + defect, alarm)
    assert metrics["image_recall"] == 1.0 and metrics["false_alarm_rate"] <= 0.05
    # at the mask threshold alone the same defects hide among the speckles
    weak = tiles.tile_metrics(free + defect, tiles.Alarm(0, tiles.calibrate_area_threshold(
        [s.alarm_ratio(0) for s in free], 0.05)))
    assert weak["image_recall"] == 0.0


@needs_data
def test_real_split_is_stratified_about_80_20():
    items = tiles.list_items()
    train, val = tiles.split_items(items)
    total, in_val = Counter(it.cls for it in items), Counter(it.cls for it in val)
    assert set(total) == set(tiles.CLASSES)
    for cls in tiles.CLASSES:
        assert 0.08 <= in_val[cls] / total[cls] <= 0.35, (cls, in_val[cls], total[cls])
    assert tiles.split_items(items) == (train, val)


@needs_data
def test_real_masks_are_binary_and_free_images_are_clean():
    items = tiles.list_items()
    crack = next(it for it in items if it.cls == "Crack")
    free = next(it for it in items if it.cls == "Free")
    image, mask = crack.load()
    assert image.dtype == np.uint8 and image.ndim == 2 and mask.shape == image.shape
    assert set(np.unique(mask)) <= {0, 1} and mask.any()
    assert not free.load()[1].any()


# ---------------------------------------------------------------- any folder in either layout


def _write_tile(folder: Path, stem: str, defect: bool, mask: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full((40, 30), 120, np.uint8)
    truth = np.zeros_like(image)
    if defect:
        truth[10:14, 8:12] = 255
    cv2.imwrite(str(folder / f"{stem}.jpg"), image)
    if mask:
        cv2.imwrite(str(folder / f"{stem}.png"), truth)


@pytest.mark.parametrize("sub", ["", "Imgs"])
def test_find_items_reads_either_layout_in_class_order(tmp_path, sub):
    for cls, stems in {"Free": ["f2", "f1"], "Crack": ["c1"], "Blowhole": ["b1", "b0"]}.items():
        for stem in stems:
            _write_tile(tmp_path / f"MT_{cls}" / sub, stem, cls != "Free")
    items = tiles.find_items(tmp_path)
    assert [(it.cls, it.image.stem) for it in items] == [("Blowhole", "b0"), ("Blowhole", "b1"), ("Crack", "c1"),
                                                         ("Free", "f1"), ("Free", "f2")]
    assert all(it.mask == it.image.with_suffix(".png") for it in items)
    image, mask = items[0].load()
    assert image.shape == mask.shape == (40, 30) and mask.sum() == 16
    assert tiles.find_items(tmp_path.parent / tmp_path.name) == items


def test_find_items_accepts_a_data_root_and_keeps_unknown_classes_as_defects(tmp_path):
    _write_tile(tmp_path / "magnetic-tile" / "MT_Free", "f", False)
    _write_tile(tmp_path / "magnetic-tile" / "MT_Scratch", "s", True)
    _write_tile(tmp_path / "magnetic-tile" / "MT_Break" / "Imgs", "b", True)
    items = tiles.find_items(tmp_path)
    assert [(it.cls, it.defective) for it in items] == [("Break", True), ("Free", False), ("Scratch", True)]


def test_find_items_refuses_an_empty_folder_naming_it_and_the_layouts(tmp_path):
    (tmp_path / "MT_Crack").mkdir()
    (tmp_path / "MT_Crack" / "notes.txt").write_text("no images here")
    with pytest.raises(tiles.DataLayoutError) as info:
        tiles.find_items(tmp_path)
    assert str(tmp_path) in str(info.value) and "MT_<Class>/Imgs/<stem>.jpg" in str(info.value)
    with pytest.raises(tiles.DataLayoutError, match="not a folder"):
        tiles.find_items(tmp_path / "nope")


def test_find_items_refuses_an_image_without_its_mask(tmp_path):
    _write_tile(tmp_path / "MT_Crack", "ok", True)
    _write_tile(tmp_path / "MT_Crack", "lonely", True, mask=False)
    with pytest.raises(tiles.DataLayoutError, match=r"1 image\(s\) without a mask .*MT_Crack/lonely\.jpg"):
        tiles.find_items(tmp_path)


# ---------------------------------------------------------------- the top-k alarm, PR curves


def _prob_score(cls: str, prob: np.ndarray, truth: np.ndarray) -> tiles.ImageScore:
    """What score_images records, without a model."""
    pred, true = prob > 0.5, truth > 0
    return tiles.ImageScore(cls, int((pred & true).sum()), int((pred | true).sum()), int(pred.sum()), int(true.sum()),
                            int(prob.size), tuple(int((prob > t).sum()) for t in tiles.ALARM_THRESHOLDS),
                            tiles.top_scores(prob))


def _speckled_free_and_small_defects(seed: int = 0):
    """Clean tiles carry 30-40 scattered pixels just above 0.98; a small defect is 6 pixels at ~0.999
    (fewer confident pixels than a clean tile's speckle, so no area rule can tell them apart)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(60):
        prob = rng.uniform(0, 0.3, (64, 64)).astype(np.float32)
        speckle = rng.choice(prob.size, 30 + i % 11, replace=False)
        prob.flat[speckle] = rng.uniform(0.981, 0.99, len(speckle))
        out.append(("Free", prob, np.zeros((64, 64), np.uint8)))
    for i in range(20):
        prob = rng.uniform(0, 0.3, (64, 64)).astype(np.float32)
        truth = np.zeros((64, 64), np.uint8)
        truth[30:32, 20 + i % 8 : 23 + i % 8] = 1
        prob[truth > 0] = rng.uniform(0.998, 0.9999, 6)
        out.append(("Blowhole", prob, truth))
    return out


def test_top_k_alarm_wins_when_small_defects_have_few_pixels():
    maps = _speckled_free_and_small_defects()
    scores = [_prob_score(cls, prob, truth) for cls, prob, truth in maps]
    area_only = tiles.calibrate_alarm(scores, 0.05, rules=("area",))
    assert tiles.tile_metrics(scores, area_only)["image_recall"] <= 0.25
    alarm = tiles.calibrate_alarm(scores, 0.05)
    assert alarm.rule == "top_k" and alarm.top_k is not None and alarm.pixel_threshold is None
    metrics = tiles.tile_metrics(scores, alarm)
    assert metrics["image_recall"] == 1.0 and metrics["false_alarm_rate"] <= 0.05
    assert metrics["alarm_top_k"] == alarm.top_k and metrics["area_threshold"] == 0.0
    free_scores = sorted(alarm.score(s) for s in scores if s.cls == "Free")
    assert alarm.threshold in free_scores  # a quantile of the clean tiles' scores ("higher")


def test_with_alarm_writes_the_top_k_rule_and_the_edge_agrees_with_the_calibration():
    from models.package.postprocess import image_alarm
    from models.package import load_package
    from models.package.signing import BUILTIN_PACKAGES

    maps = _speckled_free_and_small_defects(seed=1)
    scores = [_prob_score(cls, prob, truth) for cls, prob, truth in maps]
    alarm = tiles.calibrate_alarm(scores, 0.05)
    metrics = tiles.tile_metrics(scores, alarm)
    manifest = tiles.with_alarm(load_package(BUILTIN_PACKAGES / "seg-synth-int8").manifest, metrics)
    post = manifest.postprocess
    assert (post.alarm_top_k, post.alarm_threshold) == (alarm.top_k, alarm.threshold)
    assert [image_alarm(prob, post, []) for _, prob, _ in maps] == [alarm.fires(s) for s in scores]
    verdicts = [tiles.package_verdict(prob, post) for _, prob, _ in maps]
    assert [fires for _, fires in verdicts] == [alarm.fires(s) for s in scores]
    # and back to the area rule: alarm_top_k cleared
    area = tiles.tile_metrics(scores, tiles.calibrate_alarm(scores, 0.05, rules=("area",)))
    post = tiles.with_alarm(manifest, area).postprocess
    assert post.alarm_top_k is None and post.alarm_area_ratio == area["area_threshold"]


def test_pr_points_and_average_precision_by_hand():
    points = tiles.pr_points([0.9, 0.8, 0.3], [0.85, 0.1])
    expected = [(0.9, 1.0, 1 / 3), (0.85, 0.5, 1 / 3), (0.8, 2 / 3, 2 / 3), (0.3, 0.75, 1.0), (0.1, 0.6, 1.0)]
    assert np.allclose(points, expected)
    assert tiles.average_precision(points) == pytest.approx(1 / 3 + 2 / 9 + 1 / 4)
    assert tiles.pr_points([0.5], [0.5]) == [(0.5, 0.5, 1.0)]  # ties count together
    assert tiles.pr_points([], [0.5]) == []


def test_tile_metrics_pools_defect_images_apart_and_curves_per_class():
    def s(cls, inter, union, top):
        return tiles.ImageScore(cls, inter, union, inter, inter, 100, (0,) * len(tiles.ALARM_THRESHOLDS),
                                (top,) * len(tiles.TOP_K))

    scores = [s("Crack", 8, 10, 0.9), s("Crack", 0, 10, 0.2), s("Fray", 5, 5, 0.7), s("Free", 0, 20, 0.3),
              s("Free", 0, 0, 0.1)]
    alarm = tiles.Alarm(0, 0.25, "top_k")
    metrics = tiles.tile_metrics(scores, alarm)
    assert metrics["iou_defect_images"] == pytest.approx(13 / 25) and metrics["iou"] == pytest.approx(13 / 45)
    assert metrics["iou_crack"] == pytest.approx(8 / 20) and metrics["iou_fray"] == 1.0
    assert (metrics["image_recall"], metrics["false_alarm_rate"]) == (pytest.approx(2 / 3), 0.5)
    curves = tiles.pr_curves(scores, alarm)
    assert list(curves) == ["Crack", "Fray"]
    assert curves["Crack"].operating_point == (0.5, 0.5) and curves["Fray"].average_precision == 1.0
    assert metrics["ap_crack"] == curves["Crack"].average_precision
