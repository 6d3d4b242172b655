"""The Kafka worker against real Kafka, as separate processes, checked against the pure rules
engine (issue 17): a ``kill -9`` mid-batch and a group that grows and shrinks mid-stream neither
lose an output nor invent one.

Input goes straight to Kafka (keyed by machine, as the bridge does). The expected outputs are what
:class:`stream.rules.RulesEngine` computes for the same messages in the same per-machine order:
every machine is on a line of its own, so even the line stage (a repartition by line) sees one
machine's order and the engine's answer does not depend on how machines interleave. The check is
exact: the sets of decision, alert and command ids read from Kafka equal the engine's (an
at-least-once replay may write an id twice, which consumers dedupe, and every copy must be the
engine's message to the byte of its fields), and the test waits until the group has committed
all of the input, so an id still to come cannot hide a loss, and a late extra one cannot slip by.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from kafka.partitioner.default import murmur2

from stream.kafka import ensure_topics
from stream.messages import Alert, Command, Decision, Envelope, FrameResult, ModelOutput, Result, parse_message
from stream.rules import RulesEngine
from tests.integration.streaming import (Feeder, WorkerProcess, group_lag, produce, read_to_end, wait_for,
                                         wait_until_consumed, worker_group, write_site)

pytestmark = pytest.mark.integration

RULES = [
    {"name": "defects", "metric": "defect_ratio", "condition": {"op": ">=", "value": 0.05}, "scope": "camera",
     "actions": [{"type": "alert"}, {"type": "command", "name": "snapshot", "on": "firing"}]},
    {"name": "busy-machine", "kind": "k_of_n", "k": 3, "n": 5, "window_s": 10, "metric": "defect_ratio",
     "condition": {"op": ">=", "value": 0.05}, "scope": "machine", "actions": [{"type": "alert"}]},
    # Half of the last 20 (about 10 steps of the waves below): the count hovers at k, so records
    # applied twice to a machine's or a line's state (a replay that a worker takes for new input)
    # move a transition or its value. Checked on the engine alone: a replay of 20 or more records
    # of one partition, applied twice anywhere in the stream, changes the outputs (with only the
    # two rules above, half of such replays went unseen).
    {"name": "half-bad", "kind": "k_of_n", "k": 10, "n": 20, "window_s": 10, "metric": "defect_ratio",
     "condition": {"op": ">=", "value": 0.05}, "scope": "machine", "actions": []},
    {"name": "busy-line", "kind": "k_of_n", "k": 10, "n": 20, "window_s": 10, "metric": "defect_ratio",
     "condition": {"op": ">=", "value": 0.05}, "scope": "line", "actions": [{"type": "alert"}]},
]
OUTPUT_KINDS: tuple[type[Envelope], ...] = (Decision, Alert, Command)
PARTITIONS = 4


def machines(count: int) -> list[dict[str, str]]:
    """``m01``..: each on a line of its own (see the module docstring)."""
    return [{"id": f"m{i:02d}", "line": f"line-m{i:02d}"} for i in range(1, count + 1)]


def partition_of(machine: str) -> int:
    """The partition Kafka's default partitioner (kafka-python's and the Java client's) gives a key."""
    return (murmur2(machine.encode()) & 0x7FFFFFFF) % PARTITIONS


FRAMES = 3
"""Frames per result (an edge groups about 200 ms of a 15 fps camera): each is an observation."""
FRAME_S = 0.03


def result(site: str, machine: str, camera: str, ts: float, ratios: list[float], seq: int) -> Result:
    """A result of ``len(ratios)`` frames, the last one at ``ts``."""
    frames = [FrameResult(seq=seq * len(ratios) + i, ts=ts - FRAME_S * (len(ratios) - 1 - i),
                          outputs=[ModelOutput(model="seg", version="1", latency_ms=5.0, defect_ratio=ratio)])
              for i, ratio in enumerate(ratios)]
    return Result(site=site, machine=machine, camera=camera, ts=ts, frames=frames)


def defective(frame: int, machine_index: int, camera_index: int) -> bool:
    """Waves of 6 clean and 6 defective frames, shifted per machine and camera, so that a camera
    rule fires or resolves every 6 frames, often inside a result, and the counting rules follow
    the mix: every frame of a result counts."""
    return ((frame + 3 * machine_index + 2 * camera_index) // 6) % 2 == 1


def step_results(site: str, machine_ids: list[str], cameras: list[str], step: int, ts: float) -> list[Result]:
    """One result per machine and camera, of frames ``step * FRAMES`` ..."""
    return [result(site, machine, camera, ts,
                   [0.2 if defective(step * FRAMES + f, m, c) else 0.0 for f in range(FRAMES)], seq=step)
            for m, machine in enumerate(machine_ids) for c, camera in enumerate(cameras)]


def engine_outputs(site_config, messages: list[Envelope]) -> list[Envelope]:
    """What the pure engine emits for ``messages`` fed in order (one engine, every scope)."""
    engine = RulesEngine(site_config.rules, lines=site_config.lines(),
                         allowed_lateness_s=site_config.engine.allowed_lateness_s,
                         dedupe_ttl_s=site_config.engine.dedupe_ttl_s)
    return [out for message in messages for out in engine.process(message)]


def read_outputs(bootstrap: str, topics) -> list[Envelope]:
    """Every decision, alert and command on their topics, up to their ends."""
    return [parse_message(value) for kind in ("decision", "alert", "command")
            for value in read_to_end(bootstrap, topics.for_kind(kind))]


def assert_outputs_are_the_engines(got: list[Envelope], expected: list[Envelope]) -> str:
    """Per kind, the ids read from Kafka are exactly the engine's, and every copy read (a replay
    may write one twice) is the engine's message; a summary line of the counts."""
    want = {m.msg_id: m for m in expected}
    assert len(want) == len(expected), "the engine computed one id twice: the test's input is wrong"
    problems = []
    for kind in OUTPUT_KINDS:
        expected_ids = {m.msg_id for m in expected if isinstance(m, kind)}
        got_ids = {m.msg_id for m in got if isinstance(m, kind)}
        missing = sorted(expected_ids - got_ids, key=lambda i: (want[i].machine, want[i].ts))
        extra = sorted(got_ids - expected_ids)
        if missing:
            problems.append(f"{len(missing)} {kind.__name__} ids of the engine's missing (of {len(expected_ids)}), "
                            f"e.g. " + "; ".join(_describe(want[i]) for i in missing[:5]))
        if extra:
            shown = [next(m for m in got if m.msg_id == i) for i in extra[:5]]
            problems.append(f"{len(extra)} {kind.__name__} ids the engine does not compute, e.g. "
                            + "; ".join(_describe(m) for m in shown))
    differing = [m for m in got if m.msg_id in want and m.model_dump() != want[m.msg_id].model_dump()]
    if differing:
        problems.append(f"{len(differing)} outputs differ from the engine's with the same id, e.g. "
                        f"{differing[0].model_dump()} != {want[differing[0].msg_id].model_dump()}")
    assert not problems, "\n".join(problems)
    copies = Counter(m.msg_id for m in got)
    by_kind = Counter(type(m).__name__ for m in expected)
    return (f"{', '.join(f'{n} {k}s' for k, n in sorted(by_kind.items()))} as the engine's; "
            f"{sum(copies.values()) - len(copies)} extra copies of an id (replays)")


def _describe(m: Envelope) -> str:
    what = getattr(m, "rule", None) or getattr(m, "name", "")
    return f"{type(m).__name__} {what} {getattr(m, 'key', m.machine)} {getattr(m, 'state', '')} ts={m.ts:.3f}"


@pytest.fixture
def workers(tmp_path):
    started: list[WorkerProcess] = []

    def start(config_path, name: str) -> WorkerProcess:
        worker = WorkerProcess(config_path, tmp_path / "workers", name).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def test_a_worker_killed_mid_batch_is_replaced_and_nothing_is_lost_or_invented(
        mosquitto, kafka, unique_name, tmp_path, workers):
    began = time.monotonic()
    path, config = write_site(tmp_path, unique_name, mosquitto, kafka, RULES, machines(8), partitions=PARTITIONS)
    topics = config.stream.topics()
    results_topic = topics.for_kind("result")
    machine_ids = [m.id for m in config.machines]
    assert {partition_of(m) for m in machine_ids} == set(range(PARTITIONS)), "some partition gets no input"
    # 8 machines x 2 cameras x 375 steps (0.1 s of event time apart, ending about now): 6,000 results,
    # all in Kafka before a worker starts, so every batch it takes is as large as it allows
    steps, t0 = 375, time.time() - 40.0
    stream = [r for step in range(steps)
              for r in step_results(unique_name, machine_ids, ["cam1", "cam2"], step, t0 + 0.1 * step)]
    ensure_topics(kafka.bootstrap, topics, PARTITIONS)
    produce(kafka.bootstrap, topics.for_message, stream)
    expected = engine_outputs(config, stream)
    assert sum(isinstance(m, Decision) for m in expected) >= 500, "too few decisions to tell"
    assert {m.scope for m in expected if isinstance(m, Decision)} == {"camera", "machine", "line"}

    first = workers(path, "first")
    at_kill: list[float] = []

    def a_third_consumed() -> bool:
        at_kill[:] = [first.consumed(results_topic)]
        return at_kill[0] >= len(stream) / 3

    wait_for(a_third_consumed, 120, lambda: f"first consumes a third of the input (at {at_kill})", [first],
             interval=0.05)
    first.proc.kill()  # kill -9: no commit, no producer flush, no LeaveGroup
    first.proc.wait(10)
    left = group_lag(kafka.bootstrap, worker_group(config), [results_topic])[results_topic]
    assert left > 0, "the first worker had committed all of the input before the kill: make the input larger"

    second = workers(path, "second")
    took = wait_until_consumed(kafka.bootstrap, worker_group(config), [results_topic, topics.line_observations],
                               [second], timeout=150)
    got = read_outputs(kafka.bootstrap, topics)
    summary = assert_outputs_are_the_engines(got, expected)
    second.check_alive()
    replayed = at_kill[0] + second.consumed(results_topic) - len(stream)
    duplicates = second.metrics().get("edgeline_worker_duplicates_total")
    print(f"\nkill -9 at {at_kill[0]:.0f} of {len(stream)} results consumed ({left} not committed); the second "
          f"worker consumed the rest in "
          f"{took:.1f} s; >= {replayed:.0f} results replayed, {duplicates} dropped as duplicates; {summary}; "
          f"{time.monotonic() - began:.0f} s in all")


def test_workers_joining_and_leaving_mid_stream_decide_as_the_engine(mosquitto, kafka, unique_name, tmp_path, workers):
    began = time.monotonic()
    path, config = write_site(tmp_path, unique_name, mosquitto, kafka, RULES, machines(8), partitions=PARTITIONS)
    topics = config.stream.topics()
    results_topic = topics.for_kind("result")
    machine_ids = [m.id for m in config.machines]
    assert {partition_of(m) for m in machine_ids} == set(range(PARTITIONS)), "some partition gets no input"
    ensure_topics(kafka.bootstrap, topics, PARTITIONS)
    # 10 steps a second, one result per machine each (80 results/s, event time = wall time), from
    # before the first worker starts until after the last change of the group
    feeder = Feeder(kafka.bootstrap, topics.for_message,
                    lambda step: step_results(unique_name, machine_ids, ["cam1"], step, time.time()), steps_per_s=10)
    feeder.start()
    try:
        # b starts once a consumes: two workers starting together on a new site race on creating the
        # changelog topics (the old worker's line stage then crashed on a 0-partition changelog, and
        # its worker stayed up with the partitions it would never read); that is not this test's case
        a = workers(path, "a")
        wait_for(lambda: a.consumed(results_topic) > 0, 120, "worker a consumes results", [a], interval=0.5)
        b = workers(path, "b")
        wait_for(lambda: b.consumed(results_topic) > 0, 120, "workers a and b both consume results", [a, b],
                 interval=0.5)
        c = workers(path, "c")
        wait_for(lambda: c.consumed(results_topic) > 0, 120, "worker c, started mid-stream, consumes results",
                 [a, b, c], interval=0.5)
        consumed = {"a": a.consumed(results_topic), "b": b.consumed(results_topic), "c": c.consumed(results_topic)}
        steps_at_stop = feeder.steps
        assert a.stop() == 0  # SIGTERM mid-stream: a leaves the group, b and c take its partitions
        # the stream goes on until b and c have both consumed more and a few more seconds were sent
        since = {w.name: w.consumed(results_topic) for w in (b, c)}
        wait_for(lambda: feeder.steps >= steps_at_stop + 30 and all(
            w.consumed(results_topic) > since[w.name] for w in (b, c)), 120,
            "b and c both consume after a left", [b, c], interval=0.5)
        assert feeder.is_alive(), "the feeder stopped early"
    finally:
        sent = feeder.finish()
    took = wait_until_consumed(kafka.bootstrap, worker_group(config), [results_topic, topics.line_observations],
                               [b, c], timeout=120)
    consumed |= {"b": b.consumed(results_topic), "c": c.consumed(results_topic)}
    assert all(n > 0 for n in consumed.values()), f"a worker consumed nothing: {consumed}"
    expected = engine_outputs(config, sent)
    assert sum(isinstance(m, Decision) for m in expected) >= 100, "too few decisions to tell"
    got = read_outputs(kafka.bootstrap, topics)
    summary = assert_outputs_are_the_engines(got, expected)
    print(f"\n{len(sent)} results in {feeder.steps} steps; results consumed per worker {consumed}; the rest consumed "
          f"{took:.1f} s after the feed stopped; {summary}; {time.monotonic() - began:.0f} s in all")


def test_a_batch_past_its_deadline_stops_the_worker_and_commits_nothing(
        mosquitto, kafka, unique_name, tmp_path, workers):
    # a deadline no batch can meet (its outputs' acks alone take longer): the first batch stands
    # for one that hangs, which once kept a worker busy for good, deaf to SIGTERM
    path, config = write_site(tmp_path, unique_name, mosquitto, kafka, RULES, machines(2), partitions=PARTITIONS,
                              workers={"batch_deadline_s": 0.001})
    topics = config.stream.topics()
    results_topic = topics.for_kind("result")
    stream = [r for step in range(20)
              for r in step_results(unique_name, [m.id for m in config.machines], ["cam1"], step, time.time())]
    ensure_topics(kafka.bootstrap, topics, PARTITIONS)
    produce(kafka.bootstrap, topics.for_message, stream)

    stuck = workers(path, "stuck")
    wait_for(lambda: stuck.proc.poll() is not None, 120, "the worker stops on its first batch's deadline",
             interval=0.2)
    assert stuck.proc.returncode != 0, stuck.tail()
    assert "records took more than 0.001 s" in " ".join(stuck.tail(200).split()), stuck.tail()
    assert group_lag(kafka.bootstrap, worker_group(config), [results_topic])[results_topic] == len(stream), \
        "the worker committed input of a batch it gave up on"
