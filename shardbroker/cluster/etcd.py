"""etcd v3, through its JSON gateway (``/v3/...``), as the small interface the cluster needs.

What it does: reads and writes keys, runs transactions (compare, then puts and deletes),
grants, renews and revokes leases. It is the one module that imports the etcd client library
(``etcd3gw``, maintained, pure HTTP: no gRPC or protobuf), so the rest of the cluster code
sees plain dataclasses and one exception.

Endpoints: every URL of ``[cluster] etcd_endpoints`` is a member of one etcd cluster. A call
goes to the member that answered last; when it cannot be reached, times out or reports an
error (a member without quorum does), the call is tried once on each other member before
``EtcdUnavailable`` is raised. A transaction retried on another member can have been applied
by the first one; every write here is either idempotent or guarded by its compares, so that
is harmless.

Calls on one ``Etcd`` are serialised by a lock (a node's keep-alive thread shares it).

What it does not do: watch (the cluster code polls), or retry beyond one pass over the members.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from etcd3gw import exceptions
from etcd3gw.client import Etcd3Client

__all__ = ["Compare", "Delete", "Entry", "Etcd", "EtcdError", "EtcdUnavailable", "Put"]


class EtcdError(Exception):
    """etcd refused a request (``str(e)`` is one line)."""


class EtcdUnavailable(EtcdError):
    """No member of the etcd cluster answered."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One key as etcd holds it; ``lease`` is 0 when the key is not bound to one."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Compare:
    """A transaction's condition: ``target`` of ``key`` equals ``value``. A key that does not
    exist has create and mod revision 0 (so ``Compare(k, "create", 0)`` means "absent")."""

    key: str
    target: Literal["create", "mod", "value", "lease"]
    value: int | bytes


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix`` (etcd's range_end)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return _b64(b"\0")  # the whole key space
    raw[-1] += 1
    return _b64(bytes(raw))


def _entry(kv: dict[str, Any]) -> Entry:
    return Entry(
        key=base64.b64decode(kv["key"]).decode(errors="replace"),
        value=base64.b64decode(kv.get("value", "")),
        create_revision=int(kv.get("create_revision", 0)),
        mod_revision=int(kv.get("mod_revision", 0)),
        lease=int(kv.get("lease", 0)),
    )


_TARGETS = {"create": ("CREATE", "create_revision"), "mod": ("MOD", "mod_revision"),
            "value": ("VALUE", "value"), "lease": ("LEASE", "lease")}


def _compare(c: Compare) -> dict[str, Any]:
    target, field = _TARGETS[c.target]
    value: Any = _b64(c.value) if isinstance(c.value, bytes) else c.value
    return {"key": _b64(c.key), "result": "EQUAL", "target": target, field: value}


def _op(op: Put | Delete) -> dict[str, Any]:
    if isinstance(op, Put):
        put: dict[str, Any] = {"key": _b64(op.key), "value": _b64(op.value)}
        if op.lease:
            put["lease"] = op.lease
        return {"request_put": put}
    delete: dict[str, Any] = {"key": _b64(op.key)}
    if op.prefix:
        delete["range_end"] = _prefix_end(op.key)
    return {"request_delete_range": delete}


def _client(url: str, timeout: float) -> Etcd3Client:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise EtcdError(f"{url!r} is not an http(s)://HOST:PORT URL")
    return Etcd3Client(host=parts.hostname, port=parts.port, protocol=parts.scheme,
                       timeout=timeout, api_path="/v3/")


def _reason(exc: exceptions.Etcd3Exception) -> str:
    """The one-line reason etcd (or the connection) gave: etcd's error text, or the socket's
    (``Connection refused``, ``timed out``) rather than the HTTP library's whole story."""
    text = str(exc.detail_text or exc)
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if found:
        return found.group(1).strip()
    if "timed out" in text.lower():
        return "timed out"
    try:
        text = str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        pass
    return " ".join(text.split())[:200]


class Etcd:
    """A client of one etcd cluster, given the URLs of its members."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 2.0) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoints given")
        self.endpoints = tuple(endpoints)
        self._clients = [_client(url, timeout) for url in self.endpoints]
        self._current = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        for client in self._clients:
            client.session.close()

    def _call(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``/v3/<path>`` on the current member, else on each other one."""
        with self._lock:
            return self._call_locked(path, body)

    def _call_locked(self, path: str, body: dict[str, Any]) -> Any:
        reasons: list[str] = []
        n = len(self._clients)
        for i in range(n):
            index = (self._current + i) % n
            client = self._clients[index]
            try:
                result = client.post(client.get_url(path), json=body)
            except (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError,
                    exceptions.InternalServerError) as exc:
                reasons.append(f"{self.endpoints[index]}: {_reason(exc)}")
                continue
            except exceptions.Etcd3Exception as exc:
                raise EtcdError(f"{self.endpoints[index]}: {_reason(exc)}") from None
            self._current = index
            return result
        raise EtcdUnavailable("no etcd member answered (" + "; ".join(reasons) + ")")

    # ----------------------------------------------------------------- keys

    def get(self, key: str) -> Entry | None:
        kvs = self._call("kv/range", {"key": _b64(key)}).get("kvs", [])
        return _entry(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> list[Entry]:
        """Every key that starts with ``prefix``, in key order."""
        result = self._call("kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return [_entry(kv) for kv in result.get("kvs", [])]

    def put(self, key: str, value: bytes, lease: int = 0) -> None:
        self._call("kv/put", _op(Put(key, value, lease))["request_put"])

    def delete(self, key: str) -> bool:
        """Delete ``key``; whether it existed."""
        return int(self._call("kv/deleterange", {"key": _b64(key)}).get("deleted", 0)) > 0

    def txn(self, compares: Sequence[Compare], success: Sequence[Put | Delete],
            failure: Sequence[Put | Delete] = ()) -> bool:
        """If every compare holds, apply ``success``, else ``failure``, atomically; whether
        the compares held."""
        result = self._call("kv/txn", {
            "compare": [_compare(c) for c in compares],
            "success": [_op(op) for op in success],
            "failure": [_op(op) for op in failure],
        })
        return bool(result.get("succeeded", False))  # the gateway leaves out a false

    # ----------------------------------------------------------------- leases

    def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its ID."""
        return int(self._call("lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; the TTL it was renewed for, or -1 when it no longer exists."""
        result = self._call("lease/keepalive", {"ID": lease})
        return int(result.get("result", {}).get("TTL", -1))

    def time_to_live(self, lease: int) -> int:
        """Seconds ``lease`` has left, or -1 when it no longer exists."""
        return int(self._call("lease/timetolive", {"ID": lease}).get("TTL", -1))

    def revoke(self, lease: int) -> bool:
        """Revoke ``lease`` (its keys are deleted with it); whether it existed."""
        try:
            self._call("kv/lease/revoke", {"ID": lease})
        except EtcdError as exc:
            if "lease not found" in str(exc):
                return False
            raise
        return True

