"""Password files in Mosquitto's format: read, verified against, and written.

A line is ``username:hash``; ``#`` starts a comment line, blank lines and lines
without ``:`` are skipped, blanks around the username and the hash are trimmed,
as Mosquitto does. Two hash formats are read, both with the salt and the digest
in standard base64:

* ``$7$<iterations>$<salt>$<digest>``: PBKDF2-HMAC-SHA512 with a 64-byte key,
  what ``mosquitto_passwd`` writes by default and what ``shardbroker passwd``
  writes (so either tool manages a file for either broker);
* ``$6$<salt>$<digest>``: one SHA-512 of the password followed by the salt
  (Mosquitto 1.6 and earlier), read so that old files keep working.

Salts of 12 bytes (what ``mosquitto_passwd`` makes, and the only size Mosquitto 2.0
reads) and of 64 bytes (newer Mosquitto releases) are accepted; new hashes use 12,
so that Mosquitto reads the files this module writes. A line that does not parse is
left out and named in ``PasswordFile.problems`` (the broker logs it), never fatal:
one bad line must not lock every user out.

Verifying costs what the hash asks for (``DEFAULT_ITERATIONS`` is about 0.2 s of
one core here): callers run ``verify`` away from an event loop.
``hashlib.pbkdf2_hmac`` releases the GIL while it works, so a thread pool serves.

No I/O besides ``load`` and ``save``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_ITERATIONS",
    "PasswordFile",
    "PasswordFileError",
    "PasswordHash",
    "hash_password",
    "load",
    "save",
    "write_private",
]

DEFAULT_ITERATIONS = 210_000
"""PBKDF2-HMAC-SHA512 rounds for new hashes (OWASP's figure for this function)."""

SALT_BYTES = 12
SALT_SIZES = (12, 64)
DIGEST_BYTES = 64
MAX_FIELD = 65535  # Mosquitto's limit on a username or a hash


class PasswordFileError(Exception):
    """A password file that cannot be read or written (the message names the file)."""


@dataclass(frozen=True, slots=True)
class PasswordHash:
    kind: str  # "7" (PBKDF2-HMAC-SHA512) or "6" (SHA-512 of password + salt)
    iterations: int  # 0 for "6"
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """``$7$...`` or ``$6$...``; ``ValueError`` saying what is wrong."""
        parts = text.split("$")
        if len(parts) < 2 or parts[0] != "":
            raise ValueError("not a $6$ or $7$ hash")
        kind = parts[1]
        if kind == "7":
            if len(parts) != 5:
                raise ValueError("a $7$ hash is $7$<iterations>$<salt>$<digest>")
            try:
                iterations = int(parts[2])
            except ValueError:
                raise ValueError(f"iterations {parts[2]!r} is not a number") from None
            if iterations < 1:
                raise ValueError("iterations must be at least 1")
            salt_text, digest_text = parts[3], parts[4]
        elif kind == "6":
            if len(parts) != 4:
                raise ValueError("a $6$ hash is $6$<salt>$<digest>")
            iterations = 0
            salt_text, digest_text = parts[2], parts[3]
        else:
            raise ValueError(f"unknown hash type ${kind}$ (only $6$ and $7$ are read)")
        salt = _b64(salt_text, "salt")
        digest = _b64(digest_text, "digest")
        if len(salt) not in SALT_SIZES:
            raise ValueError(f"salt of {len(salt)} bytes (12 or 64 expected)")
        if len(digest) != DIGEST_BYTES:
            raise ValueError(f"digest of {len(digest)} bytes ({DIGEST_BYTES} expected)")
        return cls(kind, iterations, salt, digest)

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.digest).decode("ascii")
        if self.kind == "7":
            return f"$7${self.iterations}${salt}${digest}"
        return f"$6${salt}${digest}"

    def compute(self, password: bytes) -> bytes:
        if self.kind == "7":
            return hashlib.pbkdf2_hmac("sha512", password, self.salt, self.iterations, DIGEST_BYTES)
        return hashlib.sha512(password + self.salt).digest()

    def verify(self, password: bytes) -> bool:
        """Whether ``password`` is the one hashed (constant-time comparison)."""
        return hmac.compare_digest(self.compute(password), self.digest)


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError(f"{what} is not base64") from None


def hash_password(password: bytes, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> PasswordHash:
    """A new ``$7$`` hash of ``password`` with a random 12-byte salt."""
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password, salt, iterations, DIGEST_BYTES)
    return PasswordHash("7", iterations, salt, digest)


@dataclass(slots=True)
class PasswordFile:
    """Users and their hashes, in file order, and the lines that were left out."""

    entries: dict[str, PasswordHash] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> PasswordFile:
        pf = cls()
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#") or ":" not in line:
                continue
            user, _, rest = line.partition(":")
            user = user.strip()
            hashed = rest.split(":", 1)[0].strip()
            if not user:
                pf.problems.append(f"line {n}: no username")
                continue
            if len(user) > MAX_FIELD or len(hashed) > MAX_FIELD:
                pf.problems.append(f"line {n}: username or hash too long")
                continue
            if user in pf.entries:
                pf.problems.append(f"line {n}: user {user!r} again (the first line counts)")
                continue
            try:
                pf.entries[user] = PasswordHash.parse(hashed)
            except ValueError as exc:
                pf.problems.append(f"line {n}: user {user!r}: {exc}")
        return pf

    def render(self) -> str:
        return "".join(f"{user}:{h.encode()}\n" for user, h in self.entries.items())


def load(path: str | Path) -> PasswordFile:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PasswordFileError(f"{path}: cannot read the password file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PasswordFileError(f"{path}: the password file is not UTF-8 text") from None
    return PasswordFile.parse(text)


def save(path: str | Path, pf: PasswordFile) -> None:
    """Write ``pf`` to ``path`` at once (a new file renamed over the old), readable by its
    owner only; a reader never sees half a file."""
    write_private(path, pf.render(), "password file")


def write_private(path: str | Path, text: str, what: str) -> None:
    """Write ``text`` to ``path`` at once, readable by its owner only; ``PasswordFileError``
    naming ``what`` when it cannot."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise PasswordFileError(f"{path}: cannot write the {what} ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PasswordFileError(f"{path}: cannot write the {what} ({exc.strerror or exc})") from None
