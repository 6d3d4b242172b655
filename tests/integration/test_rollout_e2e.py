"""A rollout end to end: central (API, registry, rollout manager on a real port), three edge
agents on a real Mosquitto. A good package goes canary then everywhere with no frame dropped; a
slow one fails its latency gate and one with wrong outputs its drift gate, each at the canary,
and is rolled back; shadow-gated, an agreeing package is promoted stage by stage and a
disagreeing one never leaves shadow mode."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from central.api import create_api
from central.registry import Registry
from central.rollouts import RolloutManager
from central.tokens import DownloadLinks
from edge.agent import EdgeAgent
from edgeline.services import free_port
from models.package import BUILTIN_PACKAGES, load_package, write_package_tar
from models.package.signing import builtin_trusted_keys
from stream.mqtt import MqttClient, MqttSettings
from tests.conftest import edge_site

pytestmark = pytest.mark.integration
TOKEN = "rollout-test-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MACHINES = ["m1", "m2", "m3"]
TILES_INT8 = load_package(BUILTIN_PACKAGES / "seg-tiles-int8").manifest.package_id


@pytest.fixture
def central(mosquitto, unique_name, tmp_path):
    port = free_port()
    registry = Registry(f"sqlite:///{tmp_path / 'central.db'}", tmp_path / "store", builtin_trusted_keys())
    registry.sync_site(unique_name, {machine: ("line-1", ["c1"]) for machine in MACHINES})  # as serve does
    manager = RolloutManager(unique_name, registry, MqttClient(MqttSettings(host=mosquitto.host, port=mosquitto.port),
                                                               f"{unique_name}-central"), f"http://127.0.0.1:{port}",
                             links=DownloadLinks(TOKEN))  # the agents download by signed links, with no token
    manager.start()
    server = uvicorn.Server(uvicorn.Config(create_api(registry, TOKEN, manager), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", manager
    server.should_exit = True
    thread.join(10)
    manager.stop()


@pytest.fixture
def fleet(mosquitto, unique_name, tmp_path, central, monkeypatch):
    """``fleet(fps)``: three agents on seg-synth int8 that central knows, with seg-synth fp32 and
    seg-tiles int8 in the registry. Their download cache is new: every package is downloaded."""
    base, manager = central
    monkeypatch.setenv("EDGELINE_CACHE_DIR", str(tmp_path / "cache"))
    agents: list[EdgeAgent] = []

    def start(fps: float) -> list[EdgeAgent]:
        cameras = [{"id": "c1", "models": ["seg"], "fps": fps}]
        config = edge_site(mosquitto, unique_name, tmp_path, [{"id": m, "cameras": cameras} for m in MACHINES],
                           {"seg": {"path": "builtin:seg-synth-int8"}})
        agents.extend(EdgeAgent(config, m, base_dir=tmp_path, heartbeat_s=0.5) for m in MACHINES)
        for agent in agents:
            agent.start()
        for name in ("seg-synth-fp32", "seg-tiles-int8"):
            tar = write_package_tar(BUILTIN_PACKAGES / name, tmp_path / f"{name}.tar").read_bytes()
            assert httpx.post(f"{base}/models", content=tar, headers=AUTH).status_code == 201
        while len(manager.running) < 3:
            time.sleep(0.2)
        return agents

    yield start
    for agent in agents:
        agent.stop()


def wait_phase(base: str, rollout_id: str, phases: set[str], timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{base}/rollouts/{rollout_id}", headers=AUTH).json()
        if state["phase"] in phases:
            return state
        time.sleep(0.5)
    raise AssertionError(f"rollout stuck: {state}")


def test_good_package_everywhere_then_a_slow_one_rolled_back(fleet, unique_name, central):
    base, manager = central
    agents = fleet(fps=5)
    dropped = [a.vision.cameras[0].frames_dropped for a in agents]

    good = httpx.post(f"{base}/rollouts", headers=AUTH, json={
        "package": "seg-synth-1.0.0-fp32", "model": "seg", "machines": MACHINES, "stages": [0, 1.0],
        "soak_s": 2, "max_latency_ratio": 100.0}).json()  # fp32 is slower than int8, and at ~1.6 ms a
    # p95 under CI load reached 10.8x (a failed run): this rollout is about reaching every machine;
    # the latency gate is the slow package's test below
    assert good["previous"] == "seg-synth-1.0.0-int8"
    done = wait_phase(base, good["id"], {"completed", "rolled_back"})
    assert done["phase"] == "completed", (done["failure"], done["history"])
    assert [a.vision.seg_models["seg"].package_id for a in agents] == ["seg-synth-1.0.0-fp32"] * 3
    assert [a.vision.cameras[0].frames_dropped for a in agents] == dropped  # no frame lost to a swap
    assert any("stage 2/2" in e["text"] for e in done["history"])

    slow = httpx.post(f"{base}/rollouts", headers=AUTH, json={
        "package": TILES_INT8, "model": "seg", "machines": MACHINES, "stages": [0, 1.0],
        "soak_s": 6, "max_latency_ratio": 1.5, "max_drift": 1.0}).json()  # drift allowed: its latency must fail it
    failed = wait_phase(base, slow["id"], {"completed", "rolled_back"})
    assert failed["phase"] == "rolled_back" and failed["failure"].startswith("gate latency"), failed
    assert [a.vision.seg_models["seg"].package_id for a in agents] == ["seg-synth-1.0.0-fp32"] * 3
    assert httpx.post(f"{base}/rollouts/{slow['id']}/resume", headers=AUTH).status_code == 409

    deadline = time.monotonic() + 30  # the drift baseline: 20 frames on fp32 on every machine
    while min(a.vision.model_records[("seg", "seg-synth-1.0.0-fp32")].frames for a in agents) < 20:
        assert time.monotonic() < deadline, "fewer than 20 frames on fp32"
        time.sleep(0.2)
    time.sleep(1.0)  # and a heartbeat that says so
    wrong = httpx.post(f"{base}/rollouts", headers=AUTH, json={  # latency allowed: its outputs must fail it
        "package": TILES_INT8, "model": "seg", "machines": MACHINES, "stages": [0, 1.0],
        "soak_s": 10, "max_latency_ratio": 100.0, "max_drift": 0.05, "drift_min_frames": 20}).json()
    drifted = wait_phase(base, wrong["id"], {"completed", "rolled_back"})
    assert drifted["phase"] == "rolled_back" and drifted["failure"].startswith("gate drift: m1"), drifted
    assert [a.vision.seg_models["seg"].package_id for a in agents] == ["seg-synth-1.0.0-fp32"] * 3
    again = RolloutManager(unique_name, manager.registry, MqttClient(MqttSettings(), "unused"), base)
    again.restore()  # a restarted central reads every rollout back from its database
    for rollout_id in (good["id"], slow["id"], wrong["id"]):
        assert again.describe(rollout_id) == httpx.get(f"{base}/rollouts/{rollout_id}", headers=AUTH).json()
    registered = {m["id"]: m for m in httpx.get(f"{base}/machines", headers=AUTH).json()}
    assert sorted(registered) == MACHINES and {m["status"] for m in registered.values()} == {"online"}
    assert all(m["models"] == {"seg": "seg-synth-1.0.0-fp32"} and m["cameras"] == ["c1"] and m["last_heartbeat"] > 0
               for m in registered.values())
    while agents:  # the fixture stops what is left in the list
        agents.pop().stop()
    deadline = time.monotonic() + 10
    while {m["status"] for m in httpx.get(f"{base}/machines", headers=AUTH).json()} != {"offline"}:
        assert time.monotonic() < deadline, "the machines' offline status never reached the registry"
        time.sleep(0.2)


def test_a_shadow_gated_rollout_promotes_an_agreeing_package_and_never_deploys_a_disagreeing_one(
        fleet, central):
    base, manager = central
    agents = fleet(fps=10)
    gates = {"stages": [0, 1.0], "soak_s": 1, "max_latency_ratio": 10.0, "min_shadow_agreement": 0.8,
             "shadow_frames": 10}

    agreeing = httpx.post(f"{base}/rollouts", headers=AUTH,
                          json={"package": "seg-synth-1.0.0-fp32", "model": "seg", "machines": MACHINES,
                                **gates}).json()
    assert agreeing["phase"] == "shadowing"
    done = wait_phase(base, agreeing["id"], {"completed", "rolled_back"})
    assert done["phase"] == "completed", (done["failure"], done["history"])
    texts = [e["text"] for e in done["history"]]
    assert sum("shadowing seg-synth-1.0.0-fp32" in t for t in texts) == 2  # canary, then the rest
    assert sum("promoting" in t for t in texts) == 2
    # No frame-drop check here: the shadow runs inline on 1 batch in N, so on a loaded box its
    # extra inference is shed as designed. That a swap drops no frame is the first test's check.
    assert [a.vision.seg_models["seg"].package_id for a in agents] == ["seg-synth-1.0.0-fp32"] * 3
    assert all(a.vision.shadows == {} for a in agents)

    disagreeing = httpx.post(f"{base}/rollouts", headers=AUTH,
                             json={"package": TILES_INT8, "model": "seg", "machines": MACHINES,
                                   **gates}).json()  # a model of other parts: its masks disagree
    failed = wait_phase(base, disagreeing["id"], {"completed", "rolled_back"})
    assert failed["phase"] == "rolled_back" and failed["failure"].startswith("gate shadow: m1 agreement"), failed
    deadline = time.monotonic() + 10
    while any(a.vision.shadows for a in agents):  # the stop_shadow command is applied off the MQTT thread
        assert time.monotonic() < deadline, "the canary's shadow was never stopped"
        time.sleep(0.1)
    assert [a.vision.seg_models["seg"].package_id for a in agents] == ["seg-synth-1.0.0-fp32"] * 3
    assert not any("rolling back" in e["text"] for e in failed["history"])  # nothing was deployed
