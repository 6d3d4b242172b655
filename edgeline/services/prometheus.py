"""Reading a Prometheus endpoint from tests and benchmarks."""

from __future__ import annotations

import urllib.request

from edgeline.services.process import LOOPBACK


def scrape_metrics(port: int, host: str = LOOPBACK, timeout: float = 5.0) -> dict[str, float]:
    """A Prometheus endpoint's samples as ``{'name{labels}': value}``; empty while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
