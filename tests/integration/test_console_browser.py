"""The operator console in a real browser: Debian's Chromium driven by Selenium through Debian's
chromium-driver, against a real ``central serve`` fed by a real agent (synthetic camera with
defects, ONNX Runtime, evidence delivered over HTTP) and the embedded rules runner, on a real
Mosquitto. A defect becomes an alert whose page shows the overlay; acknowledging it on the page
changes it in the API. Every page is screenshotted into ``$EDGELINE_SCREENSHOTS`` (default: a
folder under the system temp dir), kept as a CI artefact."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from central.tokens import MachineTokens
from edge.agent import EdgeAgent
from edgeline.config import load
from edgeline.services import MosquittoBroker, free_port
from tests.conftest import service_unavailable
from tests.integration.central_process import client_env, start_central
from tests.integration.test_one_box import Command, one_box_copy, wait_for

pytestmark = pytest.mark.integration

TOKEN = "a-write-token-for-the-console"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")


def screenshots_dir() -> Path:
    folder = Path(os.environ.get("EDGELINE_SCREENSHOTS") or Path(tempfile.gettempdir()) / "edgeline-console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        service_unavailable("Debian's chromium and chromium-driver are not installed (scripts/install-test-deps.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def wait_in_page(driver: Any, condition: Any, timeout: float, what: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:  # htmx swaps fragments in place: an element read while it is replaced is read again
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        shot = screenshots_dir() / f"timeout-{int(time.time())}.png"
        driver.save_screenshot(str(shot))
        raise AssertionError(f"no {what} within {timeout} s (screenshot {shot})") from None


def test_a_defect_becomes_an_alert_with_its_overlay_and_is_acknowledged_from_the_page(
        mosquitto: MosquittoBroker, unique_name: str, tmp_path: Path, browser: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.webdriver.common.by import By

    site = one_box_copy(tmp_path, unique_name)
    (tmp_path / "token").write_text(TOKEN + "\n")
    server, base = start_central(tmp_path, site.read_text(), "--broker", f"{mosquitto.host}:{mosquitto.port}",
                                 env=client_env(EDGELINE_CENTRAL_TOKEN_FILE=str(tmp_path / "token")))
    rules = Command(tmp_path, "rules", ["stream", "embedded", "-c", str(site), "--metrics-port", str(free_port()),
                                        "--broker", f"{mosquitto.host}:{mosquitto.port}"])
    monkeypatch.setenv("EDGELINE_EVIDENCE_TOKEN", MachineTokens(TOKEN).token("m01"))
    config = load(site)
    config = config.model_copy(update={
        "broker": config.broker.model_copy(update={"host": mosquitto.host, "port": mosquitto.port}),
        "evidence": config.evidence.model_copy(update={"central_url": base})})
    agent = EdgeAgent(config, "m01", site.parent, heartbeat_s=1.0)
    shots = screenshots_dir()
    try:
        agent.start()
        browser.get(f"{base}/console/login?next=/console/alerts")
        browser.find_element(By.NAME, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        started = time.monotonic()
        # the camera rule's row once it shows its evidence (the site's line rule may fire too); read in
        # one script call: the list is swapped every 3 s, so a held element goes stale
        row_id = wait_in_page(browser, lambda d: d.execute_script(
            "const row = [...document.querySelectorAll('tr[id^=alert-]')].find("
            "r => r.innerText.includes('surface-defect') && r.querySelector('img.thumb')); return row && row.id"),
            60, "the camera rule's alert with an evidence thumbnail on the alerts page")
        seen_after_s, seen_at = time.monotonic() - started, time.time()
        browser.save_screenshot(str(shots / "alerts.png"))
        alert_id = row_id.removeprefix("alert-")
        browser.get(f"{base}/console/alerts/{alert_id}")
        overlay = wait_in_page(browser, lambda d: d.find_elements(By.ID, "overlay"), 10, "overlay on the alert page")[0]
        wait_in_page(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                         overlay), 10, "overlay image loaded")
        natural = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay)
        browser.save_screenshot(str(shots / "alert.png"))
        browser.find_element(By.CSS_SELECTOR, "button.ack").click()
        wait_in_page(browser, lambda d: "acknowledged by operator" in d.execute_script(
            "return (document.getElementById(arguments[0]) || {}).innerText || ''", f"state-{alert_id}"),
            10, "the acknowledgement on the page")
        acknowledged = httpx.get(f"{base}/alerts/{alert_id}", headers=AUTH, timeout=5).json()
        for name, path in (("fleet", "/console"), ("camera", "/console/cameras/m01/cam1"),
                           ("rollouts", "/console/rollouts")):
            browser.get(f"{base}{path}")
            wait_in_page(browser, lambda d: d.find_elements(By.TAG_NAME, "h1"), 10, f"the {name} page")
            browser.save_screenshot(str(shots / f"{name}.png"))
        browser.get(f"{base}/console")
        wait_in_page(browser, lambda d: "cam1" in d.find_element(By.ID, "machine-m01").text, 15,
                     "m01's cameras from its heartbeat on the fleet page")
    finally:
        agent.stop()
        rules.stop()
        server.terminate()
        server.wait(10)
    assert acknowledged["acknowledged_by"] == "operator" and acknowledged["rule"] == "surface-defect"
    assert acknowledged["evidence"] and natural == [acknowledged["evidence"][0]["width"],
                                                    acknowledged["evidence"][0]["height"]]
    shown_after_firing_s = seen_at - acknowledged["fired_at"]
    print(f"alert with evidence on the page {shown_after_firing_s:.1f} s after the rule fired ({seen_after_s:.1f} s "
          f"after sign-in, the camera's first defect run included); screenshots in {shots}")
    assert shown_after_firing_s < 10.0  # the page polls every 3 s; evidence is delivered as soon as it is encoded
    assert {p.name for p in shots.iterdir()} >= {"alerts.png", "alert.png", "fleet.png", "camera.png", "rollouts.png"}
