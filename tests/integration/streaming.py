"""Helpers for the Kafka pipeline tests: a site file of the test's own (its own topic prefix, so
tests share the session's Kafka without seeing each other), Faust workers as real processes,
and a reader of what landed on a topic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from kafka import KafkaConsumer

from edgeline.config import SiteConfig, load
from edgeline.services import free_port, scrape_metrics
from stream.messages import Envelope, parse_message

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

    def __init__(self, config: Path, workdir: Path, name: str = "worker", data: str | None = None) -> None:
        self.config = config
        self.workdir = workdir
        self.name = name
        self.data_dir = workdir / f"{data or name}-data"
        self.log = workdir / f"{name}.log"
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [*EDGELINE, "stream", "worker", "-c", str(self.config), "--data-dir",
                   str(self.data_dir), "--metrics-port", str(self.metrics_port),
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

    def consumed(self) -> float:
        return sum(v for k, v in self.metrics().items() if k.startswith("edgeline_worker_messages_total"))

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(self.metrics_port, timeout=2)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (Faust's ordered shutdown: commit offsets, flush the producer), then wait."""
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
