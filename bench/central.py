"""Can this box decide on a whole site? Three measurements in one run, each with real processes:

    python -m bench.central [--seconds 60] [--machines 50] [--window-ms 200] [--workers 1]
                            [--replay 100000] [--no-replay] [--no-embedded] [--no-site] [--profile-to DIR]

1. **replay**: Kafka pre-filled with ``--replay`` recorded messages of the simulated site (50
   machines, the site's mix below, timestamps ending now), produced straight to Kafka keyed by
   machine before any worker runs; then ONE ``edgeline stream worker`` on it, nothing else
   running. Wall time from its first consumed record until the group's lag on its input topics
   (results, anomalies, heartbeats and its own line-observations) is 0, its CPU seconds over the
   same span (psutil): msg/s, msg/s per worker core (= messages / worker CPU s), CPU %.
2. **embedded replay**: the same messages (results and anomaly scores: the runner does not take
   heartbeats) queued in Mosquitto for ``edgeline stream embedded``'s persistent session, then
   the runner started on them and measured the same way.
3. **site**: a simulated site (every machine: 4 cameras at 15 fps, results grouped per camera
   per ``--window-ms``, one 8-channel sensor group scored at 1 Hz, a heartbeat every 5 s, each
   stream on its own phase) publishing to a real Mosquitto -> the bridge -> a real Kafka ->
   ``--workers`` workers, at each ``--machines`` step for ``--seconds``: frame and
   pipeline p50/p99, the lag sampled through the step (start, end, least-squares slope), CPU
   per process and per 1k msg/s it handled, and a projection to 50, 200 and 1,000 machines.

In the same run, the embedded rules engine's msg/s on one core in this process (no I/O).
Needs Mosquitto and the Kafka jars; ``--profile-to`` needs py-spy.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import typer
import yaml
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from rich.console import Console

from bench.central_model import (LagTrend, components_per_1k, cores_per_1k, cpu_table, lag_trend, projection, projection_table,
                                 replay_table, site_latency_table, site_rates_table)
from bench.report import RESULTS, machine
from edgeline.services import KafkaBroker, MosquittoBroker, free_port, scrape_metrics
from stream.console import print_table
from stream.kafka import ensure_topics
from stream.messages import Anomaly, Envelope, FrameResult, Heartbeat, ModelOutput, Result, parse_message
from stream.mqtt import MqttClient, MqttSettings
from stream.rule_config import RuleConfig
from stream.rules import RulesEngine
from stream.topics import KafkaTopics, topic_for
from stream.worker import worker_group

SITE = "benchsite"
REPLAY_CHUNK = 2_000
"""Replay messages published to Mosquitto before waiting for their acknowledgements."""
REPLAY_SITE = "benchreplay"
"""The replays' site: its own topics and its own persistent MQTT session, apart from the live site."""
REPLAY_MACHINES = 50
REPLAY_PARTITIONS = 4
CAMERAS = 4
FPS = 15.0
PUMP_PERIOD_S = 1.0
HEARTBEAT_PERIOD_S = 5.0
SENSOR_CHANNELS = [f"ch{i}" for i in range(8)]
EDGELINE = [sys.executable, "-m", "edgeline.cli"]
POLL_S = 0.2
SETTLED_S = 2.5
"""A lag under this many seconds of the step's input counts as drained (see :func:`settle`)."""
SETTLE_SAMPLES = 3
DRAIN_POLL_S = 0.5
"""How often a drain scrapes the process it measures (a scrape costs that process CPU too)."""
RULES = [
    {"name": "defects", "metric": "defect_ratio", "condition": {"op": ">=", "value": 0.05}, "scope": "camera",
     "hold_for_s": 1.0, "actions": [{"type": "alert"}, {"type": "command", "name": "snapshot", "on": "firing"}]},
    {"name": "defect-burst", "kind": "k_of_n", "k": 5, "n": 15, "window_s": 5, "metric": "defect_ratio",
     "condition": {"op": ">=", "value": 0.05}, "scope": "machine", "actions": [{"type": "alert"}]},
    {"name": "line-defects", "kind": "k_of_n", "k": 10, "n": 30, "window_s": 5, "metric": "defect_ratio",
     "condition": {"op": ">=", "value": 0.05}, "scope": "line", "actions": [{"type": "alert"}]},
    {"name": "pump", "metric": "anomaly_level", "condition": {"op": ">=", "value": 1.0}, "scope": "machine",
     "hold_for_s": 2.0, "actions": [{"type": "alert"}]},
]


def machine_ids(count: int) -> list[str]:
    return [f"m{i:02d}" for i in range(1, count + 1)]


def machine_lines(count: int) -> dict[str, str]:
    """The simulated site's lines: ten machines to a line."""
    return {m: f"L{1 + i // 10}" for i, m in enumerate(machine_ids(count))}


def rule_configs() -> list[RuleConfig]:
    return [RuleConfig.model_validate(r) for r in RULES]


def in_process_row(runner: str, messages: int, cpu: float, wall: float) -> dict[str, Any]:
    """A replay-table row for work measured in this process (no broker beside it)."""
    return {"runner": runner, "messages": messages, "wall_s": round(wall, 1), "msg_per_s": round(messages / wall),
            "cpu_s": round(cpu, 1), "cpu_pct": round(100 * cpu / wall), "msg_per_core_s": round(messages / cpu),
            "broker_cpu_pct": None}


# --- the simulated site -----------------------------------------------------------------------


def tick_s(window_s: float) -> float:
    """How often a camera sends: its grouping window, or every frame without grouping."""
    return window_s if window_s > 0 else 1.0 / FPS


def site_schedule(machines: list[str], window_s: float, t0: float) -> Iterator[tuple[float, str, str]]:
    """``(due time, machine, stream)`` in time order, forever: each camera every window, the pump
    score every second, the heartbeat every 5 s, every stream on its own phase (no site-wide bursts)."""
    streams = [(m, kind) for m in machines for kind in [f"c{c}" for c in range(CAMERAS)] + ["pump", "hb"]]
    periods = {"pump": PUMP_PERIOD_S, "hb": HEARTBEAT_PERIOD_S}
    tick = tick_s(window_s)
    due = [(t0 + periods.get(kind, tick) * i / len(streams), i, m, kind) for i, (m, kind) in enumerate(streams)]
    heapq.heapify(due)
    while due:
        when, i, m, kind = heapq.heappop(due)
        yield when, m, kind
        heapq.heappush(due, (when + periods.get(kind, tick), i, m, kind))


def site_msg_per_s(machines: int, window_s: float) -> float:
    """Messages per second the schedule makes for ``machines``."""
    return machines * (CAMERAS / tick_s(window_s) + 1.0 / PUMP_PERIOD_S + 1.0 / HEARTBEAT_PERIOD_S)


class SiteMessages:
    """What an edge agent sends, made for a machine's stream at a time (the simulator and the replay share it)."""

    def __init__(self, site: str, window_s: float, seed: int = 0) -> None:
        self.site = site
        self.frames_per_message = max(1, round(tick_s(window_s) * FPS))
        self.frames = 0
        self._seq = 0
        self._rng = np.random.default_rng(seed)

    def make(self, machine: str, stream: str, now: float) -> Envelope:
        if stream == "pump":
            return self.anomaly(machine, now)
        if stream == "hb":
            return Heartbeat(site=self.site, machine=machine, ts=now, uptime_s=1.0)
        return self.result(machine, stream, now)

    def result(self, machine: str, camera: str, now: float) -> Result:
        count = self.frames_per_message
        frames = []
        for k in range(count):
            ratio = float(self._rng.random() < 0.03) * 0.1
            output = ModelOutput(model="seg", version="1", latency_ms=float(self._rng.uniform(5, 9)), defect_ratio=ratio)
            frames.append(FrameResult(seq=self._seq + k, ts=now - (count - 1 - k) / FPS, outputs=[output]))
        self._seq += count
        self.frames += count
        return Result(site=self.site, machine=machine, camera=camera, ts=frames[0].ts, frames=frames)

    def anomaly(self, machine: str, now: float) -> Anomaly:
        scores = {name: float(v) for name, v in zip(SENSOR_CHANNELS, self._rng.random(len(SENSOR_CHANNELS)))}
        score = max(scores.values())
        return Anomaly(site=self.site, machine=machine, ts=now, group="pump", seq=int(now), model="lstm", version="1",
                       score=score, threshold=1.2, is_anomaly=score >= 1.2, channel_scores=scores)


class SiteSimulator:
    """Publishes what ``machines`` edge agents would, on the wall clock, from one thread."""

    def __init__(self, broker: MosquittoBroker, window_s: float) -> None:
        self.client = MqttClient(MqttSettings(host=broker.host, port=broker.port), client_id="bench-site")
        self.window_s = window_s
        self.messages = SiteMessages(SITE, window_s)
        self.machines: list[str] = []
        self.published = 0
        self.behind_s = 0.0
        """How late the latest message went out against its schedule (a loaded box delays the thread,
        which then catches up: a step's rate runs above the schedule's while it does)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def frames(self) -> int:
        return self.messages.frames

    def start(self) -> None:
        self.client.start()
        self.client.wait_connected()
        self._thread = threading.Thread(target=self._run, name="bench-site", daemon=True)
        self._thread.start()

    def set_machines(self, count: int) -> None:
        with self._lock:
            self.machines = machine_ids(count)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        self.client.stop()

    def _run(self) -> None:
        schedule: Iterator[tuple[float, str, str]] | None = None
        running: list[str] = []
        when, machine, stream = 0.0, "", ""
        while not self._stop.is_set():
            with self._lock:
                machines = list(self.machines)
            if machines != running:
                running, schedule = machines, site_schedule(machines, self.window_s, time.time())
                when, machine, stream = next(schedule, (math.inf, "", ""))
            now = time.time()
            while when <= now and schedule is not None:
                self.behind_s = now - when
                self._publish(self.messages.make(machine, stream, now))
                when, machine, stream = next(schedule)
            self._stop.wait(min(0.005, max(0.0, when - now)) if when < math.inf else 0.05)

    def _publish(self, message: Envelope) -> None:
        while self.client.publish(topic_for(message), message.to_json(), qos=1).rc != 0:
            time.sleep(0.001)  # paho's in-flight window is full: wait for PUBACKs
        self.published += 1


def replay_messages(count: int, machines: int = REPLAY_MACHINES, window_s: float = 0.2,
                    end_ts: float | None = None) -> list[Envelope]:
    """``count`` messages of the site's schedule, in time order, the newest at ``end_ts`` (now)."""
    end_ts = time.time() if end_ts is None else end_ts
    t0 = end_ts - count / site_msg_per_s(machines, window_s)
    maker = SiteMessages(REPLAY_SITE, window_s, seed=2)
    schedule = site_schedule(machine_ids(machines), window_s, t0)
    return [maker.make(m, stream, when) for (when, m, stream), _ in zip(schedule, range(count))]


# --- processes and measurements ---------------------------------------------------------------


class Process:
    """A bridge, worker or rules runner as a child process, with its metrics endpoint."""

    def __init__(self, name: str, args: list[str], workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log = (workdir / f"{name}.log").open("ab")
        self.proc = subprocess.Popen([*EDGELINE, *args, "--metrics-port", str(self.port), "--log-level", "warning"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _cpu(process: psutil.Process) -> float:
    """CPU seconds of this process alone (the brokers and services are children of the bench)."""
    try:
        times = process.cpu_times()
        return times.user + times.system
    except psutil.Error:
        return 0.0


def _sum(metrics: dict[str, float], prefix: str, label: str = "") -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix) and label in k)


def _latency_buckets(workers: list[Process], histogram: str = "event") -> dict[float, float]:
    """Cumulative counts of the workers' result latency histogram, by upper bound (seconds)."""
    buckets: dict[float, float] = {}
    for worker in workers:
        for key, value in worker.metrics().items():
            if key.startswith(f"edgeline_worker_{histogram}_latency_seconds_bucket") and 'kind="result"' in key:
                bound = key.split('le="')[1].split('"')[0]
                upper = float("inf") if bound == "+Inf" else float(bound)
                buckets[upper] = buckets.get(upper, 0.0) + value
    return buckets


def _quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """histogram_quantile over the step's bucket increments (linear inside a bucket), in ms."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower * 1000.0
            inside = cumulative - below
            return (lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)) * 1000.0
        lower, below = bound, cumulative
    return float("nan")


def _ms(before: dict[float, float], after: dict[float, float], q: float) -> int | str | None:
    """A quantile in whole ms; ``">N"`` when it lies beyond the histogram's largest bound (N ms)."""
    value = _quantile(before, after, q)
    if math.isnan(value):
        return None
    top = max((b for b in after if b != float("inf")), default=0.0) * 1000.0
    return f">{top:.0f}" if value >= top else round(value)


class LagProbe:
    """A consumer group's lag (end offsets - committed) on some topics, over one admin connection."""

    def __init__(self, bootstrap: str, group: str, topics: list[str]) -> None:
        self.group = group
        self.topics = topics
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-lag")
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="bench-lag-end")

    def lag(self) -> int:
        return sum(self.by_topic().values())

    def by_topic(self) -> dict[str, int]:
        committed = self.admin.list_group_offsets(self.group).get(self.group, {})
        partitions = [TopicPartition(t, p) for t in self.topics for p in self.consumer.partitions_for_topic(t) or []]
        lags = dict.fromkeys(self.topics, 0)
        for tp, end in self.consumer.end_offsets(partitions).items():
            lags[tp.topic] += int(end - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0))
        return lags

    def close(self) -> None:
        self.admin.close()
        self.consumer.close()


def worker_input_topics(topics: KafkaTopics) -> list[str]:
    return [topics.for_kind("result"), topics.for_kind("anomaly"), topics.for_kind("heartbeat"),
            topics.line_observations]


def embedded_engine_rate(seconds: float = 5.0) -> dict[str, Any]:
    """The rules engine alone on one core: single-frame results from 50 machines x 4 cameras."""
    engine = RulesEngine(rule_configs(), lines={m: "L1" for m in machine_ids(50)})
    rng = np.random.default_rng(1)
    messages = []
    for i in range(20_000):
        machine_id, camera = f"m{1 + i % 50:02d}", f"c{(i // 50) % CAMERAS}"
        ts = 1_760_000_000.0 + i / 3000.0
        output = ModelOutput(model="seg", version="1", latency_ms=6.0, defect_ratio=float(rng.random() < 0.03) * 0.1)
        messages.append(Result(site=SITE, machine=machine_id, camera=camera, ts=ts,
                               frames=[FrameResult(seq=i, ts=ts, outputs=[output])]))
    done, started, wall0 = 0, time.process_time(), time.monotonic()
    while time.process_time() - started < seconds:
        for message in messages:
            engine.process(message.model_copy(update={"msg_id": f"{message.msg_id}-{done}"}))
            done += 1
    return in_process_row("engine alone, single-frame results", done, time.process_time() - started,
                          time.monotonic() - wall0)


def replay_engine_rate(messages: list[Envelope], window_s: float) -> list[dict[str, Any]]:
    """The worker's own work without Kafka, on the replay's messages (its peer, like for
    like: multi-frame results): the engine on parsed messages, then parse + engine from the bytes."""
    wire = [m.to_json() for m in messages]
    rows = []
    for what, timed in (("parsed", lambda engine: [engine.process(m) for m in messages]),
                        ("from bytes", lambda engine: [engine.process(parse_message(b)) for b in wire])):
        engine = RulesEngine(rule_configs(), lines=machine_lines(REPLAY_MACHINES))
        started, wall0 = time.process_time(), time.monotonic()
        timed(engine)
        rows.append(in_process_row(f"engine on the replay, {what} ({window_s * FPS:.0f}-frame results)",
                                   len(messages), time.process_time() - started, time.monotonic() - wall0))
    return rows


def bare_consumer_rate(bootstrap: str, topics: KafkaTopics, partitions: int, expected: int,
                       timeout_s: float = 300.0) -> dict[str, Any]:
    """The worker's peer, bare, in this process: an aiokafka consumer (no group, every
    partition of the replay's input topics from the start, batches of up to 1,000) parsing each
    record and feeding one in-memory engine of all scopes. No state writes, outputs or commits: an
    upper bound for a Kafka worker of this engine, which shows what its tables, outputs and commits cost.
    Fetches are small (64 KB per partition) so that the partitions interleave as in a live
    stream; line rules still see other partitions' records late, and a late observation is
    dropped early, which makes this row cheaper per message (``late_observations``)."""
    import asyncio

    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition as AioPartition

    engine = RulesEngine(rule_configs(), lines=machine_lines(REPLAY_MACHINES))

    async def consume() -> tuple[int, float, float]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", max_partition_fetch_bytes=64 * 1024)
        await consumer.start()
        try:
            names = [topics.for_kind(kind) for kind in ("result", "anomaly", "heartbeat")]
            consumer.assign([AioPartition(name, p) for name in names for p in range(partitions)])
            done, deadline = 0, time.monotonic() + timeout_s
            cpu0 = wall0 = None
            while done < expected and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=100, max_records=1000)
                if cpu0 is None and batches:
                    cpu0, wall0 = time.process_time(), time.monotonic()
                for records in batches.values():
                    for record in records:
                        engine.process(parse_message(record.value))
                    done += len(records)
            if cpu0 is None or wall0 is None:
                raise RuntimeError(f"the bare consumer read no record of {names} in {timeout_s:g} s")
            return done, time.process_time() - cpu0, time.monotonic() - wall0
        finally:
            await consumer.stop()

    done, cpu, wall = asyncio.run(consume())
    return in_process_row("bare aiokafka consumer + parse + engine (no state, outputs, commits)", done, cpu, wall) | {
        "observations": engine.stats.observations, "late_observations": engine.stats.late}


def site_config(path: Path, site: str, machines: int, mosquitto: MosquittoBroker, kafka: KafkaBroker,
                prefix: str, workers: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({
        "site": site, "broker": {"host": mosquitto.host, "port": mosquitto.port},
        "machines": [{"id": m, "line": line} for m, line in machine_lines(machines).items()],
        "rules": RULES,
        "stream": {"kafka": kafka.bootstrap, "topic_prefix": prefix, "partitions": 4,
                   **({"workers": workers} if workers else {})},
    }))
    return path


def start_profile(pid: int, out: Path, seconds: float | None = None) -> subprocess.Popen[bytes] | None:
    """py-spy on a process (collapsed stacks in ``out``) until ``seconds`` or SIGINT; None without py-spy."""
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        print(f"no py-spy next to {sys.executable}: no profile (pip install py-spy)", flush=True)
        return None
    log = out.with_suffix(".log").open("wb")
    duration = ["--duration", str(int(seconds))] if seconds else []
    return subprocess.Popen([str(py_spy), "record", "--pid", str(pid), *duration, "--rate", "50",
                             "--format", "raw", "--nonblocking", "--output", str(out)], stdout=log, stderr=log)


def stop_profile(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is None:
        return
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()


def summarize_profile(path: Path, top: int = 12) -> list[tuple[str, float]]:
    """Share of samples by the innermost frame of our code or of the library it sits in."""
    by_place: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        leaf = frames[-1]
        place = leaf.split(" (")[1].split(":")[0] if " (" in leaf else leaf
        place = place.split("site-packages/")[-1].split("/")[0] if "site-packages/" in place else place
        key = f"{leaf.split(' (')[0]} [{place}]"
        by_place[key] = by_place.get(key, 0) + int(count)
    return [(k, 100.0 * v / max(total, 1)) for k, v in sorted(by_place.items(), key=lambda kv: -kv[1])[:top]]


PROFILE_PLACES = ("stream/rules.py", "stream/batches.py", "stream/tables.py", "stream/line_records.py",
                  "stream/messages.py", "pydantic", "json", "orjson", "aiokafka", "kafka", "prometheus_client",
                  "selectors")
"""Modules and libraries whose inclusive share of the samples is printed (the worker's module, at
the root of every stack, is left out)."""


def summarize_profile_inclusive(path: Path, places: tuple[str, ...] = PROFILE_PLACES) -> list[tuple[str, float]]:
    """Share of samples with a frame in each of ``places`` anywhere on the stack (inclusive time):
    a path like ``stream/rules.py``, or a library (``pydantic``: ``pydantic/...`` or ``pydantic.py``)."""
    hits = dict.fromkeys(places, 0)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        files = ["/" + f.split(" (")[1].rsplit(":", 1)[0] if " (" in f else "" for f in stack.split(";")]
        for place in places:
            needles = (f"/{place}",) if "/" in place else (f"/{place}/", f"/{place}.py")
            if any(needle in f for f in files for needle in needles):
                hits[place] += int(count)
    return [(p, 100.0 * n / max(total, 1)) for p, n in sorted(hits.items(), key=lambda kv: -kv[1]) if n]


def _wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench.central: {what} after {timeout:.0f} s")
        time.sleep(POLL_S)


class Drain:
    """Measures one process draining a known amount of input: from its first consumed message
    (wall time and its CPU seconds then) until ``done()``."""

    def __init__(self, process: Process, consumed: Any) -> None:
        self.process = process
        self.consumed = consumed
        self.t_first = self.cpu_first = 0.0
        self.first_count = 0.0

    def run(self, expected: float, done: Any, timeout: float, on_first: Any = None) -> dict[str, Any]:
        """``on_first()`` is called once the first message is consumed (e.g. to start a profiler)."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.consumed(self.process.metrics())
            if count > 0:
                self.t_first, self.cpu_first, self.first_count = time.monotonic(), _cpu(self.process.ps), count
                if on_first is not None:
                    on_first()
                break
            if self.process.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bench.central: {self.process.name} consumed nothing (see its log)")
            time.sleep(POLL_S / 4)
        while not done():
            if time.monotonic() > deadline:
                break
            time.sleep(DRAIN_POLL_S)
        wall = time.monotonic() - self.t_first
        cpu = _cpu(self.process.ps) - self.cpu_first
        counted = self.consumed(self.process.metrics()) - self.first_count
        return {"messages": int(expected), "timed_out": time.monotonic() > deadline, "wall_s": round(wall, 2),
                "measured_messages": int(counted), "msg_per_s": round(counted / wall) if wall else None,
                "cpu_s": round(cpu, 2), "cpu_pct": round(100.0 * cpu / wall) if wall else None,
                "msg_per_core_s": round(counted / cpu) if cpu else None}


def kafka_replay(messages: list[Envelope], kafka: KafkaBroker, mosquitto: MosquittoBroker, workdir: Path,
                 workers: dict[str, Any], profile_dir: Path | None, timeout: float = 600.0) -> list[dict[str, Any]]:
    """Pre-fill the topics; the bare consumer on them (:func:`bare_consumer_rate`), then one
    worker on them alone: its rate and CPU until the lag is 0."""
    prefix = f"replay{int(time.time())}"
    config = site_config(workdir / "replay.yaml", REPLAY_SITE, REPLAY_MACHINES, mosquitto, kafka, prefix, workers)
    topics = KafkaTopics(prefix)
    ensure_topics(kafka.bootstrap, topics, REPLAY_PARTITIONS, 1)
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, linger_ms=20, batch_size=512 * 1024, acks=1,
                             client_id="bench-replay")
    started = time.monotonic()
    for message in messages:
        producer.send(topics.for_message(message), key=message.machine.encode(), value=message.to_json(),
                      timestamp_ms=int(message.ts * 1000))
    producer.flush()
    producer.close()
    print(f"replay: {len(messages):,} messages produced to Kafka in {time.monotonic() - started:.1f} s", flush=True)
    bare = bare_consumer_rate(kafka.bootstrap, topics, REPLAY_PARTITIONS, len(messages))
    input_topics = [topics.for_kind(k) for k in ("result", "anomaly", "heartbeat")]
    probe = LagProbe(kafka.bootstrap, worker_group(prefix, REPLAY_SITE), [*input_topics, topics.line_observations])
    kafka_ps = psutil.Process(kafka.pid)
    worker = Process("replay-worker", ["stream", "worker", "-c", str(config)], workdir)
    spy: list[subprocess.Popen[bytes] | None] = [None]
    kafka0 = [0.0]

    def first_record() -> None:
        kafka0[0] = _cpu(kafka_ps)
        if profile_dir is not None:  # from the first record on: the worker's start-up is not in the profile
            spy[0] = start_profile(worker.proc.pid, profile_dir / "replay-worker.txt")

    try:
        consumed = lambda m: sum(_sum(m, "edgeline_worker_messages_total", f'topic="{t}"') for t in input_topics)
        row = Drain(worker, consumed).run(
            len(messages), lambda: consumed(worker.metrics()) >= len(messages) and probe.lag() == 0, timeout,
            on_first=first_record)
        kafka_cpu = _cpu(kafka_ps) - kafka0[0]
        stop_profile(spy[0])
        spy[0] = None
        worker_metrics = worker.metrics()
        row.update({"runner": "Kafka worker (1 process)", "broker_cpu_pct": round(100 * kafka_cpu / row["wall_s"]),
                    "batches": _sum(worker_metrics, "edgeline_worker_batch_records_count") or None,
                    "emitted": int(_sum(worker_metrics, "edgeline_worker_emitted_total")),
                    "dead_letters": int(_sum(worker_metrics, "edgeline_worker_dead_lettered_total"))})
        return [bare, row]
    finally:
        stop_profile(spy[0])
        worker.stop()
        probe.close()


def embedded_replay(messages: list[Envelope], mosquitto: MosquittoBroker, kafka: KafkaBroker, workdir: Path,
                    timeout: float = 600.0) -> dict[str, Any]:
    """The same messages queued in Mosquitto for the embedded runner's persistent session, then the
    runner started on them: its rate and CPU until it has evaluated them all."""
    config = site_config(workdir / "embedded.yaml", REPLAY_SITE, REPLAY_MACHINES, mosquitto, kafka, "unused", {})
    inputs = [m for m in messages if m.KIND in ("result", "anomaly")]  # the runner subscribes to these only
    args = ["stream", "embedded", "-c", str(config)]
    first = Process("embedded-setup", args, workdir)  # makes the persistent session and its subscriptions
    try:
        _wait_until(lambda: bool(first.metrics()), 60, "the embedded runner's metrics did not answer")
        time.sleep(2.0)  # connected and subscribed (the runner subscribes on connect)
    finally:
        first.stop()
    client = MqttClient(MqttSettings(host=mosquitto.host, port=mosquitto.port), client_id="bench-replay")
    client.start()
    client.wait_connected()
    started = time.monotonic()
    try:
        for start in range(0, len(inputs), REPLAY_CHUNK):  # paho refuses a queue of 100k at once
            infos = [client.publish(topic_for(m), m.to_json(), qos=1) for m in inputs[start:start + REPLAY_CHUNK]]
            _wait_until(lambda: infos[-1].is_published() and all(info.is_published() for info in infos), timeout,
                        "Mosquitto did not acknowledge the replay")
    finally:
        client.stop()
    print(f"replay: {len(inputs):,} messages queued in Mosquitto in {time.monotonic() - started:.1f} s", flush=True)
    mosquitto_ps = psutil.Process(mosquitto.pid)
    runner = Process("embedded", args, workdir)
    try:
        seen = lambda m: (_sum(m, "edgeline_rules_messages_total") + _sum(m, "edgeline_rules_dead_lettered_total")
                          + _sum(m, "edgeline_rules_duplicates_total"))
        mosquitto0 = [0.0]
        row = Drain(runner, seen).run(len(inputs), lambda: seen(runner.metrics()) >= len(inputs), timeout,
                                      on_first=lambda: mosquitto0.__setitem__(0, _cpu(mosquitto_ps)))
        mosquitto_cpu = _cpu(mosquitto_ps) - mosquitto0[0]
        metrics = runner.metrics()
        row.update({"runner": "embedded runner (MQTT)", "broker_cpu_pct": round(100 * mosquitto_cpu / row["wall_s"]),
                    "emitted": int(_sum(metrics, "edgeline_rules_emitted_total")),
                    "dead_letters": int(_sum(metrics, "edgeline_rules_dead_lettered_total"))})
        return row
    finally:
        runner.stop()
        _forget_session(mosquitto, f"rules-{REPLAY_SITE}")


def _forget_session(mosquitto: MosquittoBroker, client_id: str) -> None:
    """Connect once with a clean session: Mosquitto drops the persistent one (no more queueing for it)."""
    client = MqttClient(MqttSettings(host=mosquitto.host, port=mosquitto.port), client_id=client_id,
                        clean_session=True)
    client.start()
    try:
        client.wait_connected()
    finally:
        client.stop()


# --- the live site ----------------------------------------------------------------------------


def settle(probe: LagProbe, msg_per_s: float, timeout: float = 180.0) -> None:
    """Wait until the step-up's backlog has drained (it would be measured as latency): the lag
    under ``SETTLED_S`` of input in ``SETTLE_SAMPLES`` samples in a row, 2 s apart. A lag that
    keeps up still swings by about a second of input, the worker committing once a second."""
    deadline, below = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and below < SETTLE_SAMPLES:
        below = below + 1 if probe.lag() <= SETTLED_S * msg_per_s else 0
        time.sleep(2.0)


def run_step(machines: int, seconds: float, site: SiteSimulator, bridge: Process, workers: list[Process],
             kafka: KafkaBroker, mosquitto_ps: psutil.Process, probe: LagProbe, window_ms: float,
             topics: KafkaTopics) -> dict[str, Any]:
    """One step of the live site. Each process's CPU per 1k msg/s is over what it handled: the
    site and Mosquitto the MQTT messages, the bridge and Kafka the records the bridge produced,
    each worker the input records (results, anomalies, heartbeats) it consumed; so a worker that
    falls behind is not credited with work it did not do."""
    inputs = [topics.for_kind(k) for k in ("result", "anomaly", "heartbeat")]

    def worker_inputs(metrics: dict[str, float]) -> float:
        return sum(_sum(metrics, "edgeline_worker_messages_total", f'topic="{t}"') for t in inputs)

    site.set_machines(machines)
    time.sleep(10.0)  # reach the new rate before measuring
    settle(probe, site_msg_per_s(machines, window_ms / 1000.0))
    me, kafka_ps = psutil.Process(), psutil.Process(kafka.pid)
    processes = {"site": me, "mosquitto": mosquitto_ps, "bridge": bridge.ps, "kafka": kafka_ps,
                 **{w.name: w.ps for w in workers}}
    cpu0 = {name: _cpu(p) for name, p in processes.items()}
    published0, frames0, behind0 = site.published, site.frames, site.behind_s
    bridge0 = bridge.metrics()
    workers0 = [w.metrics() for w in workers]
    lat0, pipe0 = _latency_buckets(workers), _latency_buckets(workers, "pipeline")
    t0 = time.monotonic()
    samples = [(0.0, float(probe.lag()))]
    while time.monotonic() - t0 < seconds:
        time.sleep(min(2.0, max(0.0, seconds - (time.monotonic() - t0))))
        samples.append((time.monotonic() - t0, float(probe.lag())))
    elapsed = time.monotonic() - t0
    cpu = {name: _cpu(p) - cpu0[name] for name, p in processes.items()}
    bridge1 = bridge.metrics()
    workers1 = [w.metrics() for w in workers]
    lat1, pipe1 = _latency_buckets(workers), _latency_buckets(workers, "pipeline")
    consumed = sum(_sum(b, "edgeline_worker_messages_total") - _sum(a, "edgeline_worker_messages_total")
                   for a, b in zip(workers0, workers1))
    lag_by_topic = probe.by_topic()
    trend: LagTrend = lag_trend(samples)
    mqtt_rate = (site.published - published0) / elapsed
    kafka_rate = (_sum(bridge1, "edgeline_bridge_kafka_produced_total")
                  - _sum(bridge0, "edgeline_bridge_kafka_produced_total")) / elapsed
    handled = {"site": mqtt_rate, "mosquitto": mqtt_rate, "bridge": kafka_rate, "kafka": kafka_rate,
               **{w.name: (worker_inputs(b) - worker_inputs(a)) / elapsed for w, a, b in zip(workers, workers0, workers1)}}
    return {
        "machines": machines, "workers": len(workers), "window_ms": window_ms, "seconds": round(elapsed, 1),
        "frames_per_s": round((site.frames - frames0) / elapsed),
        "mqtt_msg_per_s": round(mqtt_rate), "scheduled_msg_per_s": round(site_msg_per_s(machines, window_ms / 1000.0)),
        "site_behind_s": [round(behind0, 3), round(site.behind_s, 3)],
        "kafka_rec_per_s": round(kafka_rate),
        "worker_in_per_s": round(sum(v for k, v in handled.items() if k.startswith("worker"))),
        "worker_msg_per_s": round(consumed / elapsed),
        "p50_ms": _ms(lat0, lat1, 0.5), "p99_ms": _ms(lat0, lat1, 0.99),
        "pipeline_p50_ms": _ms(pipe0, pipe1, 0.5), "pipeline_p99_ms": _ms(pipe0, pipe1, 0.99),
        "lag_start": trend.start, "lag_end": trend.end, "lag_slope": round(trend.slope, 2),
        "lag_slope_stderr": round(trend.stderr, 2), "lag_grows": trend.grows, "lag_samples": samples,
        "lag_end_by_topic": lag_by_topic,
        "dead_letters": int(_sum(bridge1, "edgeline_bridge_dead_lettered_total")
                            + sum(_sum(w, "edgeline_worker_dead_lettered_total") for w in workers1)),
        "cpu": {name: {"cpu_s": round(s, 2), "cpu_pct": round(100.0 * s / elapsed), "msg_per_s": round(handled[name]),
                       "cores_per_1k": round(cores_per_1k(s, elapsed, handled[name]), 4)} for name, s in cpu.items()},
        "components_per_1k": {name: round(v, 4) for name, v in components_per_1k(
            {name: {"cpu_s": s, "msg_per_s": handled[name]} for name, s in cpu.items()}, elapsed).items()},
    }


def site_rows(seconds: float, machine_steps: tuple[int, ...], window_ms: float, worker_count: int,
              mosquitto: MosquittoBroker, kafka: KafkaBroker, workdir: Path, workers_settings: dict[str, Any],
              profile_dir: Path | None) -> list[dict[str, Any]]:
    prefix = f"bench{int(time.time())}"
    topics = KafkaTopics(prefix)
    config = site_config(workdir / "site.yaml", SITE, max(machine_steps), mosquitto, kafka, prefix, workers_settings)
    bridge = Process("bridge", ["stream", "bridge", "-c", str(config)], workdir)
    workers = [Process(f"worker{i}", ["stream", "worker", "-c", str(config)],
                       workdir) for i in range(1, worker_count + 1)]
    site = SiteSimulator(mosquitto, window_ms / 1000.0)
    probe: LagProbe | None = None
    rows = []
    try:
        _wait_until(lambda: all(p.metrics() for p in (bridge, *workers)), 120, "bridge/workers metrics did not answer")
        probe = LagProbe(kafka.bootstrap, worker_group(prefix, SITE), worker_input_topics(topics))
        site.start()
        site.set_machines(1)  # a trickle until the group consumes: a cold worker's start is no backlog to measure
        _wait_until(lambda: sum(_sum(w.metrics(), "edgeline_worker_messages_total") for w in workers) > 0, 180,
                    "the workers consumed nothing of one machine's messages")
        for machines in machine_steps:
            spies = []
            if profile_dir is not None and machines == machine_steps[-1]:
                spies = [start_profile(workers[0].proc.pid, profile_dir / "site-worker1.txt", seconds),
                         start_profile(bridge.proc.pid, profile_dir / "site-bridge.txt", seconds)]
            rows.append(run_step(machines, seconds, site, bridge, workers, kafka, psutil.Process(mosquitto.pid),
                                 probe, window_ms, topics))
            for spy in spies:
                stop_profile(spy)
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "lag_samples"}), flush=True)
    finally:
        site.stop()
        for process in [*workers, bridge]:
            process.stop()
        if probe is not None:
            probe.close()
    return rows


# --- output -----------------------------------------------------------------------------------


def print_profiles(profile_dir: Path, console: Console) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in ("replay-worker", "site-worker1", "site-bridge"):
        path = profile_dir / f"{name}.txt"
        if not path.is_file() or not path.read_text().strip():
            console.print(f"{name}: no profile (see {path.with_suffix('.log')})", markup=False, highlight=False)
            continue
        top, inclusive = summarize_profile(path), summarize_profile_inclusive(path)
        found[name] = {"innermost": top, "inclusive": inclusive}
        console.print(f"{name}: where the samples are (py-spy, innermost frame)", markup=False, highlight=False)
        for place, share in top:
            console.print(f"  {share:5.1f}%  {place}", markup=False, highlight=False, soft_wrap=True)
        console.print(f"{name}: samples with a frame in (inclusive)", markup=False, highlight=False)
        for place, share in inclusive:
            console.print(f"  {share:5.1f}%  {place}", markup=False, highlight=False)
    return found


def main(seconds: float = typer.Option(60.0, help="measured seconds per site step"),
         machines: str = typer.Option("50", help="site steps, e.g. 10,25,50"),
         window_ms: float = typer.Option(200.0, help="edge grouping of results per camera (0: one message per frame)"),
         workers: int = typer.Option(1, help="workers in the site run"),
         replay: int = typer.Option(100_000, help="messages in the replay (0: no replay rows)"),
         embedded: bool = typer.Option(True, help="the embedded runner on the same replay"),
         site: bool = typer.Option(True, help="the live site rows"),
         batch_max: int | None = typer.Option(None, help="stream.workers.batch_max for the workers (default: the site default)"),
         batch_ms: float | None = typer.Option(None, help="stream.workers.batch_ms for the workers"),
         profile_to: Path | None = typer.Option(None, help="py-spy the replay worker, the site's first worker and its "
                                                  "bridge into DIR"),
         workdir: Path | None = typer.Option(None, help="keep the processes' logs, configs and Kafka data here "
                                             "(default: a temp folder, removed)"),
         out: Path | None = typer.Option(None, help="JSON results (default bench/results/central.json)")) -> None:
    """Replay rows (Kafka worker, embedded runner), the live site, CPU per process and a projection."""
    steps = tuple(int(m) for m in machines.split(",") if m)
    workers_settings = {k: v for k, v in (("batch_max", batch_max), ("batch_ms", batch_ms)) if v is not None}
    if profile_to is not None:
        profile_to.mkdir(parents=True, exist_ok=True)
    console = Console()
    replay_rows: list[dict[str, Any]] = [embedded_engine_rate()]
    print(json.dumps(replay_rows[-1]), flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-central-") as tmp:
        workdir = Path(tmp) if workdir is None else workdir
        workdir.mkdir(parents=True, exist_ok=True)
        with MosquittoBroker(max_queued_messages=max(100_000, replay + 10_000)) as mosquitto, \
                KafkaBroker(workdir / "kafka", heap="1g", fast_start=False) as kafka:
            if replay > 0:
                messages = replay_messages(replay, window_s=window_ms / 1000.0)
                for row in replay_engine_rate(messages, window_ms / 1000.0):
                    replay_rows.append(row)
                    print(json.dumps(row), flush=True)
                for row in kafka_replay(messages, kafka, mosquitto, workdir, workers_settings, profile_to):
                    replay_rows.append(row)
                    print(json.dumps(row), flush=True)
                if embedded:
                    replay_rows.append(embedded_replay(messages, mosquitto, kafka, workdir))
                    print(json.dumps(replay_rows[-1]), flush=True)
                del messages
            if site and steps:
                rows = site_rows(seconds, steps, window_ms, workers, mosquitto, kafka, workdir, workers_settings,
                                 profile_to)
    result: dict[str, Any] = {"benchmark": "central", "machine": machine(), "replay": replay_rows, "site": rows}
    print_table(replay_table(replay_rows), console)
    if rows:
        largest = rows[-1]
        cpu_rows = [{"process": name, **values} for name, values in largest["cpu"].items()]
        per_machine = site_msg_per_s(1, window_ms / 1000.0)  # the schedule's mix (a step's measured rate runs
        # above it while the simulator catches up after a stall on a loaded box)
        plan = projection(per_machine, largest["components_per_1k"])
        result["projection"] = {
            "assumption": f"the simulated per-machine mix ({per_machine:.1f} msg/s per machine: {CAMERAS} cameras x "
                          f"{FPS:g} fps grouped per {window_ms:g} ms, pump 1 Hz, heartbeat 5 s), each component's "
                          f"CPU per 1k msg/s it handled in the {largest['machines']}-machine step (workers pooled), "
                          "linear in site msg/s, workers at "
                          "<= 70% of a core each, partitions a multiple of the workers (>= 2 per worker, >= 4)",
            "rows": plan, "measured_msg_per_s_per_machine": round(largest["mqtt_msg_per_s"] / largest["machines"], 2)}
        print_table(site_rates_table(rows), console)
        print_table(site_latency_table(rows), console)
        print_table(cpu_table(cpu_rows), console)
        print_table(projection_table(plan), console)
        console.print("projection: " + result["projection"]["assumption"], markup=False, highlight=False,
                      soft_wrap=True)
    if profile_to is not None:
        result["profiles"] = print_profiles(profile_to, console)
    notes = ("replay msg/s: messages / wall time from the first consumed record until all are consumed and the "
             "group's lag (inputs and line-observations) is 0; msg/s per core: messages / that process's CPU s over "
             "the same span; broker CPU %: Kafka (worker) or Mosquitto (embedded) over it. Site: frame p50/p99 from "
             "a frame's capture ts to its evaluation in the worker (edge grouping included), pipe p50/p99 from the "
             "message's send; lag sampled every 2 s, slope by least squares (+/-: its standard error; 'grows' when "
             "above twice that and 1 rec/s). CPU %: of one core. "
             f"Target: >= 10,000 msg/s per worker core on the replay. os cores: {os.cpu_count()}")
    console.print(notes, markup=False, highlight=False, soft_wrap=True)
    result["notes"] = notes
    path = out or RESULTS / "central.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)


if __name__ == "__main__":
    typer.run(main)
