"""Typed messages between shards, and their versioned encoding.

What a shard says to another one is a ``PeerMessage``: one of the slotted
dataclasses below. ``encode_batch``/``decode_batch`` turn a sequence of them into
bytes and back (one ZeroMQ message of the bus); ``encode_message``/``decode_message``
do the same for one message (one record of the durable outbox).

Wire format (version ``PEER_PROTOCOL_VERSION`` = 1)
    A 4-byte header, ``b"SBP"`` then the version byte, followed by MessagePack
    (https://msgpack.org): for a batch, an array of items; for a single message,
    one item. An item is an array whose first element is the kind:

    ====  ==================  ===============================================
    kind  message             fields after the kind, in order
    ====  ==================  ===============================================
    0     ``Forward``         topic, payload, qos, retain, properties,
                              expires_at, origin, non_shared, groups, hops
    1     ``DurableForward``  origin_shard, seq, forward (a kind-0 item), and
                              optionally mid, target (both or neither)
    2     ``ForwardAck``      shard, upto
    3     ``ResendRequest``   shard, mark
    4     ``RouteAdd``        shard, key, request, durable
    5     ``RouteRemove``     shard, key
    6     ``RouteAck``        shard, request
    7     ``RoutesQuery``     shard
    8     ``Routes``          shard, keys (an array of [key, durable] pairs)
    9     ``Hold``            shard, publisher
    10    ``Release``         shard, publisher
    11    ``LoginFailed``     shard, address
    12    ``RoutesAdd``       shard, keys (as in ``Routes``), request
    13    ``RoutesRemove``    shard, keys (an array of str, each once)
    14    ``Retain``          topic, payload, qos, properties, expires_at,
                              stamp, node
    15    ``ShardState``      shard, vshard, version, sessions (an array of bin),
                              seen (an array of [source, mid] pairs)
    16    ``ShardStateEnd``   shard, vshard, version, count
    17    ``ShardStateAck``   shard, vshard, version, count
    18    ``ShardStateQuery`` shard, vshard, version
    19    ``ShardRelayEnd``   shard, vshard, version, upto
    20    ``RouteDigest``     shard, digest
    21    ``SessionReplicas`` shard, vshard (-1: changes; else the whole set of
                              that virtual shard), items (an array of
                              [client id, bin] pairs; an empty bin: deleted)
    22    ``ShardsTaken``     shard, previous (a peer id), vshards (an array
                              of ints 0..1023, each once)
    23    ``ReplicasQuery``   shard, vshards (as in ``ShardsTaken``)
    ====  ==================  ===============================================

    Kinds 12 and 13 came after the others (a SUBSCRIBE's new filters, an UNSUBSCRIBE's
    or an ended session's last ones, in one message rather than one per filter); a
    shard of older code refuses a batch that holds one, which only a broker whose
    shards run different code would send. Kind 14 goes between the nodes of a cluster
    only (a retained message set or deleted on another node, ``core/retained.py``): an
    empty payload is a delete, ``stamp`` a hybrid logical clock value and ``node`` the
    writing node's ID, which together decide which write is the last.

    Kinds 15 to 18 move a virtual shard's persistent sessions between two nodes' workers
    (``core/moves.py``): each bin of ``ShardState.sessions`` is one session with its rows
    (``storage/session_state.py``: the store's own record encodings); ``vshard`` is
    0..1023, ``version`` the map version under which the sender gave the shard up (>= 1;
    in a query, the shard's epoch at the asker).

    Strings are MessagePack str (UTF-8), payloads bin, integers int, flags bool,
    ``expires_at`` float64 or nil, ``origin`` str or nil, ``groups`` an array of
    [group, filter] str pairs. ``properties`` is nil for ``NO_PROPERTIES``, else
    the MQTT 5 PUBLISH property block (``codec.encode_properties``) as bin. The
    encoding depends on no interpreter, version or host.

Why MessagePack: it was the fastest of the encodings valid between hosts.
``python -m loadtests.peer_codec_bench`` (CPython 3.11, x86-64, msgpack 1.2.4 and
cbor2 6.3.0 with their C extensions; figures move by about 10% between runs),
µs per message, batches of 200; "Forward": 20-character topic, 64-byte payload,
no properties; "mixed": every kind, 3 messages in 20 with properties. Every
option but the first builds and checks the dataclasses as this module does::

    option                        Forward enc / dec   mixed enc / dec   bytes/message
    marshal of lists, no classes  0.12 / 0.15         0.15 / 0.19       121 / 122
    marshal                       0.36 / 0.97         0.81 / 1.85       121 / 122
    msgpack (this module)         0.36 / 0.58         0.93 / 1.57        97 / 119
    cbor2                         1.02 / 1.27         1.57 / 2.22        97 / 120
    struct, hand-written          0.50 / 1.22         0.95 / 2.06       110 / 133

    marshal is a baseline only: valid between identical interpreters alone, and
    it loads whatever it is given (2026-12-04 figures). The messages are slotted dataclasses but not
    frozen: a frozen one's ``__init__`` costs one ``object.__setattr__`` per field
    (1.65 µs for ``Forward``, against 0.40 µs), paid once per message on each side.
    Treat them as values all the same. In the mixed batch the MQTT property blocks dominate
    (``codec``: 2.6 µs to encode, 4.8 µs to decode a two-property block).

Invariants
    * ``decode_batch``/``decode_message`` raise ``PeerFormatError`` and nothing
      else, whatever the bytes: bad magic, another version, truncation (every
      proper prefix of a valid encoding is refused, never read as a shorter
      batch), trailing bytes, an unknown kind, a missing or extra field, a field
      of the wrong type or out of range, a bad property block.
    * ``decode(encode(x)) == x``; a ``Forward`` without properties decodes to
      the shared ``NO_PROPERTIES`` instance and costs one byte for them.
    * A batch keeps the order of its messages.
    * A ``Forward`` carries only properties a PUBLISH may carry, and never
      ``topic_alias`` or ``subscription_identifiers``: both are per connection
      and set by the receiving shard.
    * Integers are 0 .. 2**64-1; ``DurableForward.seq`` and ``RouteAck.request``
      are >= 1; ``qos`` 0..2. ``Routes.keys`` names each key at most once.
    * A ``Retain`` with an empty payload (a delete) has qos 0, no properties and no
      expiry.

Not done here
    * No I/O, no batching by size, no routing or delivery decisions, no meaning
      checks of topics or filters: this module only says what the bytes are.
    * The dataclasses do not check themselves on construction. On the hot path
      (``Forward``, ``DurableForward``) ``encode_*`` leaves field types to the
      type checker and checks only ranges and properties; the other kinds are
      checked as on decode. A value out of range, or one the format cannot carry
      (an integer of 2**64 or more, a lone surrogate), raises ``ValueError``; a
      value that is not a peer message raises ``TypeError``.
    * Only version 1 is read. A later version must keep reading version 1
      records, which may wait in a durable outbox across an upgrade.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, Final, TypeAlias

import msgpack  # type: ignore[import-untyped]

from shardbroker.protocol.codec import decode_properties, encode_properties
from shardbroker.protocol.errors import ProtocolError
from shardbroker.protocol.packets import NO_PROPERTIES, PacketType, Properties

__all__ = [
    "PEER_PROTOCOL_VERSION",
    "REMOTE_BASE",
    "DurableForward",
    "Forward",
    "ForwardAck",
    "Hold",
    "LoginFailed",
    "PeerFormatError",
    "PeerMessage",
    "Release",
    "ReplicasQuery",
    "ResendRequest",
    "Retain",
    "RouteAck",
    "RouteAdd",
    "RouteDigest",
    "RouteRemove",
    "Routes",
    "RoutesAdd",
    "RoutesQuery",
    "RoutesRemove",
    "SessionReplicas",
    "ShardRelayEnd",
    "ShardState",
    "ShardStateAck",
    "ShardStateEnd",
    "ShardStateQuery",
    "ShardsTaken",
    "decode_batch",
    "decode_message",
    "encode_batch",
    "encode_message",
    "from_sender",
]

PEER_PROTOCOL_VERSION: Final = 1
VSHARDS: Final = 1024  # a cluster's virtual shards (ShardState.vshard)
REMOTE_BASE: Final = 256  # peer ids from here on name workers of other nodes: number * 256 + worker

_MAGIC: Final = b"SBP"
_HEADER: Final = _MAGIC + bytes((PEER_PROTOCOL_VERSION,))
_HEADER_LEN: Final = len(_HEADER)


class PeerFormatError(ValueError):
    """Bytes that are not a valid peer batch or message of a version this shard reads."""


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class Forward:
    """A publish forwarded to another shard, fire-and-forget.

    ``expires_at`` is wall-clock UNIX seconds (``None``: never). ``origin`` is
    the publishing client's id, for No Local. ``non_shared``: the receiver matches its
    non-shared subscriptions; ``groups``: the (share group, filter) pairs it serves.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties = NO_PROPERTIES
    expires_at: float | None = None
    origin: str | None = None
    non_shared: bool = True
    groups: tuple[tuple[str, str], ...] = ()
    hops: int = 0

    # Written out rather than generated: compiled (``shardbroker/_compiled.py``), an explicit
    # __init__ is native code, a dataclass-generated one is interpreted (6 x slower to construct).
    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool,
                 properties: Properties = NO_PROPERTIES, expires_at: float | None = None,
                 origin: str | None = None, non_shared: bool = True,
                 groups: tuple[tuple[str, str], ...] = (), hops: int = 0) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties = properties
        self.expires_at = expires_at
        self.origin = origin
        self.non_shared = non_shared
        self.groups = groups
        self.hops = hops


@dataclass(slots=True)
class DurableForward:
    """``forward`` sent through the durable outbox; ``seq`` numbers it per peer (from 1).

    ``mid`` numbers the publish at the shard where it was published (the same for every peer
    it goes to; 0: unnumbered), so that a session moving between nodes gets it once although
    it reaches it both ways (``core/moves.py``). ``target``, on a publish relayed to a moving
    session's new worker, is ``(client id, subscription ids, source)``: that session alone
    gets it, with ``forward``'s QoS and retain flag as they are; ``source`` is the global id
    of the shard that numbered it (``node number * 256 + worker``)."""

    origin_shard: int
    seq: int
    forward: Forward
    mid: int = 0
    target: tuple[str, tuple[int, ...], int] | None = None

    def __init__(self, origin_shard: int, seq: int, forward: Forward, mid: int = 0,
                 target: tuple[str, tuple[int, ...], int] | None = None) -> None:
        self.origin_shard = origin_shard  # explicit, as ``Forward.__init__`` says why
        self.seq = seq
        self.forward = forward
        self.mid = mid
        self.target = target


@dataclass(slots=True)
class ForwardAck:
    """``shard`` has applied every durable forward up to ``upto`` (cumulative)."""

    shard: int
    upto: int

    def __init__(self, shard: int, upto: int) -> None:
        self.shard = shard  # explicit, as ``Forward.__init__`` says why
        self.upto = upto


@dataclass(slots=True)
class ResendRequest:
    """``shard`` has applied durable forwards up to ``mark``: resend everything after it."""

    shard: int
    mark: int


@dataclass(slots=True)
class RouteAdd:
    """``shard`` wants publishes matching ``key`` (a filter, possibly ``$share/g/...``).

    ``request`` is 0 for no acknowledgement, else an id to echo in ``RouteAck``.
    """

    shard: int
    key: str
    request: int = 0
    durable: bool = False


@dataclass(slots=True)
class RoutesAdd:
    """``shard`` wants publishes matching each key of ``keys``, (key, durable) pairs, each key
    once: the new filters of one SUBSCRIBE. ``request`` as in ``RouteAdd``, one
    acknowledgement for them all."""

    shard: int
    keys: tuple[tuple[str, bool], ...]
    request: int = 0


@dataclass(slots=True)
class RouteRemove:
    """``shard`` no longer wants publishes matching ``key``."""

    shard: int
    key: str


@dataclass(slots=True)
class RoutesRemove:
    """``shard`` no longer wants publishes matching any of ``keys`` (each once)."""

    shard: int
    keys: tuple[str, ...]


@dataclass(slots=True)
class RouteAck:
    """``shard`` has applied the ``RouteAdd`` numbered ``request``."""

    shard: int
    request: int


@dataclass(slots=True)
class RoutesQuery:
    """``shard`` asks for the complete route set of the receiver."""

    shard: int


@dataclass(slots=True)
class Routes:
    """The complete route set of ``shard``: (key, durable) pairs, each key once.

    A tuple rather than a dict, so that the message is immutable and hashable like
    the others; ``dict(m.keys)`` is the mapping.
    """

    shard: int
    keys: tuple[tuple[str, bool], ...]


@dataclass(slots=True)
class Hold:
    """``shard`` has a backlog that ``publisher`` (a client of the receiver) feeds: hold it back.

    A lease: it lasts ``backpressure.HOLD_LEASE`` seconds unless sent again.
    """

    shard: int
    publisher: str


@dataclass(slots=True)
class Release:
    """``shard`` no longer holds ``publisher`` back."""

    shard: int
    publisher: str


@dataclass(slots=True)
class LoginFailed:
    """A login from ``address`` failed on ``shard``: count it against the address here too, so
    that slowing down and banning a guesser do not depend on which shards its client IDs hit."""

    shard: int
    address: str


@dataclass(slots=True)
class Retain:
    """The retained message of ``topic`` as a node wrote it (an empty ``payload``: deleted),
    stamped ``stamp`` (a hybrid logical clock value) by node ``node``: the receiver keeps it
    if ``(stamp, node)`` is greater than the pair it holds for the topic. ``expires_at`` as in
    ``Forward``. Names no sender: it needs no answer."""

    topic: str
    payload: bytes
    qos: int
    properties: Properties
    expires_at: float | None
    stamp: int
    node: str


@dataclass(slots=True)
class ShardState:
    """Part of virtual shard ``vshard``'s persistent sessions, which ``shard`` gave up under map
    ``version``: each of ``sessions`` is one session with its rows
    (``storage.session_state.pack_state``). Several may follow each other; a
    ``ShardStateEnd`` closes them."""

    shard: int
    vshard: int
    version: int
    sessions: tuple[bytes, ...]
    # (source, mid): the highest publish number of each source the sender had applied when it
    # gave the shard up (``DurableForward.mid``): what the sessions already hold
    seen: tuple[tuple[int, int], ...] = ()


@dataclass(slots=True)
class ShardStateEnd:
    """``shard`` has sent all ``count`` sessions of ``vshard`` it gave up under ``version``."""

    shard: int
    vshard: int
    version: int
    count: int


@dataclass(slots=True)
class ShardStateAck:
    """``shard`` has committed the ``count`` sessions of ``vshard`` sent under ``version``: the
    sender may delete them."""

    shard: int
    vshard: int
    version: int
    count: int


@dataclass(slots=True)
class ShardStateQuery:
    """``shard`` serves ``vshard`` from epoch ``version`` on and still waits for the sessions
    the receiver (its previous owner) had of it: send them, or say there are none."""

    shard: int
    vshard: int
    version: int


@dataclass(slots=True)
class ShardRelayEnd:
    """``shard`` has stopped relaying copies for the sessions of ``vshard`` it gave up under
    ``version``: the last went in its durable forward number ``upto`` (0: none) to the
    receiver, which may forget which copies it had once it has applied that one."""

    shard: int
    vshard: int
    version: int
    upto: int


@dataclass(slots=True)
class RouteDigest:
    """``shard``'s digest of its own routes (``RouteTable.digest``) as it stands after
    everything it sent the receiver before: a receiver whose copy of those routes gives
    another digest asks for them all (``RoutesQuery``)."""

    shard: int
    digest: int


@dataclass(slots=True)
class SessionReplicas:
    """Copies of persistent session records of the sender's virtual shards, for their backup
    (``core/replicas.py``): each item a client ID and its record (``storage/session_state``,
    a state without rows; empty: the session was deleted). ``vshard`` -1: changes; else the
    whole set of that virtual shard, which replaces the one held (more changes may follow)."""

    shard: int
    vshard: int
    items: tuple[tuple[str, bytes], ...]


@dataclass(slots=True)
class ShardsTaken:
    """``shard`` serves ``vshards`` from now on, whose owner was ``previous`` (a worker of a node
    whose registration ended), and has announced the routes of the sessions it took for them
    (``core/replicas.py``): a receiver that kept ``previous``'s routes for those shards
    (``Peers.peer_removed``) may drop them once every shard ``previous`` served is taken."""

    shard: int
    previous: int
    vshards: tuple[int, ...]


@dataclass(slots=True)
class ReplicasQuery:
    """``shard`` serves ``vshards`` from now on, taken from a worker of a node that is gone,
    and has no copies of their session records (it became their backup a moment before):
    a receiver that still keeps copies of one sends it its whole set (``SessionReplicas``)."""

    shard: int
    vshards: tuple[int, ...]


PeerMessage: TypeAlias = (
    Forward
    | DurableForward
    | ForwardAck
    | ResendRequest
    | RouteAdd
    | RoutesAdd
    | RouteRemove
    | RoutesRemove
    | RouteAck
    | RoutesQuery
    | Routes
    | Hold
    | Release
    | LoginFailed
    | Retain
    | ShardState
    | ShardStateEnd
    | ShardStateAck
    | ShardStateQuery
    | ShardRelayEnd
    | RouteDigest
    | SessionReplicas
    | ShardsTaken
    | ReplicasQuery
)

_KIND_FORWARD: Final = 0
_KIND_DURABLE: Final = 1
_KIND_RETAIN: Final = 14

# ---------------------------------------------------------------------------
# Field checks: what a decoded value must be, and how to say it is not
# ---------------------------------------------------------------------------

_Check: TypeAlias = Callable[[object], bool]
# (field name, check, what the check wants) in wire order.
_Spec: TypeAlias = tuple[tuple[str, _Check, str], ...]


def _is_uint(v: object) -> bool:
    return type(v) is int and v >= 0


def _is_pos(v: object) -> bool:
    return type(v) is int and v >= 1


def _is_qos(v: object) -> bool:
    return type(v) is int and 0 <= v <= 2


def _is_str(v: object) -> bool:
    return type(v) is str


def _is_bytes(v: object) -> bool:
    return type(v) is bytes


def _is_bool(v: object) -> bool:
    return type(v) is bool


def _is_opt_float(v: object) -> bool:
    return v is None or type(v) is float


def _is_opt_str(v: object) -> bool:
    return v is None or type(v) is str


def _is_opt_bytes(v: object) -> bool:
    return v is None or type(v) is bytes


def _is_pairs(v: object, second: type) -> bool:
    return type(v) is tuple and all(
        type(p) is tuple and len(p) == 2 and type(p[0]) is str and type(p[1]) is second
        for p in v
    )


def _is_groups(v: object) -> bool:
    return _is_pairs(v, str)


def _is_route_keys(v: object) -> bool:
    return isinstance(v, tuple) and _is_pairs(v, bool) and len({k for k, _ in v}) == len(v)


def _is_keys(v: object) -> bool:
    return isinstance(v, tuple) and all(type(k) is str for k in v) and len(set(v)) == len(v)


def _is_vshard(v: object) -> bool:
    return type(v) is int and 0 <= v < VSHARDS


def _is_vshards(v: object) -> bool:
    return type(v) is tuple and all(_is_vshard(x) for x in v) and len(set(v)) == len(v)


def _is_target(v: object) -> bool:
    return (type(v) is tuple and len(v) == 3 and type(v[0]) is str and type(v[1]) is tuple
            and all(type(i) is int and 0 < i for i in v[1]) and type(v[2]) is int and v[2] >= 0)


def _is_marks(v: object) -> bool:
    return type(v) is tuple and all(
        type(p) is tuple and len(p) == 2 and type(p[0]) is int and p[0] >= 0 and type(p[1]) is int
        and p[1] >= 0 for p in v)


def _is_chunks(v: object) -> bool:
    return type(v) is tuple and all(type(b) is bytes for b in v)


def _describe(v: object) -> str:
    if v is None or isinstance(v, (int, float)):
        return repr(v)
    return type(v).__name__


def _problem(name: str, spec: _Spec, values: Sequence[object]) -> str:
    """The one-line reason why ``values`` does not meet ``spec``."""
    if len(values) != len(spec):
        n = len(spec)
        return f"{name}: expected {n} field{'s' if n != 1 else ''}, got {len(values)}"
    for (field, check, what), value in zip(spec, values):
        if not check(value):
            return f"{name}.{field}: expected {what}, got {_describe(value)}"
    return f"{name}: invalid fields"  # only if a fast path below disagrees with its spec


_FORWARD_SPEC: Final[_Spec] = (
    ("topic", _is_str, "a str"),
    ("payload", _is_bytes, "bytes"),
    ("qos", _is_qos, "an int 0..2"),
    ("retain", _is_bool, "a bool"),
    ("properties", _is_opt_bytes, "bytes or nil"),
    ("expires_at", _is_opt_float, "a float or nil"),
    ("origin", _is_opt_str, "a str or nil"),
    ("non_shared", _is_bool, "a bool"),
    ("groups", _is_groups, "an array of [str, str] pairs"),
    ("hops", _is_uint, "an int >= 0"),
)
_DURABLE_SPEC: Final[_Spec] = (
    ("origin_shard", _is_uint, "an int >= 0"),
    ("seq", _is_pos, "an int >= 1"),
    ("forward", lambda v: type(v) is tuple, "a Forward item"),
    ("mid", _is_uint, "an int >= 0"),
    ("target", lambda v: v is None or _is_target(v), "nil or [str, [int, ...], int]"),
)
_RETAIN_SPEC: Final[_Spec] = (
    ("topic", _is_str, "a str"),
    ("payload", _is_bytes, "bytes"),
    ("qos", _is_qos, "an int 0..2"),
    ("properties", _is_opt_bytes, "bytes or nil"),
    ("expires_at", _is_opt_float, "a float or nil"),
    ("stamp", _is_uint, "an int >= 0"),
    ("node", _is_str, "a str"),
)
_UINT: Final = (_is_uint, "an int >= 0")
_POS: Final = (_is_pos, "an int >= 1")
_STR: Final = (_is_str, "a str")
_BOOL: Final = (_is_bool, "a bool")
_VSHARD: Final = (_is_vshard, f"an int 0..{VSHARDS - 1}")
# The other kinds are small and rare: encoded and decoded generically from these.
_SIMPLE: Final[tuple[tuple[int, type[PeerMessage], _Spec], ...]] = (
    (2, ForwardAck, (("shard", *_UINT), ("upto", *_UINT))),
    (3, ResendRequest, (("shard", *_UINT), ("mark", *_UINT))),
    (4, RouteAdd, (("shard", *_UINT), ("key", *_STR), ("request", *_UINT), ("durable", *_BOOL))),
    (5, RouteRemove, (("shard", *_UINT), ("key", *_STR))),
    (6, RouteAck, (("shard", *_UINT), ("request", *_POS))),
    (7, RoutesQuery, (("shard", *_UINT),)),
    (8, Routes, (("shard", *_UINT), ("keys", _is_route_keys, "[str, bool] pairs, keys unique"))),
    (9, Hold, (("shard", *_UINT), ("publisher", *_STR))),
    (10, Release, (("shard", *_UINT), ("publisher", *_STR))),
    (11, LoginFailed, (("shard", *_UINT), ("address", *_STR))),
    (12, RoutesAdd, (("shard", *_UINT), ("keys", _is_route_keys, "[str, bool] pairs, keys unique"),
                     ("request", *_UINT))),
    (13, RoutesRemove, (("shard", *_UINT), ("keys", _is_keys, "an array of str, each once"))),
    (15, ShardState, (("shard", *_UINT), ("vshard", *_VSHARD), ("version", *_POS),
                      ("sessions", _is_chunks, "an array of bin"),
                      ("seen", _is_marks, "[int, int] pairs"))),
    (16, ShardStateEnd, (("shard", *_UINT), ("vshard", *_VSHARD), ("version", *_POS),
                         ("count", *_UINT))),
    (17, ShardStateAck, (("shard", *_UINT), ("vshard", *_VSHARD), ("version", *_POS),
                         ("count", *_UINT))),
    (18, ShardStateQuery, (("shard", *_UINT), ("vshard", *_VSHARD), ("version", *_POS))),
    (19, ShardRelayEnd, (("shard", *_UINT), ("vshard", *_VSHARD), ("version", *_POS),
                         ("upto", *_UINT))),
    (20, RouteDigest, (("shard", *_UINT), ("digest", *_UINT))),
    (21, SessionReplicas, (("shard", *_UINT),
                           ("vshard", lambda v: v == -1 or _is_vshard(v), f"-1 or an int 0..{VSHARDS - 1}"),
                           ("items", lambda v: _is_pairs(v, bytes), "[str, bin] pairs"))),
    (22, ShardsTaken, (("shard", *_UINT), ("previous", *_UINT),
                       ("vshards", _is_vshards, f"an array of ints 0..{VSHARDS - 1}, each once"))),
    (23, ReplicasQuery, (("shard", *_UINT),
                         ("vshards", _is_vshards, f"an array of ints 0..{VSHARDS - 1}, each once"))),
)


def _check_layout(cls: type[PeerMessage], spec: _Spec) -> None:
    """Refuse to load if a dataclass's fields are not its wire fields, in the same order."""
    if tuple(f.name for f in fields(cls)) != tuple(field for field, _, _ in spec):
        raise RuntimeError(f"{cls.__name__}'s fields and its wire layout differ")


_check_layout(Forward, _FORWARD_SPEC)
_check_layout(DurableForward, _DURABLE_SPEC)
_check_layout(Retain, _RETAIN_SPEC)
for _, _cls, _spec in _SIMPLE:
    _check_layout(_cls, _spec)

# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------

_PUBLISH: Final = PacketType.PUBLISH


def _property_block(props: Properties, what: str = "Forward") -> bytes | None:
    if props.topic_alias is not None or props.subscription_identifiers:
        raise ValueError(f"{what}.properties: topic_alias and subscription_identifiers "
                         "are not forwarded")
    block = encode_properties(props, _PUBLISH)
    return None if block == b"\x00" else block  # an empty Properties() other than the shared one


def _wire_forward(m: Forward) -> tuple[Any, ...]:
    qos = m.qos
    hops = m.hops
    if not 0 <= qos <= 2 or hops < 0:
        raise ValueError(f"Forward: qos must be 0..2 and hops >= 0, got {qos!r} and {hops!r}")
    props = m.properties
    expires_at = m.expires_at
    return (
        _KIND_FORWARD,
        m.topic,
        m.payload,
        qos,
        m.retain,
        None if props is NO_PROPERTIES else _property_block(props),
        None if expires_at is None else float(expires_at),  # an int type-checks as a float
        m.origin,
        m.non_shared,
        m.groups,
        hops,
    )


def _wire_durable(m: DurableForward) -> tuple[Any, ...]:
    if m.origin_shard < 0 or m.seq < 1:
        raise ValueError(f"DurableForward: origin_shard must be >= 0 and seq >= 1, "
                         f"got {m.origin_shard!r} and {m.seq!r}")
    if m.mid < 0:
        raise ValueError(f"DurableForward: mid must be >= 0, got {m.mid!r}")
    if m.target is not None and not _is_target(m.target):
        raise ValueError("DurableForward: target must be (client id, subscription ids, source)")
    if not m.mid and m.target is None:  # as written before publishes were numbered
        return (_KIND_DURABLE, m.origin_shard, m.seq, _wire_forward(m.forward))
    return (_KIND_DURABLE, m.origin_shard, m.seq, _wire_forward(m.forward), m.mid, m.target)


def _wire_retain(m: Retain) -> tuple[Any, ...]:
    props, expires_at = m.properties, m.expires_at
    if not 0 <= m.qos <= 2 or m.stamp < 0:
        raise ValueError(f"Retain: qos must be 0..2 and stamp >= 0, got {m.qos!r} and {m.stamp!r}")
    if not m.payload and (m.qos or props != NO_PROPERTIES or expires_at is not None):
        raise ValueError("Retain: a delete (empty payload) has qos 0, no properties and no expiry")
    return (
        _KIND_RETAIN,
        m.topic,
        m.payload,
        m.qos,
        None if props is NO_PROPERTIES else _property_block(props, "Retain"),
        None if expires_at is None else float(expires_at),
        m.stamp,
        m.node,
    )


def _simple_encoder(
    kind: int, cls: type[PeerMessage], spec: _Spec
) -> Callable[[Any], tuple[Any, ...]]:
    checks = tuple(check for _, check, _ in spec)
    get: Callable[[Any], Any] = attrgetter(*(field for field, _, _ in spec))
    single = len(spec) == 1  # attrgetter of one name returns the value, not a tuple

    def wire(m: Any) -> tuple[Any, ...]:
        values = (get(m),) if single else get(m)
        for check, v in zip(checks, values):
            if not check(v):
                raise ValueError(_problem(cls.__name__, spec, values))
        return (kind, *values)

    return wire


_ENCODERS: Final[dict[type, Callable[[Any], tuple[Any, ...]]]] = {
    Forward: _wire_forward,
    DurableForward: _wire_durable,
    Retain: _wire_retain,
    **{cls: _simple_encoder(kind, cls, spec) for kind, cls, spec in _SIMPLE},
}

_packb: Final[Callable[[object], bytes]] = msgpack.packb


def from_sender(messages: Sequence[PeerMessage], sender: int) -> None:
    """Name ``sender`` as the shard that sent each of ``messages`` (every kind but ``Forward``
    and ``Retain`` names it: ``DurableForward.origin_shard``, the others' ``shard``). A worker of another node
    names itself by its index on its own node; the receiver knows it by its remote peer id."""
    for m in messages:
        if isinstance(m, (Forward, Retain)):
            continue
        if isinstance(m, DurableForward):
            m.origin_shard = sender
        else:
            m.shard = sender


def encode_batch(messages: Sequence[PeerMessage]) -> bytes:
    """The bytes of ``messages``, in order (an empty sequence is a valid batch)."""
    try:
        body = _packb([_ENCODERS[type(m)](m) for m in messages])
    except KeyError as exc:
        raise TypeError(f"not a peer message: {exc.args[0].__name__}") from None
    except (OverflowError, struct.error) as exc:
        raise ValueError(_cannot_carry(exc)) from None
    return _HEADER + body


def encode_message(message: PeerMessage) -> bytes:
    """The bytes of one message (same header as a batch; ``decode_message`` reads it)."""
    wire = _ENCODERS.get(type(message))
    if wire is None:
        raise TypeError(f"not a peer message: {type(message).__name__}")
    try:
        body = _packb(wire(message))
    except (OverflowError, struct.error) as exc:
        raise ValueError(_cannot_carry(exc)) from None
    return _HEADER + body


def _cannot_carry(exc: Exception) -> str:
    if isinstance(exc, OverflowError):
        return "an integer does not fit in 64 bits"
    return f"Forward.properties: a value out of range ({exc})"  # from encode_properties


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------

def _properties(block: bytes, what: str = "Forward") -> Properties:
    try:
        props = decode_properties(block, _PUBLISH)
    except ProtocolError as exc:
        raise PeerFormatError(f"{what}.properties: {exc.message}") from None
    if props.topic_alias is not None or props.subscription_identifiers:
        raise PeerFormatError(f"{what}.properties: topic_alias or subscription_identifiers")
    return props


def _forward(item: tuple[Any, ...]) -> Forward:
    try:
        _, topic, payload, qos, retain, block, expires_at, origin, non_shared, groups, hops = item
    except ValueError:
        raise PeerFormatError(_problem("Forward", _FORWARD_SPEC, item[1:])) from None
    if (
        type(topic) is not str
        or type(payload) is not bytes
        or type(qos) is not int
        or not 0 <= qos <= 2
        or type(retain) is not bool
        or (expires_at is not None and type(expires_at) is not float)
        or (origin is not None and type(origin) is not str)
        or type(non_shared) is not bool
        or type(groups) is not tuple
        or (groups and not _is_groups(groups))
        or type(hops) is not int
        or hops < 0
    ):
        raise PeerFormatError(_problem("Forward", _FORWARD_SPEC, item[1:]))
    if block is None:
        props = NO_PROPERTIES
    elif type(block) is bytes:
        props = _properties(block)
    else:
        raise PeerFormatError(_problem("Forward", _FORWARD_SPEC, item[1:]))
    return Forward(topic, payload, qos, retain, props, expires_at, origin, non_shared, groups, hops)


def _durable(item: tuple[Any, ...]) -> DurableForward:
    values = item[1:]
    if len(values) == 3:  # as written before publishes were numbered
        values = (*values, 0, None)
    if len(values) != len(_DURABLE_SPEC):
        raise PeerFormatError(f"DurableForward: expected 3 or 5 fields, got {len(values)}")
    origin_shard, seq, inner, mid, target = values
    if (
        type(origin_shard) is not int
        or origin_shard < 0
        or type(seq) is not int
        or seq < 1
        or type(inner) is not tuple
        or type(mid) is not int
        or mid < 0
        or (target is not None and not _is_target(target))
    ):
        raise PeerFormatError(_problem("DurableForward", _DURABLE_SPEC, values))
    if not inner or type(inner[0]) is not int or inner[0] != _KIND_FORWARD:
        raise PeerFormatError("DurableForward.forward: expected a Forward item")
    return DurableForward(origin_shard, seq, _forward(inner), mid, target)


def _retain(item: tuple[Any, ...]) -> Retain:
    values = item[1:]
    if len(values) != len(_RETAIN_SPEC) or not all(
            check(v) for (_, check, _), v in zip(_RETAIN_SPEC, values)):
        raise PeerFormatError(_problem("Retain", _RETAIN_SPEC, values))
    topic, payload, qos, block, expires_at, stamp, node = values
    props = NO_PROPERTIES if block is None else _properties(block, "Retain")
    if not payload and (qos or props != NO_PROPERTIES or expires_at is not None):
        raise PeerFormatError("Retain: a delete (empty payload) with qos, properties or an expiry")
    return Retain(topic, payload, qos, props, expires_at, stamp, node)


def _simple_decoder(
    cls: type[PeerMessage], spec: _Spec
) -> Callable[[tuple[Any, ...]], PeerMessage]:
    n = len(spec) + 1
    checks = tuple(check for _, check, _ in spec)
    make: Callable[..., PeerMessage] = cls

    def decode(item: tuple[Any, ...]) -> PeerMessage:
        values = item[1:]
        if len(item) != n:
            raise PeerFormatError(_problem(cls.__name__, spec, values))
        for check, v in zip(checks, values):
            if not check(v):
                raise PeerFormatError(_problem(cls.__name__, spec, values))
        return make(*values)

    return decode


_DECODERS: Final[dict[int, Callable[[tuple[Any, ...]], PeerMessage]]] = {
    _KIND_FORWARD: _forward,
    _KIND_DURABLE: _durable,
    _KIND_RETAIN: _retain,
    **{kind: _simple_decoder(cls, spec) for kind, cls, spec in _SIMPLE},
}

_unpackb: Final[Callable[..., object]] = msgpack.unpackb
_ExtraData: Final[type[Exception]] = msgpack.ExtraData
_FormatError: Final[type[Exception]] = msgpack.FormatError
_StackError: Final[type[Exception]] = msgpack.StackError


def _body(data: bytes | bytearray | memoryview) -> object:
    """Check the header and unpack what follows it."""
    if len(data) < _HEADER_LEN:
        if _MAGIC.startswith(bytes(data[:3])):
            raise PeerFormatError(f"truncated: {len(data)} bytes, the header alone is "
                                  f"{_HEADER_LEN}")
        raise PeerFormatError("not a peer message (bad magic)")
    if data[:3] != _MAGIC:
        raise PeerFormatError("not a peer message (bad magic)")
    if data[3] != PEER_PROTOCOL_VERSION:
        raise PeerFormatError(f"peer format version {data[3]} is not supported "
                              f"(this shard reads version {PEER_PROTOCOL_VERSION})")
    try:
        return _unpackb(memoryview(data)[_HEADER_LEN:], use_list=False, raw=False)
    except _ExtraData:
        raise PeerFormatError("trailing bytes after the encoded value") from None
    except _FormatError:
        raise PeerFormatError("malformed MessagePack") from None
    except _StackError:
        raise PeerFormatError("MessagePack nested too deeply") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 (msgpack: "other exceptions can be raised")
        # Mostly ValueError("Unpack failed: incomplete input"); also invalid UTF-8,
        # malformed timestamps, map keys of a type a dict cannot hold.
        raise PeerFormatError(f"truncated or malformed: {exc}") from None


def _item(item: object) -> PeerMessage:
    if type(item) is not tuple:
        raise PeerFormatError(f"expected a message item (an array), got {_describe(item)}")
    if not item:
        raise PeerFormatError("empty message item (no kind)")
    kind = item[0]
    decode = _DECODERS.get(kind) if type(kind) is int else None
    if decode is None:
        raise PeerFormatError(f"unknown message kind {_describe(kind)}")
    return decode(item)


def decode_batch(data: bytes | bytearray | memoryview) -> list[PeerMessage]:
    """The messages of a batch made by ``encode_batch``, in order."""
    items = _body(data)
    if type(items) is not tuple:
        raise PeerFormatError(f"expected a batch (an array of items), got {_describe(items)}")
    if items and type(items[0]) is int:
        raise PeerFormatError("expected a batch, got a single message")
    out: list[PeerMessage] = []
    append = out.append
    decoders = _DECODERS
    for item in items:
        # _item() inlined for the common case: an array starting with a known int kind.
        if type(item) is tuple and item and type(item[0]) is int and item[0] in decoders:
            append(decoders[item[0]](item))
        else:
            append(_item(item))
    return out


def decode_message(data: bytes | bytearray | memoryview) -> PeerMessage:
    """The message made by ``encode_message``."""
    item = _body(data)
    if type(item) is tuple and item and type(item[0]) is tuple:
        raise PeerFormatError("expected a single message, got a batch")
    return _item(item)
