"""A node's registration in the cluster: a key under a lease, kept alive, given up on leave.

``/shardbroker/nodes/<node_id>`` holds ``{"advertise", "workers", "state", "clients", "number",
"key"}`` (JSON)
and is bound to the node's lease: when the node stops renewing it, etcd deletes the key after
``lease_ttl`` seconds, and the controller gives its shards to others.

The lease deadline is reckoned on the node's monotonic clock from the moment a renewal was
*sent*: etcd's own deadline runs from when it processed the renewal, which is later, so the
node's deadline is never after etcd's. (Clock rates differing by more than a small fraction
would break this; no clock's value is compared between hosts.)

Lease loss: ``on_lost(time_left)`` is called once, from a lease thread, when etcd says the
lease is gone (``time_left`` 0: revoked, or ``cluster forget``) or when the last third of the
TTL begins without a renewal (a watchdog thread, so a renewal that hangs on an unresponsive
etcd does not delay it), so the owner can close its clients before the lease can expire.
That call is the early warning; the guarantee is ``fence.Fence``, which stops serving at
``deadline`` whatever the threads do. After a loss the node is no longer a member; ``join``
again makes it one, under a new lease.

What it does not do: decide what a lost lease means for clients (the owner does), or retry a
``join`` refused because the node ID is still registered by another holder (one that names
another bus key; the registration this node's own previous run left is taken over).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from shardbroker.cluster.etcd import Compare, Etcd, EtcdError, Put
from shardbroker.cluster.shardmap import NODES_PREFIX

__all__ = ["Membership", "NodeIdInUse", "NodeInfo", "parse_node"]

log = logging.getLogger("shardbroker.cluster")

STATES = ("up", "leaving")


class NodeIdInUse(Exception):
    """Another registration holds this node ID."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node says about itself in its registration."""

    node_id: str
    advertise: str
    workers: int
    state: str = "up"
    # HOST:PORT where clients (and the nodes that relay them) reach this node's plain MQTT
    # listener; "" when it has none (a record written before it existed parses as "")
    clients: str = ""
    # the node number (``cluster/numbers.py``; 0: none) and the CURVE public key of its bus,
    # Z85 ("": none); a record written before they existed parses with these
    number: int = 0
    key: str = ""

    def encode(self) -> bytes:
        return json.dumps({"advertise": self.advertise, "workers": self.workers,
                           "state": self.state, "clients": self.clients,
                           "number": self.number, "key": self.key}).encode()


def parse_node(key: str, value: bytes) -> NodeInfo | None:
    """The registration under ``key``; ``None`` if it is not one."""
    try:
        doc = json.loads(value)
        info = NodeInfo(key.removeprefix(NODES_PREFIX), str(doc["advertise"]),
                        int(doc["workers"]), str(doc["state"]), str(doc.get("clients") or ""),
                        int(doc.get("number") or 0), str(doc.get("key") or ""))
    except (ValueError, KeyError, TypeError):
        return None
    if not 0 <= info.number <= 0xFF:
        info = replace(info, number=0)  # no number a peer id can be made of: none
    return info if info.workers >= 0 else None


class Membership:
    """Registers ``info`` under a lease of ``ttl`` seconds and keeps it alive."""

    def __init__(self, etcd: Etcd, info: NodeInfo, ttl: int,
                 on_lost: Callable[[float], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.etcd = etcd
        self.info = info
        self.ttl = ttl
        self.on_lost = on_lost
        self.clock = clock
        self.lease = 0
        self.deadline = -1.0  # monotonic time the lease is surely alive until
        self.lost = False
        self._stop = threading.Event()
        self._renewed = threading.Condition()
        self._threads: list[threading.Thread] = []

    @property
    def key(self) -> str:
        return NODES_PREFIX + self.info.node_id

    def time_left(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def join(self) -> None:
        """Take a lease and register; ``NodeIdInUse`` when the ID is registered already by
        another holder. A registration left by this node's own previous run (killed: its lease
        not ended yet) is taken over at once: it names the same bus key, which only this data
        directory holds, and a data directory has one running broker (its lock), so that run is
        over. The registration moves to the new lease in one transaction (no moment without
        it, so its shards stay here, under new epochs) and the old lease is revoked."""
        sent = self.clock()
        lease = self.etcd.grant(self.ttl)
        if not self.etcd.txn([Compare(self.key, "create", 0)],
                             [Put(self.key, self.info.encode(), lease)]):
            held = self.etcd.get(self.key)
            mine = held is not None and held.lease and self.info.key and self._same_key(held.value)
            if not (mine and held is not None and self.etcd.txn(
                    [Compare(self.key, "lease", held.lease)], [Put(self.key, self.info.encode(), lease)])):
                self.etcd.revoke(lease)
                left = self.etcd.time_to_live(held.lease) if held is not None and held.lease else -1
                raise NodeIdInUse(f"node {self.info.node_id} is registered already"
                                  + (f" (its lease has {left} s left)" if left >= 0 else ""))
            try:
                self.etcd.revoke(held.lease)
            except EtcdError:
                pass  # ended meanwhile
            log.info("node %s took over the registration its previous run left (lease %x)",
                     self.info.node_id, held.lease)
        self.lease = lease
        self.deadline = sent + self.ttl
        self.lost = False
        self._stop.clear()
        log.info("node %s joined the cluster (lease %x, %d s)", self.info.node_id, lease, self.ttl)

    def _same_key(self, value: bytes) -> bool:
        """Whether a registration names this node's own bus key."""
        info = parse_node(self.key, value)
        return info is not None and info.key == self.info.key

    def set_state(self, state: str) -> None:
        """Change the state in the registration (under the same lease)."""
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        info = replace(self.info, state=state)
        if not self.etcd.txn([Compare(self.key, "lease", self.lease)],
                             [Put(self.key, info.encode(), self.lease)]):
            raise EtcdError(f"node {self.info.node_id} is no longer registered under its lease")
        self.info = info

    def renew(self) -> float:
        """One renewal; the time left on the lease afterwards. When etcd says the lease is
        gone, the node is lost at once (``on_lost(0.0)``)."""
        if self.lost:
            return 0.0
        sent = self.clock()
        try:
            ttl = self.etcd.keepalive(self.lease)
        except EtcdError as exc:
            left = self.time_left()
            log.warning("node %s: lease renewal failed (%.1f s left): %s",
                        self.info.node_id, left, exc)
            return left
        if ttl <= 0:
            self._lose(gone=True)
            return 0.0
        with self._renewed:
            self.deadline = max(self.deadline, sent + ttl)
            self._renewed.notify_all()
        return self.time_left()

    def _lose(self, gone: bool = False) -> None:
        """Lost: once, stop renewing and tell the owner how long the lease may still run
        (0 when etcd said it is gone)."""
        with self._renewed:
            if self.lost:
                return
            self.lost = True
            self._stop.set()
            self._renewed.notify_all()
        left = 0.0 if gone else self.time_left()
        log.warning("node %s: lease lost (%.1f s left)", self.info.node_id, left)
        self.on_lost(left)

    def start(self) -> None:
        """Renew every third of the TTL (every quarter second after a failure) in one daemon
        thread; a second one (the watchdog) declares the lease lost when the last third of
        the TTL begins unrenewed, even while a renewal hangs on an unresponsive etcd."""
        self._threads = [threading.Thread(target=self._renew_loop, name="lease", daemon=True),
                         threading.Thread(target=self._watchdog, name="lease-watch", daemon=True)]
        for thread in self._threads:
            thread.start()

    def _renew_loop(self) -> None:
        # the first renewal once two thirds of the TTL are left, as after a renewal: a join
        # answered late (its grant sent while etcd was out of reach, say) has less left, and a
        # third of the TTL more would let the watchdog end the new lease before any renewal
        interval = min(self.ttl / 3, max(0.0, self.time_left() - self.ttl * 2 / 3))
        while not self._stop.wait(interval):
            left = self.renew()
            interval = self.ttl / 3 if left >= self.ttl * 2 / 3 else min(0.25, self.ttl / 10)

    def _watchdog(self) -> None:
        with self._renewed:
            while not self._stop.is_set():
                due = self.deadline - self.ttl / 3
                now = self.clock()
                if now >= due:
                    break
                self._renewed.wait(due - now)
            if self._stop.is_set():
                return
        self._lose()

    def stop(self) -> None:
        """Stop renewing (the lease then expires by itself)."""
        with self._renewed:
            self._stop.set()
            self._renewed.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        self._threads = []

    def leave(self) -> None:
        """Stop renewing and revoke the lease: the registration goes at once."""
        self.stop()
        if self.lease and not self.lost:
            self.etcd.revoke(self.lease)
            log.info("node %s left the cluster", self.info.node_id)
        self.lost = True
