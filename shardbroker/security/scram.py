"""MQTT 5 enhanced authentication by SCRAM (RFC 5802, RFC 7677): the server's side of one
exchange, and the keys it checks against.

The methods are named as EMQX names them, ``SCRAM-SHA-256`` and ``SCRAM-SHA-512``: the
CONNECT carries the Authentication Method and the client-first message, the broker answers
AUTH 0x18 with the server-first message, the client sends AUTH 0x18 with the client-final
message, and the broker answers CONNACK (or, for a re-authentication, AUTH 0x00) with the
server-final message. The message exchange itself is the ``scramp`` library's; this module
says which keys it checks against and turns its errors into one ``ScramFailed``.

Where the keys come from (the server never needs a password):

* ``SCRAM-SHA-512``: a ``$7$`` hash *is* the salted password SCRAM-SHA-512 asks for,
  PBKDF2-HMAC-SHA512 of the password with its salt and iteration count and a 64-byte key,
  so every ``$7$`` line of a password file (``shardbroker passwd`` or ``mosquitto_passwd``)
  serves it as it is;
* ``SCRAM-SHA-256``: its salted password is PBKDF2-HMAC-SHA256, which no line of a
  Mosquitto password file holds. ``shardbroker passwd`` keeps it beside the password file,
  in ``<password file>.scram`` (``ScramFile``): per user the salt, the iteration count, the
  StoredKey and the ServerKey, and a fingerprint of the user's ``$7$`` line, so that a
  password changed by another tool makes the old SHA-256 keys void instead of still valid.

Limits: ``scramp`` takes iteration counts from 4,096 to 10,000,000 only, so a hash outside
them (``mosquitto_passwd`` makes 101 by default: give it ``-I 4096`` or more) cannot log in
by SCRAM; the client normalises the password with SASLprep and Mosquitto's hash does not, so
a password that SASLprep changes (rare: some non-ASCII ones) verifies by password but not
by SCRAM. An unknown user gets a server-first message all the same (keys derived from a
secret of the process), so the exchange does not tell which names exist; it fails at the
end, like a wrong password. No channel binding (the ``-PLUS`` methods).

Pure: no I/O besides ``load`` and ``save`` of a ``ScramFile``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import scramp

from shardbroker.security.passwords import PasswordFileError, PasswordHash, write_private

__all__ = [
    "MAX_ITERATIONS",
    "METHODS",
    "MIN_ITERATIONS",
    "SHA256",
    "SHA512",
    "ScramExchange",
    "ScramFailed",
    "ScramFile",
    "ScramKeys",
    "derive",
    "fingerprint",
    "keys_for",
    "load",
    "save",
    "sidecar_path",
]

SHA256 = "SCRAM-SHA-256"
SHA512 = "SCRAM-SHA-512"
METHODS = (SHA256, SHA512)
_HASHES = {SHA256: "sha256", SHA512: "sha512"}
MIN_ITERATIONS = 4096  # what scramp (and RFC 7677's advice) takes
MAX_ITERATIONS = 10_000_000
SUFFIX = ".scram"


class ScramFailed(Exception):
    """An exchange that cannot go on: a malformed message, or a proof that does not verify."""


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What the server keeps of one user's password for one method (RFC 5802 section 3)."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_salted(cls, method: str, salted: bytes, salt: bytes, iterations: int) -> ScramKeys:
        name = _HASHES[method]
        client_key = hmac.new(salted, b"Client Key", name).digest()
        return cls(salt, iterations, hashlib.new(name, client_key).digest(),
                   hmac.new(salted, b"Server Key", name).digest())


def derive(method: str, password: str, iterations: int, salt: bytes | None = None) -> ScramKeys:
    """New keys for ``password`` (what ``shardbroker passwd`` stores for SCRAM-SHA-256), of the
    password as a SCRAM client sends it (SASLprep'd); ``ValueError`` when SCRAM cannot take it."""
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"SCRAM takes {MIN_ITERATIONS} to {MAX_ITERATIONS} iterations, not {iterations}")
    try:
        salt, stored, server, _ = scramp.ScramMechanism(method).make_auth_info(
            password, iteration_count=iterations, salt=secrets.token_bytes(16) if salt is None else salt)
    except scramp.ScramException as exc:
        raise ValueError(f"SCRAM cannot take this password: {exc}") from None
    return ScramKeys(salt, iterations, stored, server)


def fingerprint(entry: PasswordHash) -> bytes:
    """16 bytes that change whenever the user's password-file line changes."""
    return hashlib.sha256(entry.encode().encode("ascii")).digest()[:16]


@dataclass(slots=True)
class ScramFile:
    """SCRAM-SHA-256 keys by user, each with the fingerprint of the password-file line it was
    made beside. A line is ``user:SCRAM-SHA-256:<iterations>:<salt>:<StoredKey>:<ServerKey>:
    <fingerprint>``, the binary fields in standard base64."""

    entries: dict[str, tuple[ScramKeys, bytes]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> ScramFile:
        sf = cls()
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, _, rest = line.partition(":")
            parts = rest.split(":")
            try:
                if len(parts) != 6 or parts[0] != SHA256:
                    raise ValueError(f"not user:{SHA256}:<iterations>:<salt>:<StoredKey>:<ServerKey>:<fingerprint>")
                iterations = int(parts[1])
                salt, stored, server, print_ = (_b64(p) for p in parts[2:])
            except ValueError as exc:
                sf.problems.append(f"line {n}: {exc}")
                continue
            sf.entries[user.strip()] = (ScramKeys(salt, iterations, stored, server), print_)
        return sf

    def render(self) -> str:
        def b64(b: bytes) -> str:
            return base64.b64encode(b).decode("ascii")

        return "".join(f"{user}:{SHA256}:{k.iterations}:{b64(k.salt)}:{b64(k.stored_key)}:{b64(k.server_key)}:"
                       f"{b64(fp)}\n" for user, (k, fp) in self.entries.items())


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{text[:20]!r} is not base64") from None


def keys_for(method: str, entry: PasswordHash | None, sidecar: ScramFile | None, user: str) -> ScramKeys | None:
    """The keys ``user`` logs in with by ``method``, or None when it cannot."""
    if entry is None:
        return None
    if method == SHA512:
        if entry.kind != "7" or not MIN_ITERATIONS <= entry.iterations <= MAX_ITERATIONS:
            return None
        return ScramKeys.from_salted(SHA512, entry.digest, entry.salt, entry.iterations)
    kept = sidecar.entries.get(user) if sidecar is not None else None
    if kept is None or not hmac.compare_digest(kept[1], fingerprint(entry)):
        return None  # never made, or the password changed since
    return kept[0]


class ScramExchange:
    """The server's side of one SCRAM exchange: ``first`` takes the client-first message and
    gives the server-first one; ``final`` takes the client-final message and gives the
    server-final one. Either raises ``ScramFailed``. ``lookup`` gives a user's keys (None: no
    such user, or none for this method); ``decoy`` is a per-process secret for the keys of
    users that do not exist."""

    __slots__ = ("_decoy", "_lookup", "_server", "found", "method", "username")

    def __init__(self, method: str, lookup: Callable[[str], ScramKeys | None], decoy: bytes) -> None:
        self.method = method
        self._lookup = lookup
        self._decoy = decoy
        self._server = scramp.ScramMechanism(method).make_server(self._auth_info)
        self.username: str | None = None
        self.found = False  # the user has keys: a proof can verify

    def _auth_info(self, username: str) -> tuple[bytes, bytes, bytes, int]:
        self.username = username
        keys = self._lookup(username)
        self.found = keys is not None
        if keys is None:  # the same shape of answer, from keys no password gives
            salted = hmac.new(self._decoy, username.encode(), _HASHES[self.method]).digest()
            keys = ScramKeys.from_salted(self.method, salted, salted[:16], MIN_ITERATIONS)
        return keys.salt, keys.stored_key, keys.server_key, keys.iterations

    def first(self, client_first: bytes) -> bytes:
        try:
            self._server.set_client_first(client_first.decode("utf-8"))
            return str(self._server.get_server_first()).encode()
        except (scramp.ScramException, UnicodeDecodeError, ValueError, KeyError) as exc:
            raise ScramFailed(f"bad client-first message: {exc}") from None

    def final(self, client_final: bytes) -> bytes:
        try:
            self._server.set_client_final(client_final.decode("utf-8"))
            signed = str(self._server.get_server_final()).encode()
        except (scramp.ScramException, UnicodeDecodeError, ValueError, KeyError) as exc:
            raise ScramFailed(f"the proof does not verify ({exc})") from None
        if not self.found:
            raise ScramFailed("the proof does not verify")
        return signed


def sidecar_path(password_file: str | Path) -> Path:
    """Where the SCRAM-SHA-256 keys of a password file live."""
    path = Path(password_file)
    return path.with_name(path.name + SUFFIX)


def load(path: str | Path) -> ScramFile | None:
    """The file at ``path``, or None when there is none; ``PasswordFileError`` when it cannot be read."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PasswordFileError(f"{path}: cannot read the SCRAM key file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise PasswordFileError(f"{path}: the SCRAM key file is not UTF-8 text") from None
    return ScramFile.parse(text)


def save(path: str | Path, sf: ScramFile) -> None:
    """Write ``sf`` at once (a new file renamed over the old), readable by its owner only."""
    write_private(path, sf.render(), "SCRAM key file")
