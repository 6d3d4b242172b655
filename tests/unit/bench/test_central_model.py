"""bench.central's pure parts: the lag trend, CPU per 1k msg/s, the projection and its
workers/partitions, the site schedule, and tables that fit a CI log (120 columns)."""

from __future__ import annotations

import math

import pytest

from bench.central import replay_messages, site_msg_per_s, site_schedule
from bench.central_model import (LOG_WIDTH, components_per_1k, cores_per_1k, cpu_table, lag_trend, partitions_for, projection,
                                 projection_table, replay_table, site_latency_table, site_rates_table, widest_line,
                                 workers_for)


def test_lag_slope_is_least_squares_with_its_standard_error():
    flat = lag_trend([(t, 500.0 + (100.0 if t % 4 else -100.0)) for t in range(0, 62, 2)])  # a sawtooth around 500
    assert abs(flat.slope) < 2 * flat.stderr + 1.0 and not flat.grows
    growing = lag_trend([(t, 100.0 + 50.0 * t) for t in range(0, 62, 2)])
    assert growing.slope == pytest.approx(50.0) and growing.stderr == pytest.approx(0.0, abs=1e-9)
    assert growing.grows and (growing.start, growing.end) == (100, 3100)
    draining = lag_trend([(0.0, 9000.0), (30.0, 4000.0), (60.0, 0.0)])
    assert draining.slope == pytest.approx(-150.0) and not draining.grows
    assert math.isnan(lag_trend([]).slope)


def test_cores_per_1k_msg_per_s():
    assert cores_per_1k(cpu_s=30.0, elapsed_s=60.0, msg_per_s=1000.0) == pytest.approx(0.5)
    assert cores_per_1k(cpu_s=12.0, elapsed_s=60.0, msg_per_s=4000.0) == pytest.approx(0.05)
    assert math.isnan(cores_per_1k(1.0, 60.0, 0.0))


def test_workers_at_70_percent_and_partitions_a_multiple_with_headroom():
    assert [workers_for(c) for c in (0.0, 0.3, 0.7, 0.71, 1.4, 5.0)] == [1, 1, 1, 2, 2, 8]
    for workers in range(1, 20):
        partitions = partitions_for(workers)
        assert partitions % workers == 0 and partitions >= 2 * workers and partitions >= 4
    assert [partitions_for(w) for w in (1, 2, 3, 8)] == [4, 4, 6, 16]


def test_projection_is_linear_in_msg_per_s_and_sums_the_workers():
    cpu = {"site": {"cpu_s": 6.0, "msg_per_s": 1000.0}, "mosquitto": {"cpu_s": 3.0, "msg_per_s": 1000.0},
           "bridge": {"cpu_s": 12.0, "msg_per_s": 1000.0}, "kafka": {"cpu_s": 6.0, "msg_per_s": 1000.0},
           "worker1": {"cpu_s": 9.0, "msg_per_s": 300.0}, "worker2": {"cpu_s": 9.0, "msg_per_s": 300.0}}
    per_1k = components_per_1k(cpu, elapsed_s=60.0)  # two workers that got through 600 msg/s on 0.3 cores
    assert per_1k == pytest.approx({"site": 0.1, "mosquitto": 0.05, "bridge": 0.2, "kafka": 0.1, "workers": 0.5})
    per_1k["workers"] = 0.3
    rows = projection(21.2, per_1k, machines=(50, 200, 1000))
    assert [r["msg_per_s"] for r in rows] == [1060, 4240, 21200]
    assert rows[0]["cores"] == {"site": 0.11, "mosquitto": 0.05, "bridge": 0.21, "kafka": 0.11, "workers": 0.32}
    assert rows[2]["cores"]["workers"] == pytest.approx(6.36)
    assert rows[2]["cores_total"] == pytest.approx(0.75 * 21.2)
    assert rows[2]["workers"] == math.ceil(6.36 / 0.7) and rows[2]["partitions"] == 2 * rows[2]["workers"]


def test_the_schedule_keeps_the_site_mix_and_its_phases():
    window_s = 0.2
    events = []
    for when, machine, stream in site_schedule(["m01", "m02"], window_s, t0=1000.0):
        if when >= 1010.0:
            break
        events.append((when, machine, stream))
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    assert len(events) == pytest.approx(10 * site_msg_per_s(2, window_s), abs=12)
    assert len({e[0] for e in events[:12]}) == 12  # no two streams at the same instant at the start
    cameras = [e for e in events if e[1] == "m01" and e[2] == "c0"]
    assert cameras[1][0] - cameras[0][0] == pytest.approx(window_s)


def test_replay_messages_end_now_and_are_unique():
    messages = replay_messages(2000, machines=50, window_s=0.2, end_ts=2_000_000_000.0)
    assert len(messages) == 2000 and len({m.msg_id for m in messages}) == 2000
    assert 2_000_000_000.0 - 1.0 < max(m.ts for m in messages) <= 2_000_000_000.0
    kinds = {kind: sum(m.KIND == kind for m in messages) for kind in ("result", "anomaly", "heartbeat")}
    assert kinds["result"] > 15 * kinds["anomaly"] > 0 and kinds["heartbeat"] > 0


def _rows() -> dict[str, list[dict]]:
    replay = [{"runner": "Kafka worker (1 process)", "messages": 100_000, "wall_s": 123.45, "msg_per_s": 12_345,
               "cpu_s": 98.7, "cpu_pct": 99, "msg_per_core_s": 10_123, "broker_cpu_pct": 45},
              {"runner": "embedded runner (MQTT)", "messages": 98_100, "wall_s": 10.2, "msg_per_s": 9_617,
               "cpu_s": 9.9, "cpu_pct": 97, "msg_per_core_s": 9_909, "broker_cpu_pct": None}]
    site = [{"machines": 1000, "workers": 16, "window_ms": 200.0, "frames_per_s": 600_000, "mqtt_msg_per_s": 21_200,
             "kafka_rec_per_s": 21_200, "worker_in_per_s": 21_200, "worker_msg_per_s": 42_400, "dead_letters": 12_345, "p50_ms": 12_345,
             "p99_ms": 123_456, "pipeline_p50_ms": 12_345, "pipeline_p99_ms": 123_456, "lag_start": 1_234_567,
             "lag_end": 12_345_678, "lag_slope": 12_345.67, "lag_slope_stderr": 1_234.5, "lag_grows": True}]
    cpu = [{"process": name, "cpu_pct": 123, "msg_per_s": 21_200, "cores_per_1k": 0.1234} for name in
           ("site", "mosquitto", "bridge", "kafka", *(f"worker{i}" for i in range(1, 17)))]
    return {"replay": replay, "site": site, "cpu": cpu}


def test_every_table_fits_a_log_line_and_nothing_is_cut():
    rows = _rows()
    per_1k = {"site": 0.1, "mosquitto": 0.05, "bridge": 0.2, "kafka": 0.1, "workers": 0.3}
    tables = [replay_table(rows["replay"]), site_rates_table(rows["site"]), site_latency_table(rows["site"]),
              cpu_table(rows["cpu"]), projection_table(projection(21.2, per_1k))]
    for output in tables:
        text = output.markdown()
        assert widest_line(output) <= LOG_WIDTH, text
        assert "…" not in text
    replay_text = tables[0].markdown()
    assert "Kafka worker (1 process)" in replay_text and "10,123" in replay_text and "| -" in replay_text
    assert "grows" in tables[2].markdown()
    projection_text = tables[4].markdown()
    assert "1000 machines" in projection_text and "cores: workers" in projection_text
    assert "partitions" in projection_text


def test_a_quantile_beyond_the_top_bucket_reads_as_more_than_it():
    from bench.central import _ms
    from bench.central_model import fmt
    before = {1.0: 0.0, 30.0: 0.0, float("inf"): 0.0}
    after = {1.0: 10.0, 30.0: 10.0, float("inf"): 100.0}
    assert _ms(before, after, 0.05) == 500 and _ms(before, after, 0.99) == ">30000"
    assert fmt(">30000") == "> 30,000" and _ms(after, after, 0.5) is None and fmt(None) == "-"


def test_profile_inclusive_shares_by_module_or_library(tmp_path):
    from bench.central import summarize_profile_inclusive
    raw = tmp_path / "worker.txt"
    raw.write_text("agent (stream/app.py:1);take (stream/batches.py:3);validate_json (pydantic/type_adapter.py:9) 30\n"
                   "agent (stream/app.py:1);evaluate (stream/rules.py:10);dumps (json/encoder.py:5) 10\n"
                   "agent (stream/app.py:1);send (aiokafka/producer/producer.py:5) 60\n")
    shares = dict(summarize_profile_inclusive(raw))
    assert shares == {"aiokafka": 60.0, "stream/batches.py": 30.0, "pydantic": 30.0, "stream/rules.py": 10.0,
                      "json": 10.0}
