"""What the MQTT -> Kafka bridge costs per message, by producer linger, in one run:

    python -m bench.bridge [--rate 1000] [--messages 12000] [--linger-ms 5,25,50] [--rounds 2]

A real Mosquitto and a real Kafka; for each ``stream.bridge.linger_ms`` an ``edgeline stream bridge``
process of its own (own topics), fed the simulated site's messages (3-frame results, pump scores,
heartbeats of 50 machines) at ``--rate`` from this process, until Kafka has acknowledged all of
them. Its CPU seconds over that span per message, and the ratio to the first linger of the list
(the rounds alternate the settings, so a slow spell of the box touches each). Needs Mosquitto and
the Kafka jars.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import typer
import yaml

from bench.central import Process, _cpu, _sum, _wait_until, replay_messages
from bench.report import report
from edgeline.services import KafkaBroker, MosquittoBroker
from stream.messages import Envelope
from stream.mqtt import MqttClient, MqttSettings
from stream.topics import topic_for

SITE = "benchbridge"


def bridge_config(path: Path, mosquitto: MosquittoBroker, kafka: KafkaBroker, prefix: str, linger_ms: int) -> Path:
    path.write_text(yaml.safe_dump({
        "site": SITE, "broker": {"host": mosquitto.host, "port": mosquitto.port},
        "stream": {"kafka": kafka.bootstrap, "topic_prefix": prefix, "partitions": 4,
                   "bridge": {"linger_ms": linger_ms}},
    }))
    return path


def publish_at(client: MqttClient, messages: list[Envelope], rate: float) -> None:
    """Publish ``messages`` at QoS 1, paced to ``rate`` per second."""
    started = time.monotonic()
    for i, message in enumerate(messages):
        client.publish(topic_for(message), message.to_json(), qos=1)
        if i % 100 == 99:
            time.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))


def one_bridge(linger_ms: int, messages: list[Envelope], rate: float, client: MqttClient,
               mosquitto: MosquittoBroker, kafka: KafkaBroker, workdir: Path, run: int) -> dict[str, Any]:
    prefix = f"bridge{run}l{linger_ms}"
    config = bridge_config(workdir / f"{prefix}.yaml", mosquitto, kafka, prefix, linger_ms)
    bridge = Process(f"bridge-{prefix}", ["stream", "bridge", "-c", str(config)], workdir)
    try:
        _wait_until(lambda: bool(bridge.metrics()), 120, "the bridge's metrics did not answer")
        produced = lambda: _sum(bridge.metrics(), "edgeline_bridge_kafka_produced_total")  # noqa: E731
        cpu0, wall0 = _cpu(bridge.ps), time.monotonic()
        publish_at(client, messages, rate)
        _wait_until(lambda: produced() >= len(messages), 300, "Kafka did not acknowledge every message")
        cpu, wall = _cpu(bridge.ps) - cpu0, time.monotonic() - wall0
    finally:
        bridge.stop()
    return {"linger_ms": linger_ms, "round": run, "messages": len(messages), "wall_s": round(wall, 1),
            "msg_per_s": round(len(messages) / wall), "cpu_s": round(cpu, 2), "cpu_pct": round(100 * cpu / wall),
            "us_per_msg": round(1e6 * cpu / len(messages))}


def main(rate: float = typer.Option(1000.0, help="messages per second offered to the bridge"),
         messages: int = typer.Option(12_000, help="messages per bridge"),
         linger_ms: str = typer.Option("5,25,50", help="stream.bridge.linger_ms values, the first is the baseline"),
         rounds: int = typer.Option(2, help="times each value runs, alternating"),
         out: Path | None = typer.Option(None, help="JSON results (default bench/results/bridge.json)")) -> None:
    """The bridge's CPU per message at each producer linger, against the first one, same run."""
    lingers = [int(v) for v in linger_ms.split(",") if v]
    feed = [m.model_copy(update={"site": SITE}) for m in replay_messages(messages)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp, MosquittoBroker() as mosquitto, \
            KafkaBroker(Path(tmp) / "kafka", fast_start=False) as kafka:
        client = MqttClient(MqttSettings(host=mosquitto.host, port=mosquitto.port), client_id="bench-bridge")
        client.start()
        client.wait_connected()
        try:
            for run in range(1, rounds + 1):
                for linger in lingers:
                    rows.append(one_bridge(linger, feed, rate, client, mosquitto, kafka, Path(tmp), run))
                    print(rows[-1], flush=True)
        finally:
            client.stop()
    best = {linger: min(r["us_per_msg"] for r in rows if r["linger_ms"] == linger) for linger in lingers}
    summary = [{"linger_ms": linger, "best_us_per_msg": us, "vs_first": round(us / best[lingers[0]], 2)}
               for linger, us in best.items()]
    report("bridge", "bridge CPU per message by linger", rows, out=out,
           notes=f"CPU per message: the bridge process's CPU seconds from the first publish until Kafka acknowledged "
                 f"the last record, over the messages. Best of {rounds} rounds per linger, against {lingers[0]} ms: "
                 + ", ".join(f"{s['linger_ms']} ms {s['best_us_per_msg']} us ({s['vs_first']}x)" for s in summary))


if __name__ == "__main__":
    typer.run(main)
