"""Can this box decide on a whole site? A simulated site publishing to a real Mosquitto -> the
bridge -> a real Kafka -> Faust worker(s), each a real process, at 10, 25 and 50 machines.

    python -m bench.central [--seconds 60] [--machines 10,25,50] [--window-ms 200] [--workers 1] [--two-workers]

Every machine has 4 cameras at 15 fps, results grouped per camera per ``--window-ms`` at the edge
(0: one message per frame), and one sensor group of 8 channels scored at 1 Hz, plus a heartbeat
every 5 s. Per step: offered frames/s, MQTT messages/s published, records/s the bridge got
acknowledged by Kafka, messages and observations/s the worker(s) consumed, p50/p99 latency from a
frame's capture ``ts`` to its rule evaluation in the worker, consumer lag at the end of the step,
and CPU per process. In the same run: the embedded rules engine's max messages/s on one core
(the anchor: eKuiper filters 12k msg/s on a Raspberry Pi 3B+). Needs Mosquitto and the Kafka jars.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import typer
import yaml
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from bench.report import report
from edgeline.services import KafkaBroker, MosquittoBroker, free_port, scrape_metrics
from stream.messages import Anomaly, FrameResult, Heartbeat, ModelOutput, Result
from stream.mqtt import MqttClient, MqttSettings
from stream.rule_config import RuleConfig
from stream.rules import RulesEngine
from stream.topics import KafkaTopics, topic_for

SITE = "benchsite"
CAMERAS = 4
FPS = 15.0
SENSOR_CHANNELS = [f"ch{i}" for i in range(8)]
EDGELINE = [sys.executable, "-m", "edgeline.cli"]
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


class SiteSimulator:
    """Publishes what ``machines`` edge agents would, on the wall clock, from one thread."""

    def __init__(self, broker: MosquittoBroker, window_s: float) -> None:
        self.client = MqttClient(MqttSettings(host=broker.host, port=broker.port), client_id="bench-site")
        self.window_s = window_s
        self.machines: list[str] = []
        self.published = 0
        self.frames = 0
        self._rng = np.random.default_rng(0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

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
        """Each camera sends on its own phase of the window and each machine its sensor score and
        heartbeat on its own phase of the second, as unsynchronised machines do (no site-wide bursts)."""
        tick = self.window_s if self.window_s > 0 else 1.0 / FPS
        frames_per_message = max(1, round(tick * FPS))
        due: dict[tuple[str, str], float] = {}
        seq = 0
        while not self._stop.is_set():
            now = time.time()
            with self._lock:
                machines = list(self.machines)
            streams = [(m, kind) for m in machines for kind in [f"c{c}" for c in range(CAMERAS)] + ["pump", "hb"]]
            for index, key in enumerate(streams):
                period = {"pump": 1.0, "hb": 5.0}.get(key[1], tick)
                when = due.setdefault(key, now + period * index / len(streams))
                if now < when:
                    continue
                machine, kind = key
                if kind == "pump":
                    self._publish(self._anomaly(machine, now, int(now)))
                elif kind == "hb":
                    self._publish(Heartbeat(site=SITE, machine=machine, ts=now, uptime_s=1.0))
                else:
                    self._publish(self._result(machine, kind, seq, now, frames_per_message))
                    seq += frames_per_message
                due[key] = max(when + period, now)
            self._stop.wait(0.005)

    def _result(self, machine: str, camera: str, seq: int, now: float, count: int) -> Result:
        frames = []
        for k in range(count):
            ratio = float(self._rng.random() < 0.03) * 0.1
            output = ModelOutput(model="seg", version="1", latency_ms=float(self._rng.uniform(5, 9)), defect_ratio=ratio)
            frames.append(FrameResult(seq=seq + k, ts=now - (count - 1 - k) / FPS, outputs=[output]))
        self.frames += count
        return Result(site=SITE, machine=machine, camera=camera, ts=frames[0].ts, frames=frames)

    def _anomaly(self, machine: str, now: float, seq: int) -> Anomaly:
        scores = {name: float(v) for name, v in zip(SENSOR_CHANNELS, self._rng.random(len(SENSOR_CHANNELS)))}
        score = max(scores.values())
        return Anomaly(site=SITE, machine=machine, ts=now, group="pump", seq=seq, model="lstm", version="1",
                       score=score, threshold=1.2, is_anomaly=score >= 1.2, channel_scores=scores)

    def _publish(self, message: Any) -> None:
        while self.client.publish(topic_for(message), message.to_json(), qos=1).rc != 0:
            time.sleep(0.001)  # paho's in-flight window is full: wait for PUBACKs
        self.published += 1


class Process:
    """A bridge or worker as a child process, with its metrics endpoint."""

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
        self.log.close()


def _cpu(process: psutil.Process) -> float:
    """CPU seconds of this process alone (the brokers and services are children of the bench)."""
    try:
        times = process.cpu_times()
        return times.user + times.system
    except psutil.Error:
        return 0.0


def _sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix))


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


def _lag(bootstrap: str, group: str, topics: list[str]) -> int:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-lag")
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="bench-lag-end")
    try:
        committed = admin.list_group_offsets(group).get(group, {})
        partitions = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or []]
        ends = consumer.end_offsets(partitions)
        return int(sum(end - (committed[tp].offset if tp in committed else 0) for tp, end in ends.items()))
    finally:
        admin.close()
        consumer.close()


def embedded_engine_rate(seconds: float = 5.0) -> dict[str, Any]:
    """The rules engine alone on one core: single-frame results from 50 machines x 4 cameras."""
    rules = [RuleConfig.model_validate(r) for r in RULES]
    engine = RulesEngine(rules, lines={m: "L1" for m in machine_ids(50)})
    rng = np.random.default_rng(1)
    messages = []
    for i in range(20_000):
        machine, camera = f"m{1 + i % 50:02d}", f"c{(i // 50) % CAMERAS}"
        ts = 1_760_000_000.0 + i / 3000.0
        output = ModelOutput(model="seg", version="1", latency_ms=6.0, defect_ratio=float(rng.random() < 0.03) * 0.1)
        messages.append(Result(site=SITE, machine=machine, camera=camera, ts=ts,
                               frames=[FrameResult(seq=i, ts=ts, outputs=[output])]))
    done, started = 0, time.process_time()
    while time.process_time() - started < seconds:
        for message in messages:
            engine.process(message.model_copy(update={"msg_id": f"{message.msg_id}-{done}"}))
            done += 1
    elapsed = time.process_time() - started
    return {"step": "embedded engine, 1 core", "msg_per_s": round(done / elapsed), "alerts": engine.stats.alerts}


def run_step(label: str, machines: int, seconds: float, site: SiteSimulator, bridge: Process,
             workers: list[Process], kafka: KafkaBroker, mosquitto_ps: psutil.Process, topics: KafkaTopics,
             window_ms: float) -> dict[str, Any]:
    site.set_machines(machines)
    time.sleep(10.0)  # reach the new rate before measuring
    settle_until = time.monotonic() + 120.0
    while time.monotonic() < settle_until and _lag(kafka.bootstrap, f"{topics.prefix}-worker-{SITE}",
                                                   [topics.for_kind("result"), topics.for_kind("anomaly")]) > 1000:
        time.sleep(5.0)  # a backlog from an earlier step would be measured as latency: let it drain
    me, kafka_ps = psutil.Process(), psutil.Process(kafka.pid)
    processes = {"site": me, "mosquitto": mosquitto_ps, "bridge": bridge.ps, "kafka": kafka_ps,
                 **{f"worker{i + 1}": w.ps for i, w in enumerate(workers)}}
    cpu0 = {name: _cpu(p) for name, p in processes.items()}
    published0, frames0 = site.published, site.frames
    bridge0 = bridge.metrics()
    workers0 = [w.metrics() for w in workers]
    lat0, pipe0 = _latency_buckets(workers), _latency_buckets(workers, "pipeline")
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    bridge1 = bridge.metrics()
    workers1 = [w.metrics() for w in workers]
    lat1, pipe1 = _latency_buckets(workers), _latency_buckets(workers, "pipeline")
    consumed = sum(_sum(b, "edgeline_worker_messages_total") - _sum(a, "edgeline_worker_messages_total")
                   for a, b in zip(workers0, workers1))
    row: dict[str, Any] = {
        "step": label, "machines": machines, "window_ms": window_ms,
        "frames_per_s": round((site.frames - frames0) / elapsed),
        "mqtt_msg_per_s": round((site.published - published0) / elapsed),
        "kafka_rec_per_s": round((_sum(bridge1, "edgeline_bridge_kafka_produced_total")
                                  - _sum(bridge0, "edgeline_bridge_kafka_produced_total")) / elapsed),
        "worker_msg_per_s": round(consumed / elapsed),
        "p50_ms": round(_quantile(lat0, lat1, 0.5), 1), "p99_ms": round(_quantile(lat0, lat1, 0.99), 1),
        "pipeline_p50_ms": round(_quantile(pipe0, pipe1, 0.5), 1),
        "pipeline_p99_ms": round(_quantile(pipe0, pipe1, 0.99), 1),
        "lag_end": _lag(kafka.bootstrap, f"{topics.prefix}-worker-{SITE}",
                        [topics.for_kind("result"), topics.for_kind("anomaly")]),
        "dead_letters": int(_sum(bridge1, "edgeline_bridge_dead_lettered_total")),
    }
    for name, process in processes.items():
        row[f"cpu_{name}_%"] = round(100.0 * (_cpu(process) - cpu0[name]) / elapsed)
    return row


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on a process for ``seconds`` (collapsed stacks in ``out``); runs beside the step."""
    py_spy = Path(sys.executable).with_name("py-spy")
    log = out.with_suffix(".log").open("wb")
    return subprocess.Popen([str(py_spy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "50",
                             "--format", "raw", "--nonblocking", "--output", str(out)], stdout=log, stderr=log)


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


def central_rows(seconds: float, machine_steps: tuple[int, ...], window_ms: float, two_workers: bool,
                 workdir: Path, profile_dir: Path | None = None, start_workers: int = 1) -> list[dict[str, Any]]:
    rows = [embedded_engine_rate()]
    with MosquittoBroker() as mosquitto, KafkaBroker(workdir / "kafka", heap="1g", fast_start=False) as kafka:
        topics = KafkaTopics(f"bench{int(time.time())}")
        config = workdir / "site.yaml"
        config.write_text(yaml.safe_dump({
            "site": SITE, "broker": {"host": mosquitto.host, "port": mosquitto.port},
            "machines": [{"id": m, "line": f"L{1 + i // 10}"} for i, m in enumerate(machine_ids(max(machine_steps)))],
            "rules": RULES, "stream": {"kafka": kafka.bootstrap, "topic_prefix": topics.prefix, "partitions": 4},
        }))
        bridge = Process("bridge", ["stream", "bridge", "-c", str(config)], workdir)
        workers = [Process(f"worker{i}", ["stream", "worker", "-c", str(config), "--data-dir", str(workdir / f"w{i}")],
                           workdir) for i in range(1, start_workers + 1)]
        site = SiteSimulator(mosquitto, window_ms / 1000.0)
        try:
            time.sleep(15.0)  # bridge connected, worker joined its group
            site.start()
            for machines in machine_steps:
                spies = []
                if profile_dir is not None and machines == machine_steps[-1]:
                    spies = [profile(p.proc.pid, min(30.0, seconds), profile_dir / f"{p.name}.txt")
                             for p in (bridge, workers[0])]
                rows.append(run_step(f"{machines} machines, {len(workers)} worker(s)", machines, seconds, site, bridge, workers,
                                     kafka, psutil.Process(mosquitto.pid), topics, window_ms))
                for spy in spies:
                    spy.wait(60)
                print(json.dumps(rows[-1]), flush=True)
            if two_workers and len(workers) == 1:
                workers.append(Process("worker2", ["stream", "worker", "-c", str(config), "--data-dir",
                                                   str(workdir / "w2")], workdir))
                time.sleep(20.0)  # rebalance
                rows.append(run_step(f"{machine_steps[-1]} machines, 2 workers", machine_steps[-1], seconds, site,
                                     bridge, workers, kafka, psutil.Process(mosquitto.pid), topics, window_ms))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            site.stop()
            for process in [*workers, bridge]:
                process.stop()
    return rows


def main(seconds: float = 60.0, machines: str = "10,25,50", window_ms: float = 200.0, two_workers: bool = True,
         workers: int = 1, profile_to: Path | None = None, out: Path | None = None) -> None:
    """``--profile-to DIR``: py-spy the bridge and the worker during the largest step; ``--workers``:
    how many workers run from the start; ``--two-workers``: add a second for a last step at the
    largest site."""
    steps = tuple(int(m) for m in machines.split(","))
    if profile_to is not None:
        profile_to.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-central-") as tmp:
        rows = central_rows(seconds, steps, window_ms, two_workers, Path(tmp), profile_to, workers)
    if profile_to is not None:
        for name in ("bridge", "worker1"):
            if not (profile_to / f"{name}.txt").is_file():
                print(f"{name}: no profile (see {profile_to / name}.log)")
                continue
            print(f"{name}: where the samples are (py-spy, innermost frame)")
            for place, share in summarize_profile(profile_to / f"{name}.txt"):
                print(f"  {share:5.1f}%  {place}")
    report("central", f"site -> Mosquitto -> bridge -> Kafka -> Faust, {CAMERAS} cameras x {FPS:g} fps per machine, "
           f"results grouped per {window_ms:g} ms, {seconds:g} s per step", rows,
           notes="p50/p99: a frame's capture ts to its rule evaluation in the worker, edge grouping included; "
           "pipeline_p50/p99: the message's newest frame (when the edge sent it) to evaluation (histogram quantiles); "
           "cpu: % of one core per process over the step; lag_end: worker group's unconsumed records at the end; "
           f"os cores: {os.cpu_count()}", out=out)


if __name__ == "__main__":
    typer.run(main)
