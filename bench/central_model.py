"""bench.central's pure parts: the lag trend, CPU per 1k msg/s, the projection to larger sites,
and the layout of the printed tables (narrow enough for a CI log at 80-120 columns).

No I/O here: :mod:`bench.central` measures, these functions turn its measurements into numbers
and tables, and ``tests/unit/bench/test_central_model.py`` checks them alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from stream.console import Column, TableOutput

PROJECTED_MACHINES = (50, 200, 1000)
WORKER_BUSY = 0.7
"""A worker is planned at this share of a core at most (headroom for bursts and rebalances)."""
MIN_PARTITIONS = 4


# --- lag --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LagTrend:
    start: int
    end: int
    slope: float
    """records/s, least squares over the samples."""
    stderr: float
    """standard error of the slope (records/s); 0 with fewer than 3 samples."""

    @property
    def grows(self) -> bool:
        """Growing beyond noise: the slope is above twice its standard error and above 1 record/s."""
        return self.slope > max(2.0 * self.stderr, 1.0)


def lag_trend(samples: Sequence[tuple[float, float]]) -> LagTrend:
    """The lag's least-squares slope over ``(seconds, lag)`` samples, with its standard error."""
    if not samples:
        return LagTrend(0, 0, float("nan"), float("nan"))
    start, end = int(samples[0][1]), int(samples[-1][1])
    if len(samples) < 2:
        return LagTrend(start, end, 0.0, 0.0)
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    sxx = sum((t - mean_t) ** 2 for t, _ in samples)
    if sxx <= 0:
        return LagTrend(start, end, 0.0, 0.0)
    slope = sum((t - mean_t) * (y - mean_y) for t, y in samples) / sxx
    if n < 3:
        return LagTrend(start, end, slope, 0.0)
    residual = sum((y - mean_y - slope * (t - mean_t)) ** 2 for t, y in samples)
    return LagTrend(start, end, slope, math.sqrt(residual / (n - 2) / sxx))


# --- CPU and the projection -------------------------------------------------------------------


def cores_per_1k(cpu_s: float, elapsed_s: float, msg_per_s: float) -> float:
    """Cores (CPU s per s) a process used per 1,000 msg/s of ``msg_per_s``."""
    if elapsed_s <= 0 or msg_per_s <= 0:
        return float("nan")
    return (cpu_s / elapsed_s) / (msg_per_s / 1000.0)


def workers_for(worker_cores: float, busy: float = WORKER_BUSY) -> int:
    """Worker processes for ``worker_cores`` of work, each planned at ``busy`` of a core."""
    return max(1, math.ceil(worker_cores / busy - 1e-9))


def partitions_for(workers: int, minimum: int = MIN_PARTITIONS) -> int:
    """Partitions for ``workers``: a multiple of them, at least twice as many (room to double the
    workers without repartitioning, which would move machines between partitions) and ``minimum``."""
    per_worker = max(2, math.ceil(minimum / workers))
    return workers * per_worker


def components_per_1k(cpu: dict[str, dict[str, float]], elapsed_s: float) -> dict[str, float]:
    """Cores per 1k msg/s of each component from processes' ``{"cpu_s", "msg_per_s"}``: the worker
    processes pooled into ``workers`` (their CPU over the input records they consumed together)."""
    pooled: dict[str, list[float]] = {}
    for name, values in cpu.items():
        key = "workers" if name.startswith("worker") else name
        total = pooled.setdefault(key, [0.0, 0.0])
        total[0] += values["cpu_s"]
        total[1] += values["msg_per_s"]
    return {name: cores_per_1k(cpu_s, elapsed_s, rate) for name, (cpu_s, rate) in pooled.items()}


def projection(msg_per_s_per_machine: float, components: dict[str, float],
               machines: Sequence[int] = PROJECTED_MACHINES) -> list[dict[str, Any]]:
    """Cores per component at each site size, linear in msg/s, and the workers/partitions to run.

    ``components`` maps a component (``site``, ``mosquitto``, ``bridge``, ``kafka``, ``workers``)
    to its measured cores per 1k msg/s it handles; each handles about one record per site message.
    Assumes the measured per-machine message mix and grouping."""
    rows = []
    for count in machines:
        rate = msg_per_s_per_machine * count
        cores = {name: per_1k * rate / 1000.0 for name, per_1k in components.items()}
        workers = workers_for(cores.get("workers", 0.0))
        rows.append({"machines": count, "msg_per_s": round(rate), "cores": {k: round(v, 2) for k, v in cores.items()},
                     "cores_total": round(sum(cores.values()), 2), "workers": workers,
                     "partitions": partitions_for(workers)})
    return rows


# --- tables -----------------------------------------------------------------------------------

LOG_WIDTH = 120
"""The widest line a printed table may have (CI logs are read at 80-120 columns)."""


@dataclass(frozen=True)
class Col:
    header: str
    value: Callable[[dict[str, Any]], Any]
    numeric: bool = True


def fmt(value: Any, digits: int = 0) -> str:
    """A number for a table cell: thousands separated, ``-`` for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    if isinstance(value, str) and value.startswith(">") and value[1:].replace(".", "", 1).isdigit():
        return f"> {float(value[1:]):,.{digits}f}"  # beyond a histogram's largest bound
    return str(value)


def table(title: str, columns: Sequence[Col], rows: Sequence[dict[str, Any]]) -> TableOutput:
    return TableOutput([Column(c.header, numeric=c.numeric) for c in columns],
                       [[str(c.value(row)) for c in columns] for row in rows], title)


def replay_table(rows: Sequence[dict[str, Any]]) -> TableOutput:
    return table("replay: the same recorded messages, one process, nothing else running", [
        Col("runner", lambda r: r["runner"], numeric=False),
        Col("messages", lambda r: fmt(r["messages"])),
        Col("wall s", lambda r: fmt(r["wall_s"], 1)),
        Col("msg/s", lambda r: fmt(r["msg_per_s"])),
        Col("CPU s", lambda r: fmt(r["cpu_s"], 1)),
        Col("CPU %", lambda r: fmt(r["cpu_pct"])),
        Col("msg/s per core", lambda r: fmt(r["msg_per_core_s"])),
        Col("broker CPU %", lambda r: fmt(r.get("broker_cpu_pct"))),
    ], rows)


def site_rates_table(rows: Sequence[dict[str, Any]]) -> TableOutput:
    return table("site: rates", [
        Col("machines", lambda r: fmt(r["machines"])),
        Col("workers", lambda r: fmt(r["workers"])),
        Col("window ms", lambda r: fmt(r["window_ms"])),
        Col("frames/s", lambda r: fmt(r["frames_per_s"])),
        Col("MQTT msg/s", lambda r: fmt(r["mqtt_msg_per_s"])),
        Col("Kafka rec/s", lambda r: fmt(r["kafka_rec_per_s"])),
        Col("worker in/s", lambda r: fmt(r["worker_in_per_s"])),
        Col("worker rec/s", lambda r: fmt(r["worker_msg_per_s"])),
        Col("dead letters", lambda r: fmt(r["dead_letters"])),
    ], rows)


def site_latency_table(rows: Sequence[dict[str, Any]]) -> TableOutput:
    return table("site: latency (ms) and the workers' lag (records)", [
        Col("machines", lambda r: fmt(r["machines"])),
        Col("frame p50", lambda r: fmt(r["p50_ms"])),
        Col("frame p99", lambda r: fmt(r["p99_ms"])),
        Col("pipe p50", lambda r: fmt(r["pipeline_p50_ms"])),
        Col("pipe p99", lambda r: fmt(r["pipeline_p99_ms"])),
        Col("lag start", lambda r: fmt(r["lag_start"])),
        Col("lag end", lambda r: fmt(r["lag_end"])),
        Col("slope rec/s", lambda r: fmt(r["lag_slope"], 1)),
        Col("+/-", lambda r: fmt(r["lag_slope_stderr"], 1)),
        Col("lag", lambda r: "grows" if r["lag_grows"] else "flat", numeric=False),
    ], rows)


def cpu_table(rows: Sequence[dict[str, Any]]) -> TableOutput:
    return table("site: CPU per process (largest step)", [
        Col("process", lambda r: r["process"], numeric=False),
        Col("CPU %", lambda r: fmt(r["cpu_pct"])),
        Col("msg/s handled", lambda r: fmt(r["msg_per_s"])),
        Col("cores per 1k msg/s", lambda r: fmt(r["cores_per_1k"], 3)),
    ], rows)


def projection_table(rows: Sequence[dict[str, Any]]) -> TableOutput:
    """Components as rows, site sizes as columns (narrow however many components there are)."""
    names = list(rows[0]["cores"]) if rows else []
    lines: list[dict[str, Any]] = [{"what": "msg/s", **{str(r["machines"]): fmt(r["msg_per_s"]) for r in rows}}]
    lines += [{"what": f"cores: {name}", **{str(r["machines"]): fmt(r["cores"][name], 2) for r in rows}}
              for name in names]
    lines.append({"what": "cores: total", **{str(r["machines"]): fmt(r["cores_total"], 2) for r in rows}})
    lines.append({"what": f"workers (<= {WORKER_BUSY:.0%} of a core each)",
                  **{str(r["machines"]): fmt(r["workers"]) for r in rows}})
    lines.append({"what": "partitions", **{str(r["machines"]): fmt(r["partitions"]) for r in rows}})
    return table("projection: linear in msg/s from the measured CPU per 1k msg/s",
                 [Col("", lambda r: r["what"], numeric=False),
                  *[Col(f"{r['machines']} machines", lambda line, k=str(r["machines"]): line[k]) for r in rows]],
                 lines)


def widest_line(output: TableOutput) -> int:
    """The widest line of the table as it goes to a log (whole markdown)."""
    return max(len(line) for line in output.markdown().splitlines())
