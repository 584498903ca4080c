"""Password files and ACL files: parsing, hashes made by mosquitto_passwd, the precedence of
Mosquitto 2.0's ACL checks, and the filter relations used for SUBSCRIBE (no broker)."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardbroker.core.topics import matches
from shardbroker.security import acl as aclmod
from shardbroker.security import passwords
from shardbroker.security.acl import READ, WRITE, AclFile, AclFileError, covers, overlaps

# made by mosquitto_passwd 2.0.11: alice/secret with -H sha512-pbkdf2 (the default), bob/hunter2
# with -H sha512
MOSQ_FILE = """\
alice:$7$101$I4bWkUcL4K/Ew0Ct$RD7jbuGdqJq/KEdW9bZLAus1vjj7CEyosqa4jEds/qHtOXwUFqEh12pIkWPUZBGPw+T3lZTw4RPYc+5w6TFOgQ==
bob:$6$W/G9bNHb9XRDBUOa$ZgmDusO3IDAagWl54kUCs1gn8W/GzRm8WZwY2fxQc2/i3HTBHFUUYBue039qDVub2Whiau2bQ+tXXKbhSBBB7g==
"""


def test_hashes_made_by_mosquitto_passwd_verify() -> None:
    pf = passwords.PasswordFile.parse(MOSQ_FILE)
    assert pf.problems == []
    assert pf.entries["alice"].verify(b"secret") and not pf.entries["alice"].verify(b"Secret")
    assert pf.entries["bob"].verify(b"hunter2") and not pf.entries["bob"].verify(b"hunter")
    assert pf.entries["alice"].iterations == 101 and pf.entries["bob"].kind == "6"
    assert passwords.PasswordFile.parse(pf.render()).entries == pf.entries  # written back unchanged


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_a_file_mosquitto_passwd_makes_now(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "carol", "pa:ss wörd"], check=True)
    subprocess.run(["mosquitto_passwd", "-H", "sha512", "-b", str(f), "dave", "x"], check=True)
    pf = passwords.load(f)
    assert pf.entries["carol"].verify("pa:ss wörd".encode()) and pf.entries["dave"].verify(b"x")
    assert not pf.entries["carol"].verify(b"x")


def test_new_hashes_are_pbkdf2_with_a_12_byte_salt() -> None:
    h = passwords.hash_password(b"pw", iterations=1000)
    assert h.kind == "7" and len(h.salt) == 12 and h.verify(b"pw") and not h.verify(b"pW")
    assert passwords.PasswordHash.parse(h.encode()) == h
    assert h.encode().startswith("$7$1000$")
    assert passwords.hash_password(b"pw", 1000).salt != h.salt


@pytest.mark.parametrize("line, problem", [
    ("eve:$5$abc$def", "unknown hash type"),
    ("eve:$7$x$I4bWkUcL4K/Ew0Ct$RD7j", "iterations"),
    ("eve:$7$0$I4bWkUcL4K/Ew0Ct$RD7j", "at least 1"),
    ("eve:$7$101$!!!$RD7j", "not base64"),
    ("eve:$7$101$AAAA$" + "A" * 88, "salt of 3 bytes"),
    ("eve:$6$I4bWkUcL4K/Ew0Ct$AAAA", "digest of 3 bytes"),
    ("eve:plaintext", "not a $6$ or $7$ hash"),
    (":$6$x$y", "no username"),
])
def test_a_bad_line_is_left_out_and_named(line: str, problem: str) -> None:
    pf = passwords.PasswordFile.parse(f"# comment\n\nno colon here\n{line}\n" + MOSQ_FILE)
    assert set(pf.entries) == {"alice", "bob"}  # the good lines still count
    assert len(pf.problems) == 1 and problem in pf.problems[0] and "line 4" in pf.problems[0]


def test_duplicate_user_keeps_the_first() -> None:
    pf = passwords.PasswordFile.parse(MOSQ_FILE + MOSQ_FILE.splitlines()[1].replace("bob", "alice") + "\n")
    assert pf.entries["alice"].kind == "7" and "again" in pf.problems[0]


def test_save_is_atomic_and_owner_only(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    pf = passwords.PasswordFile.parse(MOSQ_FILE)
    passwords.save(f, pf)
    assert f.stat().st_mode & 0o777 == 0o600
    assert passwords.load(f).entries == pf.entries
    assert [p.name for p in tmp_path.iterdir()] == ["pw"]  # no temporary file left behind


def test_unreadable_password_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(passwords.PasswordFileError, match="cannot read the password file"):
        passwords.load(tmp_path / "missing")
    (tmp_path / "bin").write_bytes(b"\xff\xfe:x")
    with pytest.raises(passwords.PasswordFileError, match="not UTF-8"):
        passwords.load(tmp_path / "bin")


# --------------------------------------------------------------------------- ACL files

ACL = """\
# anonymous clients
topic read public/#

user alice
topic readwrite alice/#
topic deny alice/secret
topic write shared/in
topic $SYS/#

user bob
topic read alice/#
topic shared/#

pattern readwrite devices/%c/#
pattern read inbox/%u
pattern deny devices/%c/locked
"""


def _acl(username: str | None, client_id: str) -> aclmod.ClientAcl:
    return AclFile.parse(ACL).for_client(username, client_id)


@pytest.mark.parametrize("user, cid, topic, access, allowed", [
    (None, "anon", "public/news", READ, True),
    (None, "anon", "public/news", WRITE, False),  # read only
    (None, "anon", "alice/x", READ, False),
    ("alice", "a1", "alice/x", WRITE, True),
    ("alice", "a1", "alice/secret", READ, False),  # deny first, whatever the order in the file
    ("alice", "a1", "alice/secret/more", READ, True),  # deny is for exactly that topic
    ("alice", "a1", "shared/in", WRITE, True),
    ("alice", "a1", "shared/in", READ, False),  # a rule that does not grant READ does not allow it
    ("alice", "a1", "public/news", READ, False),  # anonymous rules are not alice's
    ("alice", "a1", "$SYS/broker/uptime", READ, True),
    ("bob", "b1", "$SYS/broker/uptime", READ, False),
    ("bob", "b1", "alice/x", READ, True),
    ("bob", "b1", "alice/x", WRITE, False),
    ("bob", "b1", "shared/anything", WRITE, True),
    ("carol", "c1", "alice/x", READ, False),  # a user not in the file: patterns only
    ("carol", "c1", "devices/c1/temp", WRITE, True),
    ("carol", "c1", "devices/c2/temp", WRITE, False),
    ("carol", "c1", "devices/c1/locked", WRITE, False),  # deny pattern
    ("carol", "c1", "inbox/carol", READ, True),
    (None, "c1", "inbox/carol", READ, False),  # %u never applies without a username
    (None, "c1", "devices/c1/x", READ, True),
    ("carol", "a/b", "devices/a/b/x", READ, False),  # a '/' in the value never widens a pattern
    ("carol", "c+", "devices/c+/x", READ, False),  # '+' or '#' in the value: no pattern applies
    ("alice", "a#", "alice/x", READ, True),  # ... but the user's own rules still do
    ("dave/x", "d1", "inbox/dave/x", READ, False),
])
def test_acl_precedence(user: str | None, cid: str, topic: str, access: int, allowed: bool) -> None:
    assert _acl(user, cid).allows(topic, access) is allowed
    assert _acl(user, cid).allows(topic, access) is allowed  # from the cache, same answer


def test_deny_pattern_still_applies_to_a_value_with_a_slash() -> None:
    text = "pattern readwrite devices/#\npattern deny devices/%c/locked\n"
    acl = AclFile.parse(text).for_client(None, "a/b")
    assert acl.allows("devices/a/b/open", WRITE) and not acl.allows("devices/a/b/locked", WRITE)
    # the client's own rules come first, as in Mosquitto: a deny pattern does not undo them
    acl = AclFile.parse("topic readwrite devices/#\n" + text).for_client(None, "a/b")
    assert acl.allows("devices/a/b/locked", WRITE)


@pytest.mark.parametrize("user, flt, allowed", [
    (None, "public/#", True),
    (None, "#", True),  # overlaps public/#: granted, and filtered message by message
    (None, "alice/#", False),  # nothing under it could ever be read
    ("alice", "alice/secret", False),  # all of it denied
    ("alice", "alice/+", True),
    ("alice", "$SYS/#", True),
    ("bob", "$SYS/#", False),
    ("bob", "#", True),
    ("alice", "shared/in", False),  # write only
])
def test_subscribe_is_refused_only_when_nothing_could_be_read(user: str | None, flt: str, allowed: bool) -> None:
    assert _acl(user, "x1").may_subscribe(flt) is allowed


@pytest.mark.parametrize("text, error", [
    ("topic bogus a/b\n", "access 'bogus'"),
    ("user\n", "without a username"),
    ("topic read a/#/b\n", "'#'"),
    ("frobnicate a\n", "not user, topic or pattern"),
])
def test_a_bad_acl_line_is_an_error_naming_the_line(text: str, error: str) -> None:
    with pytest.raises(AclFileError, match="line 2") as info:
        AclFile.parse("# first\n" + text)
    assert error in str(info.value)


def test_topic_without_access_is_readwrite() -> None:
    acl = AclFile.parse("topic a/b\n").for_client(None, "c")
    assert acl.allows("a/b", READ) and acl.allows("a/b", WRITE)


# --------------------------------------------------------------------------- filter relations

LEVELS = ["a", "b", "$s", "+", "#"]
TOPIC_LEVELS = ["a", "b", "$s", "c"]
TOPICS = ["/".join(p) for n in range(1, 4) for p in itertools.product(TOPIC_LEVELS, repeat=n)]


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(LEVELS[:4]), min_size=1, max_size=3))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=300, deadline=None)
@given(filters(), filters())
def test_overlaps_and_covers_agree_with_brute_force(rule: str, flt: str) -> None:
    # over topics of up to 3 levels; the relations themselves look at any depth, so
    # only filters of at most 3 levels (and '#' past them) are compared exactly
    both = [t for t in TOPICS if matches(rule, t) and matches(flt, t)]
    if bool(both):
        assert overlaps(rule, flt), (rule, flt, both[:3])
    if covers(rule, flt):
        assert all(matches(rule, t) for t in TOPICS if matches(flt, t)), (rule, flt)
    short = len(flt.split("/")) <= 2 and len(rule.split("/")) <= 2
    if short:
        assert overlaps(rule, flt) is bool(both), (rule, flt)
        assert covers(rule, flt) is all(matches(rule, t) for t in TOPICS if matches(flt, t)), (rule, flt)
