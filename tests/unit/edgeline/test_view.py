"""The demo view's windowed counts: defect frames over the last seconds, not the last frame's count."""

from __future__ import annotations

from edgeline.view import WindowCount


def test_window_count_is_the_growth_over_the_last_window():
    window = WindowCount(10.0)
    assert window.update("m1/c1", 5, now=100.0) == 0  # the first reading is the base
    assert window.update("m1/c1", 8, now=104.0) == 3
    assert window.update("m1/c1", 12, now=110.0) == 7  # 100 s is still the window's start
    assert window.update("m1/c1", 12, now=112.0) == 7  # the newest reading at or before 102 s: 100 s
    assert window.update("m1/c1", 13, now=115.0) == 5  # 13 - 8: now 104 s is the base
    assert window.update("m1/c1", 13, now=130.0) == 0  # nothing new for a whole window
    assert window.update("m2/c1", 3, now=130.0) == 0  # each key on its own
