"""Authentication and ACL checks in the broker core: the CONNECT that waits for its password
to be verified, the packets behind it, the cache of verified passwords, reloads (no loop,
no sockets: the harness's scheduler runs the verifications)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from core_harness import Harness

from shardbroker.protocol import codec, reasons
from shardbroker.protocol.packets import (
    MQTT_3_1_1,
    MQTT_5,
    ConnAck,
    Connect,
    Disconnect,
    Publish,
    SubAck,
    Subscribe,
    Subscription,
)
from shardbroker.security.acl import AclFile
from shardbroker.security.auth import Policy
from shardbroker.security.passwords import PasswordFile, hash_password

ALICE = hash_password(b"secret", iterations=10)
BOB = hash_password(b"b0b", iterations=10)


def _policy(anonymous: bool = False, acl: str | None = None, **users: object) -> Policy:
    pf = PasswordFile({"alice": ALICE, "bob": BOB, **users})  # type: ignore[arg-type]
    return Policy(anonymous, pf, AclFile.parse(acl) if acl is not None else None)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path, policy=_policy(acl="user alice\ntopic readwrite a/#\nuser bob\ntopic read a/#\n"))
    yield h
    h.close()


def _connect(h: Harness, cid: str, user: str | None, password: bytes | None, version: int = MQTT_5,
             then: bytes = b"") -> object:
    c = h.client(cid, version)
    data = codec.encode(Connect(protocol_version=version, client_id=cid, username=user, password=password),
                        version)
    h.broker.received(c.client, data + then, h.now)  # not run yet: the verification is scheduled
    return c


def _kinds(c: object) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for p in c.packets():  # type: ignore[attr-defined]
        out.append((type(p).__name__, p.reason_codes if isinstance(p, SubAck) else p.reason_code))
    return out


def test_connect_waits_for_its_password_and_the_packets_behind_it_wait_too(harness: Harness) -> None:
    then = codec.encode(Subscribe(1, (Subscription("a/b", 1),)), MQTT_5)
    c = _connect(harness, "c1", "alice", b"secret", then=then)
    assert c.transport.paused and c.packets() == []  # type: ignore[attr-defined]
    harness.run()  # the verification finishes
    assert _kinds(c) == [("ConnAck", 0), ("SubAck", (1,))]
    assert not c.transport.paused  # type: ignore[attr-defined]


def test_wrong_password_unknown_user_and_anonymous(harness: Harness) -> None:
    bad = _connect(harness, "c1", "alice", b"nope")
    harness.run()
    assert [p.reason_code for p in bad.packets()] == [reasons.BAD_USER_NAME_OR_PASSWORD]  # type: ignore[attr-defined]
    assert bad.transport.closed  # type: ignore[attr-defined]
    unknown = _connect(harness, "c2", "mallory", b"x", MQTT_3_1_1)
    harness.run()
    assert [p.reason_code for p in unknown.packets()] == [reasons.V3_BAD_USERNAME_OR_PASSWORD]  # type: ignore[attr-defined]
    anon = _connect(harness, "c3", None, None, MQTT_3_1_1)
    harness.run()
    assert [p.reason_code for p in anon.packets()] == [reasons.V3_NOT_AUTHORIZED]  # type: ignore[attr-defined]
    assert harness.broker.stats["auth_failures"] == 3  # published in $SYS with the other counters


class _Counting:
    def __init__(self, inner: object) -> None:
        self.inner, self.calls = inner, 0

    def verify(self, *args: object) -> None:
        self.calls += 1
        self.inner.verify(*args)  # type: ignore[attr-defined]


def test_a_verified_password_is_not_hashed_again(harness: Harness) -> None:
    counting = harness.broker.verifier = _Counting(harness.broker.verifier)  # type: ignore[assignment]
    first = _connect(harness, "c1", "alice", b"secret")
    harness.run()
    first.packets()  # type: ignore[attr-defined]
    again = _connect(harness, "c2", "alice", b"secret")  # decided at once, from the cache
    harness.run()
    assert _kinds(again) == [("ConnAck", 0)] and counting.calls == 1
    wrong = _connect(harness, "c3", "alice", b"Secret")  # a different password is verified
    harness.run()
    assert counting.calls == 2
    assert [p.reason_code for p in wrong.packets()] == [reasons.BAD_USER_NAME_OR_PASSWORD]  # type: ignore[attr-defined]


def test_a_client_gone_while_its_password_is_verified(harness: Harness) -> None:
    c = _connect(harness, "c1", "alice", b"secret")
    c.drop()  # type: ignore[attr-defined]  (runs the scheduler too)
    assert c.packets() == []  # type: ignore[attr-defined]
    assert harness.broker.sessions.get("c1") is None


def test_reload_disconnects_who_lost_access_and_changes_the_acl_at_once(harness: Harness) -> None:
    alice = _connect(harness, "a1", "alice", b"secret")
    bob = _connect(harness, "b1", "bob", b"b0b")
    harness.run()
    alice.packets(), bob.packets()  # type: ignore[attr-defined]
    bob.send(Subscribe(1, (Subscription("a/#", 1),)))  # type: ignore[attr-defined]
    assert bob.packets() == [SubAck(1, (1,))]  # type: ignore[attr-defined]
    alice.send(Publish("a/x", b"1", qos=0))  # type: ignore[attr-defined]
    assert [p.payload for p in bob.packets()] == [b"1"]  # type: ignore[attr-defined]
    # bob may no longer read a/#; alice's password changed (she must log in again)
    new = _policy(acl="user alice\ntopic readwrite a/#\nuser bob\ntopic read b/#\n",
                  alice=hash_password(b"other", iterations=10))
    harness.broker.security_changed(new, harness.now)
    harness.run()
    assert [type(p) for p in alice.packets()] == [Disconnect]  # type: ignore[attr-defined]
    assert alice.transport.closed and not bob.transport.closed  # type: ignore[attr-defined]
    other = _connect(harness, "a2", "alice", b"other")
    harness.run()
    assert _kinds(other) == [("ConnAck", 0)]
    other.send(Publish("a/x", b"2", qos=0))  # type: ignore[attr-defined]
    assert bob.packets() == []  # type: ignore[attr-defined]


def test_anonymous_clients_are_disconnected_when_a_reload_turns_anonymous_access_off(tmp_path: Path) -> None:
    h = Harness(tmp_path, policy=Policy(allow_anonymous=True))
    c = h.connect("anon")
    assert c.packets() == [ConnAck(False, 0)]
    h.broker.security_changed(Policy(allow_anonymous=False), h.now)
    h.run()
    assert c.transport.closed
    h.close()


def test_queued_messages_are_checked_when_they_leave(tmp_path: Path) -> None:
    acl = "user bob\ntopic read a/#\nuser alice\ntopic readwrite a/#\n"
    h = Harness(tmp_path, policy=_policy(acl=acl))
    bob = _connect(h, "b1", "bob", b"b0b", MQTT_5)
    h.run()
    bob.packets()  # type: ignore[attr-defined]
    bob.send(Subscribe(1, (Subscription("a/#", 1),)))  # type: ignore[attr-defined]
    bob.packets()  # type: ignore[attr-defined]
    h.broker.sessions.get("b1").client.send_window = 0  # type: ignore[union-attr]  # all of it queues
    alice = _connect(h, "a1", "alice", b"secret")
    h.run()
    alice.packets()  # type: ignore[attr-defined]
    alice.send(Publish("a/x", b"q", qos=1, packet_id=1))  # type: ignore[attr-defined]
    assert h.broker.sessions.get("b1").queued() == 1  # type: ignore[union-attr]
    h.broker.security_changed(_policy(acl="user bob\ntopic read b/#\nuser alice\ntopic readwrite a/#\n"), h.now)
    h.broker.sessions.get("b1").client.send_window = 10  # type: ignore[union-attr]
    h.broker.delivery.pump(h.broker.sessions.get("b1"))  # type: ignore[arg-type]
    h.run()
    assert [p for p in bob.packets() if isinstance(p, Publish)] == []  # type: ignore[attr-defined]
    assert h.broker.stats["dropped_not_authorized"] == 1
    h.close()


def test_a_broker_configured_with_files_needs_them_loaded(tmp_path: Path) -> None:
    from shardbroker.config import load_config

    config = load_config(None, {"server.data_dir": str(tmp_path), "auth.password_file": str(tmp_path / "pw")})
    with pytest.raises(ValueError, match="pass the loaded Policy"):
        Harness(tmp_path, config=config)


def test_guessing_from_one_address_is_slowed_down_then_refused(harness: Harness) -> None:
    failures = harness.broker.handshake.failures
    answers = []
    for i in range(failures.ban_after + 1):
        c = _connect(harness, f"g{i}", "alice", b"guess")
        harness.run()
        got = c.packets()  # type: ignore[attr-defined]
        if not got:  # answered late
            assert i >= failures.slow_after and c.transport.paused  # type: ignore[attr-defined]
            harness.advance(failures.max_delay, tick=False)
            got = c.packets()  # type: ignore[attr-defined]
        answers.append([p.reason_code for p in got])
    assert answers[:-1] == [[reasons.BAD_USER_NAME_OR_PASSWORD]] * failures.ban_after
    assert answers[-1] == [reasons.NOT_AUTHORIZED]  # refused at once, nothing verified
    ok = _connect(harness, "ok", "alice", b"secret")  # the right password is refused too, for a while
    harness.run()
    assert _kinds(ok) == [("ConnAck", reasons.NOT_AUTHORIZED)]
    harness.advance(failures.ban + 1, tick=False)
    ok = _connect(harness, "ok2", "alice", b"secret")
    harness.run()
    assert _kinds(ok) == [("ConnAck", 0)]


def test_failures_count_per_address_and_are_forgotten() -> None:
    from shardbroker.security.auth import Failures

    f = Failures(slow_after=2, ban_after=4, window=10, ban=30, max_delay=3)
    assert [f.failed("a", t) for t in (0, 1, 2, 3)] == [0.0, 0.0, 0.5, 1.0]
    assert f.banned("a", 4) and not f.banned("b", 4)
    assert f.banned("a", 34) and not f.banned("a", 34.1)  # 30 s from the last answer (sent at 4, late)
    f.failed("c", 0)
    f.succeeded("c")
    assert f.failed("c", 1) == 0.0
    assert f.failed("d", 0) == 0.0 and f.failed("d", 11) == 0.0  # the window is 10 s


def test_a_client_over_its_publish_rate_is_paused_then_disconnected(tmp_path: Path) -> None:
    from shardbroker.config import load_config
    from shardbroker.core.inbound import RATE_PATIENCE

    config = load_config(None, {"server.data_dir": str(tmp_path), "limits.max_publish_rate": 5})
    h = Harness(tmp_path, config=config)
    c = h.connect("fast", version=MQTT_5)
    c.packets()
    batch = b"".join(codec.encode(Publish("t", b"x", qos=0), MQTT_5) for _ in range(8))
    h.broker.received(c.client, batch, h.now)
    h.run()
    assert c.transport.paused and h.broker.stats["received"] == 8  # what was read is handled
    h.advance(1.0, tick=False)
    assert not c.transport.paused  # the next second
    seconds = 0
    while not c.transport.closed and seconds < RATE_PATIENCE + 3:
        h.broker.received(c.client, batch, h.now)
        h.run()
        h.advance(1.0, tick=False)
        seconds += 1
    assert c.transport.closed and seconds > RATE_PATIENCE - 1
    assert [p.reason_code for p in c.packets() if isinstance(p, Disconnect)] == [reasons.MESSAGE_RATE_TOO_HIGH]
    h.close()


def test_a_client_within_its_rate_is_never_paused(tmp_path: Path) -> None:
    from shardbroker.config import load_config

    config = load_config(None, {"server.data_dir": str(tmp_path), "limits.max_publish_bytes_rate": 1000})
    h = Harness(tmp_path, config=config)
    c = h.connect("calm", version=MQTT_5)
    for _ in range(30):
        c.send(Publish("t", b"y" * 100, qos=0))  # 100 bytes a second
        assert not c.transport.paused
        h.advance(1.0, tick=False)
    assert not c.transport.closed
    h.close()


def test_failed_logins_are_counted_on_every_shard(tmp_path: Path) -> None:
    """A failure on one shard is told to the others (LoginFailed), which count it against the
    address too: a guesser is banned wherever its client IDs land."""
    from shardbroker.config import load_config
    from shardbroker.peer.messages import LoginFailed

    config = load_config(None, {"server.data_dir": str(tmp_path), "auth.max_failures": 4})
    h = Harness(tmp_path, config, peers=[1], shard=0, shards=2, policy=_policy())
    try:
        bad = _connect(h, "c1", "alice", b"nope")
        h.run()
        assert [p.reason_code for p in bad.packets()] == [reasons.BAD_USER_NAME_OR_PASSWORD]  # type: ignore[attr-defined]
        assert (1, LoginFailed(0, "fake")) in h.link.take()  # the fake transport's address is "fake:c1"
        for _ in range(3):  # three more failures of the same address, seen by shard 1
            h.peer_messages([LoginFailed(1, "fake")])
        late = _connect(h, "c2", "alice", b"secret")  # the right password, from a banned address
        h.run()
        assert [p.reason_code for p in late.packets()] == [reasons.NOT_AUTHORIZED]  # type: ignore[attr-defined]
    finally:
        h.close()
