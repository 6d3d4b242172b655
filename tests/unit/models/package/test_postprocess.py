import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.package.manifest import SegmentationPostprocess
from models.package.postprocess import image_alarm, mask_from_probabilities, region_mask, regions_from_probabilities
from stream.messages import DefectRegion


def two_blobs() -> np.ndarray:
    prob = np.zeros((50, 80), np.float32)
    prob[10:20, 5:25] = 0.9  # 200 px
    prob[30:32, 60:62] = 0.8  # 4 px
    prob[40:45, 40:45] = 0.4  # below threshold
    return prob


def test_regions_have_area_bbox_score_and_ratio():
    regions, ratio = regions_from_probabilities(two_blobs(), threshold=0.5, min_area=1)
    assert [r.area for r in regions] == [200, 4]
    first = regions[0]
    assert isinstance(first, DefectRegion)
    assert (first.cls, first.area, first.bbox) == ("defect", 200, (5, 10, 20, 10))
    assert first.score == pytest.approx(0.9)
    assert regions[1].bbox == (60, 30, 2, 2)
    assert ratio == pytest.approx(204 / (50 * 80))


def test_min_area_drops_small_regions_from_regions_and_ratio():
    regions, ratio = regions_from_probabilities(two_blobs(), threshold=0.5, min_area=10, cls="scratch")
    assert len(regions) == 1 and regions[0].cls == "scratch"
    assert ratio == pytest.approx(200 / (50 * 80))
    assert region_mask(two_blobs(), 0.5, 10).sum() == 200


def test_threshold_is_strict_and_empty_maps_have_no_regions():
    prob = np.full((10, 10), 0.5, np.float32)
    assert mask_from_probabilities(prob, 0.5).sum() == 0
    assert regions_from_probabilities(prob, 0.5, 1) == ([], 0.0)
    assert mask_from_probabilities(prob, 0.49).sum() == 100


def test_diagonal_pixels_join_one_region():
    prob = np.zeros((5, 5), np.float32)
    prob[[0, 1, 2], [0, 1, 2]] = 1.0
    regions, _ = regions_from_probabilities(prob, 0.5, 1)
    assert len(regions) == 1 and regions[0].area == 3


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, (24, 32), elements=st.floats(0, 1, width=32)), st.integers(1, 20))
def test_regions_are_consistent_with_the_kept_mask(prob, min_area):
    regions, ratio = regions_from_probabilities(prob, 0.5, min_area)
    kept = region_mask(prob, 0.5, min_area)
    assert sum(r.area for r in regions) == kept.sum()
    assert ratio == pytest.approx(kept.sum() / prob.size)
    assert all(r.area >= min_area and 0 <= r.score <= 1 for r in regions)
    assert np.all(prob[kept > 0] > 0.5)


def test_image_alarm_uses_the_calibrated_area_share_or_falls_back_to_regions():
    prob = np.zeros((10, 10), np.float32)
    prob[:2, :3] = 0.95  # 6% of the frame above 0.9
    prob[5, 5] = 0.7
    calibrated = SegmentationPostprocess(threshold=0.5, alarm_threshold=0.9, alarm_area_ratio=0.05)
    assert image_alarm(prob, calibrated, regions=[])
    assert not image_alarm(prob, calibrated.model_copy(update={"alarm_area_ratio": 0.06}), regions=[])
    uncalibrated = SegmentationPostprocess(threshold=0.5, min_area=2)
    regions, _ = regions_from_probabilities(prob, 0.5, min_area=2)
    assert image_alarm(prob, uncalibrated, regions)
    assert not image_alarm(prob, uncalibrated, regions=[])
