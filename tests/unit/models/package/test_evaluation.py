import numpy as np
import pytest

from models.package.anomaly import runs
from models.package.evaluation import event_metrics, segmentation_metrics


def test_event_metrics_by_hand():
    labels = np.zeros(100, bool)
    labels[10:20] = labels[50:55] = labels[80:90] = True
    alarms = np.zeros(100, bool)
    alarms[15:17] = True  # inside episode 1
    alarms[57] = True  # just after episode 2: within tolerance
    alarms[30:33] = True  # false alarm run
    m = event_metrics(labels, alarms, tolerance=5)
    assert m["event_recall"] == pytest.approx(2 / 3)
    assert m["event_precision"] == pytest.approx(2 / 3)
    assert m["event_f1"] == pytest.approx(2 / 3)
    assert m["false_alarm_runs"] == 1
    assert m["point_precision"] == pytest.approx(2 / 6)
    assert m["mean_delay"] == pytest.approx((5 + 7) / 2)
    assert runs(np.array([1, 1, 0, 1], bool)) == [(0, 2), (3, 4)]


def test_segmentation_metrics_by_hand():
    empty = np.zeros((10, 10), np.uint8)
    square = empty.copy()
    square[2:6, 2:6] = 1  # 16 px
    shifted = empty.copy()
    shifted[3:7, 2:6] = 1  # overlaps 12
    sliver = empty.copy()
    sliver[0, 0] = 1
    predicted = [shifted, empty, square, empty]
    truth = [square, square, empty, sliver]
    m = segmentation_metrics(predicted, truth, min_area=4)
    assert m["iou"] == pytest.approx(12 / (20 + 16 + 16 + 1))
    assert m["recall"] == 0.5  # frame 2 missed, frame 4 (sliver) not counted
    assert m["false_alarm_rate"] == 1.0  # the one clean frame was flagged
    assert m["precision"] == 0.5
    assert m["frames_defective"] == 2 and m["frames_clean"] == 1
