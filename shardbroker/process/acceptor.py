"""The acceptor process: accept, read CONNECT under a deadline, hand the socket over.

The acceptor speaks MQTT only as far as the CONNECT packet: it reads it under a
deadline (``limits.connect_timeout``) and a size limit, assigns an identifier to a
client that sent an empty one where the version allows it, and hands the socket
with every byte read so far to the worker that owns the client ID
(``shard_for(client_id, workers)``; on a cluster node, the worker the supervisor's newest
``cluster.grant.Grant`` names for the client's virtual shard; a client of a virtual shard
the node does not serve is relayed to the node that does, see below). Hand-offs made in one
loop iteration go to each worker together, up to ``MAX_FDS`` sockets in one ``sendmsg``. A CONNECT
that is malformed or illegal gets the spec's answer here (a CONNACK with a
reason code where one exists, then a close), and the reason is logged.

On an ``mqtts`` listener the acceptor first does the TLS handshake, then reads the CONNECT
through TLS, and hands the worker one end of a Unix socket pair instead of the TCP socket;
a ``transport.tls.TlsRelay`` here carries the client's bytes between the two for the rest of
the connection (that module says why TLS ends here); WebSocket listeners the same, with a
``transport.websocket.WsFramer`` in between. The connect deadline covers the handshakes
too: one that never finishes is closed like a CONNECT that never comes. A listener with
``proxy_protocol`` first takes a PROXY protocol v2 header (``transport.proxy``), whose
address the worker then sees as the client's. A ``ws`` or ``wss`` listener with
``trusted_proxies`` takes the client's address from a trusted proxy's ``X-Forwarded-For`` or
``Forwarded`` header (``transport.forwarded``) the same way.

A cluster node relays a client whose virtual shard another registered node serves (the grant
names that node's client address): it connects to it (non-blocking, at most
``RELAY_CONNECT_TIMEOUT``), sends a PROXY protocol v2 header with the client's address, then
the bytes read so far, and a ``ClientRelay`` carries the rest both ways until either side
closes. An owner that cannot be reached, a shard nobody serves, and a client whose listener
makes its certificate the user name (the name would not reach the owner) get CONNACK "server
unavailable" instead. On a plain listener without ``proxy_protocol``, a node takes a PROXY
header in front of the CONNECT as the mark of a client relayed by another node (believing its
address only from a registered node's host) and never relays such a client again: when the
two nodes' maps disagree it refuses it, so a relay cannot loop.

With ``[cluster] redirect`` an MQTT 5.0 client of a plain ``mqtt`` listener is redirected
instead of relayed: once a connection to the owner's client address has been made (the
same connect as a relay's, then reset, so that a client is only ever sent to an address that
answered), it gets CONNACK 0x9C "Use another server" with that address as the Server
Reference (4.11) and is closed. 0x9C rather than 0x9D "Server moved": a virtual shard changes
owner whenever a node joins, leaves or is drained, so the move is temporary, and the client
is to keep this node among its servers. 3.1 and 3.1.1 have no redirect, and the address is a
plain listener's (a TLS or WebSocket client sent there would not reach it as it connected):
those clients are relayed as before. An owner that does not answer gets "server unavailable".

It counts open connections (``connection_counts``) from accept to close, to enforce
``limits.max_connections`` and ``limits.max_connections_per_address`` when it accepts: the
ones it holds it sees close itself (a client relayed to another node among them, until the
relay ends); for those it handed to a worker (relayed ones too: the worker's end of the pair
closes with them), the worker writes a close notice back on the
hand-off link, and a link that breaks (the worker died) releases all of its connections. A connection over a limit is closed at once, before any
byte is read, and counted; the refusals are logged at most once a second per address.

It never touches a store, a session or the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import ssl
import struct
import time
import uuid
from collections import deque

from shardbroker.cluster.grant import NONE, Grant
from shardbroker.cluster.placement import vshard_for
from shardbroker.config import Config, ConfigError, ListenerConfig, load_config
from shardbroker.operations.histogram import LATENCY_BOUNDS, Histogram
from shardbroker.process.connection_counts import PER_ADDRESS, ConnectionCounts, HandedOff
from shardbroker.protocol import codec, reactions, reasons
from shardbroker.protocol.errors import ProtocolError
from shardbroker.protocol.packets import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    ConnAck,
    Connect,
    PacketType,
    Properties,
)
from shardbroker.sharding import shard_for
from shardbroker.transport import forwarded, proxy
from shardbroker.transport.fd_passing import MAX_FDS, ClosedReader, Handoff, send_handoffs
from shardbroker.transport.relay import ClientRelay
from shardbroker.transport.tls import TlsError, identity, server_context
from shardbroker.transport.websocket import WsFramer

log = logging.getLogger("shardbroker.process.acceptor")


SWEEP = 0.25  # seconds between connect-deadline sweeps
CERT_CHECK = 2.0  # seconds between looks at the certificate files of mqtts listeners
MAX_PROXY = proxy.MAX_LENGTH  # bytes peeked for a PROXY protocol header
ACCEPT_BATCH = 256  # connections accepted per readiness callback
RELAY_CONNECT_TIMEOUT = 2.0  # seconds to connect to the node a client is relayed to
AUTO_ID_TRIES = 64  # identifiers tried for a client that sent none, for one this node serves
HANDOFF_WAIT = 5.0  # seconds a connection may wait for its worker to take it, then CONNACK "server unavailable"
HANDOFF_RETRY = 0.05  # seconds between tries to reach a worker that is not listening (restarting)
MAX_WAITING = 4096  # connections waiting for one worker beyond which new ones for it are refused at once


class _Pending:
    """A connection whose CONNECT has not fully arrived yet (for TLS: or its handshake)."""

    __slots__ = ("address", "counted", "data", "deadline", "first_at", "framer", "head", "identity", "index",
                 "listener", "peer", "reader", "relayed", "shaken", "sock", "trusted", "watched", "writing")

    def __init__(self, sock: socket.socket, deadline: float, reader: codec.PacketReader,
                 listener: ListenerConfig | None = None, framer: WsFramer | None = None,
                 address: str | None = None, index: int = 0) -> None:
        self.sock = sock  # an ssl.SSLSocket on an mqtts or wss listener
        self.deadline = deadline
        self.reader = reader
        self.data = bytearray()  # the MQTT bytes read so far
        self.first_at = 0.0  # monotonic time the first MQTT bytes were read (hand-off latency)
        self.watched = False
        self.listener = listener  # set for the connections that are relayed (TLS, WebSocket)
        self.framer = framer  # ws, wss
        self.index = index  # of its listener in the configuration (the worker applies its auth settings)
        self.identity: str | None = None  # the certificate's name, when the listener makes it the username
        self.peer: str | None = None  # the client's address from a PROXY protocol header
        self.shaken = False  # TLS handshake done
        self.writing = False  # a writer is registered (the handshake could not write)
        self.address = address  # the key it is counted under (ConnectionCounts)
        self.counted = True  # by the acceptor, until it is closed or handed off
        self.trusted: tuple[forwarded.Network, ...] = ()  # ws, wss: the listener's trusted proxies
        self.relayed = False  # a cluster node relayed it here (a PROXY header): never relay it again
        self.head: bytearray | None = None  # the start of that header, while it is incomplete


class _Outgoing:
    """A client being relayed (or redirected) to another node, while the connection to that
    node is made."""

    __slots__ = ("limit", "out", "p", "redirect", "target", "timer", "version")

    def __init__(self, p: _Pending, out: socket.socket, target: str, version: int,
                 redirect: bool = False, limit: int | None = None) -> None:
        self.p = p
        self.out = out
        self.target = target
        self.version = version
        self.redirect = redirect  # a 5.0 client told to connect there itself (CONNACK 0x9C)
        self.limit = limit  # its Maximum Packet Size, which the CONNACK must fit
        self.timer: asyncio.TimerHandle | None = None


class _Link:
    """A hand-off link to one worker: the socket (non-blocking), what is left to send of a
    batch the kernel took only in part, the counted connections handed over it, and its close
    notices."""

    __slots__ = ("handed", "notices", "rest", "sock", "writing")

    def __init__(self, sock: socket.socket, keyed: bool) -> None:
        self.sock = sock
        self.handed = HandedOff(keyed)
        self.notices = ClosedReader()
        self.rest = b""  # the tail of a batch whose descriptors went with its first bytes
        self.writing = False  # a writer is registered: the worker is not reading


_Item = tuple[_Pending, str | None, int]  # a connection to hand over, its assigned id, its version


class _Chunk:
    """Up to ``MAX_FDS`` hand-offs for one worker that go in one ``sendmsg``, waiting for the
    worker to take them (the socket pairs of relayed ones are made at the first try)."""

    __slots__ = ("items", "pairs", "since")

    def __init__(self, items: list[_Item], since: float) -> None:
        self.items = items
        self.pairs: list[tuple[socket.socket, socket.socket] | None] | None = None
        self.since = since


Listen = tuple[socket.socket, ListenerConfig, ssl.SSLContext | None]


class Acceptor:
    def __init__(self, config: Config, listens: list[Listen], run_dir: str, shards: int) -> None:
        self.config = config
        self.listens = listens
        self._contexts = [ctx for _sock, _lst, ctx in listens]  # the current one, per listener
        self._cert_stamps = [_stamps(lst) for _sock, lst, _ctx in listens]
        self._cert_checked = time.monotonic()
        self._relays: set[ClientRelay] = set()
        self._trusted = [forwarded.networks(lst.trusted_proxies) for _sock, lst, _ctx in listens]
        self._families = [int(sock.family) for sock, _lst, _ctx in listens]  # plain ints (see _on_accept)
        self.run_dir = run_dir
        self.shards = shards
        self._links: dict[int, _Link] = {}
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, _Pending] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._outgoing: dict[int, list[_Item]] = {}  # shard -> hand-offs of this loop iteration
        # shard -> batches its worker has not taken yet (it is busy, stopped or restarting)
        self._waiting: dict[int, deque[_Chunk]] = {}
        self._retry: asyncio.TimerHandle | None = None  # the next try to reach a worker not listening
        self.accepted = 0
        self.handed_off = 0
        self.handoff_sends = 0  # sendmsg calls that carried them (handed_off / handoff_sends: the batch size)
        self.refused = 0  # closed by limits.max_connection_rate
        # from the first byte of a CONNECT read to its hand-off sent to the worker
        self.handoff_seconds = Histogram(LATENCY_BOUNDS)
        self._rate_second = 0
        self._rate_counts: dict[str, int] = {}
        self.counts = ConnectionCounts(config.limits.max_connections, config.limits.max_connections_per_address)
        self._said_second = 0
        self._said: set[str] = set()  # what was logged this second (at most once a second per address)
        # A cluster node: clients go to the worker the supervisor's newest grant names for their
        # virtual shard (cluster/grant.py); none before the first grant.
        self.clustered = config.cluster.enabled
        self.grant = NONE
        self.refused_unserved = 0  # CONNECTs of virtual shards this node does not serve
        self.relayed = 0  # clients relayed to the node that serves them
        self.relay_failed = 0  # ... whose owner could not be reached (refused)
        self.redirected = 0  # 5.0 clients sent to the node that serves them (CONNACK 0x9C)
        self.refused_relayed = 0  # clients relayed here that this node does not serve either
        self._connecting: dict[int, _Outgoing] = {}  # by the outgoing socket's descriptor
        self._node_hosts: frozenset[str] = frozenset()  # the hosts of the other registered nodes

    def _say_once(self, key: str, msg: str, *args: object, level: int = logging.WARNING) -> None:
        """Log ``msg`` at most once a second for ``key`` (an address, or a limit)."""
        now = int(time.monotonic())
        if now != self._said_second:
            self._said_second, self._said = now, set()
        if key not in self._said:
            self._said.add(key)
            log.log(level, msg, *args)

    def _link(self, shard: int) -> _Link:
        link = self._links.get(shard)
        if link is not None:
            return link
        path = os.path.join(self.run_dir, f"handoff-{shard}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(1.0)  # a local listener: it answers at once, or is not there
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)  # a busy or stopped worker must not stop the acceptor
        link = self._links[shard] = _Link(sock, self.counts.per_address)
        if self._loop is not None:
            self._loop.add_reader(sock.fileno(), self._on_notices, shard, link)
        return link

    def _on_notices(self, shard: int, link: _Link) -> None:
        """Close notices from a worker; the end of the link: the worker is gone, and with it
        every connection it was handed over this link."""
        try:
            data = link.sock.recv(65536)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError:
            data = b""
        if data:
            release = self.counts.release
            for address in link.handed.closed(link.notices.feed(data)):
                release(address)
            return
        self._drop_link(shard, link)

    def _drop_link(self, shard: int, link: _Link) -> None:
        if self._links.get(shard) is link:
            del self._links[shard]
        if link.sock.fileno() < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(link.sock.fileno())
            if link.writing:
                self._loop.remove_writer(link.sock.fileno())
        link.sock.close()
        gone = link.handed.gone()
        self.counts.release_all(gone)
        if gone and not self._stopping:
            log.info("hand-off link to shard %d closed: its %d connections are no longer counted", shard, len(gone))

    def _queue_handoff(self, shard: int, p: _Pending, client_id: str | None, version: int) -> None:
        """Hand the socket to its shard at the end of this loop iteration, with the others."""
        waiting = self._waiting.get(shard)
        if waiting and sum(len(c.items) for c in waiting) >= MAX_WAITING:
            self._say_once(f"waiting-{shard}", "shard %d is not taking connections (%d waiting): refusing new ones",
                           shard, MAX_WAITING)
            self._refuse(p, version, ProtocolError(reasons.SERVER_UNAVAILABLE, "its worker is not taking connections"),
                         quiet=True)
            return
        self._forget(p)  # no more reading or deadline here; the socket stays open until sent
        if not self._outgoing:
            assert self._loop is not None
            self._loop.call_soon(self._send_handoffs)
        self._outgoing.setdefault(shard, []).append((p, client_id, version))

    def _send_handoffs(self) -> None:
        """The hand-offs of this iteration go to their workers' queues, in batches, and out."""
        outgoing, self._outgoing = self._outgoing, {}
        now = time.monotonic()
        for shard, items in outgoing.items():
            waiting = self._waiting.setdefault(shard, deque())
            for at in range(0, len(items), MAX_FDS):
                waiting.append(_Chunk(items[at:at + MAX_FDS], now))
            self._pump(shard)

    def _pump(self, shard: int) -> None:
        """Send ``shard``'s waiting batches until its link takes no more. Never blocks: a worker
        that does not read (busy, stopped) leaves them waiting, with a writer on the link, and
        the acceptor goes on serving every other worker, its TLS and WebSocket relays among them;
        a worker that is not listening (restarting) is tried again every ``HANDOFF_RETRY``.
        A batch that waited ``HANDOFF_WAIT`` is refused (``_expire_waiting``)."""
        waiting = self._waiting.get(shard)
        while waiting:
            try:
                link = self._link(shard)
            except OSError:
                self._retry_later()
                return
            if link.writing:
                return  # the writer goes on when the link has room
            try:
                if link.rest:
                    sent = link.sock.send(link.rest)
                    link.rest = link.rest[sent:]
                    if link.rest:
                        self._watch_link(shard, link)
                        return
                chunk = waiting[0]
                rest = send_handoffs(link.sock, self._batch(chunk))
            except (BlockingIOError, InterruptedError):
                self._watch_link(shard, link)
                return
            except OSError as exc:
                log.warning("hand-off link to shard %d failed: %s", shard, exc)
                self._drop_link(shard, link)
                self._retry_later()
                return
            waiting.popleft()
            self._handed(shard, link, chunk)
            if rest is not None:  # the kernel took the descriptors and the first bytes only
                link.rest = rest
                self._watch_link(shard, link)
                return
        if waiting is not None and not waiting:
            del self._waiting[shard]

    def _batch(self, chunk: _Chunk) -> list[Handoff]:
        """The hand-offs of ``chunk``; the socket pairs of relayed connections made the first time."""
        if chunk.pairs is None:
            chunk.pairs = []
            for p, _cid, _v in chunk.items:
                if p.listener is None:
                    chunk.pairs.append(None)
                else:
                    # Both ends non-blocking: the worker writes to its end as to a TCP socket,
                    # and a relay that stops reading it (its client does not read) must fill its
                    # write buffer, not block the worker in a ``send``.
                    chunk.pairs.append(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK))
        batch = []
        for (p, cid, _v), pair in zip(chunk.items, chunk.pairs, strict=True):
            if pair is None:
                batch.append(Handoff(p.sock.fileno(), cid, bytes(p.data), p.peer, listener=p.index))
            else:
                batch.append(Handoff(pair[1].fileno(), cid, bytes(p.data), p.peer or _peername(p.sock), p.identity,
                                     p.index))
        return batch

    def _handed(self, shard: int, link: _Link, chunk: _Chunk) -> None:
        """``chunk``'s descriptors are the worker's now: close ours, count them on the link, and
        start the relays of TLS and WebSocket clients."""
        assert chunk.pairs is not None
        self.handed_off += len(chunk.items)
        self.handoff_sends += 1
        sent = time.monotonic()
        for (p, _cid, _v), pair in zip(chunk.items, chunk.pairs, strict=True):
            self.handoff_seconds.observe(sent - p.first_at)
            p.counted = False  # from now on by the link: until the worker says it closed
            link.handed.handed(p.address)
            if pair is None:
                p.sock.close()  # the worker has its own descriptor now
                continue
            ours, theirs = pair
            theirs.close()
            assert self._loop is not None
            relay = ClientRelay(p.sock, ours, self._loop, self._relays.discard, p.framer)
            self._relays.add(relay)
            relay.start()

    def _watch_link(self, shard: int, link: _Link) -> None:
        if not link.writing and self._loop is not None:
            link.writing = True
            self._loop.add_writer(link.sock.fileno(), self._link_writable, shard, link)

    def _link_writable(self, shard: int, link: _Link) -> None:
        if link.writing:
            link.writing = False
            assert self._loop is not None
            self._loop.remove_writer(link.sock.fileno())
        if self._links.get(shard) is link:
            self._pump(shard)

    def _retry_later(self) -> None:
        if self._retry is None and self._loop is not None and not self._stopping:
            self._retry = self._loop.call_later(HANDOFF_RETRY, self._retry_due)

    def _retry_due(self) -> None:
        self._retry = None
        for shard in list(self._waiting):
            self._pump(shard)

    def _expire_waiting(self, now: float) -> None:
        """The sweep: batches that waited ``HANDOFF_WAIT`` for their worker are refused (CONNACK
        "server unavailable" where the version has it). Only whole batches not begun: one whose
        descriptors went out is the worker's."""
        for shard, waiting in list(self._waiting.items()):
            expired = 0
            while waiting and now - waiting[0].since >= HANDOFF_WAIT:
                chunk = waiting.popleft()
                expired += len(chunk.items)
                self._drop_chunk(chunk, ProtocolError(reasons.SERVER_UNAVAILABLE, "its worker did not take it"))
            if expired:
                log.warning("shard %d took no connections for %.0f s: %d refused", shard, HANDOFF_WAIT, expired)
            if not waiting:
                del self._waiting[shard]

    def _drop_chunk(self, chunk: _Chunk, exc: ProtocolError | None) -> None:
        for i, (p, _cid, version) in enumerate(chunk.items):
            pair = chunk.pairs[i] if chunk.pairs is not None else None
            if pair is not None:
                pair[0].close()
                pair[1].close()
            if exc is None:
                self._close(p)
            else:
                self._refuse(p, version, exc, quiet=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve from the event loop: readiness callbacks, no task per connection."""
        self._loop = loop
        for link_shard, link in self._links.items():
            loop.add_reader(link.sock.fileno(), self._on_notices, link_shard, link)
        for i, (listen, lst, _ctx) in enumerate(self.listens):
            listen.setblocking(False)
            loop.add_reader(listen.fileno(), self._on_accept, listen, lst, i)
        self._sweep_handle = loop.call_later(SWEEP, self._sweep)

    def _on_accept(self, listen: socket.socket, lst: ListenerConfig, index: int) -> None:
        assert self._loop is not None
        ctx = self._contexts[index]
        deadline = time.monotonic() + self.config.limits.connect_timeout
        counts = self.counts
        per_address = counts.per_address and not lst.proxy_protocol  # behind it: once the header is read
        trusted = self._trusted[index]
        # ``listen.accept()`` turns the listener's family and type into enums for every socket
        # it makes (4 µs of the 45 a connection costs here): take the descriptor from the
        # method it wraps (CPython's, stable since 3.0) and wrap it with plain ints, the
        # family's taken once (``listen.family`` makes an enum too, at each call).
        family = self._families[index]
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = listen._accept()  # type: ignore[attr-defined]
                sock = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the sweep keeps going, try later
                log.warning("accept failed: %s", exc)
                return
            self.accepted += 1
            host: str = addr[0]
            # A trusted proxy's connections count under the client's address, once its header is read
            proxied = bool(trusted) and forwarded.trusted(host, trusted)
            if not proxied and self._rate_limited(sock, lst, host):
                continue
            address = host if per_address and not proxied else None
            over = counts.admit(address)
            if over is not None:
                sock.close()
                self._over_limit(over, host)
                continue
            sock.setblocking(False)
            max_size = self.config.limits.max_packet_size
            reader = codec.PacketReader(max_packet_size=max_size, server=True)
            framer = WsFramer(lst.path, max_size) if lst.type in ("ws", "wss") else None
            relayed = ctx is not None or framer is not None
            pending = _Pending(sock, deadline, reader, lst if relayed else None, framer, address, index)
            pending.trusted = trusted
            self._pending[sock.fileno()] = pending
            if lst.proxy_protocol:
                self._proxy_step(pending, ctx)
            else:
                self._begin(pending, ctx)

    def _over_limit(self, limit: str, host: str) -> None:
        """A connection closed by ``limits.max_connections`` or ``max_connections_per_address``."""
        if limit == PER_ADDRESS:
            self._say_once(host, "%s: %d connections open from this address (%s): closing new ones", host,
                           self.counts.at(host), limit)
        else:
            self._say_once(limit, "%d connections open (%s): closing new ones (this one from %s)",
                           self.counts.total, limit, host)

    def _move(self, p: _Pending, host: str) -> bool:
        """``p`` turns out to come from ``host`` (a PROXY header, a trusted proxy's header): count it
        there, or close it (False) when that address is at its limit."""
        if not self.counts.per_address or self.counts.move(p.address, host):
            if self.counts.per_address:
                p.address = host
            return True
        self._over_limit(PER_ADDRESS, host)
        self._close(p)
        return False

    def _rate_limited(self, sock: socket.socket, lst: ListenerConfig, host: str) -> bool:
        """``limits.max_connection_rate``: more new connections from one address in one second
        are closed at once (counted; logged once per address and second). Behind a PROXY
        protocol listener, or from a trusted proxy of a WebSocket listener, the address is the
        proxy's here: the limit is for direct clients."""
        limit = self.config.limits.max_connection_rate
        if not limit or lst.proxy_protocol or host in self._node_hosts:  # relays come from nodes
            return False
        now = int(time.monotonic())
        if now != self._rate_second:
            self._rate_second, self._rate_counts = now, {}
        n = self._rate_counts.get(host, 0) + 1
        self._rate_counts[host] = n
        if n <= limit:
            return False
        self.refused += 1
        if n == limit + 1:
            log.warning("%s: more than %d new connections in a second (limits.max_connection_rate): closing them",
                        host, limit)
        sock.close()
        return True

    def _proxy_step(self, p: _Pending, ctx: ssl.SSLContext | None) -> None:
        """Take the PROXY protocol header, and only it, off the socket (peeked first, so that
        the TLS or MQTT bytes behind it stay in the kernel), then begin."""
        assert self._loop is not None
        try:
            seen = p.sock.recv(MAX_PROXY, socket.MSG_PEEK)
            if not seen:
                self._close(p)
                return
            parsed = proxy.parse(seen)
            if parsed is not None:
                p.sock.recv(parsed[0])  # exactly the header
        except (BlockingIOError, InterruptedError):
            parsed = None
        except proxy.ProxyError as exc:
            log.info("%s: %s: closing", _peername(p.sock), exc)
            self._close(p)
            return
        except OSError:
            self._close(p)
            return
        if parsed is None:
            if not p.watched:
                self._loop.add_reader(p.sock.fileno(), self._proxy_step, p, ctx)
                p.watched = True
            return
        p.peer = parsed[1] or _peername(p.sock)  # LOCAL or UNSPEC: the proxy itself
        if p.watched:
            self._loop.remove_reader(p.sock.fileno())
            p.watched = False
        host = forwarded.host_of(p.peer)
        if not (p.trusted and forwarded.trusted(host, p.trusted)) and not self._move(p, host):
            return
        self._begin(p, ctx)

    def _begin(self, p: _Pending, ctx: ssl.SSLContext | None) -> None:
        """The TLS handshake, or reading the CONNECT (or the WebSocket upgrade)."""
        assert self._loop is not None
        if ctx is not None:
            p.sock = ctx.wrap_socket(p.sock, server_side=True, do_handshake_on_connect=False)  # the same fd
            self._tls_step(p)
            return
        if not self._read(p):  # CONNECT often comes with the handshake's last ACK
            self._loop.add_reader(p.sock.fileno(), self._read, p)
            p.watched = True

    def _tls_step(self, p: _Pending) -> None:
        """Go on with a TLS connection: the handshake, then the CONNECT through it."""
        assert self._loop is not None and isinstance(p.sock, ssl.SSLSocket)
        if not p.shaken:
            try:
                p.sock.do_handshake()
            except ssl.SSLWantReadError:
                self._tls_wait(p, write=False)
                return
            except ssl.SSLWantWriteError:
                self._tls_wait(p, write=True)
                return
            except (ssl.SSLError, OSError) as exc:
                log.info("%s: TLS handshake failed: %s", _who(p), getattr(exc, "reason", None) or exc)
                self._close(p)
                return
            p.shaken = True
            self._tls_wait(p, write=False)
        while self._pending.get(p.sock.fileno()) is p:  # read until OpenSSL has nothing more
            if self._read(p) or not p.sock.pending():
                return

    def _tls_wait(self, p: _Pending, *, write: bool) -> None:
        assert self._loop is not None
        fd = p.sock.fileno()
        if not p.watched:
            self._loop.add_reader(fd, self._tls_step, p)
            p.watched = True
        if write and not p.writing:
            self._loop.add_writer(fd, self._tls_step, p)
            p.writing = True
        elif not write and p.writing:
            self._loop.remove_writer(fd)
            p.writing = False

    def _read(self, p: _Pending) -> bool:
        """Read what is there; True when the connection is dealt with (handed off or closed)."""
        try:
            chunk = p.sock.recv(65536)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError as exc:
            log.debug("%s: %s", _who(p), exc)
            self._close(p)
            return True
        if not chunk:
            log.debug("%s closed before CONNECT", _who(p))
            self._close(p)
            return True
        if p.head is not None or (not p.data and chunk[:1] == proxy.SIGNATURE[:1] and self._relay_mark(p)):
            rest = self._relayed_in(p, chunk)
            if rest is None:
                return p.sock.fileno() < 0 or self._pending.get(p.sock.fileno()) is not p
            chunk = rest
            if not chunk:
                return False
        if p.framer is not None:  # WebSocket: the opening handshake, then frames
            opening = not p.framer.open
            chunk, reply, over = p.framer.feed(chunk)
            if reply:
                try:
                    p.sock.send(reply)  # an HTTP response or a control frame: fits the buffer
                except (OSError, ssl.SSLError):
                    over = True
            if over:
                self._close(p)
                return True
            if opening and p.framer.open:
                if p.trusted and not self._forwarded(p):
                    return True
                p.framer.request = None  # its headers are read: not kept for the life of the relay
            if not chunk:
                return False
        if not p.data:
            p.first_at = time.monotonic()
        p.data += chunk
        if p.data[0] >> 4 != PacketType.CONNECT:  # [MQTT-3.1.0-1], judged from the first byte
            log.info("%s: first packet is not CONNECT (byte 0x%02X): closing", _who(p), p.data[0])
            self._close(p)
            return True
        try:
            raw = p.reader.feed_raw(chunk)
        except ProtocolError as exc:
            if exc.reason == reasons.PACKET_TOO_LARGE:
                # 3.2.2.2: CONNACK 0x95 "The CONNECT packet exceeded the maximum permissible
                # size", in the version its first bytes name (3.1.1 has no such code: a close).
                self._refuse(p, _version_of(p.data), exc)
                return True
            log.info("%s: bad first packet: %s: closing", _who(p), exc.message)
            self._close(p)
            return True
        if not raw:
            return False
        self._connect(p, *raw[0])
        return True

    def _assigned_id(self) -> str:
        """A client identifier for a client that sent none. A cluster node picks one of a
        virtual shard it serves (a few tries; each is one with the share of shards it has), so
        that such a client is not relayed: the owner would assign another identifier."""
        cid = "auto-" + uuid.uuid4().hex
        if self.clustered:
            now = time.monotonic()
            for _ in range(AUTO_ID_TRIES):
                if self.grant.owner(cid, now) >= 0:
                    break
                cid = "auto-" + uuid.uuid4().hex
        return cid

    def _relay_mark(self, p: _Pending) -> bool:
        """Whether a PROXY header may come first on ``p``'s listener: a cluster node's plain
        listener without ``proxy_protocol`` (on which no CONNECT begins with its first byte)."""
        return self.clustered and p.listener is None and not self.listens[p.index][1].proxy_protocol

    def _relayed_in(self, p: _Pending, chunk: bytes) -> bytes | None:
        """The PROXY header another node put in front of a client it relays here: the bytes
        after it; None while it is incomplete, or when it closed the connection. Its address is
        the client's when the TCP peer is a registered node's host."""
        head = p.head = (p.head or bytearray()) + chunk
        try:
            parsed = proxy.parse(bytes(head))
        except proxy.ProxyError as exc:
            log.info("%s: %s: closing", _peername(p.sock), exc)
            self._close(p)
            return None
        if parsed is None:
            return None
        total, client = parsed
        p.head = None
        p.relayed = True
        peer = _peername(p.sock)
        if client is not None and forwarded.host_of(peer).strip("[]") in self._node_hosts:
            if not self._move(p, forwarded.host_of(client)):
                return None
            p.peer = client
        elif client is not None:
            self._say_once(forwarded.host_of(peer), "%s: PROXY header from a host that is no"
                           " registered node: its address is not believed", peer)
        return bytes(head[total:])

    def _forwarded(self, p: _Pending) -> bool:
        """A WebSocket request on a listener with ``trusted_proxies``: from a trusted proxy, its
        forwarding header says who the client is. False when that closed the connection."""
        assert p.framer is not None and p.framer.request is not None
        headers = p.framer.request.headers
        peer = _who(p)
        try:
            hop = forwarded.resolve(peer, p.trusted, headers.get_all("X-Forwarded-For"),
                                    headers.get_all("Forwarded"))
        except forwarded.ForwardedError as exc:
            self._say_once(forwarded.host_of(peer), "%s: forwarding header of a trusted proxy ignored: %s", peer, exc)
            hop = None
        if hop is None:  # the peer is the client (a trusted one without a header counts as itself now)
            return self._move(p, forwarded.host_of(peer))
        client = forwarded.format_hop(hop)
        log.debug("%s: forwarded for %s", peer, client)
        if not self._move(p, str(hop[0])):
            return False
        p.peer = client
        return True

    def _connect(self, p: _Pending, first: int, body: memoryview | bytes) -> None:
        """A whole CONNECT has arrived: refuse it here, or hand the socket to its shard."""
        try:  # a CONNECT says its own version (the one passed is not read)
            connect = codec.decode(first, body, MQTT_3_1_1, self.config.limits.strict_utf8)
        except ProtocolError as exc:
            try:  # the version to answer in, when the CONNECT says it
                version = codec.connect_version(body)
            except ProtocolError as early:
                if early.reason != reasons.UNSUPPORTED_PROTOCOL_VERSION:
                    return self._refuse(p, None, early)
                # Answer in the form the client will read: 5.0 (0x84) if it asked for level 5,
                # else the 3.1.1 return code 1 [MQTT-3.1.2-2].
                return self._refuse(p, MQTT_5 if _level(body) == MQTT_5 else MQTT_3_1_1, early)
            return self._refuse(p, version, exc)
        assert isinstance(connect, Connect)
        version = connect.protocol_version
        client_id: str | None = None
        if not connect.client_id:
            if version == MQTT_5 or (version == MQTT_3_1_1 and connect.clean_start):
                client_id = self._assigned_id()  # [MQTT-3.1.3-6]
            else:  # [MQTT-3.1.3-8]
                return self._refuse(p, version, ProtocolError(
                    reasons.CLIENT_IDENTIFIER_NOT_VALID, "empty client identifier with a persistent session"))
        elif version == MQTT_3_1 and len(connect.client_id) > 23:
            return self._refuse(p, version, ProtocolError(
                reasons.CLIENT_IDENTIFIER_NOT_VALID, "MQTT 3.1 client identifier longer than 23 characters"))
        elif len(connect.client_id.encode("utf-8", "surrogatepass")) > self.config.limits.max_client_id_length:
            return self._refuse(p, version, ProtocolError(
                reasons.CLIENT_IDENTIFIER_NOT_VALID,
                f"client identifier longer than {self.config.limits.max_client_id_length} bytes "
                "(limits.max_client_id_length)"))
        if p.listener is not None and p.listener.use_identity_as_username:
            assert isinstance(p.sock, ssl.SSLSocket)
            p.identity = identity(p.sock, p.listener.certificate_identity)
            if p.identity is None:  # never the CONNECT's user name instead
                return self._refuse(p, version, ProtocolError(
                    reasons.NOT_AUTHORIZED, f"the client certificate has no {p.listener.certificate_identity} "
                                            "to be the user name (use_identity_as_username)"))
        cid = client_id or connect.client_id
        if not self.clustered:
            return self._queue_handoff(shard_for(cid, self.shards), p, client_id, version)
        now = time.monotonic()
        worker = self.grant.owner(cid, now)
        if worker >= 0:
            return self._queue_handoff(worker, p, client_id, version)
        target = self.grant.relay_to(cid, now)
        if p.relayed:
            self.refused_relayed += 1
            why = "relayed here by another node, whose map differs: not relayed again"
        elif target is None:
            why = ("this node serves no virtual shard now (no lease or no shard map yet)"
                   if not self.grant.owners or now >= self.grant.until
                   else "its virtual shard is nobody's, or its node has no client address")
        elif p.listener is not None and p.listener.use_identity_as_username:
            why = "its listener makes the certificate the user name, which a relay cannot pass on"
        else:
            redirect = self.redirects(p, version)
            return self._relay(p, version, cid, target, redirect,
                               connect.properties.maximum_packet_size if redirect else None)
        self._unserved(p, version, cid, why)

    def redirects(self, p: _Pending, version: int) -> bool:
        """Whether a client of another node's virtual shard is redirected rather than relayed:
        with ``[cluster] redirect``, a 5.0 client (3.1.1 has no redirect) of a plain listener
        (the owner's address is a plain listener's, which a TLS or WebSocket client could not
        use as it connected here)."""
        return self.config.cluster.redirect and version == MQTT_5 and p.listener is None

    def _relay(self, p: _Pending, version: int, client_id: str, target: str,
               redirect: bool = False, limit: int | None = None) -> None:
        """Connect to the node at ``target`` (its client address) for ``p``; the relay (or
        the redirect) begins once connected (``_relay_connected``)."""
        assert self._loop is not None
        self._forget(p)  # no more reading or deadline here; it stays counted until the relay ends
        out: socket.socket | None = None
        try:
            host, port = proxy.split_address(target)
            out = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            out.setblocking(False)
            out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._bind_source(out)
            err = out.connect_ex((host, port))
        except (OSError, ValueError) as exc:
            if out is not None:
                out.close()
            return self._relay_failed(p, version, client_id, target, str(exc))
        if err not in (0, errno.EINPROGRESS):
            out.close()
            return self._relay_failed(p, version, client_id, target, os.strerror(err))
        going = _Outgoing(p, out, target, version, redirect, limit)
        self._connecting[out.fileno()] = going
        self._loop.add_writer(out.fileno(), self._relay_connected, going, client_id)
        going.timer = self._loop.call_later(RELAY_CONNECT_TIMEOUT, self._relay_timeout, going, client_id)

    def _bind_source(self, out: socket.socket) -> None:
        """Connect from this node's ``advertise`` host when it is a local address, so that the
        owner sees a registered node's host and believes the PROXY header's address."""
        host = self.config.cluster.advertise.rpartition(":")[0].strip("[]")
        try:
            ipaddress.ip_address(host)  # a name is not looked up here (it could block)
            out.bind((host, 0))
        except (OSError, ValueError, OverflowError):
            pass  # not an address of this host (behind NAT, say): the kernel picks one

    def _relay_timeout(self, going: _Outgoing, client_id: str) -> None:
        if self._connecting.get(going.out.fileno()) is going:
            self._relay_connected(going, client_id, timed_out=True)

    def _relay_connected(self, going: _Outgoing, client_id: str, timed_out: bool = False) -> None:
        """The connection to the owner node is made (or failed, or took too long): start the
        relay with a PROXY header and the bytes read so far, or refuse the client."""
        assert self._loop is not None
        out, p = going.out, going.p
        self._connecting.pop(out.fileno(), None)
        self._loop.remove_writer(out.fileno())
        if going.timer is not None:
            going.timer.cancel()
        err = errno.ETIMEDOUT if timed_out else out.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            out.close()
            return self._relay_failed(p, going.version, client_id, going.target, os.strerror(err))
        if going.redirect:
            return self._redirect(going, client_id)
        self.relayed += 1
        self._say_once("relay", "CONNECT of %r relayed to the node at %s, which serves its virtual"
                       " shard (%d relayed so far)", client_id, going.target, self.relayed,
                       level=logging.INFO)
        initial = proxy.encode(_who(p), going.target) + bytes(p.data)

        def closed(relay: ClientRelay) -> None:
            self._relays.discard(relay)
            if p.counted:  # counted toward this node's limits until the relay ends
                p.counted = False
                self.counts.release(p.address)

        relay = ClientRelay(p.sock, out, self._loop, closed, p.framer, initial)
        self._relays.add(relay)
        relay.start()

    def _redirect(self, going: _Outgoing, client_id: str) -> None:
        """The owner answered: reset that connection (it carried nothing, and a reset leaves
        no TIME_WAIT here), send the client CONNACK 0x9C with the owner's address as Server
        Reference [MQTT-3.2.2-7: closed after a CONNACK of 0x80 or more], and close."""
        with contextlib.suppress(OSError):
            going.out.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        going.out.close()
        self.redirected += 1
        self._say_once("redirect", "CONNECT of %r redirected to the node at %s, which serves its"
                       " virtual shard (%d redirected so far)", client_id, going.target,
                       self.redirected, level=logging.INFO)
        connack = ConnAck(False, reasons.USE_ANOTHER_SERVER, Properties(server_reference=going.target))
        self._answer(going.p, reactions.within(connack, MQTT_5, going.limit))

    def _relay_failed(self, p: _Pending, version: int, client_id: str, target: str, why: str) -> None:
        self.relay_failed += 1
        self._unserved(p, version, client_id, f"the node that serves it ({target}) cannot be reached: {why}")

    def _unserved(self, p: _Pending, version: int, client_id: str, why: str) -> None:
        """A cluster node refuses a client it neither serves nor relays: CONNACK "server
        unavailable" (3.1.1 return code 3, 5.0 reason 0x88), logged at most once a second."""
        self.refused_unserved += 1
        grant = self.grant
        self._say_once("cluster", "CONNECT of %r refused (server unavailable): %s (%d refused so"
                       " far)", client_id, why, self.refused_unserved)
        v = vshard_for(client_id, grant.count) if grant.count else -1
        self._refuse(p, version, ProtocolError(reasons.SERVER_UNAVAILABLE,
                                               f"virtual shard {v} not served here"), quiet=True)

    def _refuse(self, p: _Pending, version: int | None, exc: ProtocolError, quiet: bool = False) -> None:
        if not quiet:
            log.info("%s: CONNECT refused: %s (%s)", _who(p), exc.message, reasons.name(exc.reason))
        code = reactions.connack_for(exc.reason, version) if version is not None else None
        self._answer(p, codec.encode(ConnAck(False, code), version)
                     if code is not None and version is not None else None)

    def _answer(self, p: _Pending, data: bytes | None) -> None:
        """Send the CONNACK ``data`` that refuses ``p`` (nothing when None), then close it."""
        if data is not None:
            if p.framer is not None:
                data = p.framer.encode(data) + p.framer.close()
            try:
                p.sock.send(data)  # a few bytes: fits the buffer
            except (OSError, ssl.SSLError):
                pass
        self._close(p)

    def _forget(self, p: _Pending) -> None:
        fd = p.sock.fileno()
        if fd >= 0 and self._pending.pop(fd, None) is not None and self._loop is not None:
            if p.watched:
                self._loop.remove_reader(fd)
                p.watched = False
            if p.writing:
                self._loop.remove_writer(fd)
                p.writing = False

    def _close(self, p: _Pending) -> None:
        """Close a connection the acceptor holds (pending, or waiting to be handed off)."""
        self._forget(p)
        p.sock.close()
        if p.counted:
            p.counted = False
            self.counts.release(p.address)

    def _check_certificates(self) -> None:
        """An mqtts listener whose certificate, key or CA file changed gets a new context for
        the connections that come from now on; connections already up keep their session. A
        file that does not load (say, a certificate written before its key) is logged and the
        old context stays, until the files change again."""
        for i, (_sock, lst, _ctx) in enumerate(self.listens):
            if not lst.tls:
                continue
            stamps = _stamps(lst)
            if stamps == self._cert_stamps[i]:
                continue
            self._cert_stamps[i] = stamps
            try:
                self._contexts[i] = server_context(lst)
            except TlsError as exc:
                log.error("listener %s: certificate files changed but do not load, the previous ones stay "
                          "in use: %s", lst.name, exc)
                continue
            log.info("listener %s: certificate files reloaded", lst.name)

    def _sweep(self) -> None:
        """Close connections that sent no whole CONNECT in time (one pass, ``now`` read once)."""
        now = time.monotonic()
        if now - self._cert_checked >= CERT_CHECK:
            self._cert_checked = now
            self._check_certificates()
        for p in [p for p in self._pending.values() if now > p.deadline]:
            log.info("%s sent no CONNECT within %.1fs: closing", _who(p),
                     self.config.limits.connect_timeout)
            self._close(p)
        if self._waiting:
            self._expire_waiting(now)
        if self._loop is not None and not self._stopping:
            self._sweep_handle = self._loop.call_later(SWEEP, self._sweep)

    def control(self, request: dict[str, object]) -> object:
        """An operation asked on the acceptor's control socket (``RUN_DIR/ctl-acceptor.sock``)."""
        if request["op"] == "stats":
            counts = self.counts
            return {"counters": {
                "accepted": self.accepted, "handed_off": self.handed_off, "handoff_sends": self.handoff_sends,
                "refused_rate": self.refused,
                "refused_max_connections": counts.refused_total,
                "refused_max_connections_per_address": counts.refused_address,
                "open": counts.total, "pending": len(self._pending), "relays": len(self._relays),
                "refused_unserved": self.refused_unserved, "relayed": self.relayed,
                "relay_failed": self.relay_failed, "refused_relayed": self.refused_relayed,
                "redirected": self.redirected,
                "connecting": len(self._connecting),
            }, "histograms": {"handoff_seconds": self.handoff_seconds.snapshot()}}
        if request["op"] == "reload":
            return self.reconfigure(request.get("config"))
        if request["op"] == "fence" and self.clustered:
            grant = Grant.from_value(request.get("grant"))
            if grant.seq > self.grant.seq:
                if grant.peers != self.grant.peers:
                    self._node_hosts = frozenset(_hosts(grant.peers))
                self.grant = grant
            return {"acceptor": True, "seq": self.grant.seq}
        raise ValueError(f"unknown operation {request['op']!r}")

    def reconfigure(self, overrides: object) -> dict[str, object]:
        """The control operation ``reload``: the supervisor's new resolved configuration. The
        limits are read per connection, so connections accepted from now on get the new ones;
        ``limits.max_connections`` applies to the next accept (those open stay open)."""
        if not isinstance(overrides, dict):
            raise TypeError("reload needs 'config', the resolved configuration as an object")
        try:
            config = load_config(None, overrides)
        except ConfigError as exc:
            raise ValueError(f"reload failed, the previous configuration stays in force: {exc}") from None
        self.config = config
        self.counts.max_total = config.limits.max_connections
        logging.getLogger().setLevel(config.server.log_level.upper())
        log.info("acceptor: configuration reloaded")
        return {"acceptor": True}

    def stop(self) -> None:
        self._stopping = True
        if self._loop is not None:
            for listen, _lst, _ctx in self.listens:
                self._loop.remove_reader(listen.fileno())
        for relay in list(self._relays):
            relay.close()
        for going in list(self._connecting.values()):
            if going.timer is not None:
                going.timer.cancel()
            if self._loop is not None:
                self._loop.remove_writer(going.out.fileno())
            going.out.close()
            self._close(going.p)
        self._connecting.clear()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        for p in list(self._pending.values()):
            self._close(p)
        for items in self._outgoing.values():
            for p, _cid, _v in items:
                self._close(p)
        self._outgoing.clear()
        for waiting in self._waiting.values():
            for chunk in waiting:
                self._drop_chunk(chunk, None)
        self._waiting.clear()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for shard, link in list(self._links.items()):
            self._drop_link(shard, link)


def _hosts(addresses: tuple[str, ...]) -> list[str]:
    """The hosts of ``host:port`` addresses (one that is not such is left out)."""
    out = []
    for address in addresses:
        try:
            out.append(proxy.split_address(address)[0])
        except ValueError:
            pass
    return out


def _stamps(lst: ListenerConfig) -> tuple[tuple[int, int] | None, ...]:
    """(modification time, size) of an mqtts listener's files, None for one that is missing."""
    out: list[tuple[int, int] | None] = []
    for path in (lst.certfile, lst.keyfile, lst.cafile):
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        out.append((st.st_mtime_ns, st.st_size) if st is not None else None)
    return tuple(out)


def _version_of(data: bytes | bytearray) -> int | None:
    """The protocol version named by the first bytes of a CONNECT (fixed header included), or
    None when they do not say yet."""
    for i in range(1, min(len(data), 5)):
        if data[i] < 0x80:
            try:
                return codec.connect_version(bytes(data[i + 1:]))
            except ProtocolError:
                return None
    return None


def _level(body: memoryview | bytes) -> int | None:
    """The protocol level byte of a CONNECT body, whatever its protocol name says."""
    if len(body) < 2:
        return None
    at = 2 + int.from_bytes(body[0:2], "big")
    return body[at] if at < len(body) else None


def _who(p: _Pending) -> str:
    """The client's address for the log: the PROXY header's, else the socket's."""
    return p.peer or _peername(p.sock)


def _peername(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def run(config: Config, listen_fds: list[int], run_dir: str, shards: int) -> None:
    """Process entry point: ``listen_fds`` in the order of ``config.effective_listeners``."""
    from shardbroker.operations import control
    from shardbroker.operations.admin import acceptor_socket
    from shardbroker.process.runtime import install_loop, log_in_turns, ready

    install_loop()
    listens: list[Listen] = []
    for fd, lst in zip(listen_fds, config.effective_listeners, strict=True):
        listens.append((socket.socket(fileno=fd), lst, server_context(lst) if lst.tls else None))
    acceptor = Acceptor(config, listens, run_dir, shards)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        log_in_turns(loop)
        acceptor.start(loop)
        control_server = await control.serve(acceptor_socket(run_dir), acceptor.control)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready("acceptor")
        await stop.wait()
        open_before = acceptor.counts.total
        control_server.close()
        acceptor.stop()
        for listen, _lst, _ctx in listens:
            listen.close()
        counts = acceptor.counts
        log.info("acceptor stopped (accepted %d, handed off %d, relayed to other nodes %d, redirected %d,"
                 " refused by the connection rate %d, by limits.max_connections %d, by"
                 " limits.max_connections_per_address %d; %d connections open before stopping)",
                 acceptor.accepted, acceptor.handed_off, acceptor.relayed, acceptor.redirected,
                 acceptor.refused, counts.refused_total, counts.refused_address, open_before)

    asyncio.run(main())
