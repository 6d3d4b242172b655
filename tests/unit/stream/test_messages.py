"""Wire messages: round trips, rejections, and junk that never crashes the parser."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.messages import (AlarmSpan, Alert, Anomaly, CameraStatus, Command, Decision, DefectRegion, EncodedMask,
                             Event, FrameResult, Heartbeat, MessageError, MessageLimits, ModelOutput, Result, parse_message,
                             stable_msg_id)

NOW = float(int(time.time())) + 0.25
BASE = {"site": "plant-a", "machine": "m01", "ts": NOW}
DAY = 86_400.0


def result(**overrides: object) -> Result:
    output = ModelOutput(model="seg", version="1.0.0", latency_ms=4.5, defect_ratio=0.02,
                         regions=[DefectRegion(cls="defect", area=120, bbox=(10, 20, 15, 8), score=0.91)])
    fields = {**BASE, "camera": "cam1", "frames": [FrameResult(seq=7, ts=BASE["ts"], outputs=[output])]}
    return Result(**{**fields, **overrides})


EXAMPLES = [
    result(),
    Anomaly(**BASE, group="pump1", seq=3, model="lstm", version="1", score=2.5, threshold=1.2, is_anomaly=True,
            channel_scores={"Current": 4.0, "Pressure": 0.1}),
    Heartbeat(**BASE, uptime_s=12.0, cameras=[CameraStatus(camera="cam1", state="reconnecting", fps=10.0)],
              cpu_percent=55.0, rss_mb=310.0),
    Event(**BASE, name="camera_reconnecting", level="warning", camera="cam1", details={"attempt": 3}),
    Command(**BASE, name="set_fps", camera="cam2", args={"fps": 5}),
    Alert(**BASE, rule="surface-defect", state="firing", severity="critical", scope="camera", key="m01/cam1",
          value=0.3, camera="cam1"),
    Decision(**BASE, rule="surface-defect", state="resolved", scope="machine", key="m01", value=0.0,
             actions=["alert"]),
    Anomaly(**BASE, group="pump1", seq=9, model="lstm", version="1", score=2.5, threshold=1.2, is_anomaly=True,
            channel_scores={"Current": 4.0, "Pressure": 0.1}, top_channels=["Current", "Pressure"],
            alarm=AlarmSpan(start_seq=5, start_ts=NOW - 4, end_seq=9, end_ts=NOW, peak_level=3.5,
                            channels=["Current"])),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.KIND)
def test_round_trip_keeps_every_field_and_the_schema(message: object) -> None:
    wire = message.to_json()
    document = json.loads(wire)
    assert document["schema"] == type(message).SCHEMA
    assert document["msg_id"] == message.msg_id
    parsed = parse_message(wire)
    assert type(parsed) is type(message)
    assert parsed == message


def test_an_anomaly_of_an_older_producer_is_still_valid() -> None:
    old = {"schema": "edgeline.anomaly/1", "msg_id": "0123456789abcdef", **BASE, "group": "pump1", "seq": 3,
           "model": "lstm", "version": "1", "score": 2.5, "threshold": 1.2, "is_anomaly": True,
           "channel_scores": {"Current": 4.0}}
    parsed = parse_message(json.dumps(old).encode())
    assert isinstance(parsed, Anomaly) and parsed.top_channels == [] and parsed.alarm is None
    assert "alarm" not in json.loads(parsed.to_json())  # an open slot stays off the wire


@pytest.mark.parametrize("changes, reason", [
    ({"top_channels": [f"c{i}" for i in range(9)]}, "top_channels"),
    ({"top_channels": ["has space"]}, "top_channels"),
    ({"alarm": {"start_seq": 1, "start_ts": NOW, "peak_level": -1.0}}, "peak_level"),
    ({"alarm": {"start_seq": 1, "start_ts": NOW, "peak_level": 1.0, "channels": ["a/b"]}}, "channels"),
])
def test_anomaly_top_channels_and_alarm_are_checked(changes: dict[str, object], reason: str) -> None:
    document = json.loads(EXAMPLES[-1].to_json()) | changes
    with pytest.raises(MessageError, match=reason):
        parse_message(json.dumps(document).encode())


def test_msg_ids_are_unique_by_default_and_stable_when_derived() -> None:
    assert result().msg_id != result().msg_id
    assert stable_msg_id("m01", "cam1", 7) == stable_msg_id("m01", "cam1", 7)
    assert stable_msg_id("m01", "cam1", 7) != stable_msg_id("m01", "cam1", 8)
    retried = result(msg_id=stable_msg_id("m01", "cam1", 7))
    assert parse_message(retried.to_json()).msg_id == retried.msg_id


def test_mask_encoding_is_lossless_and_compact() -> None:
    mask = np.zeros((240, 320), np.uint8)
    mask[100:120, 50:90] = 1
    encoded = EncodedMask.encode(mask)
    assert len(encoded.data) < 2000
    assert np.array_equal(encoded.decode(), mask)
    carried = parse_message(result(frames=[FrameResult(seq=1, ts=NOW, outputs=[ModelOutput(
        model="seg", version="1", latency_ms=1, defect_ratio=0.01, mask=encoded)])]).to_json())
    assert np.array_equal(carried.frames[0].outputs[0].mask.decode(), mask)


def mutate(message: object, **changes: object) -> bytes:
    document = json.loads(message.to_json())
    document.update(changes)
    return json.dumps(document).encode()


@pytest.mark.parametrize(("changes", "reason"), [
    ({"schema": "edgeline.result/2"}, "schema"),
    ({"schema": "something/1"}, "schema"),
    ({"machine": "m/01"}, "machine"),
    ({"site": "#"}, "site"),
    ({"ts": -1}, "ts"),
    ({"msg_id": "short"}, "msg_id"),
    ({"frames": []}, "frames"),
    ({"unexpected": 1}, "unexpected"),
    ({"camera": None}, "camera"),
])
def test_invalid_fields_are_rejected_with_the_reason(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(MessageError) as caught:
        parse_message(mutate(EXAMPLES[0], **changes))
    assert reason in caught.value.reason


@pytest.mark.parametrize("payload", [b"", b"null", b"[]", b"{", b"\xff\xfe", b'{"schema": 3}', b"NaN",
                                     b'{"ts": NaN}', b"[" * 100_000])
def test_non_messages_are_rejected(payload: bytes) -> None:
    with pytest.raises(MessageError):
        parse_message(payload)


def test_nan_and_infinite_numbers_are_rejected() -> None:
    wire = EXAMPLES[1].to_json().replace(b'"score":2.5', b'"score":Infinity')
    with pytest.raises(MessageError):
        parse_message(wire)


@pytest.mark.parametrize("ts", [NOW + DAY + 60, NOW + 365 * DAY, 1e300, NOW - DAY - 60, 0.0],
                         ids=["a-day-ahead", "a-year-ahead", "1e300", "a-day-behind", "epoch"])  # stable across collections
def test_timestamps_far_from_the_receivers_clock_are_refused(ts: float) -> None:
    for wire in (mutate(EXAMPLES[1], ts=ts), result(frames=[FrameResult(seq=1, ts=ts, outputs=EXAMPLES[0].frames[0].outputs)]).to_json()):
        with pytest.raises(MessageError) as caught:
            parse_message(wire, now=NOW)
        assert caught.value.check == "clock"
        assert "the receiver's clock (limit 86400 s)" in caught.value.reason


def test_the_clock_bounds_are_settings() -> None:
    wire = mutate(EXAMPLES[1], ts=NOW + 120)
    assert parse_message(wire, now=NOW).ts == NOW + 120
    with pytest.raises(MessageError, match="ahead of the receiver's clock"):
        parse_message(wire, MessageLimits(max_ahead_s=60), now=NOW)
    assert parse_message(mutate(EXAMPLES[1], ts=NOW - 3 * DAY), MessageLimits(max_age_s=7 * DAY), now=NOW)


def test_messages_over_the_size_limit_are_refused_before_parsing() -> None:
    big = np.random.default_rng(0).integers(0, 2, (2000, 2000), dtype=np.uint8)
    wire = result(frames=[FrameResult(seq=1, ts=NOW, outputs=[ModelOutput(
        model="seg", version="1", latency_ms=1, defect_ratio=0.5, mask=EncodedMask.encode(big))])]).to_json()
    assert len(wire) > MessageLimits().max_bytes
    with pytest.raises(MessageError) as caught:
        parse_message(wire)
    assert caught.value.check == "size" and "byte limit" in caught.value.reason
    with pytest.raises(MessageError, match="over the 4096 byte limit"):
        parse_message(EXAMPLES[0].to_json() + b" " * 4096, MessageLimits(max_bytes=4096))


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"Infinity", b"NaN"])
def test_free_form_numbers_must_be_finite_too(number: bytes) -> None:
    event = EXAMPLES[3].to_json().replace(b'"attempt":3', b'"attempt":' + number)
    command = EXAMPLES[4].to_json().replace(b'"fps":5', b'"fps":' + number)
    for wire in (event, command):
        with pytest.raises(MessageError, match="finite"):
            parse_message(wire)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash_the_parser(payload: bytes) -> None:
    with pytest.raises(MessageError):
        parse_message(payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXAMPLES), st.dictionaries(st.sampled_from(
    ["schema", "msg_id", "site", "machine", "ts", "frames", "camera", "score", "cameras", "name", "args", "state"]),
    json_values, min_size=1, max_size=3))
def test_mangled_messages_either_parse_or_raise_message_error(message: object, changes: dict[str, object]) -> None:
    try:
        payload = mutate(message, **changes)
    except ValueError:
        return
    try:
        parsed = parse_message(payload)
    except MessageError as exc:
        assert exc.reason
    else:
        assert parsed.KIND in {"result", "anomaly", "heartbeat", "event", "command", "alert", "decision"}
