"""How fast does a rollout reach 50 machines, and how fast does a failed one come back?

    python -m bench.rollout [--machines 50] [--soak 5]

Central runs for real (FastAPI on a port, SQLite registry, rollout manager) against a real
Mosquitto. The 50 machines are simulated: one MQTT connection subscribed to all their command
topics; on ``load_model`` each downloads the package from central over HTTP, checks its sha256,
verifies it (checksums and signature, as the edge does), and reports it in its next heartbeat
(1 s apart, like an agent); on ``rollback_model`` it reports the previous package. On
``shadow_model`` it downloads and verifies the same way, then reports the shadow in heartbeats
with 5 more frames compared per second (a 10 fps camera, one batch in 2) at the agreement the
case sets; ``promote_shadow`` makes it the running package. They do not run inference: frames
dropped at a swap are measured on real agents by tests/integration/test_rollout_e2e.py. A "slow"
package makes the machines that run it report 3x their p95 latency. Rows: a good package
(canary, 25%, all), a slow one caught at the canary, one slow only on machines past the first 5
(caught at the 25% stage after reaching 13 machines), and two shadow-gated rollouts (20 frames
at agreement >= 0.9 per machine before each stage deploys): one agreeing, one that disagrees and
is stopped at the canary's shadow.
"""

from __future__ import annotations

import re
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import typer
import uvicorn

from bench.report import report
from central.api import create_api
from central.registry import Registry
from central.rollouts import RolloutManager
from central.tokens import DownloadLinks
from edge.ota import fetch_package
from edgeline.services import MosquittoBroker, free_port
from models.package import BUILTIN_PACKAGES, PackageSettings, load_package, write_package_tar
from models.package.signing import builtin_trusted_keys
from stream.messages import CameraStatus, Command, Heartbeat, ShadowStatus, parse_message
from stream.mqtt import MqttClient, MqttSettings
from stream.topics import topic_for

SITE = "rollbench"
TOKEN = "bench-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
START = "seg-synth-1.0.0-int8"
TILES_INT8 = load_package(BUILTIN_PACKAGES / "seg-tiles-int8").manifest.package_id
SHADOW_FPS = 5.0
SHADOW_GATES = {"min_shadow_agreement": 0.9, "shadow_frames": 20}


class SimulatedFleet:
    """``machines`` edges that obey load_model/rollback_model and send heartbeats every second."""

    def __init__(self, broker: MosquittoBroker, machines: int, workdir: Path) -> None:
        self.ids = [f"m{i:02d}" for i in range(1, machines + 1)]
        self.running = dict.fromkeys(self.ids, START)
        self.previous: dict[str, str] = {}
        self.slow_packages: set[str] = set()
        self.slow_machines: set[str] = set(self.ids)
        self.agreement: dict[str, float] = {}
        """package -> the mask agreement its shadow reports."""
        self.shadows: dict[str, tuple[str, float]] = {}
        """machine -> (package in shadow mode, when it started)."""
        self.workdir = workdir
        self.client = MqttClient(MqttSettings(host=broker.host, port=broker.port), client_id="bench-fleet")
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="bench-fleet")
        self.trusted = builtin_trusted_keys()
        self._stop = threading.Event()

    def start(self) -> None:
        self.client.subscribe(f"edgeline/v1/{SITE}/+/cmd/+", lambda m: self.pool.submit(
            self._on_command, m.payload).add_done_callback(_report_failure))
        self.client.start()
        self.client.wait_connected()
        threading.Thread(target=self._heartbeats, name="bench-fleet-hb", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=True)
        self.client.stop()

    def _on_command(self, payload: bytes) -> None:
        command = parse_message(payload)
        assert isinstance(command, Command)
        machine = command.machine
        if command.name in ("load_model", "shadow_model"):
            tar = fetch_package(str(command.args["url"]), str(command.args["sha256"]), self.workdir / machine,
                                PackageSettings())
            package = load_package(tar, trusted_keys=self.trusted, cache_dir=self.workdir / "cache")
            if command.name == "shadow_model":
                self.shadows[machine] = (package.manifest.package_id, time.monotonic())
            else:
                self._switch(machine, package.manifest.package_id)
        elif command.name == "promote_shadow" and machine in self.shadows:
            self._switch(machine, self.shadows.pop(machine)[0])
        elif command.name == "stop_shadow":
            self.shadows.pop(machine, None)
        elif command.name == "rollback_model" and machine in self.previous:
            self.running[machine] = self.previous.pop(machine)
        self._heartbeat(machine)

    def _switch(self, machine: str, package: str) -> None:
        self.previous[machine] = self.running[machine]
        self.running[machine] = package

    def _heartbeats(self) -> None:
        while not self._stop.wait(1.0):
            for machine in self.ids:
                self._heartbeat(machine)

    def _heartbeat(self, machine: str) -> None:
        package = self.running[machine]
        slow = package in self.slow_packages and machine in self.slow_machines
        camera = CameraStatus(camera="c1", state="ok", latency_p50_ms=4.0, latency_p95_ms=15.0 if slow else 5.0,
                              latency_p99_ms=16.0 if slow else 6.0)
        shadow = {}
        if machine in self.shadows:
            candidate, since = self.shadows[machine]
            shadow["seg"] = ShadowStatus(package=candidate, frames=int((time.monotonic() - since) * SHADOW_FPS),
                                         agreement=self.agreement.get(candidate, 1.0))
        beat = Heartbeat(site=SITE, machine=machine, ts=time.time(), uptime_s=1.0, cameras=[camera],
                         models={"seg": package}, shadow=shadow)
        self.client.publish(topic_for(beat), beat.to_json())


def _report_failure(done: Future[None]) -> None:
    """A simulated machine whose command failed says why (else the rollout only times out)."""
    if done.exception() is not None:
        print(f"simulated machine: command failed: {done.exception()!r}", file=sys.stderr, flush=True)


def run_rollout(base: str, package: str, machines: list[str], soak_s: float, gates: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    rollout = httpx.post(f"{base}/rollouts", headers=AUTH, timeout=30, json={
        "package": package, "model": "seg", "machines": machines, "stages": [0, 0.25, 1.0], "soak_s": soak_s,
        "max_latency_ratio": 1.5, **gates}).json()
    while True:
        state = httpx.get(f"{base}/rollouts/{rollout['id']}", headers=AUTH, timeout=30).json()
        if state["phase"] in ("completed", "rolled_back"):
            break
        time.sleep(0.1)
    return {"elapsed": time.monotonic() - started, **state}


def _stage_times(history: list[dict]) -> list[float]:
    """Seconds from each stage's start (its shadow or deploy) to the next stage's start (or to the end)."""
    starts = [e["ts"] for e in history if re.match(r"stage \d+/\d+: ", e["text"])]
    return [round(b - a, 2) for a, b in zip(starts, [*starts[1:], history[-1]["ts"]])]


def _rollback_s(history: list[dict]) -> float | None:
    """Failed gate to every machine back on the old package (or its shadow stopped)."""
    begun = next((e["ts"] for e in history if e["phase"] == "rolling_back"), None)
    return round(history[-1]["ts"] - begun, 2) if begun is not None else None


def main(machines: int = 50, soak: float = 5.0, out: Path | None = None) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp, MosquittoBroker() as broker:
        workdir = Path(tmp)
        port = free_port()
        registry = Registry(f"sqlite:///{workdir / 'central.db'}", workdir / "store", builtin_trusted_keys())
        fleet = SimulatedFleet(broker, machines, workdir / "fleet")
        registry.sync_site(SITE, {machine: ("line-1", ["c1"]) for machine in fleet.ids})  # central admits known machines only
        manager = RolloutManager(SITE, registry, MqttClient(MqttSettings(host=broker.host, port=broker.port),
                                                            "bench-central"), f"http://127.0.0.1:{port}", tick_s=0.1,
                                 links=DownloadLinks(TOKEN))
        manager.start()
        server = uvicorn.Server(uvicorn.Config(create_api(registry, TOKEN, manager), host="127.0.0.1", port=port,
                                               log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        for name in ("seg-synth-fp32", "seg-synth-fp16", "seg-synth-int8", "seg-tiles-int8"):
            tar = write_package_tar(BUILTIN_PACKAGES / name, workdir / f"{name}.tar").read_bytes()
            httpx.post(f"{base}/models", content=tar, headers=AUTH, timeout=60).raise_for_status()
        fleet.start()
        try:
            while len(manager.running) < machines:
                time.sleep(0.1)
            fleet.agreement = {"seg-synth-1.0.0-int8": 0.96, TILES_INT8: 0.3}
            cases = [("good package", "seg-synth-1.0.0-fp32", set(), set(fleet.ids), {}),
                     ("slow at the canary", "seg-synth-1.0.0-fp16", {"seg-synth-1.0.0-fp16"}, set(fleet.ids), {}),
                     ("slow past 5 machines", "seg-synth-1.0.0-fp16", {"seg-synth-1.0.0-fp16"}, set(fleet.ids[5:]),
                      {}),
                     ("shadow-gated, agrees", "seg-synth-1.0.0-int8", set(), set(fleet.ids), SHADOW_GATES),
                     ("shadow-gated, disagrees", TILES_INT8, set(), set(fleet.ids), SHADOW_GATES)]
            for label, package, slow_packages, slow_machines, gates in cases:
                fleet.slow_packages, fleet.slow_machines = slow_packages, slow_machines
                state = run_rollout(base, package, fleet.ids, soak, gates)
                on_new = sum(1 for p in fleet.running.values() if p == package)
                rows.append({"rollout": label, "machines": machines, "soak_s": soak, "phase": state["phase"],
                             "stage_s": " / ".join(f"{t:g}" for t in _stage_times(state["history"])),
                             "total_s": round(state["elapsed"], 2), "rollback_s": _rollback_s(state["history"]),
                             "machines_on_new": on_new, "shadows_left": len(fleet.shadows),
                             "failure": ":".join((state["failure"] or "").split(":")[:2])[:30]})
                print(rows[-1], flush=True)
        finally:
            fleet.stop()
            server.should_exit = True
            manager.stop()
    report("rollout", f"rollout to {machines} simulated machines (real central, Mosquitto, downloads and "
           f"verification), stages 1 / 25% / all, soak {soak:g} s", rows,
           notes="stage_s: a stage's start (shadow or deploy) to the next one's (the last: to the end); rollback_s: "
           "failed gate to every machine reporting the old package or its shadow stopped; shadow-gated: 20 frames at "
           "agreement >= 0.9 per machine (5 frames/s) before each stage deploys; frames dropped at a swap: 0 on real agents (tests/integration/"
           "test_rollout_e2e.py)", out=out)


if __name__ == "__main__":
    typer.run(main)
