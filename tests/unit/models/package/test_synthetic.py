import numpy as np
import pytest

from models.package.synthetic import CHANNELS, SyntheticCamera, SyntheticPump, make_dataset, pump_dataset


def test_same_seed_gives_identical_frames_in_any_order():
    a, b = SyntheticCamera(7), SyntheticCamera(7)
    forward = [a.frame(i) for i in (0, 5, 40, 41)]
    backward = [b.frame(i) for i in (41, 40, 5, 0)][::-1]
    for x, y in zip(forward, backward):
        assert x.index == y.index
        assert np.array_equal(x.image, y.image)
        assert np.array_equal(x.mask, y.mask)


def test_frame_shapes_and_types():
    frame = SyntheticCamera(1, width=200, height=100).frame(3)
    assert frame.image.shape == (100, 200, 3) and frame.image.dtype == np.uint8
    assert frame.mask.shape == (100, 200) and frame.mask.dtype == np.uint8
    assert set(np.unique(frame.mask)) <= {0, 1}


def test_different_seeds_differ():
    assert not np.array_equal(SyntheticCamera(1).frame(10).image, SyntheticCamera(2).frame(10).image)


def test_scene_moves_between_frames():
    camera = SyntheticCamera(3)
    diff = np.abs(camera.frame(10).image.astype(int) - camera.frame(11).image.astype(int))
    assert diff.mean() > 3


def test_defect_rate_controls_masks():
    _, none = make_dataset(4, 60, defect_rate=0.0)
    _, some = make_dataset(4, 120, defect_rate=0.15)
    _, many = make_dataset(4, 120, defect_rate=0.8)
    assert none.sum() == 0
    frac_some = (some.reshape(len(some), -1).sum(1) > 0).mean()
    frac_many = (many.reshape(len(many), -1).sum(1) > 0).mean()
    assert 0.03 < frac_some < 0.5
    assert frac_many > 0.5 and frac_many > frac_some


def test_defects_are_where_the_mask_says():
    images, masks = make_dataset(5, 80, defect_rate=1.0)
    assert masks.sum() > 0
    gray = images.mean(axis=3)
    contrasts = []
    for img, mask in zip(gray, masks):
        if mask.sum() < 20:
            continue
        ring = np.zeros_like(mask)
        ys, xs = np.nonzero(mask)
        ring[max(0, ys.min() - 6) : ys.max() + 7, max(0, xs.min() - 6) : xs.max() + 7] = 1
        ring[mask > 0] = 0
        contrasts.append(abs(img[mask > 0].mean() - img[ring > 0].mean()))
    # defects are 40-80 grey levels off the part; the surround also holds some belt, so allow slack
    assert np.median(contrasts) > 15


def test_pump_is_deterministic_and_index_addressable():
    a = SyntheticPump(3, anomaly_rate=0.05)
    values, labels = a.generate(3000)
    again, labels2 = SyntheticPump(3, anomaly_rate=0.05).generate(1000, start=2000)
    assert np.array_equal(values[2000:], again) and np.array_equal(labels[2000:], labels2)
    one, flag = a.sample(2345)
    assert np.array_equal(one, values[2345]) and flag == labels[2345]
    assert values.shape == (3000, len(CHANNELS)) and values.dtype == np.float32
    assert not np.array_equal(values, SyntheticPump(4, anomaly_rate=0.05).generate(3000)[0])


def test_pump_anomalies_are_labelled_episodes():
    pump = SyntheticPump(11, anomaly_rate=0.03)
    values, labels = pump.generate(24000)
    normal, _ = SyntheticPump(11, anomaly_rate=0.0).generate(24000)
    assert 0.01 < labels.mean() < 0.06
    episodes = pump.episodes(24000)
    assert len(episodes) >= 10
    assert {ep.kind for ep in episodes} == {"spike", "drift", "shift", "vibration"}
    for ep in episodes:
        assert labels[ep.start : ep.start + ep.length].all()
    # anomalies change the data inside episodes only
    changed = np.any(values != normal, axis=1)
    assert not changed[~labels].any()
    assert changed[labels].mean() > 0.5


def test_pump_normal_data_is_stable_and_correlated():
    first, labels = pump_dataset(0, 6000)
    later, _ = pump_dataset(0, 6000, start=50_000)
    assert not labels.any()
    assert np.allclose(first.mean(0), later.mean(0), rtol=0.05)
    corr = np.corrcoef(first.T)
    current, flow, pressure = CHANNELS.index("Current"), CHANNELS.index("VolumeFlowRateRMS"), CHANNELS.index("Pressure")
    assert corr[current, flow] > 0.9 and corr[current, pressure] > 0.8
    assert 1.0 < first[:, current].mean() < 2.5 and 200 < first[:, CHANNELS.index("Voltage")].mean() < 240


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        SyntheticCamera(0, defect_rate=1.5)
    with pytest.raises(ValueError):
        SyntheticPump(0).generate(5, start=-1)
