"""Evidence from a running agent (real Mosquitto, ONNX Runtime, OpenCV) to a real ``central serve``
process: alarmed frames arrive as records linked to the result messages that carried them, their
overlay served by the API; records made while central is down wait on the agent's disk and all
arrive once it is up."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from central.tokens import MachineTokens
from edge.agent import EdgeAgent
from edgeline.services import free_port
from stream.messages import Result, parse_message
from tests.conftest import edge_site
from tests.integration.central_process import client_env, start_central

pytestmark = pytest.mark.integration

TOKEN = "an-api-token-for-evidence"
READ = {"Authorization": f"Bearer {TOKEN}"}
SEG = {"seg": {"path": "builtin:seg-synth-int8"}}


def central_for(tmp_path: Path, mosquitto: Any, site: str, port: int | None = None) -> tuple[Any, str]:
    (tmp_path / "token").write_text(TOKEN + "\n")
    site_yaml = (f"site: {site}\nbroker: {{host: {mosquitto.host}, port: {mosquitto.port}}}\n"
                 "machines: [{id: m1, line: line-1, cameras: [{id: c0}]}]\n")
    return start_central(tmp_path, site_yaml, env=client_env(EDGELINE_CENTRAL_TOKEN_FILE=str(tmp_path / "token")),
                         port=port)


def agent_for(mosquitto: Any, site: str, tmp_path: Path, central_url: str, monkeypatch: pytest.MonkeyPatch) -> EdgeAgent:
    monkeypatch.setenv("EDGELINE_EVIDENCE_TOKEN", MachineTokens(TOKEN).token("m1"))
    camera = {"id": "c0", "models": ["seg"], "fps": 10, "source": {"type": "synthetic", "seed": 3, "defect_rate": 0.6}}
    config = edge_site(mosquitto, site, tmp_path, [{"id": "m1", "cameras": [camera]}], SEG,
                       inference={"result_window_ms": 200},
                       evidence={"central_url": central_url, "path": str(tmp_path / "edge-evidence-{machine}"),
                                 "min_interval_s": 1.0, "min_gap_s": 0.5, "retry_max_s": 2.0})
    return EdgeAgent(config, "m1", heartbeat_s=1.0)


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)
    return value


def listed(base: str) -> list[dict[str, Any]]:
    return httpx.get(f"{base}/evidence", params={"machine": "m1", "limit": 1000}, headers=READ, timeout=5).json()


def test_alarmed_frames_reach_central_linked_to_their_results(mosquitto, mqtt_probe, unique_name, tmp_path,
                                                              monkeypatch):
    server, base = central_for(tmp_path, mosquitto, unique_name)
    probe = mqtt_probe(mosquitto)
    probe.subscribe(f"edgeline/v1/{unique_name}/m1/result/#")
    agent = agent_for(mosquitto, unique_name, tmp_path, base, monkeypatch)
    agent.start()
    try:
        records = wait_until(lambda: len(got := listed(base)) >= 3 and got, 60, "three evidence records at central")
        overlay = httpx.get(f"{base}/evidence/{records[0]['id']}/overlay", headers=READ, timeout=5)
    finally:
        agent.stop()
        server.terminate()
        server.wait(10)
    image = cv2.imdecode(np.frombuffer(overlay.content, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (records[0]["height"], records[0]["width"])
    results: dict[str, Result] = {}
    while True:
        try:
            message = parse_message(probe.get(timeout=0.5).payload)
        except TimeoutError:
            break
        results[message.msg_id] = message
    for record in records:
        result = results[record["result_msg_id"]]  # the result message that carried this frame
        frame = next(f for f in result.frames if f.seq == record["seq"])
        assert (result.camera, frame.ts) == (record["camera"], record["ts"])
        assert any(o.alarm and o.model == record["model"] for o in frame.outputs) and record["reason"] == "alarm"
        assert record["regions"] == [r.model_dump(mode="json") for o in frame.outputs for r in o.regions]
    times = sorted(r["ts"] for r in records)
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.5  # never closer than min_gap_s


def test_evidence_made_while_central_is_down_waits_on_disk_and_all_of_it_arrives(mosquitto, unique_name, tmp_path,
                                                                               monkeypatch):
    port = free_port()
    agent = agent_for(mosquitto, unique_name, tmp_path, f"http://127.0.0.1:{port}", monkeypatch)
    agent.start()
    evidence = agent.evidence
    assert evidence is not None
    try:
        wait_until(lambda: evidence.store.count("pending") >= 2 and evidence.failed_attempts >= 1, 60,
                   "records pending while central is down")
        server, base = central_for(tmp_path, mosquitto, unique_name, port)
        try:
            wait_until(lambda: evidence.delivered >= 3, 60, "pending records delivered once central is up")
        finally:
            agent.stop()
            delivered = {r["id"] for r in wait_until(lambda: listed(base), 10, "records listed")}
            server.terminate()
            server.wait(10)
    finally:
        agent.stop()
    kept = sum(evidence.kept.values())
    on_disk = {p.name.split("-", 1)[1] for state in ("pending", "delivered")
               for p in (tmp_path / "edge-evidence-m1" / state).iterdir()}
    assert evidence.store.evicted == {} and evidence.dropped == 0
    assert len(on_disk) == kept and evidence.delivered + evidence.store.count("pending") == kept
    assert {p.name.split("-", 1)[1] for p in (tmp_path / "edge-evidence-m1" / "delivered").iterdir()} <= delivered
