"""Fleet liveness folded from heartbeats and events (the worker's liveness agent, without Kafka)."""

from __future__ import annotations

from stream.worker import update_liveness
from stream.messages import Event, Heartbeat

SITE = {"site": "s1", "machine": "m01"}


def heartbeat(ts: float) -> Heartbeat:
    return Heartbeat(**SITE, ts=ts, uptime_s=ts)


def event(name: str, ts: float) -> Event:
    return Event(**SITE, ts=ts, name=name)


def test_silence_fires_once_and_the_next_heartbeat_resolves():
    table: dict = {}
    assert update_liveness(table, heartbeat(0.0), now=100.0, timeout_s=15) == []
    assert update_liveness(table, event("liveness_check", 0.0), now=110.0, timeout_s=15) == []  # 10 s: fine
    (fired,) = update_liveness(table, event("liveness_check", 0.0), now=120.0, timeout_s=15)
    assert (fired.rule, fired.state, fired.severity, fired.key, fired.value) == ("machine-offline", "firing",
                                                                                 "critical", "m01", 20.0)
    assert update_liveness(table, event("liveness_check", 0.0), now=130.0, timeout_s=15) == []  # once
    (resolved,) = update_liveness(table, heartbeat(1.0), now=140.0, timeout_s=15)
    assert resolved.state == "resolved" and "back online after 20 s" in resolved.text
    assert resolved.msg_id != fired.msg_id


def test_last_will_fires_at_once_and_replays_keep_their_ids():
    table: dict = {}
    update_liveness(table, heartbeat(0.0), now=100.0, timeout_s=15)
    (fired,) = update_liveness(table, event("machine_offline", 1.0), now=101.0, timeout_s=15)
    replay: dict = {}
    update_liveness(replay, heartbeat(0.0), now=100.0, timeout_s=15)
    (again,) = update_liveness(replay, event("machine_offline", 1.0), now=101.0, timeout_s=15)
    assert fired.msg_id == again.msg_id


def test_other_events_do_not_change_liveness():
    table: dict = {}
    update_liveness(table, heartbeat(0.0), now=100.0, timeout_s=15)
    assert update_liveness(table, event("command_applied", 1.0), now=200.0, timeout_s=15) == []
    assert table["m01"]["offline"] is False
