"""29: MQTT 5 enhanced authentication by SCRAM against the real broker (raw bytes with scramp's
client, and the shipped ``loadtests.scram_client``), over TCP and TLS; authentication settings
per listener; a password changed on disk and reloaded.

The password file is made by ``shardbroker passwd`` (which keeps the SCRAM-SHA-256 keys
beside it in ``FILE.scram``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal
import subprocess
import sys

import mqttbytes as mb
import pytest
import scramp

pytestmark = pytest.mark.usefixtures("_only_shardbroker")

CLI = [sys.executable, "-m", "shardbroker.cli.main"]
USERS = {"alice": "wonder land", "bob": "b0b"}
ACL = "user alice\ntopic readwrite alice/#\nuser bob\ntopic read alice/#\n"


def _passwd(file, user: str, password: str) -> None:
    subprocess.run([*CLI, "passwd", str(file), user, "--stdin", "--iterations", "4096"],
                   input=password + "\n", text=True, check=True, capture_output=True)


@pytest.fixture(scope="module")
def scram_broker(make_module_broker, tmp_path_factory, pki):
    tmp = tmp_path_factory.mktemp("scram")
    pw, acl = tmp / "passwords", tmp / "acl"
    for user, password in USERS.items():
        _passwd(pw, user, password)
    acl.write_text(ACL)
    config = f"""
[auth]
password_file = "{pw}"
acl_file = "{acl}"

[[listener]]
port = 0

[[listener]]
port = 0
allow_anonymous = true
password_file = ""
acl_file = ""

[[listener]]
type = "mqtts"
port = 0
certfile = "{pki['crt']}"
keyfile = "{pki['key']}"
"""
    b = make_module_broker(workers=2, config=config)
    b.pw = pw
    return b


def _ports(broker) -> list[int]:
    return [int(p) for p in re.findall(r"listening on 127\.0\.0\.1:(\d+) \((?:mqtt|mqtts)\)", broker.log_text())]


def _props(method: str, data: str) -> bytes:
    return mb.prop_str(mb.AUTHENTICATION_METHOD, method) + mb.prop_bin(mb.AUTHENTICATION_DATA, data.encode())


def _recv(c: mb.RawClient) -> tuple[int, int, bytes]:
    pkt = c.recv_packet(5)
    assert pkt is not None, "no answer"
    return pkt


def _login(port: int, cid: str, user: str, password: str, method: str = "SCRAM-SHA-256"):
    """CONNECT with SCRAM, AUTH 0x18; returns the client, scramp's client and the last answer."""
    client = scramp.ScramClient([method], user, password)
    c = mb.RawClient(port=port, version=5)
    c.send(mb.connect(cid, version=5, props=_props(method, client.get_client_first())))
    kind, _flags, body = _recv(c)
    assert kind == mb.AUTH and body[0] == 0x18, mb.describe((kind, _flags, body))
    props, _ = mb.parse_props(body, 1)
    assert props[mb.AUTHENTICATION_METHOD] == method
    client.set_server_first(props[mb.AUTHENTICATION_DATA].decode())
    c.send(mb.auth(0x18, _props(method, client.get_client_final())))
    return c, client, _recv(c)


@pytest.mark.parametrize("method", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("shard", [0, 1])
def test_login_publish_and_reauthenticate(scram_broker, method, shard, uniq):
    from conftest import client_id_on_shard

    port = _ports(scram_broker)[0]
    cid = client_id_on_shard(uniq.cid(), shard, 2)
    c, client, (kind, _f, body) = _login(port, cid, "alice", USERS["alice"], method)
    ack = mb.parse_connack(body, 5)
    assert kind == mb.CONNACK and ack.rc == 0 and ack.props[mb.AUTHENTICATION_METHOD] == method
    client.set_server_final(ack.props[mb.AUTHENTICATION_DATA].decode())  # the broker holds alice's keys
    c.send(mb.publish("alice/x", b"in", qos=1, pid=1, version=5))
    assert mb.parse_ack(_recv(c)[2], 5).reason in (0, mb.RC_NO_MATCHING_SUBSCRIBERS)
    c.send(mb.publish("bob/x", b"not hers", qos=1, pid=2, version=5))
    assert mb.parse_ack(_recv(c)[2], 5).reason == mb.RC_NOT_AUTHORIZED  # the ACL is the SCRAM user's
    again = scramp.ScramClient([method], "alice", USERS["alice"])
    c.send(mb.auth(0x19, _props(method, again.get_client_first())))
    kind, _f, body = _recv(c)
    assert kind == mb.AUTH and body[0] == 0x18
    again.set_server_first(mb.parse_props(body, 1)[0][mb.AUTHENTICATION_DATA].decode())
    c.send(mb.auth(0x18, _props(method, again.get_client_final())))
    kind, _f, body = _recv(c)
    assert kind == mb.AUTH and body[0] == 0x00
    again.set_server_final(mb.parse_props(body, 1)[0][mb.AUTHENTICATION_DATA].decode())
    c.send(mb.pingreq())
    assert _recv(c)[0] == mb.PINGRESP
    c.close()


def test_wrong_password_is_refused_and_logged(scram_broker, uniq):
    port = _ports(scram_broker)[0]
    since = scram_broker.log_len()
    uid = uniq.cid()
    c, _client, (kind, _f, body) = _login(port, uid, "alice", "not it")
    assert kind == mb.CONNACK and mb.parse_connack(body, 5).rc == mb.RC_BAD_USERNAME_OR_PASSWORD
    scram_broker.wait_for_log(rf"refusing CONNECT from {uid} \(127\.0\.0\.1:\d+, listener mqtt 127\.0\.0\.1:{port}\): "
                              r"user 'alice': SCRAM-SHA-256: the proof does not verify", since=since)
    with pytest.raises(mb.ConnectionClosed):
        c.recv_packet(2)


def test_other_packets_before_connack_are_a_protocol_error(scram_broker, uniq):
    """[MQTT-3.1.2-30]"""
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", USERS["alice"])
    c = mb.RawClient(port=_ports(scram_broker)[0], version=5)
    c.send(mb.connect(uniq.cid(), version=5, props=_props("SCRAM-SHA-256", client.get_client_first())))
    assert _recv(c)[0] == mb.AUTH
    c.send(mb.subscribe(1, [("alice/#", 1)], version=5))
    kind, _f, body = _recv(c)
    assert kind == mb.CONNACK and mb.parse_connack(body, 5).rc == 0x82


def _example(port: int, password: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtests.scram_client", "--port", str(port), "--user", "alice",
                           "--password-stdin", *args], check=False, input=password + "\n", text=True, capture_output=True,
                          timeout=30, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def test_the_shipped_client_over_tcp_and_tls(scram_broker, pki):
    plain, _open, tls = _ports(scram_broker)
    run = _example(plain, USERS["alice"], "--method", "SCRAM-SHA-512", "--reauth", "--publish", "alice/t", "hi")
    assert run.returncode == 0, run.stderr
    assert "re-authenticated" in run.stdout and "PUBACK 0x10" in run.stdout
    run = _example(tls, USERS["alice"], "--cafile", str(pki["ca"]), "--publish", "alice/t", "hi")
    assert run.returncode == 0 and "PUBACK 0x10" in run.stdout, run.stderr
    run = _example(tls, "wrong", "--cafile", str(pki["ca"]))
    assert run.returncode == 1 and "0x86" in run.stderr


def test_each_listener_has_its_own_authentication(scram_broker, uniq):
    guarded, open_, _tls = _ports(scram_broker)
    c = mb.RawClient(port=guarded)
    c.send(mb.connect(uniq.cid("a"), version=4))
    assert mb.parse_connack(_recv(c)[2]).rc == 5  # anonymous: not authorized
    c = mb.RawClient(port=open_)
    c.send(mb.connect(uniq.cid("b"), version=4))
    assert mb.parse_connack(_recv(c)[2]).rc == 0
    c.send(mb.publish("anything/at/all", b"x", qos=1, pid=1))  # no ACL file on this listener
    assert _recv(c)[0] == mb.PUBACK
    c.close()
    scram = mb.RawClient(port=open_, version=5)  # no password file there: nothing to check SCRAM against
    scram.send(mb.connect(uniq.cid("c"), version=5, props=_props(
        "SCRAM-SHA-256", scramp.ScramClient(["SCRAM-SHA-256"], "alice", "x").get_client_first())))
    assert mb.parse_connack(_recv(scram)[2], 5).rc == mb.RC_BAD_AUTHENTICATION_METHOD


def test_a_password_changed_by_another_tool_voids_the_old_keys(scram_broker, uniq):
    """bob's line rewritten as mosquitto_passwd would (no FILE.scram update), then SIGHUP: his
    connected SCRAM session ends, SHA-256 (kept beside the old line) no longer logs him in, and
    SHA-512 (from the line itself) does, with the new password."""
    port = _ports(scram_broker)[0]
    c, _client, (_k, _f, body) = _login(port, uniq.cid("before"), "bob", USERS["bob"])
    assert mb.parse_connack(body, 5).rc == 0
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", b"new pw", salt, 4096, 64)
    lines = [ln for ln in scram_broker.pw.read_text().splitlines() if not ln.startswith("bob:")]
    lines.append(f"bob:$7$4096${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")
    scram_broker.pw.write_text("\n".join(lines) + "\n")
    since = scram_broker.log_len()
    os.kill(scram_broker.pid, signal.SIGHUP)
    scram_broker.wait_for_log(r"password and ACL files reloaded", since=since)
    kind, _f, body = _recv(c)
    assert kind == mb.DISCONNECT and body[0] == mb.RC_NOT_AUTHORIZED
    _c, _cl, (_k, _f, body) = _login(port, uniq.cid("sha256"), "bob", "new pw")
    assert mb.parse_connack(body, 5).rc == mb.RC_BAD_USERNAME_OR_PASSWORD
    _c, _cl, (_k, _f, body) = _login(port, uniq.cid("sha512"), "bob", "new pw", "SCRAM-SHA-512")
    assert mb.parse_connack(body, 5).rc == 0


def test_a_silent_exchange_is_closed_after_the_connect_timeout(make_broker, tmp_path):
    pw = tmp_path / "pw"
    _passwd(pw, "alice", USERS["alice"])
    b = make_broker(config=f'[auth]\npassword_file = "{pw}"\n[limits]\nconnect_timeout = 1.0\n')
    client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", USERS["alice"])
    c = mb.RawClient(port=b.port, version=5)
    c.send(mb.connect("silent", version=5, props=_props("SCRAM-SHA-256", client.get_client_first())))
    assert _recv(c)[0] == mb.AUTH
    kind, _f, body = _recv(c)  # nothing more from the client
    assert kind == mb.CONNACK and mb.parse_connack(body, 5).rc == mb.RC_NOT_AUTHORIZED


def test_passwd_keeps_the_sha256_keys_beside_the_password_file(tmp_path):
    from shardbroker.security import scram
    from shardbroker.security.passwords import load

    pw = tmp_path / "pw"
    _passwd(pw, "eve", "one")
    keys = scram.load(scram.sidecar_path(pw))
    assert keys is not None and set(keys.entries) == {"eve"}
    assert (tmp_path / "pw.scram").stat().st_mode & 0o777 == 0o600
    entry = load(pw).entries["eve"]
    assert scram.keys_for(scram.SHA256, entry, keys, "eve") == keys.entries["eve"][0]
    low = subprocess.run([*CLI, "passwd", str(pw), "eve", "--stdin", "--iterations", "100"], input="two\n",
                         text=True, capture_output=True, check=True)
    assert "can log in by password, not by SCRAM" in low.stderr  # and the old keys are gone with the old line
    assert scram.load(scram.sidecar_path(pw)).entries == {}
    _passwd(pw, "eve", "three")
    subprocess.run([*CLI, "passwd", str(pw), "eve", "--delete"], check=True, capture_output=True)
    assert scram.load(scram.sidecar_path(pw)).entries == {} and pw.read_text() == ""
