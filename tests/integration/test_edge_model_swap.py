"""Model swaps on a running agent (real Mosquitto, real ONNX Runtime): a signed package is loaded
beside the running one, self-tested on recent frames and swapped in with no frame dropped; a
tampered package is refused and changes nothing; a rollback puts the previous model back."""

from __future__ import annotations

import shutil
import time

from edge.agent import EdgeAgent
from edgeline.config import BUILTIN_PACKAGES
from stream.messages import Command, Event, Heartbeat, Result, parse_message
from stream.topics import command_topic, site_filter
from tests.conftest import edge_site


def parsed(probe) -> list:
    try:
        return [parse_message(probe.get(timeout=0.5).payload)]
    except (TimeoutError, ValueError):  # the retained online status is not JSON
        return []


def send_and_wait(probe, site: str, name: str, args: dict, timeout: float = 30.0) -> Event:
    command = Command(site=site, machine="m1", ts=time.time(), name=name, args=args)
    probe.publish(command_topic(site, "m1", name), command.to_json())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in parsed(probe):
            if isinstance(message, Event) and message.details.get("command_id") == command.msg_id:
                return message
    raise AssertionError(f"no outcome for {name} within {timeout} s")


def test_swap_self_test_refusal_and_rollback_with_no_frame_dropped(mosquitto, mqtt_probe, unique_name, tmp_path):
    site = unique_name
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": [{"id": "c1", "models": ["seg"],
                                                                               "fps": 5}]}],
                       {"seg": {"path": "builtin:seg-synth-int8"}})
    tampered = tmp_path / "tampered"
    shutil.copytree(BUILTIN_PACKAGES / "seg-synth-fp32", tampered)
    with (tampered / "model.onnx").open("r+b") as onnx:
        onnx.seek(200)
        onnx.write(b"\x00\x01\x02\x03")
    probe = mqtt_probe(mosquitto)
    probe.subscribe(site_filter(site))
    agent = EdgeAgent(config, "m1", base_dir=tmp_path, heartbeat_s=1.0)
    agent.start()
    try:
        deadline = time.monotonic() + 20
        while not any(isinstance(m, Result) for m in parsed(probe)):
            assert time.monotonic() < deadline, "no result from the agent"
        dropped = agent.cameras[0].frames_dropped
        inferred = agent.camera_counters["c1"].frames_inferred

        loaded = send_and_wait(probe, site, "load_model", {"model": "seg", "path": "builtin:seg-synth-fp32"})
        assert loaded.name == "model_loaded", loaded.text
        assert loaded.details["precision"] == "fp32" and loaded.details["self_test_frames"] >= 1
        assert loaded.details["agreement"] > 0.8  # fp32 and int8 of the same network agree
        assert agent.seg_models["seg"].package.manifest.precision == "fp32"

        refused = send_and_wait(probe, site, "load_model", {"model": "seg", "path": str(tampered)})
        assert refused.name == "model_load_failed" and "checksum mismatch for model.onnx" in refused.text
        assert agent.seg_models["seg"].package.manifest.precision == "fp32"

        back = send_and_wait(probe, site, "rollback_model", {"model": "seg"})
        assert back.name == "model_rolled_back" and back.details["precision"] == "int8"
        time.sleep(1.0)
        assert agent.camera_counters["c1"].frames_inferred > inferred + 3
        assert agent.cameras[0].frames_dropped == dropped  # nothing waited on the swaps
    finally:
        agent.stop()


def test_shadow_mode_reports_agreement_then_promotes(mosquitto, mqtt_probe, unique_name, tmp_path):
    site = unique_name
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": [{"id": "c1", "models": ["seg"],
                                                                               "fps": 10}]}],
                       {"seg": {"path": "builtin:seg-synth-int8"}})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(site_filter(site))
    agent = EdgeAgent(config, "m1", base_dir=tmp_path, heartbeat_s=0.5)
    agent.start()
    try:
        started = send_and_wait(probe, site, "shadow_model", {"model": "seg", "path": "builtin:seg-synth-fp32",
                                                             "every": 2})
        assert started.name == "shadow_started", started.text
        deadline, shadow = time.monotonic() + 20, None
        while time.monotonic() < deadline:
            beats = [m for m in parsed(probe) if isinstance(m, Heartbeat) and "seg" in m.shadow]
            if beats and beats[-1].shadow["seg"].frames >= 5:
                shadow = beats[-1].shadow["seg"]
                break
        assert shadow is not None and shadow.package == "seg-synth-1.0.0-fp32"
        assert shadow.agreement > 0.8 and shadow.latency_ratio > 0
        assert agent.seg_models["seg"].package_id == "seg-synth-1.0.0-int8"  # only a shadow so far
        promoted = send_and_wait(probe, site, "promote_shadow", {"model": "seg"})
        assert promoted.name == "model_loaded" and promoted.details["frames"] >= 5
        assert agent.seg_models["seg"].package_id == "seg-synth-1.0.0-fp32" and agent.shadows == {}
        assert send_and_wait(probe, site, "stop_shadow", {"model": "seg"}).name == "shadow_failed"
    finally:
        agent.stop()
