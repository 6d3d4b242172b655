"""bench.soak's arithmetic and its site file (the soak itself takes ten minutes: see the README)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from bench.soak import Watched, site_document
from edgeline.config import from_dict


def test_growth_is_from_minute_2_to_the_end_with_noise_averaged():
    watched = Watched("rules", psutil.Process())
    watched.samples = [(t, 100.0 if t < 120 else 100.0 + (t - 120) / 480 * 10 + (1 if t % 10 else -1))
                       for t in range(0, 601, 5)]  # start-up ramp ignored; +10 MB over minutes 2..10, +-1 MB noise
    row = watched.row(600.0)
    assert row["rss_2min_mb"] == pytest.approx(100.3, abs=0.2)
    assert row["rss_end_mb"] == pytest.approx(109.7, abs=0.2)
    assert row["growth_pct"] == pytest.approx(9.4, abs=0.3)
    assert row["slope_pct_per_10min"] == pytest.approx(12.5, abs=0.5)


def test_the_site_is_valid_with_one_camera_and_one_pump_per_machine(tmp_path: Path):
    class Broker:
        host, port = "127.0.0.1", 1883

    site = from_dict(site_document(Broker(), 3, 2.0, tmp_path), base_dir=tmp_path)
    assert [(m.id, len(m.cameras), len(m.sensors)) for m in site.machines] == [("m01", 1, 1), ("m02", 1, 1),
                                                                               ("m03", 1, 1)]
