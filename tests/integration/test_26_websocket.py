"""26: MQTT over WebSocket (ws) and secure WebSocket (wss): paho's websocket transport, raw
frames from the ``websockets`` client, and what a bad upgrade gets."""

from __future__ import annotations

import re
import socket
import ssl
import time
from pathlib import Path

import mqttbytes as mb
import pytest

pytest.importorskip("cryptography")
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

pytestmark = pytest.mark.usefixtures("_only_shardbroker")




@pytest.fixture(scope="module")
def ws_broker(make_module_broker, pki):
    config = f"""
[limits]
connect_timeout = 1.5

[[listener]]
port = 0

[[listener]]
type = "ws"
port = 0

[[listener]]
type = "wss"
port = 0
certfile = "{pki['crt']}"
keyfile = "{pki['key']}"
"""
    return make_module_broker(workers=2, config=config)


def _port(broker, kind: str) -> int:
    m = re.search(rf"listening on 127\.0\.0\.1:(\d+) \({kind}\)", broker.log_text())
    assert m, broker.tail(30)
    return int(m.group(1))


def _paho(port: int, cid: str, version: int, ca: Path | None = None):
    import paho.mqtt.client as pm
    from paho.mqtt.enums import CallbackAPIVersion

    c = pm.Client(CallbackAPIVersion.VERSION2, client_id=cid, transport="websockets",
                  protocol=pm.MQTTv5 if version == 5 else pm.MQTTv311)
    c.ws_set_options(path="/mqtt")
    if ca is not None:
        c.tls_set(ca_certs=str(ca))
    got: list[bytes] = []
    c.on_message = lambda _c, _u, msg: got.append(msg.payload)
    c.connect("localhost", port)
    c.loop_start()
    return c, got


@pytest.mark.parametrize("kind", ["ws", "wss"])
@pytest.mark.parametrize("version", [4, 5])
def test_paho_over_websocket(ws_broker, pki, uniq, kind, version):
    c, got = _paho(_port(ws_broker, kind), uniq.cid("w"), version, pki["ca"] if kind == "wss" else None)
    topic = uniq.topic()
    try:
        c.subscribe(topic, 1)
        time.sleep(0.4)
        big = b"z" * 300_000
        for payload in (b"one", big, b"three"):
            c.publish(topic, payload, qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [b"one", big, b"three"]
    finally:
        c.loop_stop()
        c.disconnect()


def test_websocket_and_tcp_clients_meet(ws_broker, mqtt, uniq):
    sub = mqtt(ws_broker, uniq.cid("t"))
    topic = uniq.topic()
    sub.subscribe(topic, 1)
    with ws_connect(f"ws://127.0.0.1:{_port(ws_broker, 'ws')}/mqtt", subprotocols=["mqtt"]) as ws:
        # a CONNECT split over two frames, then a PUBLISH in the same frame as the rest
        data = mb.connect(uniq.cid("w"), version=4) + mb.publish(topic, b"framed", qos=0)
        ws.send(data[:5])
        ws.send(data[5:])
        assert ws.recv(timeout=5)[:2] == b"\x20\x02"  # CONNACK
        assert sub.recv_publish().payload == b"framed"


@pytest.mark.parametrize("path, protocols, status", [("/other", ["mqtt"], 404), ("/mqtt", None, 400)])
def test_a_wrong_upgrade_is_refused(ws_broker, path, protocols, status):
    with pytest.raises(InvalidStatus) as info:
        ws_connect(f"ws://127.0.0.1:{_port(ws_broker, 'ws')}{path}", subprotocols=protocols, open_timeout=5)
    assert info.value.response.status_code == status


def test_old_clients_may_offer_mqttv31(ws_broker, uniq):
    with ws_connect(f"ws://127.0.0.1:{_port(ws_broker, 'ws')}/mqtt", subprotocols=["mqttv3.1"]) as ws:
        assert ws.subprotocol == "mqttv3.1"
        ws.send(mb.connect(uniq.cid("o"), version=4))
        assert ws.recv(timeout=5)[:2] == b"\x20\x02"


def test_a_text_frame_closes_the_connection(ws_broker, uniq):
    with ws_connect(f"ws://127.0.0.1:{_port(ws_broker, 'ws')}/mqtt", subprotocols=["mqtt"]) as ws:
        ws.send("not binary")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1003


def test_an_upgrade_that_never_ends_is_closed_at_the_connect_deadline(ws_broker):
    s = socket.create_connection(("127.0.0.1", _port(ws_broker, "ws")))
    s.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")  # ... and nothing more
    s.settimeout(5)
    t0 = time.monotonic()
    assert s.recv(100) == b""
    assert 1.0 < time.monotonic() - t0 < 4
    s.close()


def test_oversized_headers_are_refused(ws_broker):
    s = socket.create_connection(("127.0.0.1", _port(ws_broker, "ws")))
    s.settimeout(5)
    try:
        s.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    except OSError:
        pass  # closed while we were still sending: refused too
    reply = b""
    try:
        while chunk := s.recv(4096):
            reply += chunk
    except OSError:
        pass
    s.close()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 4")


def test_wss_refuses_a_client_that_does_not_trust_it(ws_broker):
    ctx = ssl.create_default_context()  # not our CA
    with pytest.raises(ssl.SSLError):
        ws_connect(f"wss://localhost:{_port(ws_broker, 'wss')}/mqtt", subprotocols=["mqtt"], ssl=ctx,
                   open_timeout=5)


def test_client_certificates_on_wss_name_the_user(make_broker, pki, tmp_path, uniq):
    """wss with require_certificate and use_identity_as_username: paho with alice's certificate
    gets alice's ACL; without a certificate the TLS handshake is refused."""
    import paho.mqtt.client as pm
    from paho.mqtt.enums import CallbackAPIVersion

    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite alice/#\n")
    b = make_broker(config=f"""
[auth]
acl_file = "{acl}"

[[listener]]
port = 0

[[listener]]
type = "wss"
port = 0
certfile = "{pki['crt']}"
keyfile = "{pki['key']}"
cafile = "{pki['ca']}"
require_certificate = true
use_identity_as_username = true
""")
    port = _port(b, "wss")
    c = pm.Client(CallbackAPIVersion.VERSION2, client_id=uniq.cid("a"), transport="websockets",
                  protocol=pm.MQTTv5)
    c.ws_set_options(path="/mqtt")
    c.tls_set(ca_certs=str(pki["ca"]), certfile=str(pki["cli_crt"]), keyfile=str(pki["cli_key"]))
    got: list[bytes] = []
    c.on_message = lambda _c, _u, msg: got.append(msg.payload)
    c.username_pw_set("mallory", "x")  # the certificate's name wins
    c.connect("localhost", port)
    c.loop_start()
    try:
        c.subscribe("alice/#", 1)
        time.sleep(0.3)
        c.publish("alice/x", b"mine", qos=1).wait_for_publish(5)
        info = c.publish("mallory/x", b"not hers", qos=1)
        info.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [b"mine"]
    finally:
        c.loop_stop()
        c.disconnect()
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    upgrade = (b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Protocol: mqtt\r\n\r\n")
    try:  # no certificate: the handshake fails, or (TLS 1.3) the connection ends at the first read
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(upgrade)
        answer = tls.recv(100)
    except (ssl.SSLError, ConnectionError):
        answer = b""
    assert answer == b"", answer
