"""Bounded ``msg_id`` dedupe for at-least-once delivery, driven by event time (no clocks)."""

from __future__ import annotations

from collections import OrderedDict


class Deduper:
    """Remembers recently seen message ids and reports repeats, with one clock per source.

    Time is passed in (the message's event time), never read from a clock, so replays decide the
    same way. Each source (a machine: the engine passes the message's machine) has its own dedupe
    clock, the newest ``now`` it has seen, so one machine's far-future timestamp cannot make
    another machine's ids expire. An id is forgotten once it has not been seen for ``ttl_s``
    seconds of its source's clock. At most ``max_entries`` ids are kept in all; beyond that the
    least recently seen id of the source being recorded goes first (a flooding source evicts its
    own ids, not the others'), and every such early eviction is counted in ``evicted``.
    """

    def __init__(self, ttl_s: float = 60.0, max_entries: int = 100_000) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0 and max_entries >= 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.evicted = 0
        self._sources: dict[str, _Source] = {}
        self._entries = 0

    def __len__(self) -> int:
        return self._entries

    def seen(self, msg_id: str, now: float, source: str = "") -> bool:
        """Record ``msg_id`` of ``source`` at event time ``now``; True when it was already seen and
        not expired."""
        ids = self._sources.setdefault(source, _Source())
        ids.clock = max(ids.clock, now)
        expires_before = ids.clock - self.ttl_s
        previous = ids.last_seen.pop(msg_id, None)
        ids.last_seen[msg_id] = max(now, previous) if previous is not None else now
        self._entries += previous is None
        self._forget(source, ids, expires_before)
        return previous is not None and previous >= expires_before

    def _forget(self, source: str, ids: _Source, expires_before: float) -> None:
        # A source's ids are in last-seen order, which for one machine is about event-time order,
        # so expired ids wait at the front until the next message of the same source.
        while ids.last_seen:
            oldest_id, oldest_ts = next(iter(ids.last_seen.items()))
            over = self._entries > self.max_entries
            if oldest_ts >= expires_before and not over:
                return
            del ids.last_seen[oldest_id]
            self._entries -= 1
            self.evicted += over and oldest_ts >= expires_before
        del self._sources[source]


class _Source:
    """The dedupe clock of one source and its ids, least recently seen first."""

    __slots__ = ("clock", "last_seen")

    def __init__(self) -> None:
        self.clock = float("-inf")
        self.last_seen: OrderedDict[str, float] = OrderedDict()
