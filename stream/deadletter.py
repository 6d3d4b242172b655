"""The dead-letter record: one format for every dead-letter place (Kafka ``<prefix>.deadletter``,
written by the bridge and the worker; MQTT ``edgeline/v1/<site>/_deadletter``, written by the
embedded runner, see :func:`stream.topics.deadletter_topic`)."""

from __future__ import annotations

import json
import time

PAYLOAD_MAX_CHARS = 65536
"""The payload is kept as text up to this many bytes: enough to see what was wrong with it."""


def deadletter_record(source: str, reason: str, payload: bytes, check: str | None = None) -> bytes:
    """Where a message came from (MQTT topic or Kafka topic), why it was refused, which check
    refused it (a :class:`stream.messages.MessageError` check such as ``json``, ``schema``,
    ``clock``; None when no check applies), when, and the payload as text."""
    return json.dumps({"source": source, "reason": reason, "check": check, "ts": time.time(),
                       "payload": payload[:PAYLOAD_MAX_CHARS].decode("utf-8", errors="replace")}).encode()
