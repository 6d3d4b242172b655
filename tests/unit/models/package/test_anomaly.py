from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.package.anomaly import (AlarmEvent, AnomalyScore, StreamingAnomalyModel, budget_threshold, runs,
                                    smooth_scores)
from models.package.evaluation import event_metrics, score_streams
from models.package.files import Package, load_package, write_package
from models.package.manifest import AnomalyPostprocess, AnomalyPreprocess, Manifest, TensorSpec
from models.package.session import ModelLoadError
from models.package.signing import BUILTIN_PACKAGES as PACKAGES
from models.package.synthetic import CHANNELS, SyntheticPump, pump_dataset
# the scoring settings of the runtime's own tests, pinned whatever the shipped package is tuned to
PLAIN = {"level_alpha": 1.0, "forecast_weight": 1.0, "drift_halflife": 0.0, "exit_ratio": 1.0, "clear_steps": 1,
         "max_false_alarms_per_day": None}


@pytest.fixture(scope="module")
def package():
    return load_package(PACKAGES / "anomaly-skab")


def repackage(package: Package, folder: Path, **post: Any) -> Package:
    """The same graph with postprocess fields replaced (written and loaded as a real package)."""
    manifest = package.manifest
    postprocess = AnomalyPostprocess.model_validate(manifest.postprocess.model_dump() | post)
    manifest = manifest.model_copy(update={"postprocess": postprocess})
    return write_package(folder, manifest, package.model_path.read_bytes())


def lstm_graph(channels: int, hidden: int, seed: int, head: float) -> bytes:
    """A one-step LSTM forecaster shaped like the exported one: x [B, C], h/c [1, B, H] -> y [B, C], h_out, c_out.
    Random weights; ``head`` 0 makes the forecast 0 (the score is then the scaled input itself)."""
    rng = np.random.default_rng(seed)
    weights = {
        "W": rng.normal(0, 0.5, (1, 4 * hidden, channels)), "R": rng.normal(0, 0.5, (1, 4 * hidden, hidden)),
        "B": np.zeros((1, 8 * hidden)), "head_w": head * rng.normal(0, 1, (hidden, channels)),
        "head_b": np.zeros(channels), "axes0": np.array([0]), "axes01": np.array([0, 1])}
    inits = [numpy_helper.from_array(v.astype(np.int64 if k.startswith("axes") else np.float32), k)
             for k, v in weights.items()]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axes0"], ["seq"]),
        helper.make_node("LSTM", ["seq", "W", "R", "B", "", "h", "c"], ["Y", "h_out", "c_out"], hidden_size=hidden),
        helper.make_node("Squeeze", ["Y", "axes01"], ["last"]),
        helper.make_node("MatMul", ["last", "head_w"], ["mm"]),
        helper.make_node("Add", ["mm", "head_b"], ["y"]),
    ]
    def io(name: str, shape: list[Any]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    graph = helper.make_graph(nodes, "forecaster", [io("x", ["batch", channels]), io("h", [1, "batch", hidden]),
                                                    io("c", [1, "batch", hidden])],
                              [io("y", ["batch", channels]), io("h_out", [1, "batch", hidden]),
                               io("c_out", [1, "batch", hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def tiny_package(folder: Path, channels: int, difference: bool = False, head: float = 0.3, hidden: int = 8,
                 seed: int = 0, **post: Any) -> Package:
    """A real package around :func:`lstm_graph` with channels ``ch0..``, unit normalisation and scales."""
    names = [f"ch{i}" for i in range(channels)]
    spec = lambda name, shape: TensorSpec(name=name, shape=shape)  # noqa: E731
    manifest = Manifest(
        name="anomaly-tiny", version="1", task="anomaly",
        inputs=[spec("x", ["batch", channels]), spec("h", [1, "batch", hidden]), spec("c", [1, "batch", hidden])],
        outputs=[spec("y", ["batch", channels]), spec("h_out", [1, "batch", hidden]),
                 spec("c_out", [1, "batch", hidden])],
        preprocess=AnomalyPreprocess(channels=names, mean=[0.0] * channels, std=[1.0] * channels, hidden_size=hidden,
                                     difference=difference),
        postprocess=AnomalyPostprocess.model_validate({"residual_scale": [1.0] * channels, "threshold": 1.0} | post))
    return write_package(folder, manifest, lstm_graph(channels, hidden, seed, head))


class NumpyForecaster:
    """An independent reference: the exported LSTM + head re-implemented in numpy from the graph weights."""

    def __init__(self, path: Path) -> None:
        graph = onnx.load(str(path)).graph
        weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        lstm = next(n for n in graph.node if n.op_type == "LSTM")
        self.W, self.R, self.B = (weights[name][0] for name in lstm.input[1:4])
        matmul = next(n for n in graph.node if n.op_type == "MatMul")
        self.head_w = weights[matmul.input[1]]
        self.head_b = next(weights[name] for n in graph.node if n.op_type == "Add" for name in n.input if name in weights)

    def run(self, dx: np.ndarray) -> np.ndarray:
        """Graph outputs for a [T, C] input sequence from zero state."""
        hidden = self.R.shape[1]
        h, c = np.zeros(hidden), np.zeros(hidden)
        bias = self.B[: 4 * hidden] + self.B[4 * hidden :]
        sig = lambda v: 1 / (1 + np.exp(-v))
        out = []
        for xt in dx.astype(np.float64):
            i, o, f, g = np.split(self.W @ xt + self.R @ h + bias, 4)  # ONNX gate order: input, output, forget, cell
            c = sig(f) * c + sig(i) * np.tanh(g)
            h = sig(o) * np.tanh(c)
            out.append(h @ self.head_w + self.head_b)
        return np.array(out)


def reference_scores(package, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The documented calibration and score, written out again in numpy: (scores, raw exceedances, threshold)."""
    post = package.manifest.postprocess
    assert package.manifest.preprocess.difference
    k, warm = round(n * post.normalise_fraction), post.warmup_steps
    v = values.astype(np.float64)

    def fit(rows):
        mean, std = rows.mean(0), rows.std(0)
        return mean, np.maximum(std, post.min_scale * np.maximum(np.abs(mean), 1.0))

    mean, std = fit(v[:k])
    x = (v[k:] - mean) / std  # x[i] is sample k+i
    dx = np.vstack([np.zeros((1, x.shape[1])), np.diff(x, axis=0)])
    forecast = x + NumpyForecaster(package.model_path).run(dx)
    residual = x[1:] - forecast[:-1]  # residual[j] is sample k+1+j
    samples = np.arange(k + 1, len(v))
    cal = (samples >= k + warm) & (samples < n)
    scale = np.maximum(np.sqrt((residual[cal] ** 2).mean(0)), post.min_scale)
    level = v.copy()  # the level EMA of the raw samples
    for t in range(1, len(v)):
        level[t] = post.level_alpha * v[t] + (1 - post.level_alpha) * level[t - 1]
    level_mean, level_std = fit(level[:n])
    raw = (post.forecast_weight * (residual / scale) ** 2
           + post.level_weight * ((level[k + 1 :] - level_mean) / level_std) ** 2).mean(1)
    smoothed, s = [], None
    for r in raw[cal | (samples >= n)]:
        s = r if s is None else post.ema_alpha * r + (1 - post.ema_alpha) * s
        smoothed.append(s)
    smoothed = np.array(smoothed)
    threshold = post.threshold_factor * np.quantile(smoothed[: cal.sum()], post.threshold_quantile)
    scores = np.zeros(len(v))
    scores[n:] = smoothed[cal.sum() :]
    return scores, scores > threshold, threshold


def stream(model: StreamingAnomalyModel, values: np.ndarray, group: str = "pump") -> list[AnomalyScore]:
    return [model.step({group: v})[group] for v in values]


@pytest.mark.parametrize("level_alpha, forecast_weight", [(1.0, 1.0), (0.2, 0.5)])
def test_streaming_equals_an_independent_reference_of_the_protocol(package, tmp_path, level_alpha, forecast_weight):
    values, _ = SyntheticPump(5, anomaly_rate=0.05).generate(500)
    values[300:340, 3] += 0.5  # a sustained shift the level term must carry
    package = repackage(package, tmp_path, **PLAIN | {"level_weight": 1.0, "ema_alpha": 0.1, "level_alpha": level_alpha,
                                                      "forecast_weight": forecast_weight})
    model = StreamingAnomalyModel(package, calibration_steps=120)
    streamed = stream(model, values)
    scores, alarms, threshold = reference_scores(package, values, 120)
    np.testing.assert_allclose([s.score for s in streamed], scores, rtol=1e-4, atol=1e-4)
    assert model.group_threshold("pump") == pytest.approx(threshold, rel=1e-4)
    clear = np.abs(scores - threshold) > 1e-3 * threshold  # alarms compared away from the threshold itself
    assert np.array_equal(np.array([s.is_anomaly for s in streamed])[clear], alarms[clear])
    assert alarms[300:340].any()


@pytest.mark.parametrize("post", [
    {"level_weight": 0.0, "max_false_alarms_per_day": 2.0},
    {"level_weight": 0.3, "level_alpha": 0.2, "drift_halflife": 30.0, "forecast_weight": 0.5},
])
def test_batched_groups_score_like_one_by_one(package, tmp_path, post):
    """The knobs on (level EMA, drift, hysteresis, budget, rates, missing values): the vectorised batch
    of groups in different phases gives each group what it gets streamed alone."""
    package = repackage(package, tmp_path, **PLAIN | {"ema_alpha": 0.2, "exit_ratio": 0.6, "clear_steps": 4} | post)
    streams = {f"m{i}/pump": pump_dataset(40 + i, 200, anomaly_rate=0.1)[0] for i in range(6)}
    for i, values in enumerate(streams.values()):
        values[np.random.default_rng(i).random(values.shape) < 0.03] = np.nan
    rates = {name: 1.0 + k for k, name in enumerate(streams)}
    alone = {}
    for name, values in streams.items():
        model = StreamingAnomalyModel(package, calibration_steps=60)
        alone[name] = [model.step({name: v}, rates_hz={name: rates[name]})[name] for v in values]
        alone[name + " missing"] = model.missing(name)
    together = StreamingAnomalyModel(package, calibration_steps=60)
    batched = {name: [] for name in streams}
    for t in range(200):
        # groups join at different times, like sensors coming online: the batch mixes calibration phases
        tick = {name: values[t - k * 10] for k, (name, values) in enumerate(streams.items()) if t >= k * 10}
        for name, score in together.step(tick, rates_hz=rates).items():
            batched[name].append(score)
    events = 0
    for k, name in enumerate(streams):
        expected = alone[name][: 200 - k * 10]
        np.testing.assert_allclose([s.score for s in batched[name]], [s.score for s in expected], rtol=1e-5, atol=1e-6)
        assert [s.is_anomaly for s in batched[name]] == [s.is_anomaly for s in expected]
        assert [s.threshold for s in batched[name]] == pytest.approx([s.threshold for s in expected], rel=1e-5)
        assert [s.top_channels for s in batched[name]] == [s.top_channels for s in expected]
        assert [s.event for s in batched[name]] == [s.event for s in expected]
        assert [s.step for s in batched[name]] == list(range(200 - k * 10))
        events += sum(s.event is not None and s.event.start == s.step for s in expected)
        if k == 0:
            assert together.missing(name) == alone[name + " missing"] == np.isnan(streams[name]).sum()
    assert events >= 2  # events did open


def test_calibration_never_alarms_then_the_group_threshold_applies(package, tmp_path):
    assert package.manifest.postprocess.calibration_steps == 400  # the SKAB protocol by default
    model = StreamingAnomalyModel(repackage(package, tmp_path, **PLAIN), calibration_steps=60)
    assert model.calibration.steps == 60
    values, _ = pump_dataset(3, 60)
    wild = np.full(8, 1e3, np.float32)
    during = stream(model, np.vstack([values[:59], wild[None]]), "a")
    quiet = [AnomalyScore(0.0, model.threshold, False, {ch: 0.0 for ch in CHANNELS}, step=t) for t in range(60)]
    assert during == quiet  # scores 0, package threshold, never alarms while calibrating
    threshold = model.group_threshold("a")
    assert threshold is not None and threshold != model.threshold
    after = model.step({"a": -wild})["a"]
    assert after.is_anomaly and after.threshold == threshold and set(after.channel_scores) == set(CHANNELS)
    assert after.event == AlarmEvent(60, None, after.score / threshold, after.top_channels) and after.step == 60
    model.reset("a")
    assert model.group_threshold("a") is None
    assert model.step({"a": wild})["a"] == quiet[0]  # calibrates again
    assert model.groups == ["a"]


def test_calibration_length_is_checked_and_can_be_turned_off(package, tmp_path):
    with pytest.raises(ValueError, match="calibration_steps=20"):
        StreamingAnomalyModel(package, calibration_steps=20)
    package = repackage(package, tmp_path, **PLAIN)  # the forecast term: with calibration off the level term is
    model = StreamingAnomalyModel(package, calibration_steps=0)  # the package's own constants
    values, _ = pump_dataset(3, 30)
    first = model.step({"a": values[0]})["a"]
    assert first == AnomalyScore(0.0, model.threshold, False, {ch: 0.0 for ch in CHANNELS})
    wild = np.full(8, 1e3, np.float32)
    warm = package.manifest.postprocess.warmup_steps
    scores = stream(model, [wild if t % 2 else -wild for t in range(warm + 3)], "b")
    assert not any(s.is_anomaly for s in scores[:warm]) and scores[-1].is_anomaly
    assert scores[-1].threshold == model.threshold


def test_profiles_override_the_postprocess(tmp_path):
    profiles = {"fast": {"calibration_steps": 80, "level_weight": 0.0, "clear_steps": 3.0, "exit_ratio": 0.7,
                         "max_false_alarms_per_day": 2.0},
                "margin": {"max_false_alarms_per_day": None}, "odd": {"clear_steps": 2.5}, "alien": {"colour": 1.0},
                "unset": {"clear_steps": None}}
    package = tiny_package(tmp_path, 2, level_weight=1.0, calibration_steps=400, max_false_alarms_per_day=1.0,
                           profiles=profiles)
    assert StreamingAnomalyModel(package).post.max_false_alarms_per_day == 1.0
    assert StreamingAnomalyModel(package, profile="margin").post.max_false_alarms_per_day is None
    fast = StreamingAnomalyModel(package, profile="fast")
    assert fast.post.level_weight == 0 and fast.calibration.steps == 80 and fast.post.clear_steps == 3
    assert fast.post.exit_ratio == 0.7 and fast.post.max_false_alarms_per_day == 2.0
    assert StreamingAnomalyModel(package, profile="fast", calibration_steps=100).calibration.steps == 100
    tighter = StreamingAnomalyModel(package, profile="fast", max_false_alarms_per_day=0.5)
    assert tighter.post.max_false_alarms_per_day == 0.5
    with pytest.raises(ModelLoadError, match="no postprocess profile 'nope'"):
        StreamingAnomalyModel(package, profile="nope")
    with pytest.raises(ModelLoadError, match="(?s)profile 'odd': .*clear_steps"):
        StreamingAnomalyModel(package, profile="odd")
    with pytest.raises(ModelLoadError, match="unknown fields \\['colour'\\]"):
        StreamingAnomalyModel(package, profile="alien")
    with pytest.raises(ModelLoadError, match="(?s)profile 'unset': .*clear_steps"):  # only optional fields unset
        StreamingAnomalyModel(package, profile="unset")


def demo_pumps(seeds: range, anomaly_rate: float, n: int = 3000) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pumps at the demo's 20 Hz; seeds apart from those that tuned fast-start (models.anomaly_cv.TUNE_SEEDS)."""
    return [SyntheticPump(seed, rate_hz=20.0, anomaly_rate=anomaly_rate).generate(n) for seed in seeds]


def test_normal_demo_pumps_stay_quiet_after_a_short_calibration(package):
    model = StreamingAnomalyModel(package, profile="fast-start")
    _, alarms = score_streams(model, [values for values, _ in demo_pumps(range(31_100, 31_104), 0.0)])
    assert sum(len(runs(a)) for a in alarms) <= 1


def test_detects_anomaly_episodes_on_fresh_demo_pumps(package):
    """The committed SKAB-trained package as the demo runs it: 20 Hz synthetic pumps with the demo's fault
    rate (never used in training or tuning), the 'fast-start' profile and its own calibration. Event-level
    (models.package.evaluation.event_metrics): an episode is caught by any alarm inside it or within 10 samples
    after; a run of alarms touching no episode is a false alarm. Measured here: 97 of 130 episodes, no false alarm; the
    package build reports 101 of 134 and none on its report seeds."""
    model = StreamingAnomalyModel(package, profile="fast-start")
    calibration = model.calibration.steps
    data = demo_pumps(range(31_000, 31_006), 0.1, n=6000)
    _, alarms = score_streams(model, [values for values, _ in data])
    labels = np.stack([labels for _, labels in data])
    labels[:, :calibration] = False  # nothing can be flagged while calibrating
    metrics = event_metrics(labels.ravel(), alarms.ravel())
    assert metrics["episodes"] >= 100
    assert metrics["event_recall"] >= 0.65
    assert metrics["event_precision"] >= 0.95


def test_wrong_task_is_refused():
    with pytest.raises(ModelLoadError, match="not anomaly"):
        StreamingAnomalyModel(load_package(PACKAGES / "seg-synth-int8"))


# ---------------------------------------------------------------- events, channels, drift, missing values, budget


def squares(*rows: list[float]) -> list[np.ndarray]:
    """Samples whose per-channel score (zero forecast, unit scales, no smoothing) is the given squares."""
    return [np.sqrt(np.asarray(row, np.float32)) for row in rows]


def test_events_open_and_close_with_hysteresis_and_name_their_channels(tmp_path):
    # forecast 0, unit scales, no smoothing, no calibration: a sample's score is the mean of its squares
    package = tiny_package(tmp_path, 3, head=0.0, exit_ratio=0.5, clear_steps=3)
    model = StreamingAnomalyModel(package, calibration_steps=0)
    samples = squares([0, 0, 0], [0.3] * 3, [0.5, 4.5, 1.0], [2.4, 0, 0], [0.3] * 3, [0.3] * 3, [0.6] * 3,
                      [0.3] * 3, [0.3] * 3, [0.3] * 3, [9.0, 0, 0])
    scores = stream(model, samples, "g")
    assert [s.score for s in scores] == pytest.approx([0, 0.3, 2.0, 0.8, 0.3, 0.3, 0.6, 0.3, 0.3, 0.3, 3.0], rel=1e-5)
    # opens above 1.0; stays while above 0.5; closes at the 3rd consecutive sample at or below 0.5
    assert [s.is_anomaly for s in scores] == [False, False] + [True] * 7 + [False, True]
    first = AlarmEvent(2, None, pytest.approx(2.0), ("ch1", "ch2", "ch0"))
    assert [s.event for s in scores[2:9]] == [first] * 7  # the peak and its channels stay those of step 2
    assert scores[9].event == AlarmEvent(2, 9, pytest.approx(2.0), ("ch1", "ch2", "ch0"))  # ended at this step
    assert scores[10].event == AlarmEvent(10, None, pytest.approx(3.0), ("ch0", "ch1", "ch2"))
    assert scores[0].event is scores[1].event is None
    assert scores[2].top_channels == ("ch1", "ch2", "ch0") and scores[3].top_channels[0] == "ch0"
    assert [s.step for s in scores] == list(range(11))
    assert scores[2].channel_scores == pytest.approx({"ch0": 0.5, "ch1": 4.5, "ch2": 1.0})


@pytest.mark.parametrize("channels, difference", [(1, False), (3, True), (64, False)])
def test_any_channel_count(tmp_path, channels, difference):
    """1, 3 and 64 channels: calibration, scores and events name the package's own channels; a shift on
    the last channel opens an event it leads."""
    package = tiny_package(tmp_path, channels, difference=difference, seed=channels, ema_alpha=0.3,
                           level_weight=1.0, threshold_factor=3.0, calibration_steps=60)
    model = StreamingAnomalyModel(package)
    names = tuple(f"ch{i}" for i in range(channels))
    assert model.channels == names
    values = np.random.default_rng(channels).normal(5.0, 1.0, (160, channels)).astype(np.float32)
    values[110:, -1] += 6.0 * np.sqrt(channels) + 2.0  # the score is a mean over channels: one channel weighs 1/C
    groups = {"a": values, "b": values[::-1].copy()}
    scores = {name: [] for name in groups}
    for t in range(160):
        for name, score in model.step({name: v[t] for name, v in groups.items()}).items():
            scores[name].append(score)
    a = scores["a"]
    assert model.group_threshold("a") > 0 and model.group_threshold("a") != model.group_threshold("b")
    assert all(tuple(s.channel_scores) == names for s in a)
    assert all(len(s.top_channels) == min(3, channels) for s in a[60:]) and a[59].top_channels == ()
    assert not any(s.is_anomaly for s in a[:110])
    opened = next(s for s in a if s.is_anomaly)
    assert 110 <= opened.step < 115 and opened.event.channels[0] == names[-1] and opened.top_channels[0] == names[-1]
    with pytest.raises(ValueError, match=f"needs {channels} channel values"):
        model.step({"a": np.zeros(channels + 1, np.float32)})


def drifting(n: int = 5600, calibration: int = 400, step_at: int = 5000, seed: int = 7) -> np.ndarray:
    """Normal noise whose level drifts by 9 sigma after the calibration, then steps up by 4 sigma."""
    t = np.arange(n)
    level = 0.002 * np.maximum(t - calibration, 0) + 4.0 * (t >= step_at)
    return (np.random.default_rng(seed).normal(0.0, 1.0, n) + level).astype(np.float32)[:, None]


@pytest.mark.parametrize("halflife", [0.0, 30.0])
def test_drift_adaptation_keeps_slow_drift_quiet_while_a_step_change_alarms(tmp_path, halflife):
    package = tiny_package(tmp_path, 1, head=0.0, forecast_weight=0.0, level_weight=1.0, level_alpha=0.1,
                           ema_alpha=0.5, threshold_factor=1.5, calibration_steps=400, drift_halflife=halflife)
    model = StreamingAnomalyModel(package)
    alarms = np.array([s.is_anomaly for s in stream(model, drifting(), "g")])
    if halflife:
        assert not alarms[:5000].any()  # 9 sigma of drift over 4600 samples: followed, no alarm
        assert 5000 <= np.flatnonzero(alarms)[0] < 5010 and alarms[5010:].all()  # the step: an event, reference frozen
    else:
        assert alarms[:5000].mean() > 0.5  # without adaptation the drift is one long alarm


def test_missing_values_are_imputed_counted_and_never_poison_state(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.normal(0.0, 1.0, (200, 3)).astype(np.float32)
    holes = rng.random(values.shape) < 0.05
    holes[5] = holes[150] = True  # whole samples missing too
    holed = np.where(holes, np.nan, values)
    holed[20, 1] = np.inf
    holes[20, 1] = True

    # no calibration, forecast 0: a missing value is imputed with the forecast, 0 here, and scores 0
    plain = StreamingAnomalyModel(tiny_package(tmp_path / "plain", 3, head=0.0), calibration_steps=0)
    scores = stream(plain, holed, "g")
    assert [s.score for s in scores] == pytest.approx([s.score for s in stream(plain, np.where(holes, 0, values), "z")])
    assert all(s.channel_scores["ch1"] == 0.0 for s, hole in zip(scores[1:], holes[1:, 1]) if hole)
    assert plain.missing("g") == holes.sum() and plain.missing("z") == 0 and plain.missing("unknown") == 0

    # calibrating: before the LSTM runs a missing value is the group's last value
    package = tiny_package(tmp_path / "cal", 3, level_weight=1.0, ema_alpha=0.3)
    model = StreamingAnomalyModel(package, calibration_steps=100)
    early = np.where(np.arange(200)[:, None] < 50, holed, values)  # holes only while buffering (K = 50)
    filled = early.copy()
    for t in range(1, 50):
        filled[t] = np.where(np.isfinite(early[t]), early[t], filled[t - 1])
    filled[0] = np.where(np.isfinite(early[0]), early[0], 0.0)  # a first sample falls back to the package mean
    assert stream(model, early, "g") == stream(model, filled, "f")
    late = stream(model, holed, "late")  # holes in every phase
    assert all(np.isfinite(s.score) and np.isfinite(s.threshold) for s in late)
    assert np.isfinite(model.group_threshold("late")) and model.missing("late") == holes.sum()
    model.reset("late")
    assert model.missing("late") == 0


def test_budget_threshold_gives_about_the_promised_rate_on_iid_noise():
    rng = np.random.default_rng(1)
    smoothed = smooth_scores((rng.normal(size=(300_000, 4)) ** 2).mean(1), 0.1)
    calibration, rest = smoothed[:100_000], smoothed[100_000:]
    rates = (1e-2, 1e-3, 1e-4)  # excursions above the threshold per sample
    thresholds = [budget_threshold(calibration, rate) for rate in rates]
    assert thresholds[0] < thresholds[1] < thresholds[2]
    for rate, threshold in zip(rates[1:], thresholds[1:]):
        assert rate / 2 < len(runs(rest > threshold)) / len(rest) < rate * 2
    assert budget_threshold(calibration, 0.5) == pytest.approx(np.quantile(calibration, 0.9))  # looser than the fit


def test_false_alarm_budget_through_the_model(tmp_path):
    """i.i.d. noise at a rate that makes 2,000 samples a day: about the promised events per day, never
    more; a smaller budget or a faster group gets a higher threshold."""
    package = tiny_package(tmp_path, 4, head=0.0, ema_alpha=0.1, exit_ratio=0.8, clear_steps=5, calibration_steps=2000)
    rng = np.random.default_rng(5)
    names = [f"g{i}" for i in range(16)]
    data = rng.normal(size=(14_000, 16, 4)).astype(np.float32)
    per_day = {}
    for budget in (1.0, 0.1):
        model = StreamingAnomalyModel(package, max_false_alarms_per_day=budget)
        assert model.post.max_false_alarms_per_day == budget
        rates = {name: 2000 / 86_400 for name in names}
        opened = 0
        for t, row in enumerate(data):
            out = model.step(dict(zip(names, row)), rates_hz=rates)
            opened += sum(s.event is not None and s.event.start == t for s in out.values())
        per_day[budget] = (opened / (16 * 12_000 / 2000), [model.group_threshold(name) for name in names])
    assert 0.25 < per_day[1.0][0] <= 1.0 and per_day[0.1][0] <= 0.2
    assert all(low < high for low, high in zip(per_day[1.0][1], per_day[0.1][1]))
    fast = StreamingAnomalyModel(package, max_false_alarms_per_day=1.0)
    for row in data[:2000]:
        fast.step(dict(zip(names, row)), rates_hz={name: 1.0 for name in names})  # 86,400 samples a day
    assert all(fast.group_threshold(name) > slow for name, slow in zip(names, per_day[1.0][1]))
    with pytest.raises(ValueError, match="greater than 0"):
        StreamingAnomalyModel(package, max_false_alarms_per_day=0.0)


def test_a_flat_calibration_gives_a_positive_threshold_that_any_change_exceeds(tmp_path):
    model = StreamingAnomalyModel(tiny_package(tmp_path, 2, head=0.0, level_weight=1.0), calibration_steps=40)
    flat = np.full((60, 2), 3.0, np.float32)
    scores = stream(model, flat, "g")
    assert 0 < model.group_threshold("g") and not any(s.is_anomaly for s in scores)
    assert model.step({"g": np.array([3.0, 3.1], np.float32)})["g"].is_anomaly


def test_the_level_reference_is_frozen_inside_an_event_and_follows_outside(tmp_path):
    """Half-life 1 sample: outside events the level mean jumps halfway to the level each sample; inside
    an event (here its 99-sample tail below the exit level) it does not move."""
    package = tiny_package(tmp_path, 1, head=0.0, forecast_weight=0.0, level_weight=1.0, ema_alpha=1.0,
                           threshold_factor=4.0, exit_ratio=0.5, clear_steps=100, drift_halflife=1.0)
    model = StreamingAnomalyModel(package, calibration_steps=40)
    calibration = np.array([[1.0], [-1.0]] * 20, np.float32)  # level mean 0, std 1: every score 1, threshold 4
    stream(model, calibration, "g")
    assert model.group_threshold("g") == pytest.approx(4.0)
    scores = stream(model, np.array([[3.0]] + [[1.0]] * 102, np.float32), "g")
    assert scores[0].is_anomaly and scores[0].score == pytest.approx(9.0)
    assert all(s.is_anomaly and s.score == pytest.approx(1.0) for s in scores[1:100])  # frozen: z stays 1
    assert not scores[100].is_anomaly and scores[100].event == AlarmEvent(40, 140, pytest.approx(2.25), ("ch0",))
    assert [s.score for s in scores[100:]] == pytest.approx([1.0, 0.25, 0.0625])  # then it follows


def test_top_channels_rank_by_the_excess_over_each_channels_calm_baseline(tmp_path):
    """ch0 ramps (normal drift): the level reference follows with a lag, so its raw term sits near 7 on
    every calm sample, which its calm baseline learns. Then ch1 steps to a raw term of 6: the event names
    ch1 first although ch0's raw term is the larger."""
    package = tiny_package(tmp_path, 2, head=0.0, forecast_weight=0.0, level_weight=1.0, ema_alpha=1.0,
                           threshold_factor=6.0, drift_halflife=20.0)
    model = StreamingAnomalyModel(package, calibration_steps=40)
    stream(model, np.array([[1.0, 1.0], [-1.0, -1.0]] * 20, np.float32), "g")  # level 0, std 1, every score 1
    assert model.group_threshold("g") == pytest.approx(6.0)
    slope, tau = 0.0915, 1 / -np.log(0.5 ** (1 / 20.0))  # lag in steady state: slope * tau = 2.64 std
    ramp = slope * np.arange(1, 321)
    calm = stream(model, np.column_stack([ramp[:300], np.zeros(300)]).astype(np.float32), "g")
    assert not any(s.is_anomaly for s in calm)
    assert calm[-1].channel_scores["ch0"] == pytest.approx((slope * tau) ** 2, rel=0.1)
    step = stream(model, np.column_stack([ramp[300:303], np.full(3, 2.45)]).astype(np.float32), "g")
    assert all(s.is_anomaly for s in step)
    assert all(s.channel_scores["ch0"] > s.channel_scores["ch1"] for s in step)
    assert all(s.top_channels[0] == "ch1" for s in step) and step[-1].event.channels[0] == "ch1"
