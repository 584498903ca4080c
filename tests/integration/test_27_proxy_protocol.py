"""27: listeners behind a proxy: the PROXY protocol v2 header gives the real client address to
logs and to the per-address limits, over plain TCP and TLS."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys

import mqttbytes as mb
import pytest
from conftest import client_id_on_shard

pytest.importorskip("cryptography")
from certs import make_pki

pytestmark = pytest.mark.usefixtures("_only_shardbroker")
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"



def _header(ip: str, port: int) -> bytes:
    body = socket.inet_aton(ip) + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big") + (1883).to_bytes(2, "big")
    return SIGNATURE + b"\x21\x11" + len(body).to_bytes(2, "big") + body


@pytest.fixture(scope="module")
def proxied(make_module_broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy")
    pki = make_pki(tmp)
    pw = tmp / "pw"
    subprocess.run([sys.executable, "-m", "shardbroker.cli.main", "passwd", str(pw), "alice", "--stdin",
                    "--iterations", "1000"], input="secret\n", text=True, check=True, capture_output=True)
    config = f"""
[auth]
password_file = "{pw}"
allow_anonymous = true
max_failures = 3
ban_time = 60.0

[[listener]]
port = 0

[[listener]]
port = 0
proxy_protocol = true

[[listener]]
type = "mqtts"
port = 0
proxy_protocol = true
certfile = "{pki['crt']}"
keyfile = "{pki['key']}"
"""
    b = make_module_broker(workers=2, config=config)
    ports = [int(p) for p in re.findall(r"listening on 127\.0\.0\.1:(\d+)", b.log_text())]
    b.proxy_port, b.tls_port = ports[1], ports[2]
    b.ca = pki["ca"]
    return b


def _via_proxy(port: int, ip: str, sport: int, ctx: ssl.SSLContext | None = None) -> mb.RawClient:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(_header(ip, sport))
    if ctx is not None:
        s = ctx.wrap_socket(s, server_hostname="localhost")
    s.settimeout(5)
    return mb.RawClient(port=port, sock=s)


def test_the_proxied_address_is_the_clients(proxied, uniq):
    c = _via_proxy(proxied.proxy_port, "203.0.113.7", 40000)
    assert c.connect_mqtt(uniq.cid("p"), username="alice", password="nope").rc == 4
    line = proxied.wait_for_log(r"\(203\.0\.113\.7:40000, listener .*user 'alice'", timeout=5)
    assert "refusing CONNECT" in line


def test_over_tls_too(proxied, uniq):
    ctx = ssl.create_default_context(cafile=str(proxied.ca))
    c = _via_proxy(proxied.tls_port, "198.51.100.20", 1234, ctx)
    assert c.connect_mqtt(uniq.cid("t"), username="alice", password="nope").rc == 4
    proxied.wait_for_log(r"\(198\.51\.100\.20:1234, listener ", timeout=5)
    ok = _via_proxy(proxied.tls_port, "198.51.100.21", 1235, ctx)
    assert ok.connect_mqtt(uniq.cid("o"), username="alice", password="secret").rc == 0


def test_limits_count_the_real_address(proxied, uniq):
    # failures are counted per worker: every client ID here is on shard 0
    cids = [client_id_on_shard(uniq.prefix(f"g{i}"), 0, 2) for i in range(5)]
    for cid in cids[:3]:
        c = _via_proxy(proxied.proxy_port, "192.0.2.66", 5000)
        assert c.connect_mqtt(cid, username="alice", password="guess", timeout=10).rc == 4
    banned = _via_proxy(proxied.proxy_port, "192.0.2.66", 5001)
    assert banned.connect_mqtt(cids[3], username="alice", password="secret").rc == 5  # refused for a while
    other = _via_proxy(proxied.proxy_port, "192.0.2.67", 5002)  # another client behind the same proxy
    assert other.connect_mqtt(cids[4], username="alice", password="secret").rc == 0


def test_a_connection_without_the_header_is_closed(proxied, uniq):
    c = mb.RawClient(port=proxied.proxy_port)
    c.send(mb.connect(uniq.cid("n")))
    with pytest.raises(mb.ConnectionClosed):  # closed, no CONNACK
        c.recv_packet(3)
    proxied.wait_for_log("no PROXY protocol v2 signature", timeout=5)


def test_the_plain_listener_takes_no_header(proxied, mqtt, uniq):
    assert mqtt(proxied, uniq.cid("d")).connack.rc == 0
