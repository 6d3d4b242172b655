import numpy as np
import pytest

from models.baselines import (AlwaysAlarm, ConvAE, IsolationForestDetector, PcaT2Q, RollingZ, ThresholdRule,
                              alarms_above, baselines, fit_rows_of, torch_missing)

CAL = 400


def planted(channels: int, seed: int = 0, decouple: bool = False) -> np.ndarray:
    """Correlated noise (channel 1 follows channel 0); rows 700-800 shift by 6 sigma: every channel,
    or with ``decouple`` channel 1 alone (it leaves channel 0: only the joint behaviour is odd)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1000, channels))
    if channels > 1:
        x[:, 1] = x[:, 0] + 0.3 * x[:, 1]
    x[700:800, 1 if decouple else slice(None)] += 6.0
    return x * 3.0 + 50.0  # an offset and scale: the detectors standardise


def caught(alarms: np.ndarray) -> bool:
    """An alarm within 10 rows of the onset, and alarms inside the shift 3x as often as before it."""
    inside, before = alarms[700:800], alarms[CAL:700]
    return bool(inside[:10].any()) and inside.mean() > 3 * max(before.mean(), 0.01)


def fit_and_score(detector, x: np.ndarray, calibration_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """As the bench does: fit on the first rows of the calibration, score all, the rest set the threshold."""
    fit_rows = fit_rows_of(calibration_rows)
    detector.fit(x[:fit_rows])
    scores = detector.score(x)
    return scores, scores[fit_rows:calibration_rows]


def run(detector, x: np.ndarray, factor: float = 1.0) -> np.ndarray:
    scores, calibration = fit_and_score(detector, x, CAL)
    assert scores.shape == (len(x),) and len(calibration) == CAL // 4
    threshold = ThresholdRule(0.99, factor).threshold(calibration)
    alarms = alarms_above(scores, threshold)
    alarms[:CAL] = False
    return alarms


DETECTORS = [RollingZ, PcaT2Q, IsolationForestDetector] + ([] if torch_missing() else [lambda: ConvAE(epochs=10)])


@pytest.mark.parametrize("make", DETECTORS, ids=lambda m: getattr(m, "name", "conv-ae"))
@pytest.mark.parametrize("channels", [1, 3])
def test_each_baseline_catches_a_planted_shift(make, channels):
    assert caught(run(make(), planted(channels)))


@pytest.mark.parametrize("make", [PcaT2Q] + DETECTORS[3:], ids=lambda m: getattr(m, "name", "conv-ae"))
def test_multivariate_baselines_catch_a_channel_leaving_its_partner(make):
    assert caught(run(make(), planted(3, decouple=True)))


def test_calibration_keeps_a_quarter_out_of_the_fit():
    assert fit_rows_of(400) == 300 and fit_rows_of(604) == 453 and fit_rows_of(4) == 3


def test_always_alarm_alarms_everything():
    detector = AlwaysAlarm()
    detector.fit(planted(2)[:CAL])
    assert not detector.thresholded and (detector.score(planted(2)) > 0).all()


def test_scores_are_causal():
    """Row t's score does not change when later rows change (what streaming could emit at t)."""
    x = planted(3)
    cut = x.copy()
    cut[650:] = 0.0
    for detector in baselines():
        detector.fit(x[:CAL])
        full, changed = detector.score(x), detector.score(cut)
        np.testing.assert_allclose(full[:650], changed[:650], rtol=1e-5, err_msg=detector.name)


def test_one_new_row_scores_as_in_the_whole_file():
    """A stream scoring each new sample with only its ``context`` rows gets the batch score."""
    x = planted(3)
    for detector in baselines():
        detector.fit(x[:CAL])
        full = detector.score(x)
        for t in (CAL, 705, 999):
            one = detector.score(x[t - detector.context + 1 : t + 1])[-1]
            assert one == pytest.approx(full[t], rel=1e-4), detector.name


def test_threshold_rule_is_the_spread_above_the_median():
    scores = np.arange(101, dtype=float)  # median 50, 99 % quantile 99
    assert ThresholdRule(0.99, 1.0).threshold(scores) == pytest.approx(99.0)
    assert ThresholdRule(0.99, 2.0).threshold(np.append(scores, np.nan)) == pytest.approx(148.0)
    with pytest.raises(ValueError, match="no finite calibration score"):
        ThresholdRule().threshold(np.full(5, np.nan))
    assert alarms_above(np.array([np.nan, 1.0, 3.0]), 2.0).tolist() == [False, False, True]


def test_missing_values_are_imputed_not_a_crash():
    x = planted(3)
    x[[10, 500, 501], 2] = np.nan  # one in the calibration rows, two later
    for detector in baselines():
        detector.fit(x[:CAL])
        assert np.isfinite(detector.score(x)[100:]).all(), detector.name
