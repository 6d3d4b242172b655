"""Model swaps on a running agent (real Mosquitto, real ONNX Runtime): a signed package is loaded
beside the running one, self-tested on recent frames and swapped in with no frame dropped; a
tampered package is refused and changes nothing; a rollback puts the previous model back; a
package that keeps failing after its swap is rolled back by the agent itself."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from edge.agent import EdgeAgent
from edgeline.services import scrape_metrics
from models.package import BUILTIN_PACKAGES, read_manifest, write_package
from models.package.files import sign_package
from models.package.signing import generate_keypair
from stream.messages import Command, Event, Heartbeat, Result, parse_message
from stream.topics import command_topic, site_filter
from tests.conftest import edge_site

pytestmark = pytest.mark.integration


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
        dropped = agent.vision.cameras[0].frames_dropped
        inferred = agent.vision.camera_counters["c1"].frames_inferred

        loaded = send_and_wait(probe, site, "load_model", {"model": "seg", "path": "builtin:seg-synth-fp32"})
        assert loaded.name == "model_loaded", loaded.text
        assert loaded.details["precision"] == "fp32" and loaded.details["self_test_frames"] >= 1
        assert loaded.details["agreement"] > 0.8  # fp32 and int8 of the same network agree
        assert agent.vision.seg_models["seg"].package.manifest.precision == "fp32"

        refused = send_and_wait(probe, site, "load_model", {"model": "seg", "path": str(tampered)})
        assert refused.name == "model_load_failed" and "checksum mismatch for model.onnx" in refused.text
        assert agent.vision.seg_models["seg"].package.manifest.precision == "fp32"

        back = send_and_wait(probe, site, "rollback_model", {"model": "seg"})
        assert back.name == "model_rolled_back" and back.details["precision"] == "int8"
        time.sleep(1.0)
        assert agent.vision.camera_counters["c1"].frames_inferred > inferred + 3
        assert agent.vision.cameras[0].frames_dropped == dropped  # nothing waited on the swaps
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
        assert agent.vision.seg_models["seg"].package_id == "seg-synth-1.0.0-int8"  # only a shadow so far
        promoted = send_and_wait(probe, site, "promote_shadow", {"model": "seg"})
        assert promoted.name == "model_loaded" and promoted.details["frames"] >= 5
        assert agent.vision.seg_models["seg"].package_id == "seg-synth-1.0.0-fp32" and agent.vision.shadows == {}
        assert send_and_wait(probe, site, "stop_shadow", {"model": "seg"}).name == "shadow_failed"
    finally:
        agent.stop()


def fails_on_live_batches(tmp_path: Path) -> tuple[Path, Path]:
    """seg-synth fp32 with a guard in front: Gather(const[1], (8 - batch) * (image not uniform)).
    The index is 0, so the model works, for the load's warm-up (one blank frame) and the swap's
    self-test (the last 8 frames in one batch); on a live batch of 1 real frame it is 7 and ONNX
    Runtime fails. Signed with a key of this test's own; returns the folder and the public key."""
    onnx = pytest.importorskip("onnx")
    helper, tensor = onnx.helper, onnx.TensorProto
    source = BUILTIN_PACKAGES / "seg-synth-fp32"
    model = onnx.load(str(source / "model.onnx"))
    graph, image = model.graph, model.graph.input[0].name
    for node in graph.node:
        node.input[:] = ["guarded" if name == image else name for name in node.input]
    graph.initializer.extend([
        helper.make_tensor("zero_i", tensor.INT64, [], [0]), helper.make_tensor("eight", tensor.INT64, [], [8]),
        helper.make_tensor("eps", tensor.FLOAT, [], [1e-3]), helper.make_tensor("table", tensor.FLOAT, [1], [0.0]),
    ])
    guard = [
        helper.make_node("Shape", [image], ["shape"]),
        helper.make_node("Gather", ["shape", "zero_i"], ["batch"], axis=0),
        helper.make_node("Sub", ["eight", "batch"], ["not_eight"]),
        helper.make_node("ReduceMax", [image], ["high"], keepdims=0),
        helper.make_node("ReduceMin", [image], ["low"], keepdims=0),
        helper.make_node("Sub", ["high", "low"], ["spread"]),
        helper.make_node("Greater", ["spread", "eps"], ["textured_b"]),
        helper.make_node("Cast", ["textured_b"], ["textured"], to=tensor.INT64),
        helper.make_node("Mul", ["not_eight", "textured"], ["index"]),
        helper.make_node("Gather", ["table", "index"], ["nothing"], axis=0),
        helper.make_node("Add", [image, "nothing"], ["guarded"]),
    ]
    for position, node in enumerate(guard):
        graph.node.insert(position, node)
    onnx.checker.check_model(model)
    manifest = read_manifest(source).model_copy(update={"version": "1.0.1-guarded"})
    folder = tmp_path / "guarded"
    write_package(folder, manifest, model.SerializeToString())
    private, _ = generate_keypair(tmp_path / "test.key", tmp_path / "test.pub")
    sign_package(folder, private)
    return folder, tmp_path / "test.pub"


def test_a_package_that_keeps_failing_is_rolled_back_on_the_machine(mosquitto, mqtt_probe, unique_name, tmp_path):
    site = unique_name
    package, public_key = fails_on_live_batches(tmp_path)
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": [{"id": "c1", "models": ["seg"],
                                                                               "fps": 10}]}],
                       {"seg": {"path": "builtin:seg-synth-int8"}}, signatures={"trusted_keys": [str(public_key)]})
    probe = mqtt_probe(mosquitto)
    probe.subscribe(site_filter(site))
    agent = EdgeAgent(config, "m1", base_dir=tmp_path, heartbeat_s=0.5)
    agent.start()
    try:
        deadline = time.monotonic() + 20
        while len(agent.vision.recent_frames) < 8:
            assert time.monotonic() < deadline, "the agent inferred fewer than 8 frames"
            time.sleep(0.1)
        loaded = send_and_wait(probe, site, "load_model", {"model": "seg", "path": str(package)})
        assert loaded.name == "model_loaded", loaded.text  # the self-test ran on a batch of 8
        seen: list = []
        back = next_event(probe, "model_rolled_back", seen)
        assert back.details["reason"] == "local_failure" and back.details["failed"] == "seg-synth-1.0.1-guarded-fp32"
        assert "failed 3 batches in a row" in back.text and back.details["errors"] >= 3
        assert agent.vision.seg_models["seg"].package_id == "seg-synth-1.0.0-int8"
        inferred = agent.vision.camera_counters["c1"].frames_inferred
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            seen += parsed(probe)
        assert agent.vision.camera_counters["c1"].frames_inferred > inferred + 3  # inference goes on
        health = [m for m in seen if isinstance(m, Heartbeat)][-1].health["seg"]
        assert health.package == "seg-synth-1.0.0-int8" and health.frames > 8 and health.errors == 0
        scraped = scrape_metrics(agent.metrics_port)
        assert scraped['edgeline_edge_inference_errors_total{machine="m1",model="seg"}'] == back.details["errors"]
    finally:
        agent.stop()


def next_event(probe, name: str, seen: list, timeout: float = 20.0) -> Event:
    """The next event called ``name``; every message read on the way is appended to ``seen``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in parsed(probe):
            seen.append(message)
            if isinstance(message, Event) and message.name == name:
                return message
    raise AssertionError(f"no {name} event within {timeout:.0f} s")
