"""The bridge's retry schedule alone: each record on its own backoff, hastened when Kafka is back."""

from __future__ import annotations

import struct

from kafka.errors import KafkaConnectionError, KafkaTimeoutError, MessageSizeTooLargeError

from stream.bridge import RetrySchedule, _Record, is_permanent


def record(mid: int, attempts: int) -> _Record:
    return _Record(mid, "t", b"m01", b"{}", None, 0.0, "result", attempts)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_record_waits_its_own_backoff_and_due_ones_come_out_together_in_order():
    clock = Clock()
    schedule = RetrySchedule(first_s=0.5, max_s=10.0)
    assert schedule.add(record(1, attempts=1), clock.now) == 100.5
    assert schedule.add(record(2, attempts=3), clock.now) == 102.0
    assert schedule.add(record(3, attempts=9), clock.now) == 110.0  # capped at max_s
    assert schedule.add(record(4, attempts=1), clock.now) == 100.5
    clock.now = 102.0
    assert [r.mid for r in schedule.take_due(0, clock)] == [1, 2, 4]
    assert len(schedule) == 1


def test_hasten_brings_every_wait_down_to_the_first_backoff():
    clock = Clock()
    schedule = RetrySchedule(first_s=0.5, max_s=10.0)
    for mid in range(5):
        schedule.add(record(mid, attempts=8), clock.now)
    assert schedule.take_due(0, clock) == []
    schedule.hasten(clock.now)
    clock.now += 0.5
    assert [r.mid for r in schedule.take_due(0, clock)] == [0, 1, 2, 3, 4]


def test_size_and_encoding_failures_are_permanent_the_broker_being_away_is_not():
    assert is_permanent(MessageSizeTooLargeError())
    assert is_permanent(struct.error("int too large to convert"))
    assert not is_permanent(KafkaTimeoutError())
    assert not is_permanent(KafkaConnectionError())
