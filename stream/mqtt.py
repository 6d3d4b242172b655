"""A thin wrapper over paho-mqtt 2: reconnects, re-subscribes, QoS 1, a last-will, safe handlers.

paho runs its network loop in its own thread; handlers are called from it, so they must be quick
and must not block. A handler that raises is logged and counted, never fatal.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)

Handler = Callable[[paho.MQTTMessage], None]


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass
class MqttStats:
    connects: int = 0
    disconnects: int = 0
    received: int = 0
    handler_errors: int = 0
    published: int = 0


@dataclass(frozen=True)
class MqttSettings:
    """Where and how to connect; built from the site config's ``broker`` section."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive_s: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30


class MqttClient:
    """One MQTT connection with a name that shows in logs (``mqtt:<client_id>``).

    ``start()`` connects in the background and keeps reconnecting with backoff (1 s .. 30 s);
    subscriptions are renewed on every connect. ``clean_session=False`` keeps QoS 1 messages
    queued at the broker while the client is away.
    """

    def __init__(self, settings: MqttSettings, client_id: str, *, will: Will | None = None,
                 clean_session: bool = True, manual_ack: bool = False) -> None:
        self.client_id = client_id
        self.settings = settings
        self.stats = MqttStats()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        """Set once the subscriptions held at the latest connect are granted (SUBACK)."""
        self.last_error: str | None = None
        """Why the latest connection attempt failed (None once connected)."""
        self._stopping = False
        self._subscriptions: dict[str, tuple[int, Handler]] = {}
        self._on_connected: list[Callable[[], None]] = []
        self._connect_suback_mid: int | None = None
        self._lock = threading.Lock()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   clean_session=clean_session, protocol=paho.MQTTv311, manual_ack=manual_ack)
        self._client.reconnect_delay_set(min_delay=settings.reconnect_min_s, max_delay=settings.reconnect_max_s)
        self._client.max_queued_messages_set(0)
        self._client.max_inflight_messages_set(100)
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password)
        if settings.ca_file:
            self._client.tls_set(ca_certs=settings.ca_file, certfile=settings.cert_file,
                                 keyfile=settings.key_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    def start(self) -> None:
        self._stopping = False
        self._client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s)
        self._client.loop_start()

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until connected and the subscriptions made before are granted: from then on a message
        published to them reaches this client."""
        deadline = time.monotonic() + timeout
        if not self.connected.wait(timeout):
            reason = f": {self.last_error}" if self.last_error else ""
            raise ConnectionError(f"mqtt:{self.client_id}: no connection to {self.settings.host}:{self.settings.port} "
                                  f"after {timeout:.0f} s{reason}")
        if not self.subscribed.wait(max(0.0, deadline - time.monotonic())):
            raise ConnectionError(f"mqtt:{self.client_id}: connected to {self.settings.host}:{self.settings.port} "
                                  f"but its subscriptions were not granted within {timeout:.0f} s")

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Disconnect cleanly, after publishing ``final`` (topic, payload; retained) if given."""
        self._stopping = True
        if final and self.connected.is_set():
            info = self._client.publish(final[0], final[1], qos=1, retain=True)
            info.wait_for_publish(timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()
        self.subscribed.clear()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> paho.MQTTMessageInfo:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == paho.MQTT_ERR_SUCCESS:
            self.stats.published += 1
        return info

    def ack(self, mid: int, qos: int = 1) -> None:
        """Acknowledge a received QoS 1 message (``manual_ack=True``): until then the broker keeps
        it, and sends it again after a reconnect of this persistent session."""
        self._client.ack(mid, qos)

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every (re)connect, from the network thread (e.g. to re-announce
        a retained status that the last-will overwrote while the link was down)."""
        self._on_connected.append(callback)

    def on_publish_acked(self, handler: Callable[[int], None]) -> None:
        """Call ``handler(mid)`` when the broker acknowledges a QoS 1 publish (PUBACK)."""

        def on_publish(client: paho.Client, userdata: object, mid: int, reason_code: object,
                       properties: object) -> None:
            handler(mid)

        self._client.on_publish = on_publish

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        with self._lock:
            self._subscriptions[topic_filter] = (qos, handler)
        if self.connected.is_set():
            self._client.subscribe(topic_filter, qos=qos)

    def _on_connect(self, client: paho.Client, userdata: object, flags: object, reason_code: object,
                    properties: object) -> None:
        if getattr(reason_code, "is_failure", False):
            self._connect_failed(f"the broker refused the connection: {reason_code}")
            return
        self.last_error = None
        self.stats.connects += 1
        with self._lock:
            subscriptions = [(topic, qos) for topic, (qos, _) in self._subscriptions.items()]
        if subscriptions:
            _, self._connect_suback_mid = client.subscribe(subscriptions)
        else:
            self.subscribed.set()
        log.info("mqtt:%s: connected to %s:%d", self.client_id, self.settings.host, self.settings.port)
        self.connected.set()
        for callback in self._on_connected:
            callback()

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        self._connect_failed(self._unreachable_reason())

    def _unreachable_reason(self) -> str:
        """Why a TCP connection failed: a name that does not resolve, or a broker that does not answer."""
        host, port = self.settings.host, self.settings.port
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            return (f"cannot resolve broker host {host!r} (is this the compose hostname? use --broker or "
                    "EDGELINE_BROKER)")
        return f"cannot connect to broker {host}:{port} (is it running, on this port?)"

    def _connect_failed(self, reason: str) -> None:
        """Warn once per distinct reason while reconnecting, not on every retry."""
        if reason != self.last_error:
            log.warning("mqtt:%s: %s; retrying", self.client_id, reason)
        self.last_error = reason

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object, reason_code: object,
                       properties: object) -> None:
        if self.connected.is_set() and not self._stopping:
            self.stats.disconnects += 1
            log.warning("mqtt:%s: disconnected (%s); reconnecting", self.client_id, reason_code)
        self.connected.clear()
        self.subscribed.clear()

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reason_codes: list[object],
                      properties: object) -> None:
        """Runs on the network thread after ``_on_connect``, so the connect's mid is already known."""
        if mid != self._connect_suback_mid:
            return
        refused = [str(code) for code in reason_codes if getattr(code, "is_failure", False)]
        if refused:
            log.warning("mqtt:%s: the broker refused a subscription: %s", self.client_id, ", ".join(refused))
        self.subscribed.set()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        self.stats.received += 1
        with self._lock:
            handlers = [h for f, (_, h) in self._subscriptions.items() if paho.topic_matches_sub(f, message.topic)]
        for handler in handlers:
            try:
                handler(message)
            except Exception:  # a bad message or handler bug must not kill the network loop
                self.stats.handler_errors += 1
                log.exception("mqtt:%s: handler failed on %s", self.client_id, message.topic)
