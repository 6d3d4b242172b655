"""Commands found by name, each handler validating its own arguments; the OTA pipeline applies the
slow ones (model loads, shadows, rollbacks) off the MQTT thread. No broker: an in-memory publisher."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge.commands import CommandHandler, CommandRegistry, CommandsPipeline, SetFps, camera_commands
from edge.metrics import EdgeMetrics
from edge.model_commands import OtaPipeline, model_commands
from edge.ota import ModelSwapper
from edge.publisher import MemoryPublisher
from edge.settings import CameraConfig, InferenceConfig
from edge.vision import VisionPipeline
from models.package import BUILTIN_PACKAGES, PackageSettings, load_package
from models.package.session import SegmentationModel
from models.package.signing import builtin_trusted_keys
from stream.messages import Command, Event


def vision(publisher: MemoryPublisher, tmp_path: Path, models: dict | None = None) -> VisionPipeline:
    cameras = [CameraConfig(id=c, fps=10, resolution=(32, 24), models=list(models or {})) for c in ("c1", "c2")]
    swapper = ModelSwapper(models or {}, builtin_trusted_keys(), providers={}, threads={}, downloads=tmp_path)
    return VisionPipeline("s1", "m1", cameras, lambda cam: None, swapper, InferenceConfig(), 1 << 20,  # type: ignore[arg-type,return-value]
                          publisher, EdgeMetrics())


def command(name: str, camera: str | None = None, **args) -> Command:
    return Command(site="s1", machine="m1", ts=time.time(), name=name, camera=camera, args=args)


def commands(vision: VisionPipeline, publisher: MemoryPublisher, background=None) -> CommandsPipeline:
    return CommandsPipeline("s1", "m1", CommandRegistry(camera_commands(vision)), publisher,
                            background or (lambda handler, cmd: pytest.fail("nothing here is slow")))


def test_a_name_is_registered_once() -> None:
    handler = SetFps(SimpleNamespace())  # type: ignore[arg-type]
    registry = CommandRegistry([handler])
    assert registry.get("set_fps") is handler and registry.get("nope") is None
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(handler)


@pytest.mark.parametrize(("sent", "applied", "text"), [
    (command("set_fps", "c1", fps=2), True, "fps set to 2 on c1"),
    (command("set_fps", fps=0), False, "set_fps: fps must be in (0, 120], got 0.0"),
    (command("set_fps", "c1", fps="fast"), False, "set_fps: could not convert string to float: 'fast'"),
    (command("set_gate", threshold=12.5), True, "gate threshold set to 12.5 on c1, c2"),
    (command("set_gate", "c2", threshold=999), False, "set_gate: gate threshold must be within 0..255 (got 999)"),
    (command("set_gate", "c2"), False, "set_gate: gate threshold must be within 0..255 (got -1)"),
    (command("snapshot", "c2"), True, "mask snapshot requested on c2"),
    (command("snapshot", "c9"), False, "no camera 'c9' on m1"),
    (command("reboot"), False, "unknown command 'reboot'"),
])
def test_camera_commands_validate_then_apply(tmp_path: Path, sent: Command, applied: bool, text: str) -> None:
    publisher = MemoryPublisher()
    pipeline = vision(publisher, tmp_path)
    event = commands(pipeline, publisher).apply_command(sent)
    assert (event.name, event.level, event.text) == (
        ("command_applied", "info", text) if applied else ("command_rejected", "warning", text))
    assert event.details == {"command": sent.name, "command_id": sent.msg_id} and event.camera == sent.camera
    fps = {c.id: c.fps for c in pipeline.cameras}
    thresholds = {cam: gate.threshold for cam, gate in pipeline.gates.items()}
    snapshots = {cam: counters.snapshot_requested for cam, counters in pipeline.camera_counters.items()}
    if not applied:  # a refusal changes nothing
        assert fps == {"c1": 10, "c2": 10} and thresholds == {"c1": 0, "c2": 0} and not any(snapshots.values())
    elif sent.name == "set_fps":
        assert fps == {"c1": 2, "c2": 10}
    elif sent.name == "set_gate":
        assert thresholds == {"c1": 12.5, "c2": 12.5}
    else:
        assert snapshots == {"c1": False, "c2": True}


def test_messages_on_the_command_topic(tmp_path: Path) -> None:
    publisher, slow = MemoryPublisher(), []
    pipeline = vision(publisher, tmp_path)

    class Reboot(CommandHandler):
        name, slow = "reboot", True

        def handle(self, command: Command) -> Event:
            raise AssertionError("handed to the background, not applied here")

    handler = Reboot()
    reader = CommandsPipeline("s1", "m1", CommandRegistry([*camera_commands(pipeline), handler]), publisher,
                              lambda h, c: slow.append((h, c)))
    for payload in (b"not json", command("set_fps", fps=3).model_copy(update={"machine": "m2"}).to_json()):
        reader.on_message(SimpleNamespace(topic="t", payload=payload))  # type: ignore[arg-type]
    assert publisher.messages == []  # bad or someone else's: ignored
    fps = command("set_fps", fps=3)
    reader.on_message(SimpleNamespace(topic="t", payload=fps.to_json()))  # type: ignore[arg-type]
    reboot = command("reboot")
    reader.on_message(SimpleNamespace(topic="t", payload=reboot.to_json()))  # type: ignore[arg-type]
    assert [(e.name, e.details["command_id"]) for e in publisher.of(Event)] == [("command_applied", fps.msg_id)]
    assert slow == [(handler, reboot)]


# ---------------------------------------------------------------- model commands, applied by the OTA pipeline


@pytest.fixture
def ota(tmp_path: Path) -> Iterator[SimpleNamespace]:
    publisher = MemoryPublisher()
    seg = SegmentationModel(load_package(BUILTIN_PACKAGES / "seg-synth-int8", trusted_keys=builtin_trusted_keys()))
    pipeline = vision(publisher, tmp_path, {"seg": seg})
    worker = OtaPipeline("m1", publisher)
    registry = CommandRegistry(model_commands(pipeline, PackageSettings(), tmp_path / "downloads", tmp_path))
    worker.start()
    yield SimpleNamespace(worker=worker, vision=pipeline, publisher=publisher, registry=registry)
    worker.stop()


def outcome(ota: SimpleNamespace, name: str, **args) -> Event:
    """Submit a model command as the command reader would, and wait for the event that answers it."""
    sent = command(name, **args)
    handler = ota.registry.get(name)
    assert handler is not None and handler.slow
    ota.worker.submit(handler, sent)
    publisher = ota.publisher
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answers = [e for e in publisher.of(Event) if e.details.get("command_id") == sent.msg_id]
        if answers:
            return answers[0]
        time.sleep(0.01)
    raise AssertionError(f"no answer to {name} within 30 s")


def test_model_commands_load_roll_back_and_refuse(ota) -> None:
    pipeline = ota.vision
    nothing = outcome(ota, "rollback_model", model="seg")
    assert (nothing.name, nothing.level, nothing.text) == ("model_rollback_failed", "error", "seg: nothing to roll back to")
    missing = outcome(ota, "load_model", model="seg", path="no-such-package")
    assert missing.name == "model_load_failed" and "seg: refused" in missing.text
    unknown = outcome(ota, "load_model", model="other", path="builtin:seg-synth-fp32")
    assert unknown.name == "model_load_failed" and "no model 'other' on this machine" in unknown.text
    bad_url = outcome(ota, "load_model", model="seg", url="file:///etc/passwd", sha256="0" * 64)
    assert bad_url.name == "model_load_failed" and "only http:// and https://" in bad_url.text
    loaded = outcome(ota, "load_model", model="seg", path="builtin:seg-synth-fp32")
    assert loaded.name == "model_loaded" and loaded.details["precision"] == "fp32", loaded.text
    assert pipeline.seg_models["seg"].package_id == "seg-synth-1.0.0-fp32"
    back = outcome(ota, "rollback_model", model="seg")
    assert back.name == "model_rolled_back" and pipeline.seg_models["seg"].package_id == "seg-synth-1.0.0-int8"


def test_shadow_commands(ota) -> None:
    pipeline = ota.vision
    refused = outcome(ota, "shadow_model", model="seg", path="builtin:seg-synth-fp32", every="often")
    assert (refused.name, refused.text) == ("shadow_failed", "shadow_model: every must be a whole number, got 'often'")
    assert outcome(ota, "promote_shadow", model="seg").text == "seg: no shadow running"
    started = outcome(ota, "shadow_model", model="seg", path="builtin:seg-synth-fp32", every=3)
    assert started.name == "shadow_started" and started.text == "seg: shadowing seg-synth-1.0.0-fp32 on 1 batch in 3"
    assert pipeline.shadows["seg"].every == 3
    stopped = outcome(ota, "stop_shadow", model="seg")
    assert stopped.name == "shadow_stopped" and pipeline.shadows == {}
    outcome(ota, "shadow_model", model="seg", path="builtin:seg-synth-fp32")
    promoted = outcome(ota, "promote_shadow", model="seg")
    assert promoted.name == "model_loaded" and pipeline.seg_models["seg"].package_id == "seg-synth-1.0.0-fp32"
