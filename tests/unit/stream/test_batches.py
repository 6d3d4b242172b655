"""The worker's batch bookkeeping (stream.batches) on plain dicts: states and dedupe marks read once
and written once per checkpoint, a replay after a partial write neither loses nor doubles input,
and the offsets the worker commits cover only records a batch took and finished."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from faust.types import TP

from stream.batches import (DEDUPE_BUCKETS, REWIND_RETRY_S, STALL_S, Checkpoint, Marks, Pending, Position, Progress,
                           StateCache)
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
    generation_id: int = 1
    tp: TP = field(init=False)

    def __post_init__(self) -> None:
        self.tp = TP(self.topic, self.partition)


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


@dataclass
class DictTable:
    """A dict as a batch reads and writes a table (stream.batches.BatchTable); writes are final."""

    data: dict[str, Any]

    def get(self, key: str, _event: Any) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any, _event: Any) -> None:
        self.data[key] = value

    def drop(self, key: str, _event: Any) -> None:
        self.data.pop(key, None)


def flush(states: StateCache) -> int:
    pending: Pending = []
    written = states.flush(pending)
    assert not pending  # a dict's writes are final
    return written


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
    states = StateCache(DictTable(table), lambda obs: origins[id(obs)])
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
    assert flush(states) == len(keys) == table.writes
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
        flush(states)
        second, states = run_batch(RulesEngine(RULES), table, records[40:])
        table.budget = written
        try:
            flush(states)
        except Killed:
            pass
        table.budget = None
        replay, states = run_batch(RulesEngine(RULES), table, records[40:])
        flush(states)
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


async def checkpoint_batch(checkpoint: Checkpoint, engine: RulesEngine, records: list[tuple[Event, Result]],
                           fail: bool = False) -> None:
    """One rules-stage batch as the worker runs it on a checkpoint (``fail``: it dies after the engine)."""
    async with checkpoint.batch([event for event, _ in records]) as marks:
        checkpoint.origins = {}
        engine.states = checkpoint.states
        for event, message in records:
            assert marks.first(message.machine, message.msg_id, message.ts, event, Position.of(event))
            observed = observations(message)
            checkpoint.origins.update({id(obs): (event, Position.of(event)) for obs in observed})
            engine.observe_all(observed, fresh=checkpoint.states.fresh)
        if fail:
            raise Killed("the batch's outputs were never acknowledged")


def test_a_checkpoint_writes_its_batches_states_once_and_only_then_finishes_their_records() -> None:
    states, marks = CountingTable(), CountingTable()
    checkpoint = Checkpoint(DictTable(states), DictTable(marks), 60.0)
    records = list(records_of(stream_of(30)))
    engine = RulesEngine(RULES)

    async def run() -> tuple[int, list[Any], list[Any]]:
        await checkpoint_batch(checkpoint, engine, records[:15])
        await checkpoint_batch(checkpoint, engine, records[15:])
        before = states.writes + marks.writes
        return before, await checkpoint.flush(), await checkpoint.flush()

    before, finished, again = asyncio.run(run())
    assert before == 0 and finished == [event for event, _ in records] and again == []
    assert states.writes == len(states) == 8 and marks.writes == len(marks) > 0  # each key once for 2 batches
    assert {value["upto"] for key, value in states.items() if key.startswith("burst|")} == {28, 29}


def test_a_failed_batch_discards_the_checkpoint_and_finishes_nothing_of_it() -> None:
    states, marks = CountingTable(), CountingTable()
    checkpoint = Checkpoint(DictTable(states), DictTable(marks), 60.0)
    records = list(records_of(stream_of(30)))

    async def run() -> list[Any]:
        await checkpoint_batch(checkpoint, RulesEngine(RULES), records[:15])
        try:
            await checkpoint_batch(checkpoint, RulesEngine(RULES), records[15:], fail=True)
        except Killed:
            pass
        return await checkpoint.flush()

    assert asyncio.run(run()) == []  # the first batch's records are read again with the second's
    assert states.writes == marks.writes == 0


def test_a_mark_tells_a_replayed_record_from_an_upstream_duplicate() -> None:
    table = CountingTable()
    marks = Marks(DictTable(table), ttl_s=60.0)
    event = Event(Message("results", 1, 7))
    here = Position.of(event)
    assert marks.first("m1", "id-1", 1000.0, event, here)
    assert marks.first("m1", "id-1", 1000.0, event, here)  # the same record, read again in the batch
    marks.flush([])
    replay = Marks(DictTable(table), ttl_s=60.0)
    assert replay.first("m1", "id-1", 1000.0, event, here)  # the same record after a crash: not a duplicate
    again = Event(Message("results", 1, 9))
    assert not replay.first("m1", "id-1", 1000.0, again, Position.of(again))  # a redelivered copy is


def test_marks_are_written_once_per_bucket_and_expire_past_the_horizon() -> None:
    table = CountingTable()
    width = 60.0 / DEDUPE_BUCKETS
    marks = Marks(DictTable(table), ttl_s=60.0)
    for i in range(50):
        event = Event(Message("results", 0, i))
        assert marks.first("m1", f"id-{i}", 1000.0 + i * 0.1, event, Position.of(event))
    marks.flush([])
    buckets = {int((1000.0 + i * 0.1) // width) for i in range(50)}
    assert table.writes == len(buckets) + 1  # the buckets and the machine's index
    late = Marks(DictTable(table), ttl_s=60.0)
    event = Event(Message("results", 0, 99))
    assert late.first("m1", "id-late", 1000.0 + 200.0, event, Position.of(event))
    late.flush([])
    assert table["m1|index"] == [int(1200.0 // width)]
    assert not any(f"m1|{bucket}" in table for bucket in buckets)


def events(partition: int, offsets: range, generation: int = 1) -> list[Event]:
    return [Event(Message("results", partition, offset, generation)) for offset in offsets]


def test_progress_commits_each_partition_after_the_last_record_its_batches_finished() -> None:
    progress = Progress(start_of=lambda _tp: None)
    batch = progress.take(events(0, range(10, 15)) + events(1, range(3, 5)), generation=1)
    assert len(batch) == 7
    assert progress.to_commit() == {}  # taken, not finished: nothing to commit
    progress.finished(batch)
    assert progress.to_commit() == {TP("results", 0): 15, TP("results", 1): 5}
    assert progress.to_commit() == {}  # handed out once


def test_progress_takes_no_record_of_an_old_generation_nor_of_one_being_revoked() -> None:
    committed: dict[TP, int] = {}
    progress = Progress(start_of=committed.get)
    progress.finished(progress.take(events(0, range(0, 5)), generation=1))
    committed.update(progress.to_commit())
    assert progress.take(events(0, range(5, 8), generation=1), generation=2) == []  # read before the rebalance
    taken = progress.take(events(0, range(3, 8), generation=2), generation=2)  # 3, 4: committed before
    assert [e.message.offset for e in taken] == [5, 6, 7]
    progress.close(2)
    assert progress.take(events(0, range(8, 10), generation=2), generation=2) == []
    assert len(progress.take(events(0, range(5, 10), generation=3), generation=3)) == 5  # from the committed 5


def test_progress_drops_a_record_read_twice_and_rewinds_a_partition_that_skipped_one() -> None:
    progress = Progress(start_of=lambda _tp: None)
    progress.take(events(0, range(0, 5)), generation=1)
    assert progress.take(events(0, range(3, 6)), generation=1) == events(0, range(5, 6))
    assert progress.gaps == 0 and progress.rewinds(now=0.0) == {}
    # offset 6 never came: nothing after it is taken, the partition is read again from 6
    assert progress.take(events(0, range(7, 10)) + events(1, range(0, 2)), generation=1) == events(1, range(0, 2))
    assert progress.gaps == 1
    assert progress.rewinds(now=0.0) == {TP("results", 0): 6}
    progress.rewound(TP("results", 0), 6)
    assert progress.take(events(0, range(10, 12)), generation=1) == []  # still read before the seek
    assert progress.rewinds(now=0.5) == {} and progress.gaps == 1
    assert progress.rewinds(now=0.0 + REWIND_RETRY_S) == {TP("results", 0): 6}  # the seek was lost: again
    assert progress.take(events(0, range(6, 9)), generation=1) == events(0, range(6, 9))
    assert progress.rewinds(now=10.0) == {}


def test_progress_goes_on_from_the_earliest_record_when_the_skipped_ones_are_gone() -> None:
    progress = Progress(start_of=lambda _tp: None)
    progress.take(events(0, range(0, 5)), generation=1)
    progress.take(events(0, range(40, 41)), generation=1)
    assert progress.rewinds(now=0.0) == {TP("results", 0): 5}
    progress.rewound(TP("results", 0), 30)  # retention deleted 5..29
    assert progress.take(events(0, range(30, 32)), generation=1) == events(0, range(30, 32))


def test_progress_rewinds_a_partition_whose_generation_starts_past_its_committed_offset() -> None:
    progress = Progress(start_of={TP("results", 0): 100}.get)
    assert progress.take(events(0, range(120, 125), generation=4), generation=4) == []  # faust lost 100..119
    assert progress.rewinds(now=0.0) == {TP("results", 0): 100}
    progress.rewound(TP("results", 0), 100)
    assert len(progress.take(events(0, range(100, 125), generation=4), generation=4)) == 25


def test_progress_reads_again_a_partition_whose_last_records_never_came() -> None:
    tp, other = TP("results", 0), TP("results", 1)
    progress = Progress(start_of={tp: 20, other: 0}.get)
    progress.finished(progress.take(events(0, range(20, 25)) + events(1, range(0, 3)), generation=1))
    ends = {tp: 30, other: 3}  # Kafka holds 25..29 of partition 0; partition 1 is read to its end
    progress.stalled(ends, generation=1, now=100.0)
    assert progress.rewinds(now=100.0) == {}  # just found waiting: records may be on their way
    progress.stalled(ends, generation=1, now=100.0 + STALL_S - 0.1)
    assert progress.rewinds(now=100.0 + STALL_S - 0.1) == {}
    progress.stalled(ends, generation=1, now=100.0 + STALL_S)
    assert progress.gaps == 1
    assert progress.rewinds(now=100.0 + STALL_S) == {tp: 25}
    assert progress.take(events(0, range(25, 30)), generation=1) == events(0, range(25, 30))


def test_progress_leaves_a_partition_alone_while_its_records_are_taken() -> None:
    tp = TP("results", 0)
    progress = Progress(start_of={tp: 0}.get)
    for step in range(10):  # always behind the end, never quiet for STALL_S
        now = step * STALL_S / 2
        progress.stalled({tp: 10 * step + 50}, generation=1, now=now)
        progress.take(events(0, range(10 * step, 10 * step + 10)), generation=1)
    assert progress.gaps == 0 and progress.rewinds(now=100.0) == {}


def test_progress_finds_a_stall_in_a_generation_that_took_no_record_yet() -> None:
    tp = TP("results", 0)
    progress = Progress(start_of={tp: 7}.get)
    progress.take(events(0, range(0, 3)), generation=1)
    progress.close(1)  # revoked; generation 2 starts and nothing of partition 0 ever comes
    progress.stalled({tp: 9}, generation=2, now=0.0)
    progress.stalled({tp: 9}, generation=2, now=STALL_S)
    assert progress.rewinds(now=STALL_S) == {tp: 7}
