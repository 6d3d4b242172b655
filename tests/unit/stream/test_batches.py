"""The worker's batch bookkeeping (stream.batches) on plain dicts: states and dedupe marks read once
and written once per batch, and a replay after a partial write neither loses nor doubles input."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from stream.batches import DEDUPE_BUCKETS, Marks, Position, StateCache
from stream.messages import FrameResult, ModelOutput, Result
from stream.rule_config import RuleConfig
from stream.rules import Observation, RulesEngine, observations

RULES = [RuleConfig.model_validate(r) for r in (
    {"name": "hot", "metric": "defect_ratio", "condition": {"op": ">=", "value": 0.05}, "scope": "camera",
     "hold_for_s": 0.5, "clear_after_s": 0.5, "actions": [{"type": "alert"}]},
    {"name": "burst", "kind": "k_of_n", "k": 3, "n": 6, "window_s": 5, "metric": "defect_ratio",
     "condition": {"op": ">=", "value": 0.05}, "scope": "machine", "actions": [{"type": "alert"}]},
)]


@dataclass
class Message:
    topic: str
    partition: int
    offset: int


@dataclass
class Event:
    message: Message


class CountingTable(dict[str, Any]):
    """A dict that counts reads and writes, as a Faust table would cost them."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.writes = 0

    def get(self, key: str, default: Any = None) -> Any:
        self.reads += 1
        return super().get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes += 1
        super().__setitem__(key, value)


def no_partition(_event: Any) -> nullcontext[None]:
    return nullcontext()


def stream_of(count: int, seed: int = 0, frames: int = 3) -> list[Result]:
    """Results of ``frames`` frames each (grouped, as the edge sends them), defects at random."""
    rng = random.Random(seed)
    return [Result(site="s", machine=f"m{i % 2}", camera=f"c{i % 3}", ts=1000.0 + i * 0.2,
                   frames=[FrameResult(seq=i * frames + k, ts=1000.0 + i * 0.2 + k * 0.05, outputs=[
                       ModelOutput(model="seg", version="1", latency_ms=5.0,
                                   defect_ratio=0.1 if rng.random() < 0.5 else 0.0)]) for k in range(frames)])
            for i in range(count)]


def run_batch(engine: RulesEngine, table: dict[str, Any], records: list[tuple[Event, Result]]) -> tuple[list[str], StateCache]:
    """One batch as the worker runs it: the ids it emits, and its cache (flush not yet done)."""
    origins: dict[int, tuple[Event, Position]] = {}
    states = StateCache(table, lambda obs: origins[id(obs)], scope=no_partition)
    engine.states = states
    emitted: list[str] = []
    for event, message in records:
        observed = observations(message)
        for obs in observed:
            origins[id(obs)] = (event, Position.of(event))
        emitted += [out.msg_id for out in engine.observe_all(observed, fresh=states.fresh)]
    return emitted, states


def records_of(messages: list[Result]) -> Iterator[tuple[Event, Result]]:
    for offset, message in enumerate(messages):
        yield Event(Message("results", 0, offset)), message


def test_a_batch_reads_each_state_once_and_writes_it_once_with_its_position() -> None:
    table = CountingTable()
    emitted, states = run_batch(RulesEngine(RULES), table, list(records_of(stream_of(30))))
    keys = {"hot|m0/c0", "hot|m0/c1", "hot|m0/c2", "hot|m1/c0", "hot|m1/c1", "hot|m1/c2", "burst|m0", "burst|m1"}
    assert table.reads == len(keys)
    assert states.flush() == len(keys) == table.writes
    assert set(table) == keys
    last = {key: max(o for o, m in enumerate(stream_of(30)) if key.endswith(f"|{m.machine}/{m.camera}")
                     or key == f"burst|{m.machine}") for key in keys}
    assert {key: (value["source"], value["upto"]) for key, value in table.items()} == {
        key: ("results/0", upto) for key, upto in last.items()}


class Killed(Exception):
    """The worker died between two table writes."""


class DyingTable(dict[str, Any]):
    """A table whose process is killed after ``budget`` more writes."""

    def __init__(self) -> None:
        super().__init__()
        self.budget: int | None = None

    def __setitem__(self, key: str, value: Any) -> None:
        if self.budget is not None:
            if self.budget == 0:
                raise Killed
            self.budget -= 1
        super().__setitem__(key, value)


def test_a_replay_after_a_partial_write_emits_only_the_pure_engines_ids_and_ends_in_its_states() -> None:
    """Kill -9 between two table writes of a batch: some of its states were written, some not; the
    replayed batch skips what each state already holds, so the states end as a straight run's and
    every id emitted is one the pure engine computes."""
    messages = stream_of(60, seed=3)
    pure = RulesEngine(RULES)
    want = [out.msg_id for message in messages for out in pure.process(message)]
    assert len(want) >= 6
    records = list(records_of(messages))
    for written in range(9):
        table = DyingTable()
        first, states = run_batch(RulesEngine(RULES), table, records[:40])
        states.flush()
        second, states = run_batch(RulesEngine(RULES), table, records[40:])
        table.budget = written
        try:
            states.flush()
        except Killed:
            pass
        table.budget = None
        replay, states = run_batch(RulesEngine(RULES), table, records[40:])
        states.flush()
        assert first + second == want  # every frame of every record counts
        assert set(replay) <= set(want)
        assert {key: value["state"] for key, value in table.items()} == {
            key: state.to_dict() for key, state in pure.states.items()}


def test_the_fresh_hook_is_asked_before_a_state_is_read_and_skips_what_it_refuses() -> None:
    engine = RulesEngine(RULES)
    asked: list[str] = []

    def refuse_burst(key: str, _obs: Observation) -> bool:
        asked.append(key)
        return not key.startswith("burst|")

    for message in stream_of(20):
        engine.observe_all(observations(message), fresh=refuse_burst)
    assert not any(key.startswith("burst|") for key in engine.states)
    assert any(key.startswith("hot|") for key in engine.states)
    assert {key.split("|")[0] for key in asked} == {"hot", "burst"}


def test_a_mark_tells_a_replayed_record_from_an_upstream_duplicate() -> None:
    table = CountingTable()
    marks = Marks(table, ttl_s=60.0, scope=no_partition)
    event = Event(Message("results", 1, 7))
    here = Position.of(event)
    assert marks.first("m1", "id-1", 1000.0, event, here)
    assert marks.first("m1", "id-1", 1000.0, event, here)  # the same record, read again in the batch
    marks.flush()
    replay = Marks(table, ttl_s=60.0, scope=no_partition)
    assert replay.first("m1", "id-1", 1000.0, event, here)  # the same record after a crash: not a duplicate
    again = Event(Message("results", 1, 9))
    assert not replay.first("m1", "id-1", 1000.0, again, Position.of(again))  # a redelivered copy is


def test_marks_are_written_once_per_bucket_and_expire_past_the_horizon() -> None:
    table = CountingTable()
    width = 60.0 / DEDUPE_BUCKETS
    marks = Marks(table, ttl_s=60.0, scope=no_partition)
    for i in range(50):
        event = Event(Message("results", 0, i))
        assert marks.first("m1", f"id-{i}", 1000.0 + i * 0.1, event, Position.of(event))
    marks.flush()
    buckets = {int((1000.0 + i * 0.1) // width) for i in range(50)}
    assert table.writes == len(buckets) + 1  # the buckets and the machine's index
    late = Marks(table, ttl_s=60.0, scope=no_partition)
    event = Event(Message("results", 0, 99))
    assert late.first("m1", "id-late", 1000.0 + 200.0, event, Position.of(event))
    late.flush()
    assert table["m1|index"] == [int(1200.0 // width)]
    assert not any(f"m1|{bucket}" in table for bucket in buckets)
