"""Who may connect: the decision for a CONNECT's username and password, and the client's
ACL view once it is in.

``Policy`` is what the configuration and its files say (loaded by the process that
runs the broker, reloaded on SIGHUP). ``Authenticator.check`` decides a CONNECT:

* no username: accepted when anonymous access is allowed, else refused with
  "not authorized" (5.0 0x87, 3.1.1 return code 5);
* a username and a password file: the user must be in the file and the password
  must match its hash; otherwise "bad user name or password" (0x86, return code 4),
  the same answer for an unknown user and a wrong password, so that the reply does
  not tell which names exist;
* a username and no password file: accepted (the name is the client's word; give a
  password file to check it).

Matching a password costs a slow hash (about 0.2 s at the default iterations), which
must not run on an event loop: ``check`` returns the ``PasswordHash`` to verify instead
of a verdict, the caller verifies it elsewhere (``PasswordHash.verify``) and hands the
result to ``verified``. A password that verified is remembered (a keyed digest of it,
never the password) until the user's hash changes, so that a client reconnecting, or
a thousand of them after a restart of their network, costs one hash per user instead
of one per CONNECT.

Each listener has its own ``Policy`` (``listener.allow_anonymous``, ``password_file`` and
``acl_file``, or ``[auth]``'s): the ``Authenticator`` holds one per listener, in the
configuration's order, and every decision names the listener the client came in on.
MQTT 5 enhanced authentication (SCRAM, ``scram.py``) checks against the same password
file: ``scram_keys`` gives what an exchange verifies against.

Pure: no threads, and no I/O besides ``load_policy``, which reads the files.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

from shardbroker.config import Config
from shardbroker.protocol import reasons
from shardbroker.security import acl as aclmod
from shardbroker.security import passwords, scram
from shardbroker.security.acl import AclFile, ClientAcl
from shardbroker.security.passwords import PasswordFile, PasswordHash
from shardbroker.security.scram import ScramFile, ScramKeys

__all__ = ["ACCEPTED", "Authenticator", "Failures", "Identity", "Policies", "Policy", "Refused", "load_policies",
           "load_policy"]

CACHE_SIZE = 100_000  # verified (user, password) pairs kept


@dataclass(frozen=True, slots=True)
class Policy:
    allow_anonymous: bool = True
    passwords: PasswordFile | None = None
    acl: AclFile | None = None
    scram: ScramFile | None = None  # SCRAM-SHA-256 keys kept beside the password file

    def acl_for(self, username: str | None, client_id: str) -> ClientAcl | None:
        """The client's view of the ACL file; None without one (everything allowed)."""
        return None if self.acl is None else self.acl.for_client(username, client_id)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connected client authenticated as: its username and the hash its password
    matched (None when no password was checked). A reload that changes that hash ends
    the client's access: its password is not kept, so it cannot be checked again."""

    username: str | None
    credential: PasswordHash | None
    listener: int = 0  # the listener it came in on (whose policy applies)
    method: str | None = None  # the enhanced authentication method of its CONNECT (re-authentication uses it)


@dataclass(frozen=True, slots=True)
class Refused:
    reason: int  # a 5.0 CONNACK reason code (mapped to 3.1.1 by the handshake)
    text: str


ACCEPTED = None
Verdict = Refused | None
Policies = tuple[Policy, ...]  # one per listener, in the configuration's order


class Authenticator:
    __slots__ = ("_cache", "_key", "decoy", "policies")

    def __init__(self, policies: Policy | Sequence[Policy]) -> None:
        self.policies: Policies = ()
        self.reload(policies)
        self._key = secrets.token_bytes(32)  # digests of verified passwords are keyed per process
        self.decoy = secrets.token_bytes(32)  # SCRAM keys of users that do not exist
        self._cache: dict[str, tuple[PasswordHash, bytes]] = {}

    def reload(self, policies: Policy | Sequence[Policy]) -> None:
        """New files: remembered passwords stay valid only where the user's hash is unchanged."""
        self.policies = (policies,) if isinstance(policies, Policy) else tuple(policies)

    def policy(self, listener: int = 0) -> Policy:
        """The policy of a listener (the first one's for a listener it does not know)."""
        policies = self.policies
        return policies[listener] if 0 <= listener < len(policies) else policies[0]

    def check(self, username: str | None, password: bytes | None, listener: int = 0) -> Verdict | PasswordHash:
        """The verdict, or the hash that ``password`` must be verified against."""
        policy = self.policy(listener)
        if username is None:
            if policy.allow_anonymous:
                return ACCEPTED
            return Refused(reasons.NOT_AUTHORIZED, "anonymous access is not allowed")
        if policy.passwords is None:
            return ACCEPTED
        wanted = policy.passwords.entries.get(username)
        if wanted is None or password is None:
            return Refused(reasons.BAD_USER_NAME_OR_PASSWORD, "bad user name or password")
        known = self._cache.get(username)
        if known is not None and known[0] == wanted and hmac.compare_digest(known[1], self._digest(password)):
            return ACCEPTED
        return wanted

    def verified(self, username: str, password: bytes, against: PasswordHash, ok: bool,
                 listener: int = 0) -> Verdict:
        """The outcome of verifying ``password`` against the hash ``check`` returned."""
        if not ok:
            return Refused(reasons.BAD_USER_NAME_OR_PASSWORD, "bad user name or password")
        if self.credential(username, listener) != against:  # the file changed while it was verified: ask again
            verdict = self.check(username, password, listener)
            if not isinstance(verdict, PasswordHash):
                return verdict
            return Refused(reasons.BAD_USER_NAME_OR_PASSWORD, "its password changed while it was checked")
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[username] = (against, self._digest(password))
        return ACCEPTED

    def credential(self, username: str, listener: int = 0) -> PasswordHash | None:
        """The user's line of the password file that applies on ``listener``."""
        pw = self.policy(listener).passwords
        return pw.entries.get(username) if pw is not None else None

    def scram_keys(self, method: str, username: str, listener: int = 0) -> ScramKeys | None:
        """What a SCRAM exchange by ``username`` on ``listener`` verifies against; None when
        the user cannot log in by ``method`` there."""
        return scram.keys_for(method, self.credential(username, listener), self.policy(listener).scram, username)

    def still_valid(self, identity: Identity | None, listener: int = 0) -> Refused | None:
        """After a reload: why a connected client may no longer be connected, or None."""
        policy = self.policy(identity.listener if identity is not None else listener)
        username = identity.username if identity is not None else None
        if username is None:
            return None if policy.allow_anonymous else Refused(reasons.NOT_AUTHORIZED,
                                                               "anonymous access is no longer allowed")
        if policy.passwords is None:
            return None
        assert identity is not None
        if policy.passwords.entries.get(username) != identity.credential or identity.credential is None:
            return Refused(reasons.NOT_AUTHORIZED, f"the password of {username!r} changed or was removed")
        return None

    def _digest(self, password: bytes) -> bytes:
        return hmac.new(self._key, password, hashlib.sha256).digest()


def load_policy(allow_anonymous: bool, password_file: str, acl_file: str) -> tuple[Policy, list[str]]:
    """Read the files the configuration names (and the SCRAM keys beside the password file,
    where there are any): the policy, and the lines that were left out (for the log).
    ``PasswordFileError`` / ``AclFileError`` when a file cannot be read, or the ACL file does
    not parse."""
    pw = passwords.load(password_file) if password_file else None
    keys = scram.load(scram.sidecar_path(password_file)) if password_file else None
    acl = aclmod.load(acl_file) if acl_file else None
    problems = [f"{password_file}: {p}" for p in pw.problems] if pw is not None else []
    if keys is not None:
        problems += [f"{scram.sidecar_path(password_file)}: {p}" for p in keys.problems]
    return Policy(allow_anonymous, pw, acl, keys), problems


def load_policies(config: Config) -> tuple[Policies, list[str]]:
    """The policy of every listener, in order (a file that several name is read once), and
    the lines left out; errors as ``load_policy``'s."""
    files: dict[tuple[str, str], Policy] = {}
    problems: list[str] = []
    out = []
    for settings in config.listeners_auth():
        named = (settings.password_file, settings.acl_file)
        policy = files.get(named)
        if policy is None:
            policy, left_out = load_policy(settings.allow_anonymous, *named)
            files[named] = policy
            problems += left_out
        out.append(replace(policy, allow_anonymous=settings.allow_anonymous))
    return tuple(out), problems


class Failures:
    """Failed authentications by source address, for slowing down and then refusing password
    guessing. One per worker; the handshake also counts the failures other workers tell it of
    (``LoginFailed``), so a guesser whose client IDs fall on several workers is counted whole.

    After ``slow_after`` failures from an address within ``window`` seconds, its further
    refusals are answered late (``delay``: 0.5 s doubling up to ``max_delay``), which costs a
    guesser time and costs the broker nothing but an open socket. After ``ban_after``
    failures the address is refused at once, without a hash being computed, until ``ban``
    seconds have passed without a failure. A success clears the address.
    """

    __slots__ = ("_seen", "ban", "ban_after", "max_delay", "slow_after", "window")

    def __init__(self, slow_after: int = 3, ban_after: int = 10, window: float = 60.0, ban: float = 60.0,
                 max_delay: float = 5.0) -> None:
        self.slow_after, self.ban_after = slow_after, ban_after
        self.window, self.ban, self.max_delay = window, ban, max_delay
        self._seen: dict[str, tuple[int, float]] = {}  # address -> (failures, time of the last)

    def _count(self, address: str, mono: float) -> int:
        seen = self._seen.get(address)
        if seen is None:
            return 0
        failures, last = seen
        limit = self.ban if failures >= self.ban_after else self.window
        if mono - last > limit:
            del self._seen[address]
            return 0
        return failures

    def banned(self, address: str, mono: float) -> bool:
        return self.ban_after > 0 and self._count(address, mono) >= self.ban_after

    def failed(self, address: str, mono: float) -> float:
        """Count a failure; returns how long to wait before answering it."""
        failures = self._count(address, mono) + 1
        delay = 0.0 if failures <= self.slow_after else min(self.max_delay,
                                                            0.5 * 2.0 ** (failures - self.slow_after - 1))
        self._seen[address] = (failures, mono + delay)  # a ban runs from when the answer goes out
        if len(self._seen) > 100_000:  # bounded: forget the quietest
            for addr in [a for a, (_, t) in self._seen.items() if mono - t > self.window]:
                del self._seen[addr]
        return delay

    def any(self) -> bool:
        """Whether any address has failures on record."""
        return bool(self._seen)

    def succeeded(self, address: str) -> None:
        self._seen.pop(address, None)
