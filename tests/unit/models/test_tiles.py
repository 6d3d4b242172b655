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
