"""24: password files and ACL files against the real broker, raw bytes and the mosquitto
clients; the same files run by Mosquitto must give the same deliveries.

Password files are made by ``shardbroker passwd`` and by ``mosquitto_passwd`` itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mqttbytes as mb
import pytest
from conftest import BrokerStartError, assert_no_publish, wait_until

pytestmark = pytest.mark.usefixtures("_only_shardbroker")

CLI = [sys.executable, "-m", "shardbroker.cli.main"]
MOSQUITTO = "/usr/sbin/mosquitto"

ACL = """\
# clients without a username
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret
topic read public/#
topic write public/alice

user bob
topic read alice/#
topic readwrite shared/#

user admin
topic readwrite #
topic read $SYS/#

pattern readwrite devices/%c/#
pattern read inbox/%u
"""

USERS = {"alice": "wonder land", "bob": "b0b", "admin": "root:pw"}



def _passwd(file: Path, user: str, password: str, *more: str) -> None:
    subprocess.run([*CLI, "passwd", str(file), user, "--stdin", "--iterations", "1000", *more],
                   input=password + "\n", text=True, check=True, capture_output=True)


def _files(tmp: Path, acl: str = ACL) -> tuple[Path, Path]:
    pw, aclf = tmp / "passwords", tmp / "acl"
    for user, password in USERS.items():
        _passwd(pw, user, password)
    aclf.write_text(acl)
    return pw, aclf


def _config(pw: Path | None, acl: Path | None, anonymous: str | None = None) -> str:
    lines = ["[auth]"]
    if pw is not None:
        lines.append(f'password_file = "{pw}"')
    if acl is not None:
        lines.append(f'acl_file = "{acl}"')
    if anonymous is not None:
        lines.append(f"allow_anonymous = {anonymous}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def secured(make_module_broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    pw, acl = _files(tmp)
    b = make_module_broker(workers=2, config=_config(pw, acl, "true"))
    b.files = (pw, acl)
    return b


def _as(mqtt, broker, cid: str, user: str | None, version: int = 4, **kw):
    password = USERS.get(user or "", None) if "password" not in kw else kw.pop("password")
    return mqtt(broker, cid, version=version, username=user, password=password, **kw)


# --------------------------------------------------------------------------- who may connect


@pytest.mark.parametrize("version, bad, anon", [(4, 4, 5), (5, 0x86, 0x87)])
def test_credentials_decide_the_connack(make_broker, tmp_path, mqtt, uniq, version, bad, anon):
    pw, _ = _files(tmp_path)
    b = make_broker(workers=2, config=_config(pw, None))
    assert _as(mqtt, b, uniq.cid("a"), "alice", version).connack.rc == 0
    assert _as(mqtt, b, uniq.cid("w"), "alice", version, password="wrong", expect_rc=None).connack.rc == bad
    assert _as(mqtt, b, uniq.cid("n"), "alice", version, password=None, expect_rc=None).connack.rc == bad
    assert _as(mqtt, b, uniq.cid("u"), "nobody", version, password="x", expect_rc=None).connack.rc == bad
    # a password file makes anonymous access off unless it is asked for
    assert mqtt(b, uniq.cid("z"), version=version, expect_rc=None).connack.rc == anon
    line = b.wait_for_log("user 'nobody'", timeout=5)
    assert "refusing CONNECT" in line and "(127.0.0.1:" in line


def test_anonymous_access_can_stay_on_beside_a_password_file(secured, mqtt, uniq):
    assert mqtt(secured, uniq.cid("z"), version=5).connack.rc == 0
    assert _as(mqtt, secured, uniq.cid("w"), "bob", 5, password="nope", expect_rc=None).connack.rc == 0x86


@pytest.mark.skipif(not shutil.which("mosquitto_passwd") or not shutil.which("mosquitto_pub"),
                    reason="mosquitto_passwd / mosquitto_pub are not installed")
def test_a_file_made_by_mosquitto_passwd_and_the_mosquitto_clients(make_broker, tmp_path, uniq):
    pw = tmp_path / "mosq-passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "carol", "s3cret"], check=True)
    subprocess.run(["mosquitto_passwd", "-H", "sha512", "-b", str(pw), "dave", "old-style"], check=True)
    b = make_broker(workers=2, config=_config(pw, None))
    topic = uniq.topic()
    sub = subprocess.Popen(["mosquitto_sub", "-p", str(b.port), "-u", "dave", "-P", "old-style", "-t", topic,
                            "-C", "1", "-W", "10", "-q", "1"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    subprocess.run(["mosquitto_pub", "-p", str(b.port), "-u", "carol", "-P", "s3cret", "-t", topic, "-m", "hi",
                    "-q", "1"], check=True, timeout=10)
    out, _ = sub.communicate(timeout=15)
    assert out.strip() == "hi"
    bad = subprocess.run(["mosquitto_pub", "-p", str(b.port), "-u", "carol", "-P", "x", "-t", topic, "-m", "no"],
                         capture_output=True, text=True, timeout=10, check=False)
    assert bad.returncode != 0 and "bad user name or password" in (bad.stderr + bad.stdout).lower()


def test_passwd_adds_changes_and_deletes(tmp_path):
    f = tmp_path / "pw"
    _passwd(f, "eve", "one")
    first = f.read_text()
    _passwd(f, "eve", "two")
    assert f.read_text() != first and f.read_text().startswith("eve:$7$1000$")
    assert f.stat().st_mode & 0o777 == 0o600
    subprocess.run([*CLI, "passwd", str(f), "eve", "--delete"], check=True, capture_output=True)
    assert f.read_text() == ""
    gone = subprocess.run([*CLI, "passwd", str(f), "eve", "--delete"], capture_output=True, text=True,
                          check=False)
    assert gone.returncode == 1 and "no user 'eve'" in gone.stderr
    # the password never appears on the command line: there is no option for it
    helped = subprocess.run([*CLI, "passwd", "--help"], capture_output=True, text=True, check=True)
    assert "--stdin" in helped.stdout and "--password" not in helped.stdout


def test_a_storm_of_slow_hashes_does_not_stall_other_clients(make_broker, tmp_path, mqtt, uniq):
    pw = tmp_path / "pw"
    _passwd(pw, "alice", "wonder land")
    subprocess.run([*CLI, "passwd", str(pw), "slow", "--stdin", "--iterations", "300000"],
                   input="x\n", text=True, check=True, capture_output=True)
    b = make_broker(workers=1, config=_config(pw, None) + "max_failures = 0\n")  # every guess is hashed
    canary = _as(mqtt, b, uniq.cid("c"), "alice")
    topic = uniq.topic()
    canary.subscribe(topic, 1)
    stop = threading.Event()
    refused: list[int] = []

    def storm() -> None:
        while not stop.is_set():
            c = mb.RawClient(port=b.port)
            try:
                refused.append(c.connect_mqtt(uniq.cid("s"), username="slow", password="wrong", timeout=30).rc)
            finally:
                c.close()

    threads = [threading.Thread(target=storm, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    worst = 0.0
    try:
        time.sleep(0.3)
        for i in range(30):  # QoS 1 round trips through the same worker while it hashes
            t0 = time.monotonic()
            canary.publish(topic, str(i).encode(), qos=1)
            assert canary.recv_publish().payload == str(i).encode()
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.03)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert refused and set(refused) == {4}
    assert worst < 0.25, f"a round trip took {worst * 1000:.0f} ms while passwords were hashed"


def test_guessing_is_slowed_down_then_refused_for_a_while(make_broker, tmp_path, mqtt, uniq):
    pw, _ = _files(tmp_path)
    b = make_broker(workers=1, config=_config(pw, None) + "max_failures = 6\nban_time = 2.0\n")
    took = []
    for _ in range(6):
        t0 = time.monotonic()
        assert _as(mqtt, b, uniq.cid("g"), "alice", 4, password="guess", expect_rc=None).connack.rc == 4
        took.append(time.monotonic() - t0)
    assert max(took[:3]) < 0.4 and took[3] >= 0.45 and took[4] >= 0.95  # late from the 4th on
    t0 = time.monotonic()
    assert _as(mqtt, b, uniq.cid("r"), "alice", 4, expect_rc=None).connack.rc == 5  # refused, right or not
    assert time.monotonic() - t0 < 0.4
    b.wait_for_log("too many failed attempts from this address", timeout=5)
    time.sleep(2.2)
    assert _as(mqtt, b, uniq.cid("ok"), "alice", 4).connack.rc == 0


def test_guessing_from_many_addresses_at_once(make_broker, tmp_path, mqtt, uniq):
    """40 addresses guess alice's password at the same time: every guess is refused, each
    address is slowed down on its own, and alice (from another address) and a bystander's
    round trips go on meanwhile."""
    pw, _ = _files(tmp_path)
    b = make_broker(workers=2, config=_config(pw, None))
    canary = _as(mqtt, b, uniq.cid("c"), "alice")
    topic = uniq.topic()
    canary.subscribe(topic, 1)
    answers: dict[str, list[tuple[int, float]]] = {}

    def guesser(host: str) -> None:
        got = answers.setdefault(host, [])
        for i in range(5):
            s = socket.create_connection((b.host if hasattr(b, "host") else "127.0.0.1", b.port), timeout=30,
                                         source_address=(host, 0))
            c = mb.RawClient(port=b.port, sock=s)
            t0 = time.monotonic()
            try:
                got.append((c.connect_mqtt(f"{uniq.prefix('g')}-{host}-{i}", username="alice", password="guess",
                                           timeout=30).rc, time.monotonic() - t0))
            finally:
                c.close()

    threads = [threading.Thread(target=guesser, args=(f"127.0.0.{10 + k}",), daemon=True) for k in range(40)]
    for t in threads:
        t.start()
    worst_trip = worst_login = 0.0
    logins = 0
    try:
        while any(t.is_alive() for t in threads):
            t0 = time.monotonic()
            canary.publish(topic, b"%d" % logins, qos=1)
            assert canary.recv_publish().payload == b"%d" % logins
            worst_trip = max(worst_trip, time.monotonic() - t0)
            t0 = time.monotonic()
            _as(mqtt, b, uniq.cid(f"a{logins}"), "alice").disconnect()
            worst_login = max(worst_login, time.monotonic() - t0)
            logins += 1
            time.sleep(0.05)
    finally:
        for t in threads:
            t.join(timeout=60)
    assert len(answers) == 40 and all(len(a) == 5 for a in answers.values())
    assert {rc for a in answers.values() for rc, _ in a} == {4}
    # each address slowed down from its 4th failure; a worker counts another worker's failures
    # from its peer notice, which a loaded machine can deliver after the next guess arrived, so
    # a 4th answer may come at once, never a 5th
    assert sum(a[3][1] >= 0.45 for a in answers.values()) >= 36, answers
    assert all(a[4][1] >= 0.45 for a in answers.values()), answers
    assert logins >= 5 and worst_login < 1.0, f"alice's login took up to {worst_login * 1000:.0f} ms"
    assert worst_trip < 0.5, f"a round trip took {worst_trip * 1000:.0f} ms"


# --------------------------------------------------------------------------- what they may do


@pytest.mark.parametrize("version", [4, 5])
def test_publish_needs_write_access(secured, mqtt, uniq, version):
    admin = _as(mqtt, secured, uniq.cid("ad"), "admin", 4)
    admin.subscribe([("alice/#", 1), ("public/#", 1)])
    alice = _as(mqtt, secured, uniq.cid("al"), "alice", version)
    ack = alice.publish("public/news", b"no", qos=1)
    assert ack is not None and ack.reason == (0x87 if version == 5 else 0)
    assert alice.publish("public/alice", b"yes", qos=1).reason == 0
    assert alice.publish("alice/x", b"own", qos=1).reason == 0
    got = [m.payload for m in admin.recv_publishes(2)]
    assert got == [b"yes", b"own"]
    assert_no_publish(admin, 0.3)
    secured.wait_for_log("not allowed to write by the ACL file", timeout=5)


@pytest.mark.parametrize("version, no", [(4, 0x80), (5, 0x87)])
def test_subscribe_is_refused_where_nothing_could_be_read(secured, mqtt, uniq, version, no):
    bob = _as(mqtt, secured, uniq.cid("b"), "bob", version)
    codes = bob.subscribe([("alice/+", 1), ("public/#", 1), ("#", 1), ("$SYS/#", 0), ("shared/x", 2)])
    assert codes == [1, no, 1, no, 2]


def test_every_delivery_is_checked_for_read(secured, mqtt, uniq):
    bob = _as(mqtt, secured, uniq.cid("b"), "bob", 5)
    assert bob.subscribe("#", 1) == [1]  # granted: some of it is readable
    admin = _as(mqtt, secured, uniq.cid("ad"), "admin", 4)
    for topic in ("alice/ok", "public/no", "alice/secret", "shared/yes", "other/no"):
        admin.publish(topic, topic.encode(), qos=1)
    got = sorted(m.topic for m in bob.drain_publishes(quiet=0.5, first_timeout=5))
    # alice/secret is denied to alice, not to bob: bob's own rules decide
    assert got == ["alice/ok", "alice/secret", "shared/yes"]


def test_retained_messages_and_patterns_are_checked_too(secured, mqtt, uniq):
    admin = _as(mqtt, secured, uniq.cid("ad"), "admin", 4)
    admin.publish("inbox/bob", b"for bob", qos=1, retain=True)
    admin.publish("inbox/alice", b"for alice", qos=1, retain=True)
    try:
        bob = _as(mqtt, secured, uniq.cid("b"), "bob", 4)
        assert bob.subscribe("inbox/+", 1) == [1]
        assert [m.payload for m in bob.drain_publishes(quiet=0.5, first_timeout=5)] == [b"for bob"]
        dev = _as(mqtt, secured, "dev42", "bob", 4)
        assert dev.subscribe("devices/dev42/#", 1) == [1]
        assert dev.publish("devices/dev42/temp", b"21", qos=1).reason == 0
        assert dev.recv_publish().payload == b"21"
        other = _as(mqtt, secured, "dev43", "bob", 5)
        assert other.publish("devices/dev42/temp", b"forged", qos=1).reason == 0x87
    finally:
        admin.publish("inbox/bob", b"", qos=1, retain=True)
        admin.publish("inbox/alice", b"", qos=1, retain=True)


def test_a_will_needs_write_access(secured, mqtt, uniq):
    will = mb.Will(topic="public/last", payload=b"bye", qos=1)
    c = _as(mqtt, secured, uniq.cid("w"), "bob", 5, will=will, expect_rc=None)
    assert c.connack.rc == 0x87
    ok = _as(mqtt, secured, uniq.cid("w"), "alice", 5, will=mb.Will(topic="alice/last", payload=b"bye"))
    assert ok.connack.rc == 0


def test_a_client_id_with_a_slash_never_widens_a_pattern(secured, mqtt, uniq):
    owner = _as(mqtt, secured, "devA", "bob", 4)
    owner.subscribe("devices/devA/#", 1)
    intruder = _as(mqtt, secured, "devA/x", "bob", 5)
    assert intruder.publish("devices/devA/x/cmd", b"no", qos=1).reason == 0x87
    assert_no_publish(owner, 0.3)


# --------------------------------------------------------------------------- reload and bad files


def test_sighup_reloads_the_files_and_takes_access_away_at_once(make_broker, tmp_path, mqtt, uniq):
    pw, acl = _files(tmp_path)
    b = make_broker(workers=2, config=_config(pw, acl))
    bob = _as(mqtt, b, uniq.cid("b"), "bob", 5)
    alice = _as(mqtt, b, uniq.cid("a"), "alice", 5)
    assert bob.subscribe("alice/#", 1) == [1]
    assert alice.publish("alice/1", b"before", qos=1).reason == 0
    assert bob.recv_publish().payload == b"before"
    since = b.log_len()
    acl.write_text(ACL.replace("user bob\ntopic read alice/#\n", "user bob\n"))
    subprocess.run([*CLI, "passwd", str(pw), "admin", "--delete"], check=True, capture_output=True)
    admin = _as(mqtt, b, uniq.cid("ad"), "admin", 5)
    os.kill(b.pid, signal.SIGHUP)
    b.wait_for_log("password and ACL files reloaded", timeout=10, since=since)
    wait_until(lambda: b.log_text().count("password and ACL files reloaded") >= 2, timeout=10)
    assert alice.publish("alice/2", b"after", qos=1).reason == 0
    assert_no_publish(bob, 0.5)  # still connected, no longer allowed to read it
    assert bob.publish("shared/x", b"still here", qos=1).reason < 0x80  # (0x10: no subscribers)
    with pytest.raises((mb.ConnectionClosed, OSError, AssertionError)):  # admin left the password file
        admin.recv_publish(timeout=3)
    assert _as(mqtt, b, uniq.cid("ad"), "admin", 5, expect_rc=None).connack.rc == 0x86
    # a file that no longer parses leaves the previous rules in force
    since = b.log_len()
    acl.write_text("topic bogus x\n")
    os.kill(b.pid, signal.SIGHUP)
    b.wait_for_log("reload failed, the previous password and ACL files stay in force", timeout=10, since=since)
    assert alice.publish("alice/3", b"still", qos=1).reason == 0
    assert b.alive()


@pytest.mark.parametrize("what, text, error", [
    ("acl", "user\n", "line 1: 'user' without a username"),
    ("acl", None, "cannot read the ACL file"),
    ("password", None, "cannot read the password file"),
])
def test_a_bad_file_at_startup_is_a_one_line_error(make_broker, tmp_path, what, text, error):
    f = tmp_path / what
    if text is not None:
        f.write_text(text)
    config = _config(f, None) if what == "password" else _config(None, f)
    b = make_broker(config=config, start=False)
    with pytest.raises(BrokerStartError):
        b.start(timeout=10)
    assert error in b.log_text() and "Traceback" not in b.log_text()
    assert b.returncode == 2


# --------------------------------------------------------------------------- the same answers as Mosquitto


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MATRIX_TOPICS = ["public/news", "public/alice", "alice/x", "alice/secret", "shared/a", "devices/cX/t",
                 "devices/cY/t", "inbox/alice", "inbox/bob", "other"]
MATRIX_USERS = [None, "alice", "bob"]


def _deliveries(port: int, mqtt) -> dict[tuple[str | None, str], tuple[bool, bool]]:
    """For each (user, topic): whether that user's publish reached admin, and whether admin's
    publish reached that user (client IDs "cX" for every user, so %c patterns apply)."""
    out = {}
    admin = mqtt(port, "admin0", username="admin", password=USERS["admin"])
    admin.subscribe("#", 1)
    for user in MATRIX_USERS:
        c = mqtt(port, "cX", username=user, password=USERS.get(user or ""))
        c.subscribe([(t, 1) for t in MATRIX_TOPICS])
        mark = (user or "anon").encode()
        for topic in MATRIX_TOPICS:
            c.publish(topic, b"from " + mark, qos=1)
        wrote = {m.topic for m in admin.drain_publishes(quiet=0.4) if m.payload == b"from " + mark}
        for topic in MATRIX_TOPICS:
            admin.publish(topic, b"to " + mark, qos=1)
        read = {m.topic for m in c.drain_publishes(quiet=0.4) if m.payload == b"to " + mark}
        admin.drain_publishes(quiet=0.1)
        for topic in MATRIX_TOPICS:
            out[(user, topic)] = (topic in wrote, topic in read)
        c.disconnect()
    return out


@pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="mosquitto is not installed")
def test_the_same_files_give_the_same_deliveries_as_mosquitto(make_broker, tmp_path, mqtt):
    pw, acl = _files(tmp_path)
    b = make_broker(workers=2, config=_config(pw, acl, "true"))
    ours = _deliveries(b.port, mqtt)
    port = _free_port()
    conf = tmp_path / "mosquitto.conf"
    # "user": started as root, Mosquitto would drop to user mosquitto, who cannot read the files
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npassword_file {pw}\nacl_file {acl}\n"
                    f"persistence false\nuser {user}\n")
    log = tmp_path / "mosquitto.log"
    with log.open("w") as out:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _listening(port) or proc.poll() is not None, timeout=10)
        assert proc.poll() is None, log.read_text()
        theirs = _deliveries(port, mqtt)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    diff = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not diff, f"(user, topic): (ShardBroker (wrote, read), Mosquitto (wrote, read)): {diff}"
    assert sum(1 for w, r in ours.values() if w) >= 5 and sum(1 for w, r in ours.values() if not r) >= 5


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False
