"""The demo's closing count of pump faults: injected after calibration, detected, false alarm events."""

from __future__ import annotations

from edgeline.demo import PumpTally, tally_pump


def test_a_fault_is_detected_by_an_event_that_overlaps_it_or_follows_within_the_tolerance() -> None:
    faults = [(500, 560), (800, 840), (1200, 1230)]
    events = [(520, 600), (845, 870), (2000, None)]
    tally = tally_pump(faults, events, calibration=400, tolerance=10)
    assert tally == PumpTally(injected=3, detected=2, events=3, false_events=1)


def test_faults_during_calibration_are_not_counted_but_their_alarms_are_not_false() -> None:
    tally = tally_pump([(100, 150), (700, 720)], [(140, 160)], calibration=400, tolerance=0)
    assert tally == PumpTally(injected=1, detected=0, events=1, false_events=0)


def test_tallies_add_up() -> None:
    assert PumpTally(1, 1, 2, 1) + PumpTally(2, 0, 0, 0) == PumpTally(3, 1, 2, 1)
