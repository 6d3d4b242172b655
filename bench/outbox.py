"""How many minutes of broker outage does an outbox of a given size hold? A real agent (synthetic
cameras and pumps, the real int8 segmentation and LSTM models) runs with its broker unreachable,
so every message it makes stays in its SQLite outbox. Its message rate (per kind) and the bytes a
message takes give what ``outbox.max_messages`` holds: every message for size / rate; beyond that
results go first, so anomalies, events and alerts are kept for size / their rate.

    python -m bench.outbox [--seconds 60] [--sizes 10000,100000,1000000]

Machines: 4 cameras at 15 fps grouped per second (``result_window_ms: 1000``) with one pump at
the default 1 sample/s, and the demo's m03 (4 cameras at 5 fps, one message per frame, one pump
at 20 samples/s).
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from bench.report import report
from edge.agent import EdgeAgent
from edge.outbox import Priority
from edgeline.config import SiteConfig, from_dict
from edgeline.demo import demo_config
from edgeline.services import free_port

WARMUP_S = 5.0
MODELS = {"seg": {"path": "builtin:seg-synth-int8"}, "anomaly": {"path": "builtin:anomaly-skab",
                                                                  "profile": "fast-start"}}


def four_cameras_grouped(folder: Path) -> tuple[SiteConfig, str]:
    cameras = [{"id": f"cam{c}", "models": ["seg"], "source": {"type": "synthetic", "seed": c, "defect_rate": 0.3}}
               for c in range(1, 5)]
    return from_dict({
        "site": "bench", "models": MODELS, "camera_defaults": {"fps": 15, "resolution": [320, 240]},
        "machines": [{"id": "m1", "cameras": cameras, "sensors": [{"id": "pump1", "model": "anomaly"}]}],
        "inference": {"result_window_ms": 1000}, **unreachable(folder),
    }, base_dir=folder), "m1"


def demo_machine(folder: Path) -> tuple[SiteConfig, str]:
    demo = demo_config(machines=3).model_dump(mode="json", exclude_unset=True)
    return from_dict(demo | unreachable(folder), base_dir=folder), "m03"


def unreachable(folder: Path) -> dict[str, Any]:
    """A broker port nothing listens on, an outbox that never fills, no metrics endpoint."""
    return {"broker": {"host": "127.0.0.1", "port": free_port(), "reconnect_max_s": 60},
            "outbox": {"path": str(folder / "{machine}.sqlite"), "max_messages": 10_000_000},
            "metrics": {"enabled": False}}


def stored_by_kind(path: Path) -> dict[str, int]:
    """Messages in the outbox file: results (masks included), anomalies, and the rest (events, alerts)."""
    with sqlite3.connect(path) as db:
        counts = dict(db.execute("SELECT priority, COUNT(*) FROM outbox GROUP BY priority").fetchall())
    results = counts.get(Priority.RESULT, 0) + counts.get(Priority.MASK, 0)
    anomalies = counts.get(Priority.ANOMALY, 0)
    return {"results": results, "anomalies": anomalies, "other": sum(counts.values()) - results - anomalies}


def payload_bytes(path: Path) -> float:
    with sqlite3.connect(path) as db:
        return float(db.execute("SELECT AVG(LENGTH(payload)) FROM outbox").fetchone()[0] or 0.0)


def measure(name: str, build: Any, seconds: float, sizes: list[int]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        config, machine = build(Path(tmp))
        agent = EdgeAgent(config, machine, base_dir=Path(tmp))
        agent.start(connect_timeout_s=0.5)
        try:
            time.sleep(WARMUP_S)
            path = agent.outbox.path
            before, started = stored_by_kind(path), time.monotonic()
            time.sleep(seconds)
            after, elapsed = stored_by_kind(path), time.monotonic() - started
            size = payload_bytes(path)
        finally:
            agent.stop()
    rates = {kind: (after[kind] - before[kind]) / elapsed for kind in after}
    total = sum(rates.values())
    kept = rates["anomalies"] + rates["other"]
    row: dict[str, Any] = {"machine": name, "messages_per_s": total, "results_per_s": rates["results"],
                           "anomalies_per_s": rates["anomalies"], "other_per_s": rates["other"],
                           "payload_bytes": size, "payload_mib_per_100k": size * 100_000 / 2**20}
    for count in sizes:
        row[f"{count:,}: all, min"] = count / total / 60
        row[f"{count:,}: anomalies, min"] = count / kept / 60 if kept else float("inf")
    return row


def main(seconds: float = 60.0, sizes: str = "10000,100000,1000000", out: Path | None = None) -> None:
    counts = [int(s) for s in sizes.split(",")]
    rows = [measure("4 cameras x 15 fps, 1 s grouping, 1 pump at 1 Hz", four_cameras_grouped, seconds, counts),
            measure("demo m03: 4 cameras x 5 fps, no grouping, 1 pump at 20 Hz", demo_machine, seconds, counts)]
    report("outbox", f"Outage an outbox holds (broker down, {seconds:g} s measured per machine)", rows,
           notes="all: minutes until the first message is dropped; anomalies: minutes anomalies, events and "
                 "alerts are kept once results are dropped first (outbox.max_messages = the size); "
                 "payload_mib_per_100k: message bytes 100,000 stored messages take (the SQLite file is a little "
                 "larger)", out=out)


if __name__ == "__main__":
    typer.run(main)
