"""The overload policy on scripted timelines of inference-loop duty."""

from __future__ import annotations

from edge.load_shedding import LoadShedder


def run(shedder: LoadShedder, duty: float, seconds: float, start: float, cycle: float = 0.1):
    """Cycles of ``cycle`` s at the given duty; the changes that happened."""
    changes, t = [], start
    while t < start + seconds - 1e-9:
        t += cycle
        change = shedder.report(t, cycle * duty)
        if change.shed or change.restored:
            changes.append(change)
    return changes, t


def test_overload_sheds_lowest_priority_first_and_restores_in_reverse():
    shedder = LoadShedder({"inspect": 10, "overview": 0, "backup": 0, "line": 5}, window_s=1.0)
    changes, t = run(shedder, 0.97, 3.5, 0.0)
    # ties at priority 0: the later one in config order goes first
    assert [c.shed for c in changes] == ["backup", "overview", "line"]
    assert all(c.duty > 0.9 for c in changes)
    changes, t = run(shedder, 0.97, 2.0, t)
    assert changes == []  # the last camera is never shed
    changes, t = run(shedder, 0.75, 3.0, t)
    assert changes == []  # between low and high: hold
    changes, t = run(shedder, 0.3, 2.5, t)
    assert [c.restored for c in changes] == ["line", "overview"]
    assert shedder.shed == ["backup"]


def test_a_shed_camera_is_inferred_one_frame_in_stride():
    shedder = LoadShedder({"a": 1, "b": 0}, window_s=1.0, stride=3)
    run(shedder, 1.0, 1.5, 0.0)
    assert shedder.shed == ["b"]
    assert [shedder.should_infer("b") for _ in range(7)] == [True, False, False, True, False, False, True]
    assert all(shedder.should_infer("a") for _ in range(5))


def test_short_busy_spikes_inside_a_window_do_not_shed():
    shedder = LoadShedder({"a": 1, "b": 0}, window_s=2.0)
    changes, t = run(shedder, 1.0, 0.5, 0.0)
    changes2, _ = run(shedder, 0.2, 1.5, t)
    assert changes == changes2 == [] and shedder.shed == []
