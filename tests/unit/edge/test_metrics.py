"""The rate a heartbeat reports (frames inferred per second), on a scripted clock."""

from __future__ import annotations

import pytest

from edge.metrics import RecentRate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_over_the_recent_window() -> None:
    clock = Clock()
    rate = RecentRate(window_s=10.0, clock=clock)
    assert rate.per_second() == 0.0
    for _ in range(40):  # 8 per second for 5 s: younger than the window, so over 5 s
        clock.now += 0.125
        rate.add()
    assert rate.per_second() == pytest.approx(8.0)
    for _ in range(40):  # then 4 per second for 10 s: the first 5 s are forgotten
        clock.now += 0.25
        rate.add()
    assert rate.per_second() == pytest.approx(4.0)


def test_rate_falls_to_zero_when_nothing_happens() -> None:
    clock = Clock()
    rate = RecentRate(window_s=10.0, clock=clock)
    clock.now += 1.0
    for _ in range(10):
        rate.add()
    assert rate.per_second() == pytest.approx(10.0)
    clock.now += 5.0
    assert rate.per_second() == pytest.approx(10 / 6)
    clock.now += 5.5
    assert rate.per_second() == 0.0
