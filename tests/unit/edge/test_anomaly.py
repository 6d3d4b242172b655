from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge.anomaly import AnomalyScore, StreamingAnomalyModel, event_metrics, runs, score_streams
from edge.inference import ModelLoadError
from edge.synthetic import CHANNELS, SyntheticPump, pump_dataset
from models.package import load_package

PACKAGES = Path(__file__).resolve().parents[3] / "models" / "packages"


@pytest.fixture(scope="module")
def package():
    return load_package(PACKAGES / "anomaly-synth")


@pytest.fixture()
def model(package):
    return StreamingAnomalyModel(package)


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

    def run(self, x: np.ndarray) -> np.ndarray:
        """Forecasts for a [T, C] sequence from zero state; row t forecasts x[t+1]."""
        hidden = self.R.shape[1]
        h, c = np.zeros(hidden), np.zeros(hidden)
        bias = self.B[: 4 * hidden] + self.B[4 * hidden :]
        out = []
        for xt in x.astype(np.float64):
            gates = self.W @ xt + self.R @ h + bias
            i, o, f, g = np.split(gates, 4)  # ONNX gate order: input, output, forget, cell
            sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
            c = sig(f) * c + sig(i) * np.tanh(g)
            h = sig(o) * np.tanh(c)
            out.append(xt + h @ self.head_w + self.head_b)
        return np.array(out)


def reference_scores(package, values: np.ndarray) -> np.ndarray:
    pre, post = package.manifest.preprocess, package.manifest.postprocess
    x = (values - np.array(pre.mean)) / np.array(pre.std)
    forecasts = NumpyForecaster(package.model_path).run(x)
    raw = (((x[1:] - forecasts[:-1]) / np.array(post.residual_scale)) ** 2).mean(axis=1)
    scores, s = [0.0], None
    for r in raw:
        s = r if s is None else post.ema_alpha * r + (1 - post.ema_alpha) * s
        scores.append(s)
    return np.array(scores)


def test_streaming_equals_unrolling_the_whole_sequence(model, package):
    values, _ = SyntheticPump(5, anomaly_rate=0.05).generate(400)
    streamed = np.array([model.step({"pump": v})["pump"].score for v in values])
    np.testing.assert_allclose(streamed, reference_scores(package, values), rtol=1e-4, atol=1e-4)


def test_batched_groups_score_like_one_by_one(package):
    streams = {f"m{i}/pump": pump_dataset(40 + i, 120, anomaly_rate=0.1)[0] for i in range(6)}
    alone = {}
    for name, values in streams.items():
        solo = StreamingAnomalyModel(package)
        alone[name] = [solo.step({name: v})[name] for v in values]
    together = StreamingAnomalyModel(package)
    batched = {name: [] for name in streams}
    for t in range(120):
        # groups join at different times, like sensors coming online
        tick = {name: values[t - k * 10] for k, (name, values) in enumerate(streams.items()) if t >= k * 10}
        for name, score in together.step(tick).items():
            batched[name].append(score)
    for k, name in enumerate(streams):
        expected = alone[name][: 120 - k * 10]
        np.testing.assert_allclose([s.score for s in batched[name]], [s.score for s in expected], rtol=1e-5, atol=1e-5)
        assert [s.is_anomaly for s in batched[name]] == [s.is_anomaly for s in expected]


def test_first_sample_scores_zero_and_reset_starts_afresh(model):
    values, _ = pump_dataset(3, 30)
    first = model.step({"a": values[0]})["a"]
    assert first == AnomalyScore(0.0, model.threshold, False, {ch: 0.0 for ch in CHANNELS})
    later = [model.step({"a": v})["a"].score for v in values[1:20]]
    assert all(s > 0 for s in later)
    model.reset("a")
    assert model.step({"a": values[20]})["a"].score == 0.0
    assert model.groups == ["a"]


def test_warmup_never_alarms_and_channel_scores_name_channels(model, package):
    warmup = package.manifest.postprocess.warmup_steps
    wild = np.full(8, 1e3, np.float32)
    scores = [model.step({"b": wild if t % 2 else -wild})["b"] for t in range(warmup + 3)]
    assert not any(s.is_anomaly for s in scores[:warmup])
    assert scores[-1].is_anomaly
    assert set(scores[-1].channel_scores) == set(CHANNELS)


def test_normal_pumps_rarely_alarm(model):
    streams = [pump_dataset(seed, 5000)[0] for seed in (30_100, 30_101)]
    _, alarms = score_streams(model, streams)
    assert sum(len(runs(a)) for a in alarms) <= 2


def test_detects_anomaly_episodes_on_fresh_pumps(model):
    """The committed package, streamed as the edge runs it, on pump seeds never used in training.

    Measure: event-level F1 (see edge.anomaly.event_metrics) - an episode is caught by any alarm
    inside it or within 10 samples after; a run of alarms touching no episode is a false alarm.
    """
    data = [pump_dataset(seed, 12_000, anomaly_rate=0.02) for seed in range(30_000, 30_004)]
    _, alarms = score_streams(model, [values for values, _ in data])
    metrics = event_metrics(np.concatenate([labels for _, labels in data]), alarms.ravel())
    print(metrics)
    assert metrics["episodes"] >= 30
    assert metrics["event_f1"] >= 0.85
    assert metrics["event_precision"] >= 0.8 and metrics["event_recall"] >= 0.8


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


def test_wrong_task_is_refused():
    with pytest.raises(ModelLoadError, match="not anomaly"):
        StreamingAnomalyModel(load_package(PACKAGES / "seg-synth"))
