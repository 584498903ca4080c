"""What a worker answers on its control socket (``RUN_DIR/ctl-N.sock``), on its event loop.

Each operation reads the shard's ``Broker`` between two events; none blocks. Only
``kick`` (through the broker's own server-side disconnect), ``publish_sys`` and ``reload``
(which reads the password and ACL files, small ones) change anything. Answers are
plain JSON values: strings as the clients sent them (the CLI escapes control characters
for its tables), times as wall-clock seconds, payloads as their size and a short preview
made of printable ASCII only.

A client pattern is a glob on the client ID (``fnmatch``, case-sensitive); topic selections
are described in ``select``.

Besides the operations of ``ctl``:

- ``stats``: the broker's counters and gauges (``counters``, integers; the supervisor sums
  them over the shards for ``ctl stats``), values that are not to be summed (``values``:
  seconds held, the store's fill, the retained count of the store all shards share), the
  worker's histograms (``histograms``, see ``histogram.Histogram.snapshot``) and whether the
  shard is ready (``ready``: routes synced with every peer, store writable).
- ``publish_sys``: publish the broker-wide ``$SYS`` values the supervisor computed.
- ``retained_digest``: the order-independent digest of the node's retained messages with
  their stamps (``RetainedStore.digest``, a scan of the store), which two nodes that hold
  the same set share, and this worker's counts of ``Retain`` messages between nodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from fnmatch import fnmatchcase
from typing import Any, Protocol

from shardbroker.core.broker import Broker
from shardbroker.core.client import Client
from shardbroker.core.clock import Now
from shardbroker.core.session import Session, Subscribed
from shardbroker.core.topics import matches, parse_shared
from shardbroker.operations.control import Handler, Operations, Request
from shardbroker.operations.histogram import BATCH_BOUNDS, LATENCY_BOUNDS, Histogram
from shardbroker.operations.select import (
    RETAINED_LIMIT,
    checked_filter,
    preview,
    subscription_selector,
)
from shardbroker.peer.messages import REMOTE_BASE


def _clock() -> Now:
    return Now(time.time(), time.monotonic())


class _Store(Protocol):
    def sizes(self) -> dict[str, int]: ...
    def fill(self) -> float: ...


class _Retained(Protocol):
    def count(self) -> int: ...


class _Bus(Protocol):
    waited: int
    refused_keys: int
    refused_frames: int
    shed: int
    unreached: int

    @property
    def peers(self) -> list[int]: ...

    def backlog(self) -> int: ...


class ShardMetrics:
    """What the worker's shell measures around the broker: the store's commits (told by
    ``ShardStore.on_commit``), the store's size, the bus's backlog."""

    def __init__(self, store: _Store, retained: _Retained, bus: _Bus) -> None:
        self.store = store
        self.retained = retained
        self.bus = bus
        self.commit_seconds = Histogram(LATENCY_BOUNDS)
        self.commit_ops = Histogram(BATCH_BOUNDS)

    def committed(self, seconds: float, ops: int) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_ops.observe(ops)


def subscription_view(client_id: str, flt: str, sub: Subscribed) -> dict[str, Any]:
    return {
        "client_id": client_id, "filter": flt, "qos": sub.qos, "no_local": sub.no_local,
        "retain_as_published": sub.retain_as_published, "retain_handling": sub.retain_handling,
        "subscription_id": sub.subscription_id,
    }

Reload = Callable[[dict[str, Any]], dict[str, Any]]


class ShardOps(Operations):
    """The operations of one shard, by name. ``clock`` reads the time (the worker's);
    ``metrics`` is what the worker's shell measures (None without one: ``stats`` then answers
    the broker's own counters only); ``reload`` is the worker's: it takes the new resolved
    configuration (as dotted overrides) and applies it (None: no reload); ``fence``, a cluster
    node's worker's: it takes the supervisor's grant (op ``fence``)."""

    def __init__(self, broker: Broker, clock: Callable[[], Now] = _clock, metrics: ShardMetrics | None = None,
                 reload: Reload | None = None, fence: Handler | None = None) -> None:
        self.broker = broker
        self.clock = clock
        self.metrics = metrics
        self._reload = reload
        self.ops = {
            "stats": self.stats,
            "publish_sys": self.publish_sys,
            "reload": self.reload,
            "clients": self.clients,
            "client": self.client,
            "kick": self.kick,
            "subscriptions": self.subscriptions,
            "routes": self.routes,
            "route_digests": self.route_digests,
            "retained": self.retained,
            "retained_digest": self.retained_digest,
        }
        if fence is not None:  # a cluster node's worker: what it may serve (cluster/grant.py)
            self.ops["fence"] = fence

    def stats(self, request: Request) -> dict[str, Any]:
        broker, metrics = self.broker, self.metrics
        counters = broker.counters()
        if metrics is None:
            return {"shard": broker.shard, "counters": counters}
        sizes = metrics.store.sizes()
        counters.update(
            bus_backlog=metrics.bus.backlog(), bus_waited=metrics.bus.waited, flow_holds=broker.flow.holds,
            store_used_bytes=sizes["used_bytes"], store_map_bytes=sizes["map_size"],
            bus_refused_keys=metrics.bus.refused_keys, bus_refused_frames=metrics.bus.refused_frames,
            bus_shed=metrics.bus.shed, bus_unreached=metrics.bus.unreached,
            remote_peers=sum(1 for p in metrics.bus.peers if p >= REMOTE_BASE),
            handover_remote=sum(len(items) for p, items in broker.peers.outbox.pending.items()
                                if p >= REMOTE_BASE),
            route_digest=broker.peers.routes.digest(broker.shard) >> 16,
            vshards_moving_in=broker.moves.moving_in(),
        )
        unsynced = sorted(set(range(broker.shards)) - broker.synced - {broker.shard})
        return {
            "shard": broker.shard,
            "counters": counters,
            "values": {
                "flow_held_seconds": broker.flow.held_for,
                "store_fill": metrics.store.fill(),
                "retained": metrics.retained.count(),
            },
            "histograms": {
                "commit_seconds": metrics.commit_seconds.snapshot(),
                "commit_ops": metrics.commit_ops.snapshot(),
            },
            "ready": {"unsynced": unsynced, "store_writable": not broker.commit.store_full},
        }

    def publish_sys(self, request: Request) -> dict[str, Any]:
        """``{"values": {topic: payload}, "retain": bool}``: publish them from this shard."""
        values = request.get("values")
        if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in values.items()):
            raise ValueError("publish_sys needs 'values': an object of topic -> text")
        self.broker.publish_sys(values, bool(request.get("retain")), self.clock())
        return {"published": len(values)}

    # ---- clients

    def _listener_name(self, index: int) -> str | int:
        names = self.broker.handshake.listener_names
        return names[index] if index < len(names) else index

    def client_view(self, client: Client, sess: Session) -> dict[str, Any]:
        """A connected client as ``ctl clients`` lists it."""
        transport = client.transport
        return {
            "client_id": sess.client_id, "state": "online", "shard": self.broker.shard,
            "address": client.peer, "version": client.version, "keepalive": client.keepalive,
            "connected_at": client.connected_at, "inflight": len(sess.inflight), "queued": sess.queued(),
            "subscriptions": len(sess.subscriptions or ()), "bytes_in": transport.bytes_received,
            "bytes_out": transport.bytes_sent, "username": client.username,
            "listener": self._listener_name(transport.listener),
        }

    def _connected(self) -> Iterator[tuple[Client, Session]]:
        for client in list(self.broker.sessions.clients):
            sess = client.session
            if sess is not None and client.connected:
                yield client, sess

    def clients(self, request: Request) -> dict[str, Any]:
        """Connected clients, those whose client ID matches the glob ``pattern`` when given."""
        pattern = request.get("pattern")
        if pattern is not None and not isinstance(pattern, str):
            raise TypeError("'pattern' is a string")
        return {"shard": self.broker.shard, "clients": [
            self.client_view(client, sess) for client, sess in self._connected()
            if pattern is None or fnmatchcase(sess.client_id, pattern)]}

    def client(self, request: Request) -> dict[str, Any]:
        """One client in detail (with its subscriptions), connected or an offline session;
        ``client`` is None when this shard has neither."""
        client_id = _client_id(request)
        sess = self.broker.sessions.get(client_id)
        if sess is None:
            return {"shard": self.broker.shard, "client": None}
        client = sess.client
        if client is not None and client.connected:
            view = self.client_view(client, sess)
        else:
            view = {"client_id": client_id, "state": "offline", "shard": self.broker.shard,
                    "version": sess.version, "inflight": len(sess.inflight), "queued": sess.queued(),
                    "subscriptions": len(sess.subscriptions or ()), "disconnected_at": sess.disconnected_at}
        view.update(
            expiry_interval=sess.expiry_interval, expires_at=sess.expires_at(), persistent=sess.persistent,
            queued_bytes=sess.queued_bytes, will=sess.will.topic if sess.will is not None else None,
            will_due=sess.will_due,
            subscription_list=sorted((subscription_view(sess.client_id, flt, s)
                                      for flt, s in (sess.subscriptions or {}).items()),
                                     key=lambda v: str(v["filter"])),
        )
        return {"shard": self.broker.shard, "client": view}

    def kick(self, request: Request) -> dict[str, Any]:
        """Disconnect a connected client (``Broker.kick``); ``kicked`` False when it is not connected."""
        client_id = _client_id(request)
        client = self.broker.kick(client_id, self.clock())
        return {"shard": self.broker.shard, "client_id": client_id, "kicked": client is not None,
                "version": client.version if client is not None else None}

    # ---- subscriptions and routes

    def subscriptions(self, request: Request) -> dict[str, Any]:
        """Every subscription of this shard's sessions (online and offline) the selection keeps."""
        selection = request.get("filter")
        if selection is not None and not isinstance(selection, str):
            raise TypeError("'filter' is a string")
        selected = subscription_selector(selection)
        rows = [subscription_view(sess.client_id, flt, sub) for sess in list(self.broker.sessions.sessions.values())
                for flt, sub in (sess.subscriptions or {}).items() if selected(flt)]
        return {"shard": self.broker.shard, "subscriptions": rows}

    def routes(self, request: Request) -> dict[str, Any]:
        """This shard's copy of the route table: key -> {shard: durable there}."""
        table = self.broker.peers.routes.holders()
        return {"shard": self.broker.shard, "count": len(table),
                "routes": {key: {str(s): d for s, d in shards.items()} for key, shards in table.items()}}

    def route_digests(self, request: Request) -> dict[str, Any]:
        """The digest of this shard's own routes, and of the routes it holds for each peer (a
        worker of this node by its index, of another node by its peer id): a peer's entry
        here equals that peer's own digest when their tables agree (``RouteTable.digest``)."""
        peers = self.broker.peers
        return {"shard": self.broker.shard, "own": peers.routes.digest(self.broker.shard),
                "peers": {str(p): peers.routes.digest(p) for p in peers.peer_ids()}}

    # ---- retained messages (one store shared by every shard: the supervisor asks one)

    def retained(self, request: Request) -> dict[str, Any]:
        """Retained messages whose topic ``filter`` matches (default ``#``), in topic order, at
        most ``limit``; ``truncated`` says there were more."""
        flt = request.get("filter") or "#"
        limit = request.get("limit", RETAINED_LIMIT)
        if not isinstance(flt, str):
            raise TypeError("'filter' is a string")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError("'limit' is a positive integer")
        if parse_shared(checked_filter(flt)) is not None:
            raise ValueError("retained messages are selected by a plain topic filter, not a shared one")
        cut = min((i for i in (flt.find("+"), flt.find("#")) if i >= 0), default=len(flt))
        wall = self.clock().wall
        rows: list[dict[str, Any]] = []
        truncated = False
        for topic, smsg in self.broker.subscriptions.retained.scan(flt[:cut]):
            if not matches(flt, topic) or (smsg.expires_at is not None and wall >= smsg.expires_at):
                continue
            if len(rows) == limit:
                truncated = True
                break
            rows.append({"topic": topic, "qos": smsg.qos, "size": len(smsg.payload),
                         "preview": preview(smsg.payload), "expires_at": smsg.expires_at})
        rows.sort(key=lambda r: str(r["topic"]))
        return {"shard": self.broker.shard, "retained": rows, "truncated": truncated, "limit": limit}


    def retained_digest(self, request: Request) -> dict[str, Any]:
        """``count`` retained messages, their ``digest`` (16 hex digits), this node's ID, and
        this worker's ``Retain`` counters and the nodes (peer ids) it is catching up."""
        count, digest = self.broker.subscriptions.retained.digest()
        sync = self.broker.retained_sync
        return {"shard": self.broker.shard, "node": sync.node, "count": count, "digest": f"{digest:016x}",
                "catching_up": sorted(sync.catching_up), "counters": dict(sync.stats)}

    def reload(self, request: Request) -> dict[str, Any]:
        """``{"op": "reload", "config": {dotted name: value}}``: the new configuration, applied."""
        config = request.get("config")
        if not isinstance(config, dict):
            raise TypeError("reload needs 'config', the resolved configuration as an object")
        if self._reload is None:
            raise ValueError("this shard cannot reload")
        return self._reload(config)


def _client_id(request: Request) -> str:
    client_id = request.get("client_id")
    if not isinstance(client_id, str):
        raise TypeError("'client_id' is a string")
    return client_id
