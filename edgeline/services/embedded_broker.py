"""The pure-Python ``amqtt`` MQTT broker in a background thread, for machines without Mosquitto
(the demo on a laptop)."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from edgeline.services.process import LOOPBACK, ServiceError, ServiceUnavailable

log = logging.getLogger(__name__)


class EmbeddedBroker:
    """The pure-Python ``amqtt`` broker on ``127.0.0.1:<port>``, in a background daemon thread.

    For machines without Mosquitto. MQTT 3.1.1, QoS 0-2, retained messages, last-wills, anonymous
    access. Sessions and retained messages live in memory and are gone after :meth:`stop`.

    Limitation (amqtt 0.12): with anonymous access every session counts as anonymous, and amqtt
    does not queue QoS 1 messages for an anonymous ``clean_session=False`` client while it is
    offline. Good enough for the demo; outage and redelivery tests need :class:`MosquittoBroker`.
    """

    def __init__(self, port: int | None = None, *, start_timeout: float = 10.0) -> None:
        self._port = port or 0
        self.start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> None:
        return None  # runs in this process

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __repr__(self) -> str:
        return f"EmbeddedBroker({self.host}:{self.port}, running={self.running})"

    def start(self) -> None:
        """Start the broker thread and wait until its port accepts connections."""
        if self.running:
            return
        try:
            from amqtt.broker import Broker  # noqa: F401 - fail here, not in the thread
        except ImportError as exc:
            raise ServiceUnavailable(f"amqtt is not installed: {exc}") from exc
        # amqtt's state machine library logs every transition at INFO; keep it quiet unless asked.
        transitions_log = logging.getLogger("transitions")
        if transitions_log.level == logging.NOTSET:
            transitions_log.setLevel(logging.WARNING)
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="mqtt:embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise ServiceError(f"embedded MQTT broker did not start within {self.start_timeout:.1f} s")
        if self._error is not None:
            self._thread.join(timeout=5)
            self._thread = None
            raise ServiceError(f"embedded MQTT broker failed to start: {self._error!r}") from self._error
        # No port probe: the listener is bound once Broker.start() has returned, and amqtt logs an
        # ERROR for every connection that closes without a CONNECT packet.
        log.info("embedded MQTT broker (amqtt) up on %s:%d", self.host, self._port)

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{self._port}"}},
            # Only anonymous auth: no $SYS publisher, no per-packet logging.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._astart())
        except BaseException as exc:  # noqa: BLE001 - handed to start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    async def _astart(self) -> None:
        from amqtt.broker import Broker

        self._broker = Broker(self._config())
        await self._broker.start()
        if self._port == 0:
            # Bound to port 0: read back the port the OS chose, and keep it for restarts.
            server = self._broker._servers["default"].instance  # noqa: SLF001 - amqtt has no public accessor
            self._port = int(server.sockets[0].getsockname()[1])

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down (closing client sessions) and join its thread."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                future.result(timeout)
            except Exception:  # noqa: BLE001 - a failed shutdown still ends the loop below
                log.warning("embedded MQTT broker: shutdown failed", exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("embedded MQTT broker thread did not end within %.0f s", timeout)
        self._thread = None
        self._broker = None

    def restart(self) -> None:
        """Stop and start again on the same port (in-memory state is lost)."""
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
