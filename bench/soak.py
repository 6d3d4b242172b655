"""Does memory stay flat? Simulated machines (real edge agents, ``edgeline edge run``, one process
each, synthetic cameras and pumps) and the embedded rules runner (``edgeline stream embedded``, its
own process) on a real Mosquitto for ``--minutes``; the RSS of every process is sampled every
``--sample-s`` seconds.

    python -m bench.soak [--minutes 10] [--machines 10] [--fps 2] [--sample-s 5]

Per process: RSS at minute 2 (mean of its samples in the 30 s from there, after start-up and the
first dedupe TTL), at the end (mean of the last 30 s), the growth between them in %, and the
least-squares slope over the same span in % per 10 min. The goal is under 2 % for every process.
The rules runner's held dedupe ids and rule states and their bounds (scraped from its metrics at
the end) show whether its stores reached their plateau. Not in CI: it runs ``--minutes``. The
samples go to ``bench/results/soak-samples.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import typer
import yaml

from bench.report import RESULTS, report
from edgeline.services import MosquittoBroker, free_port, scrape_metrics

SITE = "soak"
BASELINE_S = 120.0
"""Growth is measured from here: start-up, model warm-up and the first dedupe TTL are behind."""
AVERAGE_S = 30.0
"""RSS at a point in time is the mean of the samples over this long (the allocator is noisy)."""
REPO = Path(__file__).resolve().parent.parent
RULES = [
    {"name": "surface-defect", "kind": "k_of_n", "metric": "defect_count", "condition": {"op": ">=", "value": 1},
     "k": 3, "n": 5, "window_s": 5, "clear_after_s": 5, "scope": "camera",
     "actions": [{"type": "alert"}, {"type": "command", "name": "snapshot"}]},
    {"name": "defect-burst-on-line", "kind": "k_of_n", "metric": "defect_count",
     "condition": {"op": ">=", "value": 1}, "k": 20, "n": 40, "window_s": 10, "scope": "line"},
    {"name": "pump-anomaly", "kind": "k_of_n", "metric": "anomaly_level", "condition": {"op": ">=", "value": 1.0},
     "k": 3, "n": 5, "window_s": 10, "clear_after_s": 10, "scope": "machine", "severity": "critical"},
    {"name": "slow-inference", "metric": "latency_ms", "condition": {"op": ">", "value": 100}, "hold_for_s": 30,
     "clear_after_s": 30, "scope": "machine", "severity": "info"},
]


@dataclass
class Watched:
    """One process of the soak and its RSS samples (seconds since start, MB)."""

    name: str
    process: psutil.Process
    samples: list[tuple[float, float]] = field(default_factory=list)
    exited: bool = False

    def sample(self, at: float) -> None:
        try:
            self.samples.append((at, self.process.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            self.exited = True

    def row(self, end: float) -> dict[str, Any]:
        times = np.array([t for t, _ in self.samples])
        rss = np.array([r for _, r in self.samples])
        span = times >= BASELINE_S
        start_mb = float(rss[span & (times < BASELINE_S + AVERAGE_S)].mean())
        end_mb = float(rss[times >= end - AVERAGE_S].mean())
        slope = float(np.polyfit(times[span], rss[span], 1)[0]) if span.sum() > 1 else 0.0
        return {"process": self.name + (" (exited)" if self.exited else ""), "rss_2min_mb": start_mb,
                "rss_end_mb": end_mb, "growth_pct": 100.0 * (end_mb - start_mb) / start_mb,
                "slope_pct_per_10min": 100.0 * slope * 600.0 / start_mb, "peak_mb": float(rss.max())}


def site_document(broker: MosquittoBroker, machines: int, fps: float, outbox: Path) -> dict[str, Any]:
    """N machines, each one seg camera and one pump, on two lines; the example site's rules."""
    return {
        "site": SITE, "broker": {"host": broker.host, "port": broker.port},
        "camera_defaults": {"fps": fps, "resolution": [320, 240]},
        "models": {"seg": {"path": "builtin:seg-synth-int8", "threads": 1},
                   "anomaly": {"path": "builtin:anomaly-skab", "profile": "fast-start"}},
        "machines": [{"id": f"m{i:02d}", "line": f"line-{i % 2 + 1}", "metrics_port": 0,
                      "cameras": [{"id": "cam1", "models": ["seg"],
                                   "source": {"type": "synthetic", "seed": i, "defect_rate": 0.05}}],
                      "sensors": [{"id": "pump1", "model": "anomaly",
                                   "source": {"type": "synthetic", "seed": i, "anomaly_rate": 0.005}}]}
                     for i in range(1, machines + 1)],
        "rules": RULES,
        "outbox": {"path": str(outbox / "{machine}.sqlite")},
    }


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``edgeline <args>`` as a child process of this checkout, its output to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "edgeline.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO)


def stop(children: list[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> list[int | None]:
    """SIGTERM every child, wait, kill the ones still running; their exit codes."""
    for child in children:
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return [child.returncode for child in children]


def soak(minutes: float, machines: int, fps: float, sample_s: float, workdir: Path) -> tuple[list[Watched], dict[str, float], list[int | None]]:
    with MosquittoBroker() as broker:
        config = workdir / "site.yaml"
        config.write_text(yaml.safe_dump(site_document(broker, machines, fps, workdir)))
        rules_port = free_port()
        children = [spawn(["stream", "embedded", "--config", str(config), "--metrics-port", str(rules_port),
                           "--log-level", "warning"], workdir / "rules.log")]
        children += [spawn(["edge", "run", "--config", str(config), "--machine", f"m{i:02d}", "--log-level",
                            "warning"], workdir / f"m{i:02d}.log") for i in range(1, machines + 1)]
        watched = [Watched("rules (embedded)", psutil.Process(children[0].pid))]
        watched += [Watched(f"agent m{i:02d}", psutil.Process(child.pid)) for i, child in enumerate(children[1:], 1)]
        watched.append(Watched("mosquitto", psutil.Process(broker.pid)))
        started = time.monotonic()
        try:
            while (now := time.monotonic() - started) < minutes * 60:
                for process in watched:
                    process.sample(now)
                time.sleep(max(0.0, sample_s - (time.monotonic() - started - now)))
            scraped = scrape_metrics(rules_port)
        finally:
            codes = stop(children)
    return watched, scraped, codes


def main(minutes: float = 10.0, machines: int = 10, fps: float = 2.0, sample_s: float = 5.0,
         out: Path | None = None) -> None:
    if minutes * 60 < BASELINE_S + 2 * AVERAGE_S:
        raise typer.BadParameter(f"at least {(BASELINE_S + 2 * AVERAGE_S) / 60:g} minutes", param_hint="--minutes")
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        watched, scraped, codes = soak(minutes, machines, fps, sample_s, Path(tmp))
    end = minutes * 60
    rows = [process.row(end) for process in watched]
    stores = {f"{store}: {what}": scraped.get(f'edgeline_rules_state_{what}{{store="{store}"}}', float("nan"))
              for store in ("dedupe", "rules") for what in ("entries", "max_entries")}
    worst = max(abs(row["growth_pct"]) for row in rows)
    (out.parent if out else RESULTS).mkdir(parents=True, exist_ok=True)
    ((out.parent if out else RESULTS) / "soak-samples.json").write_text(
        json.dumps({p.name: p.samples for p in watched}))
    report("soak", f"soak: {machines} machines (1 camera at {fps:g} fps + 1 pump each), embedded rules, "
           f"Mosquitto, {minutes:g} min; RSS from minute 2 to the end", rows,
           notes=f"worst growth {worst:.2f} % (goal < 2 %); rules runner at the end: "
           + ", ".join(f"{k} {v:.0f}" for k, v in stores.items())
           + f"; exit codes after SIGTERM: {codes}", out=out)


if __name__ == "__main__":
    typer.run(main)
