"""An MQTT client for Locust users: paho-mqtt 2.x, reporting to Locust's statistics.

Every measurement is fired as a Locust request event with ``request_type="MQTT"``:

* ``connect``            CONNECT sent -> CONNACK received (failures carry the reason)
* ``subscribe``          SUBSCRIBE -> SUBACK
* ``publish qos0``       time spent in ``publish()`` (QoS 0 is fire-and-forget)
* ``publish qos1|qos2``  ``publish()`` -> PUBACK / PUBCOMP (the acknowledgement time)
* ``deliver qosN``       end-to-end latency measured at the subscriber: the first 8
                         payload bytes are the publisher's ``time.monotonic_ns()``,
                         which is one clock for every process on a Linux machine

Locust runs users as gevent greenlets (it monkey-patches sockets and threads), so
paho's network thread (``loop_start``) is a greenlet as well.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

TS_BYTES = 8


def parse_host(url: str | None, default_port: int = 1883) -> tuple[str, int]:
    """``mqtt://HOST:PORT`` (or ``HOST:PORT``) -> ``(host, port)``; loopback only."""
    url = url or "mqtt://127.0.0.1:1883"
    if "://" not in url:
        url = "mqtt://" + url
    parsed = urlparse(url)
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or default_port
    if host != "localhost":
        try:
            loop = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loop = False
        if not loop:
            raise ValueError(f"--host {url!r}: these load tests only send to this machine "
                             "(127.0.0.1, localhost or ::1)")
    return host, port


def make_payload(size: int) -> bytes:
    """A payload of ``size`` bytes (at least 8) starting with the send timestamp."""
    size = max(size, TS_BYTES)
    return time.monotonic_ns().to_bytes(TS_BYTES, "big") + b"x" * (size - TS_BYTES)


class MQTTClient:
    """One paho connection whose events go to Locust's ``request`` event hook."""

    def __init__(self, environment: Any, client_id: str, host: str, port: int, *,
                 protocol: int = 4, keepalive: int = 60, clean: bool = True,
                 session_expiry: int = 0, timeout: float = 10.0) -> None:
        self.env = environment
        self.client_id = client_id
        self.host, self.port = host, port
        self.protocol = protocol
        self.keepalive = keepalive
        self.clean = clean
        self.session_expiry = session_expiry
        self.timeout = timeout
        self.v5 = protocol == 5
        kwargs: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": client_id,
            "protocol": MQTTProtocolVersion.MQTTv5 if self.v5 else MQTTProtocolVersion.MQTTv311,
            "reconnect_on_failure": False,
        }
        if not self.v5:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(**kwargs)
        self.client.max_inflight_messages_set(64)
        self._connected = threading.Event()
        self._connect_rc: Any = None
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[float, str, int]] = {}   # mid -> (t0, name, size)
        self._early: dict[int, float] = {}                      # acks seen before publish() returned
        self._subacks: dict[int, tuple[float, threading.Event]] = {}
        self.on_message: Callable[[mqtt.MQTTMessage, float], None] | None = None
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.closing = False

    # ---- reporting
    def fire(self, name: str, ms: float, length: int = 0, exc: BaseException | None = None) -> None:
        self.env.events.request.fire(request_type="MQTT", name=name, response_time=ms,
                                     response_length=length, exception=exc, context={})

    # ---- paho callbacks (run in paho's network greenlet)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self._connect_rc = rc
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not self.closing:
            self.fire("disconnected", 0, 0, ConnectionError(f"{self.client_id}: {rc}"))

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        now = time.perf_counter()
        with self._lock:
            entry = self._pending.pop(mid, None)
            if entry is None:
                self._early[mid] = now
                return
        t0, name, size = entry
        exc = None if not getattr(rc, "is_failure", False) else RuntimeError(f"ack {rc}")
        self.fire(name, (now - t0) * 1000, size, exc)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        entry = self._subacks.get(mid)
        if entry is not None:
            t0, ev = entry
            bad = [c for c in codes if getattr(c, "is_failure", False)]
            self.fire("subscribe", (time.perf_counter() - t0) * 1000, 0,
                      RuntimeError(f"SUBACK {bad}") if bad else None)
            ev.set()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic_ns()
        payload = msg.payload
        if len(payload) >= TS_BYTES:
            sent = int.from_bytes(payload[:TS_BYTES], "big")
            latency_ms = (now - sent) / 1e6
            if 0 <= latency_ms < 3_600_000:
                self.fire(f"deliver qos{msg.qos}", latency_ms, len(payload))
        if self.on_message is not None:
            self.on_message(msg, now)

    # ---- operations (called from the user's greenlet)
    def connect(self) -> bool:
        t0 = time.perf_counter()
        try:
            props = None
            if self.v5:
                from paho.mqtt.packettypes import PacketTypes
                from paho.mqtt.properties import Properties
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                if self.session_expiry:
                    props.SessionExpiryInterval = self.session_expiry
                self.client.connect(self.host, self.port, self.keepalive, clean_start=self.clean,
                                    properties=props)
            else:
                self.client.connect(self.host, self.port, self.keepalive)
            sock: Any = self.client.socket()
            if sock is not None:  # paho leaves Nagle on: small acks would wait for the peer's ACK
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.client.loop_start()
            if not self._connected.wait(self.timeout):
                raise TimeoutError(f"no CONNACK within {self.timeout} s")
            rc = self._connect_rc
            if getattr(rc, "is_failure", False):
                raise ConnectionRefusedError(f"CONNACK {rc}")
        except Exception as exc:  # noqa: BLE001 - every failure is a failed request
            self.fire("connect", (time.perf_counter() - t0) * 1000, 0, exc)
            self.close()
            return False
        self.fire("connect", (time.perf_counter() - t0) * 1000, 0)
        return True

    def subscribe(self, topic_filter: str, qos: int) -> bool:
        t0 = time.perf_counter()
        ev = threading.Event()
        rc, mid = self.client.subscribe(topic_filter, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            self.fire("subscribe", 0, 0, RuntimeError(f"subscribe: {mqtt.error_string(rc)}"))
            return False
        self._subacks[mid] = (t0, ev)
        if not ev.wait(self.timeout):
            self.fire("subscribe", (time.perf_counter() - t0) * 1000, 0,
                      TimeoutError(f"no SUBACK within {self.timeout} s"))
            return False
        return True

    def publish(self, topic: str, payload: bytes, qos: int) -> None:
        name = f"publish qos{qos}"
        t0 = time.perf_counter()
        try:
            info = self.client.publish(topic, payload, qos=qos)
        except Exception as exc:  # noqa: BLE001
            self.fire(name, (time.perf_counter() - t0) * 1000, len(payload), exc)
            return
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.fire(name, (time.perf_counter() - t0) * 1000, len(payload),
                      RuntimeError(f"publish: {mqtt.error_string(info.rc)}"))
            return
        if qos == 0:
            self.fire(name, (time.perf_counter() - t0) * 1000, len(payload))
            return
        with self._lock:
            acked = self._early.pop(info.mid, None)
            if acked is None:
                self._pending[info.mid] = (t0, name, len(payload))
                return
        self.fire(name, (acked - t0) * 1000, len(payload))

    def unacked(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        self.closing = True
        with contextlib.suppress(Exception):
            self.client.disconnect()
        with contextlib.suppress(Exception):
            self.client.loop_stop()
