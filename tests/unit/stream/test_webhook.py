"""The alert webhook against a real local HTTP server: retries on 5xx, gives up on 4xx."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stream.settings import WebhookConfig
from stream.webhook import WebhookSink


class Receiver:
    """Answers with the scripted statuses in turn (then 200), keeping every body it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                receiver.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/alerts"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def deliver(url: str, retries: int = 3) -> tuple[str | None, WebhookSink]:
    sink = WebhookSink(WebhookConfig(url=url, retries=retries, backoff_s=0.01, timeout_s=2))
    return asyncio.run(sink.deliver(b'{"rule": "defects"}')), sink


def test_server_errors_are_retried_until_delivered():
    with Receiver([500, 503, 429]) as receiver:
        failure, sink = deliver(receiver.url)
    assert failure is None and sink.delivered == 1
    assert receiver.bodies == [b'{"rule": "defects"}'] * 4


def test_a_client_error_is_permanent():
    with Receiver([400]) as receiver:
        failure, sink = deliver(receiver.url)
    assert failure is not None and "HTTP 400" in failure and sink.failed == 1
    assert len(receiver.bodies) == 1


@pytest.mark.parametrize("retries", [0, 2])
def test_nobody_listening_gives_up_after_the_retries(retries):
    with Receiver([]) as receiver:
        url = receiver.url
    failure, sink = deliver(url, retries=retries)
    assert failure is not None and "ClientConnectorError" in failure and sink.failed == 1
