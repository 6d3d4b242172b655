"""The model commands and the OTA pipeline that applies them, one at a time, off the MQTT thread.

``load_model`` {model, url+sha256 | path} swaps a model live; ``rollback_model`` {model} puts the
previous one back; ``shadow_model`` {model, url+sha256 | path, every} runs a candidate beside the
current model on every ``every``-th batch, ``promote_shadow`` {model} puts it in place and
``stop_shadow`` {model} drops it. Each outcome is published as an event, with the self-test's
figures (see :mod:`edge.ota`).
"""

from __future__ import annotations

import logging
import queue
import time
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge.commands import CommandHandler, CommandRejected
from edge.ota import DownloadError, ShadowRun, SwapOutcome, fetch_package
from edge.publisher import Publisher
from edge.settings import ModelRef, resolve_model_path
from edge.vision import VisionPipeline
from models.package import PackageError, PackageSettings
from models.package.session import ModelLoadError
from stream.messages import Command, Event, Scalar
from stream.service import Service

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackageSource:
    """Where a command's package comes from: ``url`` + ``sha256`` (from central), else ``path`` on this box."""

    url: str | None
    sha256: str
    path: str


@dataclass(frozen=True)
class ModelArgs:
    model: str
    source: PackageSource | None = None
    every: int = 5


class ModelCommand(CommandHandler):
    """A command on one of the machine's segmentation models; slow: applied by the OTA pipeline."""

    slow = True
    failed: str
    """Event name of a refusal."""

    def __init__(self, vision: VisionPipeline, packages: PackageSettings, downloads: Path, base_dir: Path) -> None:
        self.vision = vision
        self.packages = packages
        self.downloads = downloads
        self.base_dir = base_dir

    def validate(self, args: Mapping[str, Scalar]) -> ModelArgs:
        """``model``: the name of a model in the site config."""
        model = args.get("model", "")
        if not isinstance(model, str):
            raise CommandRejected(f"model must be a name, got {model!r}")
        return ModelArgs(model)

    @abstractmethod
    def apply(self, args: ModelArgs) -> tuple[SwapOutcome, str]:
        """The outcome and the name of the event that reports it."""

    def handle(self, command: Command) -> Event:
        try:
            args = self.validate(command.args)
        except CommandRejected as exc:
            outcome, name = SwapOutcome(False, f"{self.name}: {exc}", {}), self.failed
        else:
            outcome, name = self.apply(args)
        log.log(logging.INFO if outcome.ok else logging.WARNING, "edge:%s: %s", self.vision.id, outcome.text)
        return Event(site=self.vision.site, machine=self.vision.id, ts=time.time(), name=name,
                     level="info" if outcome.ok else "error", text=outcome.text[:2000],
                     details={**outcome.details, "command_id": command.msg_id})

    def package_path(self, source: PackageSource) -> Path:
        """``url`` + ``sha256`` (http(s) under ``packages.download_urls`` only): downloaded and verified;
        else ``path`` on this box."""
        if source.url is not None:
            return fetch_package(source.url, source.sha256, self.downloads, self.packages)
        return resolve_model_path(ModelRef(path=source.path), self.base_dir)


def package_source(args: Mapping[str, Scalar]) -> PackageSource:
    return PackageSource(url=str(args["url"]) if "url" in args else None, sha256=str(args.get("sha256", "")),
                         path=str(args.get("path", "")))


class LoadModel(ModelCommand):
    name = "load_model"
    failed = "model_load_failed"

    def validate(self, args: Mapping[str, Scalar]) -> ModelArgs:
        """``model``, and ``url`` + ``sha256`` or ``path``."""
        return ModelArgs(super().validate(args).model, package_source(args))

    def apply(self, args: ModelArgs) -> tuple[SwapOutcome, str]:
        assert args.source is not None
        try:
            path = self.package_path(args.source)
        except DownloadError as exc:
            outcome = SwapOutcome(False, f"{args.model}: {exc}", {"model": args.model})
        else:
            outcome = self.vision.swapper.load(args.model, path, list(self.vision.recent_frames))
        return outcome, "model_loaded" if outcome.ok else "model_load_failed"


class RollbackModel(ModelCommand):
    name = "rollback_model"
    failed = "model_rollback_failed"

    def apply(self, args: ModelArgs) -> tuple[SwapOutcome, str]:
        outcome = self.vision.swapper.rollback(args.model)
        return outcome, "model_rolled_back" if outcome.ok else "model_rollback_failed"


class ShadowModel(ModelCommand):
    name = "shadow_model"
    failed = "shadow_failed"

    def validate(self, args: Mapping[str, Scalar]) -> ModelArgs:
        """``model``, ``url`` + ``sha256`` or ``path``, and ``every`` (batches per comparison, default 5)."""
        every = args.get("every", 5)
        try:
            if isinstance(every, bool):
                raise ValueError
            batches = max(1, int(every))
        except ValueError:
            raise CommandRejected(f"every must be a whole number, got {every!r}") from None
        return ModelArgs(super().validate(args).model, package_source(args), batches)

    def apply(self, args: ModelArgs) -> tuple[SwapOutcome, str]:
        assert args.source is not None
        model = args.model
        try:
            candidate = self.vision.swapper.candidate(model, self.package_path(args.source))
        except (DownloadError, PackageError, ModelLoadError, OSError) as exc:
            return SwapOutcome(False, f"{model}: shadow refused: {exc}", {"model": model}), "shadow_failed"
        self.vision.shadows[model] = ShadowRun(candidate, args.every)
        return SwapOutcome(True, f"{model}: shadowing {candidate.package_id} on 1 batch in {args.every}",
                           {"model": model, "package": candidate.package_id}), "shadow_started"


class PromoteShadow(ModelCommand):
    name = "promote_shadow"
    failed = "shadow_failed"

    def apply(self, args: ModelArgs) -> tuple[SwapOutcome, str]:
        shadow = self.vision.shadows.pop(args.model, None)
        if shadow is None:
            return SwapOutcome(False, f"{args.model}: no shadow running", {"model": args.model}), "shadow_failed"
        outcome = self.vision.swapper.adopt(args.model, shadow.model)
        return SwapOutcome(True, outcome.text, {**outcome.details, **shadow.status().model_dump()}), "model_loaded"


class StopShadow(ModelCommand):
    name = "stop_shadow"
    failed = "shadow_failed"

    def apply(self, args: ModelArgs) -> tuple[SwapOutcome, str]:
        shadow = self.vision.shadows.pop(args.model, None)
        if shadow is None:
            return SwapOutcome(False, f"{args.model}: no shadow running", {"model": args.model}), "shadow_failed"
        return SwapOutcome(True, f"{args.model}: shadow {shadow.model.package_id} stopped",
                           {"model": args.model, **shadow.status().model_dump()}), "shadow_stopped"


def model_commands(vision: VisionPipeline, packages: PackageSettings, downloads: Path,
                   base_dir: Path) -> list[CommandHandler]:
    return [kind(vision, packages, downloads, base_dir)
            for kind in (LoadModel, RollbackModel, ShadowModel, PromoteShadow, StopShadow)]


class OtaPipeline(Service):
    """Applies slow commands (model loads, shadows, rollbacks) one at a time, in arrival order, in
    its own loop, so that the MQTT thread never waits on a download or a model warm-up."""

    def __init__(self, machine: str, publisher: Publisher) -> None:
        super().__init__(f"ota:{machine}")
        self.publisher = publisher
        self._queue: queue.Queue[tuple[CommandHandler, Command]] = queue.Queue()
        self.add_loop("apply", self._apply_loop)

    def submit(self, handler: CommandHandler, command: Command) -> None:
        self._queue.put((handler, command))

    def _apply_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                handler, command = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.publisher.publish(handler.handle(command))
