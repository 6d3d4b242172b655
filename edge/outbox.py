"""Store-and-forward outbox: every message the edge must not lose is written to SQLite before it
is published and deleted only when the broker acknowledges it (PUBACK, QoS 1).

- One file per agent, WAL journal, ``synchronous=NORMAL``: a committed row survives a killed
  process (the WAL is fsynced at checkpoints; a power cut can lose the last few hundred ms,
  the usual trade for an edge box writing tens of rows a second).
- Replay is in insertion order, so a restarted or reconnected agent sends what it holds oldest
  first, and the receiving side dedupes by ``msg_id`` (delivery is at least once).
- The store is bounded: when full, the oldest message of the LOWEST priority present goes first
  (sampled masks, then results, then events; anomalies and alerts last); a newcomer that ranks
  below everything stored is refused instead. Every drop is counted per priority, and the age of
  the oldest stored message says how much of an outage the store is holding.

Not in the outbox: heartbeats and the retained status (only the latest matters).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from stream.service import Service, Supervisor


class Priority(IntEnum):
    """Who goes first when the outbox is full: the lowest value."""

    MASK = 0
    RESULT = 1
    EVENT = 2
    ANOMALY = 3
    ALERT = 4


@dataclass(frozen=True)
class Pending:
    """A stored message waiting for its PUBACK."""

    row_id: int
    topic: str
    payload: bytes
    priority: Priority


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_priority ON outbox (priority, id);
"""


class Outbox:
    """A bounded, durable FIFO of (topic, payload) with drop-lowest-priority-first.

    Thread-safe: the inference, sensor and command threads put, the forwarder reads and acks."""

    def __init__(self, path: Path | str, max_messages: int = 100_000) -> None:
        if max_messages < 1:
            raise ValueError(f"outbox max_messages must be >= 1 (got {max_messages})")
        self.path = Path(path)
        self.max_messages = max_messages
        self.dropped: Counter[Priority] = Counter()
        self.written = 0
        self.acked = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._depth = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def put(self, topic: str, payload: bytes, priority: Priority) -> int | None:
        """Store one message; its row id, or None when it was itself the one dropped."""
        with self._lock:
            if self._depth >= self.max_messages and not self._make_room(priority):
                self.dropped[priority] += 1
                return None
            cursor = self._db.execute("INSERT INTO outbox (priority, topic, payload, created) VALUES (?, ?, ?, ?)",
                                      (int(priority), topic, payload, time.time()))
            self._depth += 1
            self.written += 1
            return int(cursor.lastrowid)

    def _make_room(self, incoming: Priority) -> bool:
        """Drop the oldest message of the lowest stored priority if it ranks at or below
        ``incoming``; False when everything stored outranks the newcomer."""
        row = self._db.execute("SELECT id, priority FROM outbox ORDER BY priority, id LIMIT 1").fetchone()
        if row is None or row[1] > incoming:
            return False
        self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
        self._depth -= 1
        self.dropped[Priority(row[1])] += 1
        return True

    def pending(self, after: int = 0, limit: int = 100) -> list[Pending]:
        """Up to ``limit`` stored messages with row id > ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload, priority FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                    (after, limit)).fetchall()
        return [Pending(int(r[0]), r[1], bytes(r[2]), Priority(r[3])) for r in rows]

    def ack(self, row_id: int) -> None:
        """The broker has the message: forget it (a second ack of the same row is harmless)."""
        with self._lock:
            deleted = self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,)).rowcount
            self._depth -= deleted
            self.acked += deleted

    @property
    def depth(self) -> int:
        return self._depth

    def oldest_age_s(self) -> float:
        """Seconds the oldest stored message has waited (0 when empty): how much of an outage it has held."""
        with self._lock:
            row = self._db.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
        return max(0.0, time.time() - row[0]) if row else 0.0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Forwarder(Service):
    """Moves outbox rows to the broker and deletes each on its PUBACK; a service named
    ``outbox:<name>`` whose loop runs in thread ``outbox:<name>/forward``.

    Each row is handed to the MQTT client once per process, at most ``window`` at a time and
    only while connected; paho keeps unacknowledged QoS 1 messages and re-sends them after a
    reconnect (``dup`` set), so a broker outage costs nothing here. A restarted process replays
    every row still stored (at least once; receivers dedupe by ``msg_id``). ``stop()`` first waits
    up to ``drain_s`` for the outbox to empty while connected."""

    def __init__(self, outbox: Outbox, mqtt, name: str, window: int = 200, *, drain_s: float = 0.0,
                 supervisor: Supervisor | None = None) -> None:
        super().__init__(f"outbox:{name}", supervisor=supervisor)
        self.outbox, self.mqtt, self.window, self.drain_s = outbox, mqtt, window, drain_s
        self._inflight: dict[int, int] = {}  # mid -> row id
        self._early: set[int] = set()  # PUBACKs that beat the bookkeeping of their publish
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._last_row = 0
        mqtt.on_publish_acked(self._acked)
        self.add_loop("forward", self._run)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop handing rows over, after waiting up to ``drain_s`` for the outbox to empty."""
        deadline = time.monotonic() + self.drain_s
        while self.outbox.depth and time.monotonic() < deadline and self.mqtt.connected.is_set():
            self._wake.set()
            time.sleep(0.02)
        self.stopping.set()
        self._wake.set()  # the loop sees stopping now rather than at its next poll
        super().stop(timeout_s)

    def notify(self) -> None:
        """A row was written: look now rather than at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self.stopping.is_set():
            self._wake.wait(0.1)
            self._wake.clear()
            if self.mqtt.connected.is_set():
                self._send_more()

    def _send_more(self) -> None:
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        for row in self.outbox.pending(after=self._last_row, limit=room):
            if not self.mqtt.connected.is_set() or self.stopping.is_set():
                return
            info = self.mqtt.publish(row.topic, row.payload, qos=1)
            self._last_row = row.row_id
            with self._lock:
                if info.mid in self._early:
                    self._early.discard(info.mid)
                    early = True
                else:
                    self._inflight[info.mid] = row.row_id
                    early = False
            if early:
                self.outbox.ack(row.row_id)

    def _acked(self, mid: int) -> None:
        with self._lock:
            row_id = self._inflight.pop(mid, None)
            if row_id is None:
                self._early.add(mid)
        if row_id is not None:
            self.outbox.ack(row_id)
            self._wake.set()
