import json
import math
from pathlib import Path

import numpy as np
import pytest

from models import nab
from models.nab import (STANDARD, CostMatrix, NabFile, load_corpus, nab_raw_score, nab_score, onsets, outcome,
                        probation_rows)
from models.package.series import Series


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def scaled(x: float) -> float:
    """NAB's scaled sigmoid, written out from its definition."""
    return -1.0 if x >= 3.0 else 2.0 * sigmoid(-5.0 * x) - 1.0


def reference_score(alarms: list[int], windows: list[tuple[int, int]], probation: int, costs: CostMatrix) -> float:
    """NAB's sweep at a fixed threshold, row by row as its docs describe it: every scored alarm
    outside a window pays A_FP x scaled sigmoid of its distance past the last window's end (in
    window length - 1 units; 3 = well past when there is no earlier window); each window earns
    its earliest scored alarm's scaled position / scaled(-1) x A_TP, or -A_FN without one."""
    total, best = 0.0, {}
    last_end, last_width = None, None
    for i in range(len(alarms)):
        window = next((w for w in windows if w[0] <= i <= w[1]), None)
        if window is not None:
            width = window[1] - window[0] + 1
            value = scaled(-(window[1] - i + 1) / width) * costs.tp / scaled(-1.0)
        else:
            distance = 3.0 if last_end is None else abs(i - last_end) / (last_width - 1)
            value = scaled(distance) * costs.fp
        if i >= probation and alarms[i]:
            if window is None:
                total += value
            else:
                best[window] = max(best.get(window, -math.inf), value)
        if window is not None and i == window[1]:
            last_end, last_width = i, window[1] - window[0] + 1
    return total + sum(best.get(w, -costs.fn) for w in windows)


def test_probation_is_15_percent_capped_like_nab():
    assert probation_rows(100) == 15 and probation_rows(4032) == 604 and probation_rows(1243) == 186
    assert probation_rows(18050) == 750 and probation_rows(5000) == 750 and probation_rows(5001) == 750


def test_window_scores_by_hand():
    alarms = np.zeros(100, bool)
    windows = [(30, 39)]
    assert nab_raw_score(alarms, windows, 10) == -1.0  # missed window: -A_FN
    alarms[30] = True
    assert nab_raw_score(alarms, windows, 10) == pytest.approx(1.0)  # first row of the window: A_TP
    alarms[:] = False
    alarms[39] = True  # last row: relative position -1/10
    assert nab_raw_score(alarms, windows, 10) == pytest.approx((2 * sigmoid(0.5) - 1) / (2 * sigmoid(5) - 1))
    alarms[35] = True  # the window's best (earliest) alarm counts, once
    assert nab_raw_score(alarms, windows, 10) == pytest.approx((2 * sigmoid(2.5) - 1) / (2 * sigmoid(5) - 1))


def test_false_positive_costs_by_hand():
    windows = [(30, 39)]
    alarms = np.zeros(100, bool)
    alarms[[5, 20]] = True  # row 5 is in probation: free; row 20 is before any window: -A_FP
    assert nab_raw_score(alarms, windows, 10) == pytest.approx(-1.0 - 0.11)
    alarms[:] = False
    alarms[40] = True  # one row past the window end: A_FP x scaled(1/9)
    assert nab_raw_score(alarms, windows, 10) == pytest.approx(-1.0 + 0.11 * (2 * sigmoid(-5 / 9) - 1))
    alarms[:] = False
    alarms[70] = True  # 31/9 > 3 window lengths past: the full -A_FP
    assert nab_raw_score(alarms, windows, 10) == pytest.approx(-1.0 - 0.11)


def test_matches_the_row_by_row_reference_on_random_alarms():
    rng = np.random.default_rng(3)
    costs = CostMatrix(tp=1.0, fp=0.22, fn=2.0)
    for _ in range(50):
        alarms = rng.random(120) < rng.uniform(0.0, 0.2)
        windows = [(20, 31), (60, 64), (90, 110)]
        expected = reference_score(alarms.tolist(), windows, 18, costs)
        assert nab_raw_score(alarms, windows, 18, costs) == pytest.approx(expected)


def nab_file(values: np.ndarray, windows: tuple[tuple[int, int], ...], name: str = "cat/x.csv") -> NabFile:
    t = np.arange(len(values), dtype=np.float64) * 300
    return NabFile(Series(Path(name), name, ("value",), values.reshape(-1, 1).astype(np.float32), t, None, 0, 0),
                   windows)


def test_detected_windows_and_false_positive_events():
    f = nab_file(np.zeros(200), ((50, 59), (120, 139)))
    assert f.probation == 30
    alarms = np.zeros(200, bool)
    alarms[[10, 11]] = True  # in probation: never counted
    alarms[[70, 71, 72]] = True  # one event of three rows
    alarms[[80, 90]] = True  # two more events
    alarms[[135, 136, 137, 138, 139, 140, 141]] = True  # detects window 2; its tail past the window is one event
    o = outcome(f, alarms)
    assert (o.windows, o.detected, o.fp_events) == (2, 1, 4)
    assert o.alarmed_rows == 12 and o.scored_rows == 170
    assert o.nab_null == -2.0


def test_onset_score_counts_each_alarm_run_once():
    assert onsets(np.array([0, 1, 1, 0, 1, 1, 1], bool)).tolist() == [False, True, False, False, True, False, False]
    f = nab_file(np.zeros(200), ((50, 59),))
    alarms = np.zeros(200, bool)
    alarms[55:80] = True  # one event: starts inside the window, runs 20 rows past it
    o = outcome(f, alarms)
    window_part = (2 * sigmoid(2.5) - 1) / (2 * sigmoid(5) - 1)  # row 55: relative position -0.5
    assert o.nab_onset_raw == pytest.approx(window_part)  # the onset is the only detection
    tail = sum(0.11 * (2 * sigmoid(-5 * (i - 59) / 9) - 1) for i in range(60, 80))
    assert o.nab_raw == pytest.approx(window_part + tail)  # NAB's literal rule charges every row past the window
    assert nab_score([o], use_onsets=True) > nab_score([o])


def test_corpus_score_normalised_between_null_and_perfect():
    f = nab_file(np.zeros(200), ((50, 59), (120, 139)))
    g = nab_file(np.zeros(100), (), "none/y.csv")
    perfect = [outcome(f, f.in_window), outcome(g, np.zeros(100, bool))]
    assert nab_score(perfect) == pytest.approx(100.0)
    null = [outcome(f, np.zeros(200, bool)), outcome(g, np.zeros(100, bool))]
    assert nab_score(null) == pytest.approx(0.0)
    one = np.zeros(200, bool)
    one[50] = True  # one window on its first row, the other missed, plus one FP row on the empty file
    fp = np.zeros(100, bool)
    fp[50] = True
    half = [outcome(f, one), outcome(g, fp)]
    assert nab_score(half) == pytest.approx(100 * (0.0 - 0.11 + 2.0) / 4.0)
    assert STANDARD == CostMatrix(1.0, 0.11, 1.0)


def test_loads_windows_by_timestamp(tmp_path):
    folder = tmp_path / "realX"
    folder.mkdir()
    lines = ["timestamp,value"] + [f"2014-01-01 {h:02d}:{m:02d}:00,{h * 12 + m // 5}" for h in range(10) for m in
                                   range(0, 60, 5)]
    (folder / "a.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / nab.WINDOWS_FILE).write_text(json.dumps(
        {"realX/a.csv": [["2014-01-01 02:00:00.000000", "2014-01-01 03:00:00.000000"]], "realX/gone.csv": []}))
    [f] = load_corpus(tmp_path, categories=["realX"])
    assert f.name == "realX/a.csv" and f.category == "realX" and f.values.shape == (120, 1)
    assert f.windows == ((24, 36),)
    assert f.values[24, 0] == 24 and f.in_window.sum() == 13


REAL = nab.nab_root()


@pytest.mark.skipif(not (REAL / nab.WINDOWS_FILE).is_file(),
                    reason=f"NAB data not found under {REAL} (set EDGELINE_DATA)")
def test_real_corpus_loads_every_window_on_rows():
    files = load_corpus()
    assert len(files) >= 30
    by_category = {c: [f for f in files if f.category == c] for c in nab.CATEGORIES}
    quiet = by_category["artificialNoAnomaly"]
    assert len(quiet) == 5 and all(not f.windows for f in quiet)
    for f in files:
        for first, last in f.windows:
            assert f.probation <= first < last < len(f.values)
    outcomes = [outcome(f, f.in_window) for f in files]
    assert nab_score(outcomes) == pytest.approx(100.0)
