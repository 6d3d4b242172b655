"""What evidence costs and takes: one vision machine as a real agent against a real Mosquitto and a
real ``central serve``, first with evidence off, then on (the default settings, delivered to
central), ``--seconds`` each, in the same run. ``--site one-box``: ``config/one-box.yaml``'s m01
(``cam1`` with the seg model, 10 fps 320x240 synthetic; ``overview`` without a model); ``--site
demo``: ``edgeline demo``'s site (5 fps, defect rate 0.3), e.g. its m02 with three cameras.

    python -m bench.evidence [--seconds 120] [--site one-box|demo] [--machine m01]

Per run and camera with a model: frames inferred per second (the ratio on/off says whether
evidence slows inference), frames whose image-level alarm fired, evidence records kept and
delivered per minute, the mean record on the agent's disk (frame + mask + overlay), the bytes per
hour per camera projected from the run, and what the agent's store would hold after an hour at
the default bound (the smaller of that and ``evidence.max_bytes``). Needs Mosquitto and the
central extra.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import typer
import yaml

from bench.report import report
from central.tokens import MachineTokens
from edge.agent import EdgeAgent
from edgeline.config import SiteConfig, load
from edgeline.demo import CentralProcess, demo_config
from edgeline.services import MosquittoBroker, free_port

SITE_FILE = Path(__file__).resolve().parent.parent / "config" / "one-box.yaml"
TOKEN = "bench-evidence-api-token"
WARMUP_S = 5.0


def site_for(config: SiteConfig, broker: MosquittoBroker, folder: Path, central: str | None) -> SiteConfig:
    evidence = config.evidence.model_copy(update={"enabled": central is not None, "central_url": central,
                                                  "path": str(folder / "evidence-{machine}")})
    return config.model_copy(update={
        "broker": config.broker.model_copy(update={"host": broker.host, "port": broker.port}),
        "outbox": config.outbox.model_copy(update={"path": str(folder / "outbox-{machine}.sqlite")}),
        "metrics": config.metrics.model_copy(update={"port": 0}), "evidence": evidence,
        "machines": [m.model_copy(update={"metrics_port": None}) for m in config.machines]})


def counts(agent: EdgeAgent) -> dict[str, Any]:
    evidence = agent.evidence
    return {"cameras": {c: (n.frames_inferred, n.defect_frames) for c, n in agent.vision.camera_counters.items()},
            "kept": sum(evidence.kept.values()) if evidence else 0,
            "by_camera": dict(evidence.kept_by_camera) if evidence else {},
            "delivered": evidence.delivered if evidence else 0,
            "bytes": evidence.store.bytes if evidence else 0}


def run(config: SiteConfig, machine: str, seconds: float, label: str) -> list[dict[str, Any]]:
    agent = EdgeAgent(config, machine, SITE_FILE.parent, heartbeat_s=5.0)  # builtin packages: any base works
    agent.start()
    try:
        time.sleep(WARMUP_S)
        before, started = counts(agent), time.monotonic()
        time.sleep(seconds)
        after, elapsed = counts(agent), time.monotonic() - started
    finally:
        agent.stop()
    rows = []
    modelled = [c.id for c in agent.machine.cameras if c.models]
    for camera in modelled:
        inferred = after["cameras"][camera][0] - before["cameras"][camera][0]
        alarms = after["cameras"][camera][1] - before["cameras"][camera][1]
        kept = after["by_camera"].get(camera, 0) - before["by_camera"].get(camera, 0)
        record_bytes = (after["bytes"] - before["bytes"]) / max(1.0, after["kept"] - before["kept"])  # machine mean
        per_hour = kept / elapsed * 3600 * record_bytes
        rows.append({"run": label, "camera": camera, "inferred fps": round(inferred / elapsed, 2),
                     "alarm frames/min": round(alarms / elapsed * 60, 1),
                     "records/min": round(kept / elapsed * 60, 2),
                     "delivered/min (machine)": round((after["delivered"] - before["delivered"]) / elapsed * 60, 2),
                     "record KB": round(record_bytes / 1024, 1), "MB/h per camera": round(per_hour / 2**20, 2),
                     "machine store after 1 h MB": round(min((after["bytes"] - before["bytes"]) / elapsed * 3600,
                                                             config.evidence.max_bytes) / 2**20, 1)})
    return rows


def main(seconds: float = typer.Option(120.0, help="measured seconds per run (after a 5 s warm-up)"),
         site: str = typer.Option("one-box", help="one-box (config/one-box.yaml) or demo (edgeline demo's site)"),
         machine: str = typer.Option("m01", help="the site's machine to run")) -> None:
    with tempfile.TemporaryDirectory(prefix="edgeline-bench-evidence-") as tmp, MosquittoBroker() as broker:
        folder = Path(tmp)
        site_file = SITE_FILE
        if site == "demo":
            site_file = folder / "demo.yaml"
            site_file.write_text(yaml.safe_dump(demo_config().model_dump(mode="json", by_alias=True,
                                                                          exclude_none=True)))
        elif site != "one-box":
            raise typer.BadParameter(f"--site is one-box or demo, not {site!r}")
        config = load(site_file)
        central = CentralProcess(site_for(config, broker, folder, None), folder, free_port(), TOKEN)
        central.start()
        base = central.url
        os.environ["EDGELINE_EVIDENCE_TOKEN"] = MachineTokens(TOKEN).token(machine)
        try:
            rows = run(site_for(config, broker, folder / "off", None), machine, seconds, "evidence off")
            rows += run(site_for(config, broker, folder / "on", base), machine, seconds, "evidence on")
            at_central = len(httpx.get(f"{base}/evidence", params={"limit": 1000},
                                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json())
        finally:
            central.stop()
    off, on = rows[0], rows[-1]
    ratio = on["inferred fps"] / off["inferred fps"] if off["inferred fps"] else float("nan")
    report(f"evidence-{site}", f"evidence on the {site} site's {machine}, {seconds:g} s per run", rows,
           notes=(f"inferred fps with evidence on / off: {ratio:.2f}; records at central after the run: "
                  f"{at_central}. Records and bytes per hour are projected linearly from the run; "
                  f"'store after 1 h' is the agent's store at the default bound "
                  f"({config.evidence.max_bytes / 2**20:.0f} MiB), delivered records included."))


if __name__ == "__main__":
    typer.run(main)
