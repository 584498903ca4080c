"""A cluster node's identity: its node number, claimed in etcd, and its CURVE keypair, kept in
its data directory.

* **The node number** (1..255) names the node on the bus between nodes: a remote worker's peer
  id is ``number * 256 + worker`` (a u16, the key of durable outbox rows). It is claimed for
  good: ``NUMBERS_PREFIX + n`` holds the node ID, bound to no lease, created in a transaction
  that requires the key to be absent (the smallest free ``n``; a claim that lost a race reads
  again and takes the next free one). ``NumbersExhausted`` when all 255 are taken.
* **The identity file** ``<data_dir>/cluster-identity.json`` (mode 0600, replaced atomically:
  a temporary file, fsync, rename) holds ``{"node_id", "public", "secret", "number"}``: the
  node ID, the node's CURVE keypair (Z85 text) and its number once claimed (0 before). It is
  made at the first clustered start; the workers read their secret key from it
  (``load_identity``).

The number belongs to the data directory, not to the node ID: a restart reuses the number the
file remembers when etcd still maps it to the node ID, but a node started on a new (empty)
data directory claims a new number even under an old node ID, since its durable sequence
numbers start again and the other nodes must not take it for the old one. A data directory
whose file names another node ID is refused (``IdentityError``): it is another node's.

The bus address: worker ``w`` of a node binds its bus at ``HOST:(PORT + w)``, where
``HOST:PORT`` is ``[cluster] advertise``; ``bus_ports_problem`` says, before the workers
start, when ``HOST`` is not an address of this host or one of those ports is taken.

What it does not do: free a number (nothing does yet; each data directory a node ever started
on keeps one), or import ``zmq``: the keypair comes from ``peer.bus.curve_keypair``, passed in.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from shardbroker.cluster.etcd import Compare, Etcd, EtcdError, Put
from shardbroker.cluster.shardmap import NUMBERS_PREFIX

__all__ = ["IDENTITY_FILE", "MAX_NUMBER", "Identity", "IdentityError", "NumbersExhausted",
           "bus_ports_problem", "claim_number", "ensure_identity", "load_identity", "number_key",
           "save_identity"]

IDENTITY_FILE = "cluster-identity.json"
MAX_NUMBER = 255  # number * 256 + worker fits a u16
Z85_KEY = 40  # characters of a 32-byte CURVE key in Z85


class IdentityError(Exception):
    """The identity file cannot be used (unreadable, damaged, or another node's); one line."""


class NumbersExhausted(Exception):
    """Every node number is taken."""


@dataclass(frozen=True, slots=True)
class Identity:
    node_id: str
    public: str  # CURVE public key, Z85 (what the registration calls ``key``)
    secret: str  # CURVE secret key, Z85
    number: int = 0  # 0: none claimed yet

    def to_value(self) -> dict[str, object]:
        return {"node_id": self.node_id, "public": self.public, "secret": self.secret,
                "number": self.number}


def _path(data_dir: str | Path) -> Path:
    return Path(data_dir) / IDENTITY_FILE


def load_identity(data_dir: str | Path) -> Identity | None:
    """The identity kept in ``data_dir``; ``None`` when there is none yet."""
    path = _path(data_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw)
        identity = Identity(doc["node_id"], doc["public"], doc["secret"], doc["number"])
        if not (isinstance(identity.node_id, str) and identity.node_id
                and all(isinstance(k, str) and len(k) == Z85_KEY
                        for k in (identity.public, identity.secret))
                and type(identity.number) is int and 0 <= identity.number <= MAX_NUMBER):
            raise ValueError("a field has the wrong type or size")
    except (ValueError, KeyError, TypeError) as exc:
        raise IdentityError(f"{path} is not a cluster identity ({exc})") from None
    return identity


def save_identity(data_dir: str | Path, identity: Identity) -> None:
    """Write ``identity`` to ``data_dir`` atomically, readable by its owner alone."""
    path = _path(data_dir)
    temp = path.with_name(f".{IDENTITY_FILE}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, json.dumps(identity.to_value()).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise IdentityError(f"cannot write {path}: {exc.strerror}") from None


def ensure_identity(data_dir: str | Path, node_id: str,
                    keypair: Callable[[], tuple[str, str]]) -> Identity:
    """The identity of ``data_dir``, made with a new ``keypair()`` when there is none;
    ``IdentityError`` when it belongs to another node ID."""
    identity = load_identity(data_dir)
    if identity is None:
        public, secret = keypair()
        identity = Identity(node_id, public, secret)
        save_identity(data_dir, identity)
    elif identity.node_id != node_id:
        raise IdentityError(f"data directory {data_dir} belongs to node {identity.node_id!r},"
                            f" not {node_id!r} (its {IDENTITY_FILE}): start that node on it, or"
                            " give this one a data directory of its own")
    return identity


def number_key(number: int) -> str:
    return f"{NUMBERS_PREFIX}{number}"


def claim_number(etcd: Etcd, node_id: str, remembered: int = 0) -> int:
    """``node_id``'s number: ``remembered`` when etcd still maps it to ``node_id``, else the
    smallest free one, claimed for good. ``NumbersExhausted`` when none is free."""
    if 0 < remembered <= MAX_NUMBER:
        held = etcd.get(number_key(remembered))
        if held is not None and held.value == node_id.encode():
            return remembered
    for _ in range(MAX_NUMBER + 1):  # every race lost is a number someone else took
        taken = {entry.key.removeprefix(NUMBERS_PREFIX) for entry in etcd.get_prefix(NUMBERS_PREFIX)}
        free = next((n for n in range(1, MAX_NUMBER + 1) if str(n) not in taken), None)
        if free is None:
            raise NumbersExhausted(
                f"every node number (1..{MAX_NUMBER}) is taken under {NUMBERS_PREFIX}: each data"
                " directory a node ever started on keeps one; delete the keys of those that are"
                " gone for good")
        key = number_key(free)
        if etcd.txn([Compare(key, "create", 0)], [Put(key, node_id.encode())]):
            return free
    raise EtcdError(f"no node number claimed after {MAX_NUMBER + 1} tries (others kept taking them)")


def bus_ports_problem(advertise: str, workers: int,
                      listeners: Iterable[tuple[str, int]] = ()) -> str | None:
    """Why the bus of ``workers`` workers cannot bind ``advertise`` (``HOST:PORT``: worker
    ``w`` at ``PORT + w``), in one line; ``None`` when each port could be bound now (each is
    bound and closed again, with ``SO_REUSEADDR`` as the bus's listener has it) and none is
    the port of one of ``listeners`` (``(host, port)`` of the node's MQTT listeners, not
    bound yet) on that host or on every address."""
    host, _, port_text = advertise.rpartition(":")
    host, first = host.strip("[]"), int(port_text)
    last = first + workers - 1
    ports = f"port {first}" if workers == 1 else f"ports {first}..{last}"
    if last > 0xFFFF:
        return f"cluster.advertise {advertise}: the bus of {workers} workers needs {ports}"
    for listen_host, port in listeners:
        if first <= port <= last and listen_host.strip("[]") in (host, "0.0.0.0", "::", ""):
            return (f"cluster.advertise {advertise}: port {port} is an MQTT listener's (the bus"
                    f" binds {ports}, one per worker)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, first, type=socket.SOCK_STREAM)[0]
    except (OSError, IndexError) as exc:
        return f"cluster.advertise {advertise}: host {host} does not resolve ({exc})"
    for port in range(first, last + 1):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address[0], port, *address[2:]))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    return (f"cluster.advertise {advertise}: {host} is not an address of this host"
                            " (advertise is this node's bus address, bound here)")
                why = "in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                return (f"cluster.advertise {advertise}: port {port} is {why} (the bus binds"
                        f" {ports}, one per worker)")
    return None
