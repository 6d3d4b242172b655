"""The worker's batch bookkeeping (stream.batches) on plain dicts: states and dedupe marks read once
and written once per checkpoint, a replay after a partial write neither loses nor doubles input,
and the offsets the worker commits cover only records a batch took and finished."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stream.batches import TP, DEDUPE_BUCKETS, Checkpoint, Marks, Offsets, Pending, Position, StateCache
from stream.messages import FrameResult, ModelOutput, Result
from stream.rule_config import RuleConfig
from stream.rules import Observation, RulesEngine, observations

RULES = [RuleConfig.model_validate(r) for r in (
    {"name": "hot", "metric": "defect_ratio", "condition": {"op": ">=", "value": 0.05}, "scope": "camera",
     "hold_for_s": 0.5, "clear_after_s": 0.5, "actions": [{"type": "alert"}]},
    {"name": "burst", "kind": "k_of_n", "k": 3, "n": 6, "window_s": 5, "metric": "defect_ratio",
     "condition": {"op": ">=", "value": 0.05}, "scope": "machine", "actions": [{"type": "alert"}]},
)]


@dataclass(frozen=True)
class Rec:
    """A Kafka record, as far as the batches look at one."""

    topic: str
    partition: int
    offset: int


class CountingTable(dict[str, Any]):
    """A dict that counts reads and writes, as a Kafka-backed table would cost them."""

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


def run_batch(engine: RulesEngine, table: dict[str, Any], records: list[tuple[Rec, Result]]) -> tuple[list[str], StateCache]:
    """One batch as the worker runs it: the ids it emits, and its cache (flush not yet done)."""
    origins: dict[int, tuple[Rec, Position]] = {}
    states = StateCache(DictTable(table), lambda obs: origins[id(obs)])
    engine.states = states
    emitted: list[str] = []
    for event, message in records:
        observed = observations(message)
        for obs in observed:
            origins[id(obs)] = (event, Position.of(event))
        emitted += [out.msg_id for out in engine.observe_all(observed, fresh=states.fresh)]
    return emitted, states


def records_of(messages: list[Result]) -> Iterator[tuple[Rec, Result]]:
    for offset, message in enumerate(messages):
        yield Rec("results", 0, offset), message


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


async def checkpoint_batch(checkpoint: Checkpoint, engine: RulesEngine, records: list[tuple[Rec, Result]],
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
    event = Rec("results", 1, 7)
    here = Position.of(event)
    assert marks.first("m1", "id-1", 1000.0, event, here)
    assert marks.first("m1", "id-1", 1000.0, event, here)  # the same record, read again in the batch
    marks.flush([])
    replay = Marks(DictTable(table), ttl_s=60.0)
    assert replay.first("m1", "id-1", 1000.0, event, here)  # the same record after a crash: not a duplicate
    again = Rec("results", 1, 9)
    assert not replay.first("m1", "id-1", 1000.0, again, Position.of(again))  # a redelivered copy is


def test_marks_are_written_once_per_bucket_and_expire_past_the_horizon() -> None:
    table = CountingTable()
    width = 60.0 / DEDUPE_BUCKETS
    marks = Marks(DictTable(table), ttl_s=60.0)
    for i in range(50):
        event = Rec("results", 0, i)
        assert marks.first("m1", f"id-{i}", 1000.0 + i * 0.1, event, Position.of(event))
    marks.flush([])
    buckets = {int((1000.0 + i * 0.1) // width) for i in range(50)}
    assert table.writes == len(buckets) + 1  # the buckets and the machine's index
    late = Marks(DictTable(table), ttl_s=60.0)
    event = Rec("results", 0, 99)
    assert late.first("m1", "id-late", 1000.0 + 200.0, event, Position.of(event))
    late.flush([])
    assert table["m1|index"] == [int(1200.0 // width)]
    assert not any(f"m1|{bucket}" in table for bucket in buckets)


def records(partition: int, offsets: range | list[int]) -> list[Rec]:
    return [Rec("results", partition, offset) for offset in offsets]


def test_offsets_commit_each_partition_after_the_last_record_its_batches_finished() -> None:
    offsets = Offsets()
    offsets.assign({TP("results", 0): 10, TP("results", 1): 3})
    batch, rewinds = offsets.take([(TP("results", 0), records(0, range(10, 15))), (TP("results", 1), records(1, range(3, 5)))])
    assert len(batch) == 7 and rewinds == {}
    assert offsets.to_commit() == {}  # taken, not finished: nothing to commit
    offsets.finished(batch)
    assert offsets.to_commit() == {TP("results", 0): 15, TP("results", 1): 5}
    assert offsets.to_commit() == {}  # handed out once


def test_offsets_take_no_record_read_before_nor_of_a_partition_not_assigned() -> None:
    offsets = Offsets()
    offsets.assign({TP("results", 0): 5})
    # a batch fetched before the rebalance: 3, 4 were committed before it, partition 1 went elsewhere
    batch, rewinds = offsets.take([(TP("results", 0), records(0, range(3, 8))), (TP("results", 1), records(1, range(0, 4)))])
    assert batch == records(0, range(5, 8)) and rewinds == {}
    batch, _ = offsets.take([(TP("results", 0), records(0, range(5, 10)))])  # read again from the committed 5
    assert batch == records(0, range(8, 10))
    offsets.revoke()
    assert offsets.take([(TP("results", 0), records(0, range(10, 12)))]) == ([], {})
    offsets.finished(records(0, range(10, 12)))
    assert offsets.to_commit() == {}  # not assigned: the next owner commits these


def test_offsets_read_a_partition_again_from_a_record_that_did_not_come() -> None:
    offsets = Offsets()
    offsets.assign({TP("results", 0): 0, TP("results", 1): 0})
    batch, rewinds = offsets.take([(TP("results", 0), records(0, [0, 1, 3, 4])), (TP("results", 1), records(1, range(0, 2)))])
    assert batch == records(0, range(0, 2)) + records(1, range(0, 2))
    assert rewinds == {TP("results", 0): 2}
    batch, rewinds = offsets.take([(TP("results", 0), records(0, range(2, 5)))])  # after the seek
    assert batch == records(0, range(2, 5)) and rewinds == {}
