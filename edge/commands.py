"""Commands to one machine, found by name in a :class:`CommandRegistry` of handlers.

Each :class:`CommandHandler` validates its own arguments and answers with the event it publishes.
The camera commands (``snapshot``, ``set_fps``, ``set_gate``) are applied at once, on the MQTT
thread, and answered ``command_applied`` or ``command_rejected``; a handler marked ``slow`` (the
model commands of :mod:`edge.model_commands`) is handed to the OTA pipeline, which applies it off
the MQTT thread. An unknown name is rejected.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import paho.mqtt.client as paho

from edge.capture import Camera
from edge.publisher import Publisher
from edge.vision import VisionPipeline
from stream.messages import Command, Event, MessageError, Scalar, parse_message
from stream.service import Service

log = logging.getLogger(__name__)


class CommandRejected(ValueError):
    """A command's arguments do not hold; the text says why."""


class CommandHandler(ABC):
    """One command by name: validates its arguments, applies them, answers with an event."""

    name: ClassVar[str]
    slow: ClassVar[bool] = False
    """True: applied off the MQTT thread (loading a model takes a while)."""

    @abstractmethod
    def handle(self, command: Command) -> Event:
        """Apply ``command``; the event that says what happened (published by the caller)."""


class CommandRegistry:
    """Command name -> its handler."""

    def __init__(self, handlers: Iterable[CommandHandler] = ()) -> None:
        self._handlers: dict[str, CommandHandler] = {}
        for handler in handlers:
            self.register(handler)

    def register(self, handler: CommandHandler) -> None:
        if handler.name in self._handlers:
            raise ValueError(f"command {handler.name!r} registered twice")
        self._handlers[handler.name] = handler

    def get(self, name: str) -> CommandHandler | None:
        return self._handlers.get(name)


class CameraCommand(CommandHandler):
    """A command for one camera of the machine (``command.camera``) or all of them (None)."""

    def __init__(self, vision: VisionPipeline) -> None:
        self.vision = vision

    @abstractmethod
    def validate(self, args: Mapping[str, Scalar]) -> Any:
        """The command's argument, checked (:class:`CommandRejected`, ``ValueError`` or ``TypeError`` if not)."""

    @abstractmethod
    def apply(self, cameras: Sequence[Camera], value: Any) -> str:
        """Apply ``value`` to ``cameras`` (``ValueError``: refused, nothing changed); what was done."""

    def handle(self, command: Command) -> Event:
        applied, text = self.run(command)
        return Event(site=self.vision.site, machine=self.vision.id, ts=time.time(), camera=command.camera,
                     name="command_applied" if applied else "command_rejected",
                     level="info" if applied else "warning", text=text,
                     details={"command": command.name, "command_id": command.msg_id})

    def run(self, command: Command) -> tuple[bool, str]:
        cameras = [c for c in self.vision.cameras if command.camera in (None, c.id)]
        if not cameras:
            return False, f"no camera {command.camera!r} on {self.vision.id}"
        try:
            return True, self.apply(cameras, self.validate(command.args))
        except (TypeError, ValueError) as exc:
            return False, f"{self.name}: {exc}"


class Snapshot(CameraCommand):
    """The next inferred frame of the cameras is published with its mask."""

    name = "snapshot"

    def validate(self, args: Mapping[str, Scalar]) -> None:
        return None

    def apply(self, cameras: Sequence[Camera], value: None) -> str:
        for camera in cameras:
            self.vision.camera_counters[camera.id].snapshot_requested = True
        return f"mask snapshot requested on {', '.join(c.id for c in cameras)}"


class SetFps(CameraCommand):
    """``fps``: the capture rate cap, in (0, 120]."""

    name = "set_fps"

    def validate(self, args: Mapping[str, Scalar]) -> float:
        return float(args.get("fps", 0))  # type: ignore[arg-type]  # None: TypeError, refused

    def apply(self, cameras: Sequence[Camera], value: float) -> str:
        for camera in cameras:
            camera.set_fps(value)
        return f"fps set to {value:g} on {', '.join(c.id for c in cameras)}"


class SetGate(CameraCommand):
    """``threshold``: the change gate's threshold, 0..255 (0: off)."""

    name = "set_gate"

    def validate(self, args: Mapping[str, Scalar]) -> float:
        return float(args.get("threshold", -1))  # type: ignore[arg-type]  # None: TypeError, refused

    def apply(self, cameras: Sequence[Camera], value: float) -> str:
        for camera in cameras:
            self.vision.gates[camera.id].set_threshold(value)
        return f"gate threshold set to {value:g} on {', '.join(c.id for c in cameras)}"


def camera_commands(vision: VisionPipeline) -> list[CommandHandler]:
    return [Snapshot(vision), SetFps(vision), SetGate(vision)]


class CommandsPipeline(Service):
    """Reads the machine's command topic: each command goes to its handler by name; a slow one to
    ``background`` (the OTA pipeline), the others are applied at once."""

    def __init__(self, site: str, machine: str, registry: CommandRegistry, publisher: Publisher,
                 background: Callable[[CommandHandler, Command], None]) -> None:
        super().__init__(f"commands:{machine}")
        self.site = site
        self.id = machine
        self.registry = registry
        self.publisher = publisher
        self.background = background

    def on_message(self, message: paho.MQTTMessage) -> None:
        try:
            command = parse_message(message.payload)
        except MessageError as exc:
            log.warning("edge:%s: bad command on %s: %s", self.id, message.topic, exc.reason)
            return
        if not isinstance(command, Command) or command.machine != self.id:
            log.warning("edge:%s: ignored a message for %s on the command topic", self.id, command.machine)
            return
        handler = self.registry.get(command.name)
        if handler is not None and handler.slow:
            self.background(handler, command)
            return
        self.publisher.publish(self.apply_command(command))

    def apply_command(self, command: Command) -> Event:
        """Apply ``command`` here and now (slow ones too); the event that answers it."""
        handler = self.registry.get(command.name)
        if handler is None:
            return Event(site=self.site, machine=self.id, ts=time.time(), camera=command.camera,
                         name="command_rejected", level="warning", text=f"unknown command {command.name!r}",
                         details={"command": command.name, "command_id": command.msg_id})
        return handler.handle(command)
