"""25: mqtts listeners with certificates the test makes: the mosquitto clients, paho and raw
bytes over TLS 1.2 and 1.3, client certificates, the certificate's CN as the username, a
handshake that never ends, bad certificate files."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import time

import mqttbytes as mb
import pytest
from conftest import BrokerStartError

pytest.importorskip("cryptography")
from certs import key_pem, new_cert, new_key, write_pem
from cryptography.hazmat.primitives import serialization

pytestmark = pytest.mark.usefixtures("_only_shardbroker")




def _tls_config(pki, **extra: object) -> str:
    lines = ["[[listener]]", "port = 0", "", "[[listener]]", 'type = "mqtts"', "port = 0",
             f'certfile = "{pki["crt"]}"', f'keyfile = "{pki["key"]}"']
    for k, v in extra.items():
        lines.append(f"{k} = {v!r}".replace("'", '"') if isinstance(v, str) else f"{k} = {str(v).lower()}")
    return "\n".join(lines) + "\n"


def _tls_port(broker) -> int:
    m = re.search(r"listening on 127\.0\.0\.1:(\d+) \(mqtts\)", broker.log_text())
    assert m, broker.tail(30)
    return int(m.group(1))


def TlsClient(port: int, ctx: ssl.SSLContext) -> mb.RawClient:
    """mqttbytes' raw client over a TLS socket."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise
    tls.settimeout(5)
    return mb.RawClient(port=port, sock=tls)


def _client_ctx(pki, cert: str | None = None, key: str | None = None,
                maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if cert:
        ctx.load_cert_chain(str(pki[cert]), str(pki[key]))
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


@pytest.fixture(scope="module")
def tls_broker(make_module_broker, pki):
    return make_module_broker(workers=2, config=_tls_config(pki))


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("version", [4, 5])
def test_raw_clients_over_tls_12_and_13(tls_broker, pki, uniq, maximum, version):
    port = _tls_port(tls_broker)
    sub = TlsClient(port, _client_ctx(pki, maximum=maximum))
    assert sub.sock.version() == ("TLSv1.2" if maximum == ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
    assert sub.connect_mqtt(uniq.cid("s"), version=version).rc == 0
    topic = uniq.topic()
    sub.subscribe(topic, 1)
    pub = TlsClient(port, _client_ctx(pki, maximum=maximum))
    assert pub.connect_mqtt(uniq.cid("p"), version=version).rc == 0
    big = bytes(range(256)) * 2048  # 512 KB: many TLS records each way
    for i in range(200):
        pub.publish(topic, b"%d" % i, qos=1)
    pub.publish(topic, big, qos=1)
    got = [sub.recv_publish().payload for _ in range(201)]
    assert got[:200] == [b"%d" % i for i in range(200)] and got[200] == big
    sub.disconnect()
    pub.disconnect()


def test_plain_and_tls_clients_meet(tls_broker, pki, mqtt, uniq):
    plain = mqtt(tls_broker, uniq.cid("p"))
    topic = uniq.topic()
    plain.subscribe(topic, 1)
    t = TlsClient(_tls_port(tls_broker), _client_ctx(pki))
    t.connect_mqtt(uniq.cid("t"))
    t.publish(topic, b"through TLS", qos=1)
    assert plain.recv_publish().payload == b"through TLS"


@pytest.mark.skipif(not shutil.which("mosquitto_pub"), reason="mosquitto clients are not installed")
def test_mosquitto_clients_over_tls(tls_broker, pki, uniq):
    port, topic = _tls_port(tls_broker), uniq.topic()
    sub = subprocess.Popen(["mosquitto_sub", "-p", str(port), "--cafile", str(pki["ca"]), "-h", "localhost",
                            "-t", topic, "-C", "1", "-W", "10", "-q", "1"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.6)
    subprocess.run(["mosquitto_pub", "-p", str(port), "--cafile", str(pki["ca"]), "-h", "localhost", "-t", topic,
                    "-m", "over tls", "-q", "1"], check=True, timeout=10)
    out, _ = sub.communicate(timeout=15)
    assert out.strip() == "over tls"


def test_paho_over_tls(tls_broker, pki, uniq):
    import paho.mqtt.client as pm
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[bytes] = []
    c = pm.Client(CallbackAPIVersion.VERSION2, client_id=uniq.cid("paho"), protocol=pm.MQTTv5)
    c.tls_set(ca_certs=str(pki["ca"]))
    c.on_message = lambda _c, _u, msg: got.append(msg.payload)
    topic = uniq.topic()
    c.connect("localhost", _tls_port(tls_broker))
    c.loop_start()
    try:
        c.subscribe(topic, 1)
        time.sleep(0.5)
        c.publish(topic, b"paho", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [b"paho"]
    finally:
        c.loop_stop()
        c.disconnect()


def test_a_handshake_that_never_ends_is_closed_at_the_connect_deadline(make_broker, pki):
    b = make_broker(config="[limits]\nconnect_timeout = 1.0\n" + _tls_config(pki))
    s = socket.create_connection(("127.0.0.1", _tls_port(b)))
    s.settimeout(5)
    t0 = time.monotonic()
    assert s.recv(100) == b""  # closed, nothing said
    assert 0.8 < time.monotonic() - t0 < 3
    s.close()
    half = socket.create_connection(("127.0.0.1", _tls_port(b)))  # TLS done, no CONNECT
    tls = _client_ctx(pki).wrap_socket(half, server_hostname="localhost")
    tls.settimeout(5)
    assert tls.recv(100) == b""
    tls.close()


def test_client_certificates_and_the_cn_as_username(make_broker, pki, tmp_path, uniq):
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite alice/#\n")
    config = _tls_config(pki, cafile=str(pki["ca"]), require_certificate=True, use_identity_as_username=True)
    config = f'[auth]\nacl_file = "{acl}"\n\n' + config
    b = make_broker(workers=2, config=config)
    port = _tls_port(b)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):  # no certificate: refused in the handshake
        c = TlsClient(port, _client_ctx(pki))
        c.connect_mqtt(uniq.cid("n"))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):  # a certificate of another CA
        c = TlsClient(port, _client_ctx(pki, "rogue_crt", "rogue_key"))
        c.connect_mqtt(uniq.cid("r"))
    alice = TlsClient(port, _client_ctx(pki, "cli_crt", "cli_key"))
    assert alice.connect_mqtt(uniq.cid("a"), version=5, username="mallory", password="x").rc == 0
    assert alice.subscribe("alice/#", 1) == [1]  # the ACL sees alice, the certificate's CN
    assert alice.publish("alice/x", b"mine", qos=1).reason < 0x80
    assert alice.recv_publish().payload == b"mine"
    assert alice.publish("mallory/x", b"no", qos=1).reason == 0x87


def test_a_subject_alternative_name_as_username(make_broker, pki, tmp_path, uniq):
    acl = tmp_path / "acl"
    acl.write_text("user carol@example.com\ntopic readwrite carol/#\n")
    config = _tls_config(pki, cafile=str(pki["ca"]), require_certificate=True, use_identity_as_username=True,
                         certificate_identity="san")
    b = make_broker(config=f'[auth]\nacl_file = "{acl}"\n\n' + config)
    carol = TlsClient(_tls_port(b), _client_ctx(pki, "san_crt", "san_key"))
    assert carol.connect_mqtt(uniq.cid("c"), version=5).rc == 0
    assert carol.subscribe("carol/#", 1) == [1]  # the ACL sees the email address, not the CN
    assert carol.publish("not-carol/x", b"no", qos=1).reason == 0x87
    alice = TlsClient(_tls_port(b), _client_ctx(pki, "cli_crt", "cli_key"))  # no such name: refused, whoever
    assert alice.connect_mqtt(uniq.cid("a"), version=5, username="carol@example.com").rc == 0x87  # it says it is


def test_a_tls13_only_listener_refuses_tls12(make_broker, pki):
    b = make_broker(config=_tls_config(pki, tls_version="tlsv1.3"))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        TlsClient(_tls_port(b), _client_ctx(pki, maximum=ssl.TLSVersion.TLSv1_2))
    assert TlsClient(_tls_port(b), _client_ctx(pki)).sock.version() == "TLSv1.3"


@pytest.mark.parametrize("which, error", [("certfile", "no such file"), ("keyfile", "does not load")])
def test_bad_certificate_files_are_a_one_line_error(make_broker, pki, tmp_path, which, error):
    bad = tmp_path / "bad.pem"
    if which == "keyfile":
        bad.write_text("not a key\n")
    files = {"certfile": str(pki["crt"]), "keyfile": str(pki["key"])}
    files[which] = str(bad) if which == "keyfile" else str(tmp_path / "missing.pem")
    config = ("[[listener]]\ntype = \"mqtts\"\nport = 0\n"
              f'certfile = "{files["certfile"]}"\nkeyfile = "{files["keyfile"]}"\n')
    b = make_broker(config=config, start=False)
    with pytest.raises(BrokerStartError):
        b.start(timeout=10)
    assert error in b.log_text() and "Traceback" not in b.log_text()
    assert b.returncode == 2


def test_certificates_are_reloaded_when_their_files_change(make_broker, pki, tmp_path, uniq):
    crt, key = tmp_path / "live.crt", tmp_path / "live.key"
    crt.write_bytes(pki["crt"].read_bytes())
    key.write_bytes(pki["key"].read_bytes())
    b = make_broker(config=_tls_config({**pki, "crt": crt, "key": key}))
    port = _tls_port(b)
    old = TlsClient(port, _client_ctx(pki))
    assert old.connect_mqtt(uniq.cid("o")).rc == 0
    topic = uniq.topic()
    old.subscribe(topic, 1)
    # a new CA and certificate: written key first, then certificate (a moment where they do not match)
    ca2_key, srv2_key = new_key(), new_key()
    ca2 = new_cert("second CA", ca2_key, "second CA", ca2_key, ca=True)
    ca2_path, _ = write_pem(tmp_path / "ca2", ca2, ca2_key)
    since = b.log_len()
    key.write_bytes(key_pem(srv2_key))
    b.wait_for_log("certificate files changed but do not load", timeout=10, since=since)
    crt.write_bytes(new_cert("localhost", srv2_key, "second CA", ca2_key, server=True)
                    .public_bytes(serialization.Encoding.PEM))
    b.wait_for_log("certificate files reloaded", timeout=10, since=since)
    new_ctx = ssl.create_default_context(cafile=str(ca2_path))
    fresh = TlsClient(port, new_ctx)
    assert fresh.connect_mqtt(uniq.cid("n")).rc == 0
    with pytest.raises(ssl.SSLError):  # the old CA no longer vouches for the server
        TlsClient(port, _client_ctx(pki))
    fresh.publish(topic, b"after the reload", qos=1)
    assert old.recv_publish().payload == b"after the reload"  # the old connection is still up
