"""Does the edge agent keep up? Synthetic 256x256 cameras through the whole agent (capture ->
change gate -> micro-batched ONNX Runtime int8 seg-tiles -> regions -> SQLite outbox -> QoS 1
publish to a real Mosquitto), against the naive pipeline in the same run: one loop, torch eager
fp32, frame by frame, no batching, no gating, direct publish.

    python -m bench.edge [--seconds 60] [--cameras 1,2,4,8] [--fps 15] [--threads 2]

Per configuration: offered and sustained inferred frames/s, p50/p99 capture->received latency
(the subscriber's clock minus the frame's capture time, same host), frames dropped by the
camera queues, CPU of this process and of the broker. Ratios are against the naive pipeline at
the same number of cameras, measured in the same run. Needs Mosquitto and, for the naive row,
torch (the models extra).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import typer

from bench.report import report
from edge.agent import EdgeAgent
from edgeline.config import from_dict
from edgeline.services import MosquittoBroker
from stream.mqtt import MqttClient, MqttSettings

SITE = "bench"
MODEL = "builtin:seg-tiles-int8"
SIZE = 256
WARMUP_S = 3.0


class LatencyProbe:
    """Subscribes to every result of the site; capture->received latency of each frame."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.client = MqttClient(MqttSettings(host=broker.host, port=broker.port), client_id="bench-probe")
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.client.subscribe(f"edgeline/v1/{SITE}/+/result/#", self._on_message)

    def _on_message(self, message) -> None:  # noqa: ANN001 - paho message
        now = time.time()
        frames = json.loads(message.payload)["frames"]
        with self.lock:
            self.latencies.extend(now - frame["ts"] for frame in frames)

    def start(self) -> None:
        self.client.start()
        self.client.wait_connected()

    def take(self) -> list[float]:
        with self.lock:
            taken, self.latencies = self.latencies, []
        return taken

    def stop(self) -> None:
        self.client.stop()


def site(broker: MosquittoBroker, cameras: int, fps: float, threads: int, outbox: Path) -> dict[str, Any]:
    return {
        "site": SITE, "broker": {"host": broker.host, "port": broker.port},
        "models": {"seg": {"path": MODEL, "threads": threads}},
        "machines": [{"id": "m1", "cameras": [
            {"id": f"c{i}", "models": ["seg"], "fps": fps, "resolution": [SIZE, SIZE],
             "source": {"type": "synthetic", "seed": i, "defect_rate": 0.2}} for i in range(cameras)]}],
        "outbox": {"path": str(outbox / "{machine}.sqlite")}, "metrics": {"port": 0},
    }


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _row(name: str, cameras: int, fps: float, seconds: float, inferred: int, dropped: int,
         latencies: list[float], cpu: float, broker_cpu: float) -> dict[str, Any]:
    lat = np.asarray(latencies or [float("nan")]) * 1000.0
    return {"pipeline": name, "cameras": cameras, "offered_fps": cameras * fps,
            "inferred_fps": inferred / seconds, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "dropped": dropped,
            "cpu_pct": 100.0 * cpu / seconds, "broker_cpu_pct": 100.0 * broker_cpu / seconds}


def run_agent(broker: MosquittoBroker, probe: LatencyProbe, cameras: int, fps: float, seconds: float,
              threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        agent = EdgeAgent(from_dict(site(broker, cameras, fps, threads, Path(tmp)), base_dir=Path(tmp)), "m1")
        agent.start()
        try:
            time.sleep(WARMUP_S)
            me, mosquitto = psutil.Process(), psutil.Process(broker.pid)
            inferred0 = sum(c.frames_inferred for c in agent.vision.camera_counters.values())
            dropped0 = sum(c.frames_dropped for c in agent.vision.cameras)
            cpu0, broker0 = _cpu_seconds(me), _cpu_seconds(mosquitto)
            probe.take()
            started = time.perf_counter()
            time.sleep(seconds)
            elapsed = time.perf_counter() - started
            latencies = probe.take()
            inferred = sum(c.frames_inferred for c in agent.vision.camera_counters.values()) - inferred0
            dropped = sum(c.frames_dropped for c in agent.vision.cameras) - dropped0
            cpu, broker_cpu = _cpu_seconds(me) - cpu0, _cpu_seconds(mosquitto) - broker0
        finally:
            agent.stop()
    return _row("agent", cameras, fps, elapsed, inferred, dropped, latencies, cpu,
                broker_cpu)


def run_naive(broker: MosquittoBroker, probe: LatencyProbe, cameras: int, fps: float, seconds: float,
              threads: int) -> dict[str, Any]:
    """One loop over the cameras: render the frame that is due now, torch fp32 forward, regions,
    publish. Frames that came due while the loop was busy are lost (counted as dropped)."""
    import torch

    from models.package.preprocess import preprocess_frame
    from models.package.postprocess import regions_from_probabilities
    from models.package.synthetic import SyntheticCamera
    from edge.settings import ModelRef, resolve_model_path
    from models.package import load_package
    from models.segmentation import TileUNet
    from stream.messages import FrameResult, ModelOutput, Result

    torch.set_num_threads(threads)
    package = load_package(resolve_model_path(ModelRef(path=MODEL), Path(".")))
    spec, post = package.manifest.preprocess, package.manifest.postprocess
    model = TileUNet().eval()  # the seg-tiles architecture; weights do not change the timing
    sources = [SyntheticCamera(seed=i, width=SIZE, height=SIZE, fps=fps, defect_rate=0.2) for i in range(cameras)]
    client = MqttClient(MqttSettings(host=broker.host, port=broker.port), client_id="bench-naive")
    client.start()
    client.wait_connected()
    me, mosquitto = psutil.Process(), psutil.Process(broker.pid)
    done = dropped = 0
    last_index = [-1] * cameras
    t0 = time.time()

    def one_round() -> None:
        nonlocal done, dropped
        for cam, source in enumerate(sources):
            index = int((time.time() - t0) * fps)
            if index <= last_index[cam]:
                continue
            dropped += max(0, index - last_index[cam] - 1)
            last_index[cam] = index
            ts = time.time()
            image = source.frame(index).image
            with torch.no_grad():
                prob = model(torch.from_numpy(preprocess_frame(image, spec)[None])).numpy()[0, 0]
            regions, ratio = regions_from_probabilities(prob, post.threshold, post.min_area)
            output = ModelOutput(model="seg-tiles", version="bench", latency_ms=0.0, defect_ratio=ratio,
                                 regions=regions[:256])
            result = Result(site=SITE, machine="naive", ts=ts, camera=f"c{cam}",
                            frames=[FrameResult(seq=index, ts=ts, outputs=[output])])
            client.publish(f"edgeline/v1/{SITE}/naive/result/c{cam}", result.to_json(), qos=1)
            done += 1

    try:
        warm_end = time.time() + WARMUP_S
        while time.time() < warm_end:
            one_round()
        done = dropped = 0
        cpu0, broker0 = _cpu_seconds(me), _cpu_seconds(mosquitto)
        probe.take()
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            one_round()
        elapsed = time.perf_counter() - started
        time.sleep(0.5)  # let the last publishes arrive
        latencies = probe.take()
        cpu, broker_cpu = _cpu_seconds(me) - cpu0, _cpu_seconds(mosquitto) - broker0
    finally:
        client.stop()
    return _row("naive", cameras, fps, elapsed, done, dropped, latencies, cpu,
                broker_cpu)


def edge_rows(seconds: float = 60.0, cameras: tuple[int, ...] = (1, 2, 4, 8), fps: float = 15.0,
              threads: int = 2, naive: bool = True) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with MosquittoBroker() as broker:
        probe = LatencyProbe(broker)
        probe.start()
        try:
            for n in cameras:
                rows.append(run_agent(broker, probe, n, fps, seconds, threads))
                if naive:
                    rows.append(run_naive(broker, probe, n, fps, seconds, threads))
                    rows[-2]["vs_naive"] = rows[-2]["inferred_fps"] / max(rows[-1]["inferred_fps"], 1e-9)
                    rows[-1]["vs_naive"] = 1.0
        finally:
            probe.stop()
    return rows


def main(seconds: float = 60.0, cameras: str = "1,2,4,8", fps: float = 15.0, threads: int = 2,
         naive: bool = True, out: Path | None = None) -> None:
    counts = tuple(int(c) for c in cameras.split(","))
    rows = edge_rows(seconds, counts, fps, threads, naive)
    report("edge", f"edge agent, {SIZE}x{SIZE} synthetic cameras at {fps:g} fps, seg-tiles, {threads} threads, "
           f"{seconds:g} s per row", rows,
           notes="agent: ORT int8, micro-batched, change gate off, SQLite outbox, QoS 1; naive: one loop, torch eager "
           "fp32, frame by frame, direct publish. vs_naive: sustained inferred frames/s over the naive pipeline's at the "
           "same camera count, same run",
           out=out)


if __name__ == "__main__":
    typer.run(main)
