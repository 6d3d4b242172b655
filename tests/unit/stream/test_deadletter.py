"""The one dead-letter record, written by the bridge, the worker and the embedded runner."""

from __future__ import annotations

import json
import time

import pytest

from stream.deadletter import PAYLOAD_MAX_CHARS, deadletter_record
from stream.topics import deadletter_topic, parse_topic


def test_a_record_says_where_why_which_check_when_and_what():
    before = time.time()
    record = json.loads(deadletter_record("edgeline/v1/a/m01/result/cam1", "bad JSON", b"{oops", "json"))
    assert record.pop("ts") >= before
    assert record == {"source": "edgeline/v1/a/m01/result/cam1", "reason": "bad JSON", "check": "json",
                      "payload": "{oops"}


def test_the_payload_is_cut_to_its_limit_and_bytes_that_are_not_utf8_are_replaced():
    record = json.loads(deadletter_record("edgeline.results", "too large", b"\xff" + b"x" * (2 * PAYLOAD_MAX_CHARS)))
    assert record["check"] is None
    assert record["payload"].startswith("\ufffd") and len(record["payload"]) == PAYLOAD_MAX_CHARS


def test_the_mqtt_dead_letter_topic_is_a_side_topic_of_the_site():
    topic = deadletter_topic("plant-a")
    assert topic == "edgeline/v1/plant-a/_deadletter"
    with pytest.raises(ValueError):  # not a machine's topic
        parse_topic(topic)
