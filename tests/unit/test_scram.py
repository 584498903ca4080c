"""SCRAM enhanced authentication (MQTT 5 section 4.12): the keys (``security/scram.py``) and
the exchange in the broker core, CONNECT to CONNACK and re-authentication, with scramp's
client on the other side (no loop, no sockets); and authentication settings per listener."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import scramp
from core_harness import FakeClient, Harness

from shardbroker.config import load_config
from shardbroker.protocol import reasons
from shardbroker.protocol.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    PingReq,
    Properties,
    Publish,
    Subscribe,
    Subscription,
)
from shardbroker.security import scram
from shardbroker.security.acl import AclFile
from shardbroker.security.auth import Policy
from shardbroker.security.passwords import PasswordFile, hash_password

ALICE = hash_password(b"secret", iterations=4096)
BOB = hash_password(b"b0b", iterations=4096)
FEW = hash_password(b"few", iterations=101)  # what mosquitto_passwd makes by default


def _keys() -> scram.ScramFile:
    sf = scram.ScramFile()
    sf.entries["alice"] = (scram.derive(scram.SHA256, "secret", 4096), scram.fingerprint(ALICE))
    sf.entries["bob"] = (scram.derive(scram.SHA256, "b0b", 4096), scram.fingerprint(hash_password(b"old", 4096)))
    return sf


def _policy(anonymous: bool = False, acl: str | None = None) -> Policy:
    pf = PasswordFile({"alice": ALICE, "bob": BOB, "few": FEW})
    return Policy(anonymous, pf, AclFile.parse(acl) if acl is not None else None, _keys())


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path, policy=_policy(acl="user alice\ntopic readwrite a/#\n"))
    yield harness
    harness.close()


def _props(method: str, data: str) -> Properties:
    return Properties(authentication_method=method, authentication_data=data.encode())


def _login(h: Harness, cid: str, user: str, password: str, method: str = scram.SHA256,
           ) -> tuple[FakeClient, scramp.ScramClient, list[object]]:
    """CONNECT and the exchange; the packets of the broker's last answer."""
    client = scramp.ScramClient([method], user, password)
    c = h.client(cid, MQTT_5)
    c.send(Connect(protocol_version=MQTT_5, client_id=cid, properties=_props(method, client.get_client_first())))
    [step] = c.packets()
    assert isinstance(step, Auth) and step.reason_code == reasons.CONTINUE_AUTHENTICATION
    assert step.properties.authentication_method == method
    client.set_server_first(step.properties.authentication_data.decode())
    c.send(Auth(reasons.CONTINUE_AUTHENTICATION, _props(method, client.get_client_final())))
    return c, client, c.packets()


@pytest.mark.parametrize("method", scram.METHODS)
def test_login_and_the_server_proves_it_has_the_keys(h: Harness, method: str) -> None:
    c, client, [ack] = _login(h, "c1", "alice", "secret", method)
    assert isinstance(ack, ConnAck) and ack.reason_code == reasons.SUCCESS
    assert ack.properties.authentication_method == method
    client.set_server_final(ack.properties.authentication_data.decode())  # raises unless signed with the keys
    c.send(Subscribe(1, (Subscription("a/#", 1),)))  # the ACL is alice's
    c.send(Subscribe(2, (Subscription("b/#", 1),)))
    assert [p.reason_codes for p in c.packets()] == [(1,), (reasons.NOT_AUTHORIZED,)]


@pytest.mark.parametrize("user, password, method", [
    ("alice", "wrong", scram.SHA256),
    ("alice", "wrong", scram.SHA512),
    ("nobody", "secret", scram.SHA256),  # answered like a wrong password, at the end
    ("bob", "b0b", scram.SHA256),  # its SHA-256 keys were made beside another password line
    ("few", "few", scram.SHA512),  # 101 iterations: SCRAM takes 4,096 or more
])
def test_refused_like_a_wrong_password(h: Harness, user: str, password: str, method: str) -> None:
    c, _client, [ack] = _login(h, "c1", user, password, method)
    assert isinstance(ack, ConnAck) and ack.reason_code == reasons.BAD_USER_NAME_OR_PASSWORD
    assert c.transport.closed and h.broker.stats["auth_failures"] == 1


def test_bob_logs_in_by_sha512_from_his_password_line_alone(h: Harness) -> None:
    _c, _client, [ack] = _login(h, "c1", "bob", "b0b", scram.SHA512)
    assert ack.reason_code == reasons.SUCCESS


def test_another_method_and_no_password_file(h: Harness, tmp_path: Path) -> None:
    c = h.client("c1", MQTT_5)
    c.send(Connect(protocol_version=MQTT_5, client_id="c1", properties=_props("SCRAM-SHA-1", "n,,n=a,r=x")))
    assert [p.reason_code for p in c.packets()] == [reasons.BAD_AUTHENTICATION_METHOD]
    other = Harness(tmp_path / "other")
    try:
        c = other.client("c2", MQTT_5)
        c.send(Connect(protocol_version=MQTT_5, client_id="c2", properties=_props(scram.SHA256, "n,,n=a,r=x")))
        assert [p.reason_code for p in c.packets()] == [reasons.BAD_AUTHENTICATION_METHOD]
    finally:
        other.close()


def test_malformed_client_first_and_a_user_name_that_is_not_scrams(h: Harness) -> None:
    c = h.client("c1", MQTT_5)
    c.send(Connect(protocol_version=MQTT_5, client_id="c1", properties=_props(scram.SHA256, "garbage")))
    assert [p.reason_code for p in c.packets()] == [reasons.BAD_USER_NAME_OR_PASSWORD]
    client = scramp.ScramClient([scram.SHA256], "alice", "secret")
    c = h.client("c2", MQTT_5)
    c.send(Connect(protocol_version=MQTT_5, client_id="c2", username="bob",
                   properties=_props(scram.SHA256, client.get_client_first())))
    assert [p.reason_code for p in c.packets()] == [reasons.BAD_USER_NAME_OR_PASSWORD]


def _started(h: Harness, cid: str) -> FakeClient:
    """A client whose CONNECT began an exchange (the broker's AUTH 0x18 read and dropped)."""
    c = h.client(cid, MQTT_5)
    c.send(Connect(protocol_version=MQTT_5, client_id=cid, properties=_props(
        scram.SHA256, scramp.ScramClient([scram.SHA256], "alice", "secret").get_client_first())))
    [step] = c.packets()
    assert isinstance(step, Auth)
    return c


def test_only_auth_or_disconnect_before_connack(h: Harness) -> None:
    """[MQTT-3.1.2-30]: anything else during the exchange is a protocol error."""
    c = _started(h, "c1")
    c.send(PingReq())
    assert [p.reason_code for p in c.packets()] == [reasons.PROTOCOL_ERROR] and c.transport.closed
    quits = _started(h, "c2")
    quits.send(Disconnect())
    assert quits.packets() == [] and quits.transport.closed and not h.broker.handshake.exchanges


@pytest.mark.parametrize("data, reason", [
    (b"\xf0\x04\x18\x02\x24\x01", reasons.MALFORMED_PACKET),  # Maximum QoS: not an AUTH property (2.2.2.2)
    (b"\xf0\x08\x18\x06\x1f\x00\x00\x1f\x00\x00", reasons.PROTOCOL_ERROR),  # Reason String twice
    (b"\xf0\x03\x18\x01\x00", reasons.MALFORMED_PACKET),  # identifier 0 is no property
], ids=["not-allowed", "twice", "unknown"])
def test_a_bad_auth_before_connack_is_refused_by_connack(h: Harness, data: bytes, reason: int) -> None:
    """Before the CONNACK a 5.0 client is told why by a CONNACK (``reactions``), even when the
    packet that is wrong is an AUTH of the exchange."""
    c = _started(h, "c1")
    c.send_raw(data)
    [ack] = c.packets()
    assert isinstance(ack, ConnAck) and ack.reason_code == reason and c.transport.closed
    assert not h.broker.handshake.exchanges


def test_an_exchange_that_is_not_finished_in_time_is_refused(h: Harness) -> None:
    c = _started(h, "c1")
    h.advance(h.config.limits.connect_timeout - 1)
    assert not c.transport.closed
    h.advance(2)
    assert [p.reason_code for p in c.packets()] == [reasons.NOT_AUTHORIZED] and c.transport.closed


def _reauth(c: FakeClient, user: str, password: str, method: str = scram.SHA256) -> list[object]:
    client = scramp.ScramClient([method], user, password)
    c.send(Auth(reasons.RE_AUTHENTICATE, _props(method, client.get_client_first())))
    [step] = c.packets()
    assert isinstance(step, Auth) and step.reason_code == reasons.CONTINUE_AUTHENTICATION
    client.set_server_first(step.properties.authentication_data.decode())
    c.send(Auth(reasons.CONTINUE_AUTHENTICATION, _props(method, client.get_client_final())))
    out = c.packets()
    if out and isinstance(out[0], Auth):
        client.set_server_final(out[0].properties.authentication_data.decode())
    return out


def test_reauthentication(h: Harness) -> None:
    c, _client, _ack = _login(h, "c1", "alice", "secret")
    [done] = _reauth(c, "alice", "secret")
    assert isinstance(done, Auth) and done.reason_code == reasons.SUCCESS
    c.send(Publish("a/b", b"still in", qos=1, packet_id=1))  # the session goes on
    assert [type(p).__name__ for p in c.packets()] == ["PubAck"]
    [gone] = _reauth(c, "alice", "wrong")
    assert isinstance(gone, Disconnect) and gone.reason_code == reasons.NOT_AUTHORIZED and c.transport.closed


def test_reauthentication_as_another_user_or_by_another_method(h: Harness) -> None:
    c, _client, _ack = _login(h, "c1", "alice", "secret", scram.SHA512)
    [gone] = _reauth(c, "bob", "b0b", scram.SHA512)  # bob's own proof, but the session is alice's
    assert isinstance(gone, Disconnect) and gone.reason_code == reasons.NOT_AUTHORIZED and c.transport.closed
    c2, _client, _ack = _login(h, "c2", "alice", "secret")
    client = scramp.ScramClient([scram.SHA512], "alice", "secret")
    c2.send(Auth(reasons.RE_AUTHENTICATE, _props(scram.SHA512, client.get_client_first())))  # [MQTT-4.12.1-1]
    assert [p.reason_code for p in c2.packets()] == [reasons.PROTOCOL_ERROR]


def test_auth_from_a_client_that_did_not_use_a_method_is_a_protocol_error(h: Harness) -> None:
    c = h.client("c1", MQTT_5)
    c.send(Connect(protocol_version=MQTT_5, client_id="c1", username="alice", password=b"secret"))
    h.run()
    assert [p.reason_code for p in c.packets()] == [reasons.SUCCESS]
    c.send(Auth(reasons.RE_AUTHENTICATE, _props(scram.SHA256, "n,,n=alice,r=abc")))  # [MQTT-4.12.0-1]
    assert [p.reason_code for p in c.packets()] == [reasons.PROTOCOL_ERROR]


def test_scram_file_round_trip_and_bad_lines() -> None:
    sf = _keys()
    again = scram.ScramFile.parse(sf.render() + "carol:SCRAM-SHA-1:1:AA==:AA==:AA==:AA==\nbroken\n")
    assert again.entries == sf.entries and len(again.problems) == 2
    with pytest.raises(ValueError, match="4096"):
        scram.derive(scram.SHA256, "pw", 100)


def test_each_listener_has_its_own_settings(tmp_path: Path) -> None:
    """listener 0 lets anonymous clients in, listener 1 wants a password."""
    config = load_config(None, {"server.data_dir": str(tmp_path),
                                "listener": [{"port": 1}, {"port": 2, "allow_anonymous": False}]})
    assert [a.allow_anonymous for a in config.listeners_auth()] == [True, False]
    h = Harness(tmp_path, config, policy=(Policy(True), _policy(anonymous=False)))
    try:
        open_door = h.client("c0", MQTT_3_1_1)
        open_door.send(Connect(protocol_version=MQTT_3_1_1, client_id="c0"))
        closed = h.client("c1", MQTT_3_1_1)
        closed.transport.listener = 1
        closed.send(Connect(protocol_version=MQTT_3_1_1, client_id="c1"))
        assert [p.reason_code for p in open_door.packets()] == [0]
        assert [p.reason_code for p in closed.packets()] == [reasons.V3_NOT_AUTHORIZED]
        scram_on_0 = h.client("c2", MQTT_5)  # no password file on listener 0: nothing to check SCRAM against
        scram_on_0.send(Connect(protocol_version=MQTT_5, client_id="c2", properties=_props(
            scram.SHA256, scramp.ScramClient([scram.SHA256], "alice", "secret").get_client_first())))
        assert [p.reason_code for p in scram_on_0.packets()] == [reasons.BAD_AUTHENTICATION_METHOD]
    finally:
        h.close()
