"""``edgeline demo`` as a user runs it: a real process, its own broker, a summary at the end."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e

DEMO = [sys.executable, "-m", "edgeline.cli", "demo"]


def counts(output: str) -> dict[str, int]:
    patterns = {
        "frames": r"frames captured (\d+)", "inferred": r"inferred (\d+)", "results": r"results (\d+)",
        "scores": r"anomaly scores (\d+)", "alerts": r"alerts (\d+) firing",
        "faults": r"pump faults injected (\d+)", "detected": r"detected (\d+); alarm events",
        "events": r"alarm events (\d+)", "false_events": r"alarm events \d+, false (\d+)",
    }
    found = {}
    for name, pattern in patterns.items():
        match = re.search(pattern, output)
        assert match, f"summary has no {name!r}:\n{output[-3000:]}"
        found[name] = int(match.group(1))
    return found


def require_mosquitto() -> None:
    if shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"):
        if os.environ.get("EDGELINE_REQUIRE_SERVICES") == "1":
            pytest.fail("mosquitto not installed (EDGELINE_REQUIRE_SERVICES=1)")
        pytest.skip("mosquitto not installed")


def test_demo_runs_for_its_duration_and_prints_the_summary() -> None:
    require_mosquitto()
    started = time.monotonic()
    done = subprocess.run([*DEMO, "--duration", "15"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - started >= 15
    found = counts(done.stdout)
    assert found["frames"] > 200  # 9 cameras at 5 fps for 15 s is 675
    assert 0 < found["results"] <= found["inferred"] <= found["frames"]
    assert found["scores"] > 100  # 3 pumps at 5 Hz
    assert found["alerts"] > 0
    assert found["detected"] <= found["faults"] and found["detected"] <= found["events"]
    assert found["false_events"] <= 1, "the pumps' alarm events should be their injected faults"
    assert "Cameras" in done.stdout and "Latest alerts" in done.stdout  # the live view rendered


def test_ctrl_c_shuts_down_in_order_and_still_summarises() -> None:
    """Started as a background job of a non-interactive shell would start it: SIGINT ignored."""
    require_mosquitto()
    command = " ".join([*DEMO, "--machines", "2", "--no-live"])
    process = subprocess.Popen(["bash", "-c", f"trap '' INT; exec {command}"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(8)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "summary (interrupted)" in stdout
    assert counts(stdout)["results"] > 0
    assert "Traceback" not in stderr


def test_demo_runs_on_the_embedded_broker_where_mosquitto_is_missing() -> None:
    done = subprocess.run([*DEMO, "--duration", "8", "--machines", "1", "--embedded-broker"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "EmbeddedBroker" in done.stdout
    found = counts(done.stdout)
    assert found["results"] > 10 and found["scores"] > 10


def test_the_demo_runs_central_with_the_console_which_keeps_alerts_and_evidence() -> None:
    require_mosquitto()
    process = subprocess.Popen([*DEMO, "--duration", "40", "--machines", "2", "--no-live", "--console-port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    try:
        line = process.stdout.readline()  # the console's line comes first, before the run
        match = re.search(r"operator console: (http://127\.0\.0\.1:\d+)/console \(sign in with the token (\S+)\)", line)
        assert match, line
        base, auth = match.group(1), {"Authorization": f"Bearer {match.group(2)}"}
        deadline = time.monotonic() + 35
        alerts = evidence = []
        while time.monotonic() < deadline and not (alerts and evidence):
            alerts = httpx.get(f"{base}/alerts", headers=auth, timeout=5).json()
            evidence = httpx.get(f"{base}/evidence", headers=auth, timeout=5).json()
            time.sleep(1)
        page = httpx.get(f"{base}/console/alerts", headers=auth, timeout=5)
    finally:
        stdout, stderr = process.communicate(timeout=90)
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert alerts and evidence, (alerts, evidence)
    assert page.status_code == 200 and alerts[0]["rule"] in page.text
    assert counts(stdout)["alerts"] > 0
