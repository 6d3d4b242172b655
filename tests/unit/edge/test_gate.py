"""The change gate on scripted frame timelines."""

from __future__ import annotations

import numpy as np
import pytest

from edge.gate import ChangeGate
from models.package.synthetic import SyntheticCamera


def frame(level: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(level + rng.normal(0, noise, (240, 320)), 0, 255).astype(np.uint8) if noise else \
        np.full((240, 320), level, np.uint8)


def test_off_by_default_infers_everything():
    gate = ChangeGate()
    assert all(gate.should_infer(frame(100), t * 0.1) for t in range(20)) and gate.gated == 0


def test_static_scene_is_gated_until_max_age_then_reinferred():
    gate = ChangeGate(threshold=2.0, max_age_s=1.0)
    decisions = [gate.should_infer(frame(100, noise=1.0, seed=t), t * 0.1) for t in range(25)]
    # t=0 infers; sensor noise alone never passes the threshold; every 1.0 s the frame is refreshed
    assert [t for t, d in enumerate(decisions) if d] == [0, 10, 20]
    assert gate.gated == 22


def test_a_change_is_inferred_at_once_and_slow_drift_adds_up():
    gate = ChangeGate(threshold=3.0, max_age_s=100.0)
    assert gate.should_infer(frame(100), 0.0)
    assert not gate.should_infer(frame(101), 0.1)
    assert not gate.should_infer(frame(102), 0.2)
    assert gate.should_infer(frame(103), 0.3)  # 3 levels from the last inferred frame, not from the last frame
    assert gate.should_infer(frame(160), 0.4)


def test_moving_conveyor_is_not_gated():
    camera = SyntheticCamera(3, fps=15, part_speed=0.3)
    gate = ChangeGate(threshold=1.0)
    decisions = [gate.should_infer(camera.frame(i).image, i / 15) for i in range(45)]
    assert sum(decisions) >= 40


def test_threshold_is_checked():
    with pytest.raises(ValueError, match="within 0..255"):
        ChangeGate().set_threshold(-1)
