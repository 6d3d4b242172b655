"""Helpers for the Kafka pipeline tests: a site file of the test's own (its own topic prefix, so
tests share the session's Kafka without seeing each other), workers as real processes,
and a reader of what landed on a topic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from edgeline.config import SiteConfig, load
from edgeline.services import free_port, scrape_metrics
from stream.kafka import close_producer, reliable_producer
from stream.messages import Envelope, parse_message
from stream.worker import worker_group as stream_worker_group

EDGELINE = [sys.executable, "-m", "edgeline.cli"]


def write_site(tmp_path: Path, name: str, mosquitto: Any, kafka: Any, rules: list[dict[str, Any]],
               machines: list[dict[str, Any]], sections: dict[str, Any] | None = None,
               **stream: Any) -> tuple[Path, SiteConfig]:
    """A site YAML for ``name`` (also its topic prefix) wired to the test brokers; ``sections``
    adds top-level sections, ``stream`` settings of the stream section."""
    raw = {**(sections or {}),
        "site": name, "broker": {"host": mosquitto.host, "port": mosquitto.port},
        "machines": machines, "rules": rules,
        "engine": {"allowed_lateness_s": 5.0},
        "stream": {"kafka": kafka.bootstrap, "topic_prefix": name, "partitions": 4, **stream},
    }
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, load(path)


class WorkerProcess:
    """``edgeline stream worker`` as a child process, its output in a log file."""

    def __init__(self, config: Path, workdir: Path, name: str = "worker") -> None:
        self.config = config
        self.workdir = workdir
        self.name = name
        self.log = workdir / f"{name}.log"
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [*EDGELINE, "stream", "worker", "-c", str(self.config), "--metrics-port", str(self.metrics_port),
                   "--log-level", "info"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         env=os.environ | {"PYTHONUNBUFFERED": "1"})
        return self

    def wait_consuming(self, timeout: float = 90.0) -> None:
        """Until the worker has consumed at least one message (its partitions are assigned)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.consumed() > 0:
                return
            self.check_alive()
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} consumed nothing in {timeout:.0f} s; log:\n{self.tail()}")

    def consumed(self, topic: str | None = None) -> float:
        """Records consumed so far (``edgeline_worker_messages_total``), of ``topic`` or of all topics."""
        if topic is not None:
            return self.metrics().get(f'edgeline_worker_messages_total{{topic="{topic}"}}', 0.0)
        return sum(v for k, v in self.metrics().items() if k.startswith("edgeline_worker_messages_total"))

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.metrics_port, timeout=2)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the worker's ordered shutdown: checkpoint, commit, leave the group), then wait."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        code, self.proc = self.proc.returncode, None
        return code

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def read_topic(bootstrap: str, topic: str, *, until: int | None = None, timeout: float = 30.0,
               idle_s: float = 3.0) -> list[bytes]:
    """Every record value on ``topic`` from the start: until ``until`` records arrived (or
    ``timeout``), else until nothing new came for ``idle_s``."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=500)
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            for records in batch.values():
                values += [r.value for r in records]
                last_new = time.monotonic()
            if until is not None and len(values) >= until:
                break
            if until is None and values and time.monotonic() - last_new > idle_s:
                break
    finally:
        consumer.close()
    return values


def read_until_ids(bootstrap: str, topic: str, want: set[str], timeout: float = 120.0) -> list[Envelope]:
    """The messages on ``topic`` once every id in ``want`` is among them (or at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        got = read_messages(bootstrap, topic, idle_s=1.0, timeout=max(1.0, deadline - time.monotonic()))
        if want <= {m.msg_id for m in got} or time.monotonic() >= deadline:
            return got
        time.sleep(1.0)


def read_messages(bootstrap: str, topic: str, **kwargs: Any) -> list[Envelope]:
    return [parse_message(v) for v in read_topic(bootstrap, topic, **kwargs)]


def read_json(bootstrap: str, topic: str, **kwargs: Any) -> list[dict[str, Any]]:
    return [json.loads(v) for v in read_topic(bootstrap, topic, **kwargs)]


# ------------------------------------------------------------------ straight to Kafka, group lag


def worker_group(site: SiteConfig) -> str:
    """The consumer group of a site's workers."""
    return stream_worker_group(site.stream.topic_prefix, site.site)


def wait_for(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str],
             workers: Sequence[WorkerProcess] = (), interval: float = 0.2) -> float:
    """Poll ``condition`` until it holds (seconds it took); a worker of ``workers`` that exits
    fails at once, and ``timeout`` raises with ``what`` (or what it returns) and the workers' logs."""
    started = time.monotonic()
    while not condition():
        for worker in workers:
            worker.check_alive()
        if time.monotonic() - started > timeout:
            logs = "\n".join(f"--- {w.name}:\n{w.tail(30)}" for w in workers)
            raise TimeoutError(f"not within {timeout:.0f} s: {what() if callable(what) else what}\n{logs}")
        time.sleep(interval)
    return time.monotonic() - started


def produce(bootstrap: str, topic_of: Callable[[Envelope], str], messages: Iterable[Envelope],
            timeout: float = 60.0) -> int:
    """Send ``messages`` straight to Kafka as the bridge does (key = machine, record timestamp =
    the message's ts), in order per machine (an idempotent producer); wait for every ack."""
    producer = reliable_producer(bootstrap, "test-producer")
    try:
        futures = [producer.send(topic_of(m), key=m.machine.encode(), value=m.to_json(),
                                 timestamp_ms=int(m.ts * 1000)) for m in messages]
        producer.flush(timeout)
        for future in futures:
            future.get(timeout)
        return len(futures)
    finally:
        close_producer(producer, 10.0)


class Feeder(threading.Thread):
    """Keeps producing straight to Kafka in the background: step ``i`` sends the messages
    ``make_step(i)`` (keyed by machine, as :func:`produce`), ``steps_per_s`` steps a second,
    until :meth:`finish`. ``sent`` is every message sent, in the order sent."""

    def __init__(self, bootstrap: str, topic_of: Callable[[Envelope], str],
                 make_step: Callable[[int], list[Envelope]], steps_per_s: float) -> None:
        super().__init__(name="test-feeder", daemon=True)
        self.topic_of, self.make_step, self.period = topic_of, make_step, 1.0 / steps_per_s
        self.producer = reliable_producer(bootstrap, "test-feeder")
        self.sent: list[Envelope] = []
        self.steps = 0
        self.error: BaseException | None = None
        self._futures: list[Any] = []
        self._stopping = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        try:
            while not self._stopping.is_set():
                for message in self.make_step(self.steps):
                    self._futures.append(self.producer.send(
                        self.topic_of(message), key=message.machine.encode(), value=message.to_json(),
                        timestamp_ms=int(message.ts * 1000)))
                    self.sent.append(message)
                self.steps += 1
                next_at += self.period
                self._stopping.wait(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def finish(self, timeout: float = 60.0) -> list[Envelope]:
        """Stop, wait until Kafka acknowledged every message sent; the messages sent."""
        self._stopping.set()
        if self.is_alive():
            self.join(timeout)
        try:
            if self.error is not None:
                raise RuntimeError(f"the feeder failed: {self.error!r}") from self.error
            self.producer.flush(timeout)
            for future in self._futures:
                future.get(timeout)
        finally:
            close_producer(self.producer, 10.0)
        return self.sent


def group_lag(bootstrap: str, group: str, topics: Iterable[str]) -> dict[str, int]:
    """Per topic: records not yet committed by ``group`` (end offset - committed offset, summed
    over the partitions; a partition the group never committed counts from 0)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-lag")
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="test-lag-end", group_id=None)
    try:
        committed = admin.list_group_offsets({group: None}).get(group, {})
        lag: dict[str, int] = {}
        for topic in topics:
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
            ends = consumer.end_offsets(partitions)
            lag[topic] = int(sum(end - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
                                 for tp, end in ends.items()))
        return lag
    finally:
        admin.close()
        consumer.close()


def wait_until_consumed(bootstrap: str, group: str, topics: Sequence[str], workers: Sequence[WorkerProcess],
                        timeout: float = 120.0) -> float:
    """Until ``group`` has committed every record of ``topics`` (in order: a later topic may be
    fed from an earlier one); seconds it took. The workers must stay alive."""
    last: dict[str, int] = {}

    def done() -> bool:
        last.update(group_lag(bootstrap, group, topics))
        return not any(last.values())

    return wait_for(done, timeout, lambda: f"group {group} consumes everything (lag now {last})", workers,
                    interval=0.5)


def read_to_end(bootstrap: str, topic: str, timeout: float = 60.0) -> list[bytes]:
    """Every record value on ``topic``, from the start up to its end offsets as they were when
    called (so nothing already written is missed, whatever the pauses in between)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             client_id="test-read-to-end")
    deadline = time.monotonic() + timeout
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            return []
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        values: list[bytes] = []
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: read {len(values)} records, not up to its end within {timeout:.0f} s")
            for records in consumer.poll(timeout_ms=500).values():
                values += [r.value for r in records if r.offset < ends[TopicPartition(r.topic, r.partition)]]
        return values
    finally:
        consumer.close()
