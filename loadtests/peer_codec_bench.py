"""Micro-benchmark of the encodings considered for the messages between shards.

    python -m loadtests.peer_codec_bench [--repeat 5] [--loops 100]

Prints, for each option, µs per message to encode and to decode a batch of 200
``Forward`` (20-character topic, 64-byte payload, no properties) and a batch of
200 mixed messages (every kind; 3 in 20 with properties; groups, origin, expiry),
and the encoded bytes per message. Each figure is the best of ``--repeat`` runs
of ``--loops`` batches; the whole run takes a few seconds.

Options
    marshal, lists       today's bus: ``marshal`` of plain lists, no dataclasses
                         (the floor; not valid between hosts or interpreters)
    marshal              the same, from and to the dataclasses, fields checked
    msgpack (module)     ``shardbroker.peer.messages`` itself
    cbor2                plain lists through ``cbor2``, fields checked
    struct               a hand-written ``struct`` format, fields checked

Every option except the first converts from and to the dataclasses and checks
each decoded field as ``shardbroker.peer.messages`` does (types, ranges, the
property block), and builds ``Forward`` the same way (slots set directly), so
that the figures differ by the serialization alone. Each option's round trip is
checked before it is timed.

Not done here: no I/O, no ZeroMQ; single-threaded, one process.
"""

from __future__ import annotations

import argparse
import marshal
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import cbor2

from shardbroker.peer import messages as pm
from shardbroker.peer.messages import (
    DurableForward,
    Forward,
    ForwardAck,
    PeerFormatError,
    PeerMessage,
    ResendRequest,
    RouteAck,
    RouteAdd,
    RouteRemove,
    Routes,
    RoutesQuery,
)
from shardbroker.protocol.codec import decode_properties, encode_properties
from shardbroker.protocol.packets import NO_PROPERTIES, PacketType, Properties

BATCH = 200
Encode = Callable[[Any], bytes]
Decode = Callable[[bytes], Any]

# ---------------------------------------------------------------------------
# The two batches
# ---------------------------------------------------------------------------


def forward_batch() -> list[PeerMessage]:
    # "sensors/room-000/tmp": 20 characters.
    return [Forward(f"sensors/room-{i:03d}/tmp", bytes(64), i % 2, False) for i in range(BATCH)]


def mixed_batch() -> list[PeerMessage]:
    props = Properties(content_type="application/json", user_properties=(("trace", "abc123"),))
    out: list[PeerMessage] = []
    for i in range(BATCH // 20):
        for j in range(10):
            out.append(Forward(
                f"plant/line-{i}/machine-{j}/state", bytes(range(48)) * 2, j % 3, j == 0,
                props if j % 4 == 0 else NO_PROPERTIES,
                1.9e9 + j if j % 2 else None,
                f"client-{i}-{j}" if j % 3 else None,
                j != 5,
                (("workers", f"plant/line-{i}/#"),) if j % 5 == 0 else (),
                j % 2,
            ))
        for j in range(5):
            out.append(DurableForward(3, i * 5 + j + 1, Forward(
                f"orders/{i}/{j}", b"x" * 100, 1, False, NO_PROPERTIES, None, f"shop-{j}")))
        out.append(ForwardAck(2, i * 5))
        out.append(RouteAdd(1, f"plant/line-{i}/+/state", i, i % 2 == 0))
        out.append(RouteRemove(1, f"old/{i}/#"))
        out.append(RouteAck(0, i + 1))
        out.append(ResendRequest(2, i) if i % 2 else RoutesQuery(2))
    out[-1] = Routes(1, tuple((f"plant/line-{k}/#", k % 2 == 0) for k in range(20)))
    return out


# ---------------------------------------------------------------------------
# A plain-list layer shared by marshal and cbor2: the same layout as the module's
# items, checked the same way on the way back.
# ---------------------------------------------------------------------------

_PUBLISH = PacketType.PUBLISH
_new = object.__new__
_FSET = tuple(Forward.__dict__[f].__set__ for f in (
    "topic", "payload", "qos", "retain", "properties", "expires_at", "origin", "non_shared",
    "groups", "hops"))


def _props_out(p: Properties) -> bytes | None:
    return None if p is NO_PROPERTIES else encode_properties(p, _PUBLISH)


def _props_in(block: bytes) -> Properties:
    try:
        props = decode_properties(block, _PUBLISH)
    except Exception as exc:  # noqa: BLE001
        raise PeerFormatError(str(exc)) from None
    if props.topic_alias is not None or props.subscription_identifiers:
        raise PeerFormatError("forbidden property")
    return props


def _fwd_out(m: Forward) -> list[Any]:
    qos = m.qos
    hops = m.hops
    if not 0 <= qos <= 2 or hops < 0:
        raise ValueError("qos or hops")
    exp = m.expires_at
    return [0, m.topic, m.payload, qos, m.retain, _props_out(m.properties),
            None if exp is None else float(exp), m.origin, m.non_shared,
            [list(g) for g in m.groups] if m.groups else [], hops]


def to_lists(m: PeerMessage) -> list[Any]:
    if type(m) is Forward:
        return _fwd_out(m)
    if type(m) is DurableForward:
        return [1, m.origin_shard, m.seq, _fwd_out(m.forward)]
    if type(m) is ForwardAck:
        return [2, m.shard, m.upto]
    if type(m) is ResendRequest:
        return [3, m.shard, m.mark]
    if type(m) is RouteAdd:
        return [4, m.shard, m.key, m.request, m.durable]
    if type(m) is RouteRemove:
        return [5, m.shard, m.key]
    if type(m) is RouteAck:
        return [6, m.shard, m.request]
    if type(m) is RoutesQuery:
        return [7, m.shard]
    assert type(m) is Routes
    return [8, m.shard, [[k, d] for k, d in m.keys]]


def _seq(v: object) -> bool:
    return type(v) is list or type(v) is tuple


def _fwd_in(it: Sequence[Any]) -> Forward:
    _, topic, payload, qos, retain, block, exp, origin, non_shared, groups, hops = it
    if (type(topic) is not str or type(payload) is not bytes or type(qos) is not int
            or not 0 <= qos <= 2 or type(retain) is not bool
            or (exp is not None and type(exp) is not float)
            or (origin is not None and type(origin) is not str) or type(non_shared) is not bool
            or not _seq(groups) or type(hops) is not int or hops < 0):
        raise PeerFormatError("bad Forward")
    if groups:
        if not all(_seq(g) and len(g) == 2 and type(g[0]) is str and type(g[1]) is str
                   for g in groups):
            raise PeerFormatError("bad groups")
        groups = tuple(tuple(g) for g in groups)
    else:
        groups = ()
    if block is None:
        props = NO_PROPERTIES
    elif type(block) is bytes:
        props = _props_in(block)
    else:
        raise PeerFormatError("bad properties")
    m = _new(Forward)
    s = _FSET
    s[0](m, topic)
    s[1](m, payload)
    s[2](m, qos)
    s[3](m, retain)
    s[4](m, props)
    s[5](m, exp)
    s[6](m, origin)
    s[7](m, non_shared)
    s[8](m, groups)
    s[9](m, hops)
    return m


_INT_PAIRS: dict[int, type[ForwardAck | ResendRequest | RouteAck]] = {
    2: ForwardAck, 3: ResendRequest, 6: RouteAck,
}


def _uint(v: object) -> bool:
    return type(v) is int and v >= 0


def from_list(it: Sequence[Any]) -> PeerMessage:
    kind = it[0]
    if kind == 0:
        return _fwd_in(it)
    if kind == 1:
        _, shard, seq, inner = it
        if not _uint(shard) or type(seq) is not int or seq < 1 or not _seq(inner):
            raise PeerFormatError("bad DurableForward")
        return DurableForward(shard, seq, _fwd_in(inner))
    if kind in _INT_PAIRS:
        _, shard, n = it
        if not _uint(shard) or not _uint(n) or (kind == 6 and n < 1):
            raise PeerFormatError("bad ints")
        return _INT_PAIRS[kind](shard, n)
    if kind == 4:
        _, shard, key, request, durable = it
        if not _uint(shard) or type(key) is not str or not _uint(request) or type(durable) is not bool:
            raise PeerFormatError("bad RouteAdd")
        return RouteAdd(shard, key, request, durable)
    if kind == 5:
        _, shard, key = it
        if not _uint(shard) or type(key) is not str:
            raise PeerFormatError("bad RouteRemove")
        return RouteRemove(shard, key)
    if kind == 7:
        _, shard = it
        if not _uint(shard):
            raise PeerFormatError("bad RoutesQuery")
        return RoutesQuery(shard)
    _, shard, keys = it
    if not _uint(shard) or not all(_seq(p) and len(p) == 2 and type(p[0]) is str
                                   and type(p[1]) is bool for p in keys):
        raise PeerFormatError("bad Routes")
    return Routes(shard, tuple((k, d) for k, d in keys))


def marshal_encode(ms: Sequence[PeerMessage]) -> bytes:
    return marshal.dumps([to_lists(m) for m in ms])


def marshal_decode(data: bytes) -> list[PeerMessage]:
    return [from_list(it) for it in marshal.loads(data)]


def cbor2_encode(ms: Sequence[PeerMessage]) -> bytes:
    return cbor2.dumps([to_lists(m) for m in ms])


def cbor2_decode(data: bytes) -> list[PeerMessage]:
    return [from_list(it) for it in cbor2.loads(data)]


# ---------------------------------------------------------------------------
# A hand-written struct format
#   batch   := "SBS" version:u8 count:u32 message*
#   Forward := 0:u8 flags:u8 hops:u16 len(topic):u16 len(payload):u32 len(origin):u16
#              len(props):u32 ngroups:u16 expires_at:f64, then topic payload origin props,
#              then per group: len:u16 group len:u16 filter
#   flags   := qos (bits 0-1) | retain 4 | non_shared 8 | has origin 16 | has expires_at 32
#   others  := kind:u8, ints u64, strings len:u16 + UTF-8, bools u8
# ---------------------------------------------------------------------------

_S_HEAD = struct.Struct("<3sBI")
_S_FWD = struct.Struct("<BBHHIHIHd")
_S_DUR = struct.Struct("<BQQ")
_S_2Q = struct.Struct("<BQQ")
_S_Q = struct.Struct("<BQ")
_S_H = struct.Struct("<H")
_S_B = struct.Struct("<B")
_S_QH = struct.Struct("<BQH")
_S_QI = struct.Struct("<BQI")
_S_QB = struct.Struct("<QB")


def _s_str(s: str) -> bytes:
    b = s.encode()
    return _S_H.pack(len(b)) + b


def _s_fwd(m: Forward, kind: int, out: list[bytes]) -> None:
    t = m.topic.encode()
    origin = m.origin
    o = b"" if origin is None else origin.encode()
    qos = m.qos
    if not 0 <= qos <= 2 or m.hops < 0:
        raise ValueError("qos or hops")
    exp = m.expires_at
    p = m.payload
    g = m.groups
    props = m.properties
    pr = b"" if props is NO_PROPERTIES else encode_properties(props, _PUBLISH)
    flags = (qos | (4 if m.retain else 0) | (8 if m.non_shared else 0)
             | (0 if origin is None else 16) | (0 if exp is None else 32))
    out += (_S_FWD.pack(kind, flags, m.hops, len(t), len(p), len(o), len(pr), len(g),
                        0.0 if exp is None else exp), t, p, o, pr)
    for group, flt in g:
        out += (_s_str(group), _s_str(flt))


def struct_encode(ms: Sequence[PeerMessage]) -> bytes:
    out = [_S_HEAD.pack(b"SBS", 1, len(ms))]
    for m in ms:
        if type(m) is Forward:
            _s_fwd(m, 0, out)
        elif type(m) is DurableForward:
            out.append(_S_DUR.pack(1, m.origin_shard, m.seq))
            _s_fwd(m.forward, 0, out)
        elif type(m) is ForwardAck:
            out.append(_S_2Q.pack(2, m.shard, m.upto))
        elif type(m) is ResendRequest:
            out.append(_S_2Q.pack(3, m.shard, m.mark))
        elif type(m) is RouteAdd:
            out += (_S_Q.pack(4, m.shard), _s_str(m.key), _S_QB.pack(m.request, m.durable))
        elif type(m) is RouteRemove:
            out += (_S_Q.pack(5, m.shard), _s_str(m.key))
        elif type(m) is RouteAck:
            out.append(_S_2Q.pack(6, m.shard, m.request))
        elif type(m) is RoutesQuery:
            out.append(_S_Q.pack(7, m.shard))
        elif type(m) is Routes:
            out.append(_S_QI.pack(8, m.shard, len(m.keys)))
            for key, durable in m.keys:
                out += (_s_str(key), b"\x01" if durable else b"\x00")
    return b"".join(out)


def _r_str(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = _S_H.unpack_from(data, pos)
    pos += 2
    end = pos + n
    if end > len(data):
        raise PeerFormatError("truncated")
    return data[pos:end].decode(), end


def _r_fwd(data: bytes, pos: int) -> tuple[Forward, int]:
    _, flags, hops, tl, pl, ol, prl, ng, exp = _S_FWD.unpack_from(data, pos)
    pos += _S_FWD.size
    a = pos + tl
    b = a + pl
    c = b + ol
    e = c + prl
    if e > len(data) or flags & 0xC0 or flags & 3 == 3:
        raise PeerFormatError("bad Forward")
    topic = data[pos:a].decode()
    origin = data[b:c].decode() if flags & 16 else None
    props = _props_in(data[c:e]) if prl else NO_PROPERTIES
    groups: tuple[tuple[str, str], ...] = ()
    if ng:
        gl = []
        for _ in range(ng):
            group, e = _r_str(data, e)
            flt, e = _r_str(data, e)
            gl.append((group, flt))
        groups = tuple(gl)
    m = _new(Forward)
    s = _FSET
    s[0](m, topic)
    s[1](m, data[a:b])
    s[2](m, flags & 3)
    s[3](m, flags & 4 != 0)
    s[4](m, props)
    s[5](m, exp if flags & 32 else None)
    s[6](m, origin)
    s[7](m, flags & 8 != 0)
    s[8](m, groups)
    s[9](m, hops)
    return m, e


def struct_decode(data: bytes) -> list[PeerMessage]:
    try:
        magic, version, count = _S_HEAD.unpack_from(data, 0)
        if magic != b"SBS" or version != 1:
            raise PeerFormatError("bad header")
        pos = _S_HEAD.size
        out: list[PeerMessage] = []
        append = out.append
        m: PeerMessage
        for _ in range(count):
            kind = data[pos]
            if kind == 0:
                m, pos = _r_fwd(data, pos)
            elif kind == 1:
                _, shard, seq = _S_DUR.unpack_from(data, pos)
                if seq < 1:
                    raise PeerFormatError("seq")
                f, pos = _r_fwd(data, pos + _S_DUR.size)
                m = DurableForward(shard, seq, f)
            elif kind in _INT_PAIRS:
                _, shard, n = _S_2Q.unpack_from(data, pos)
                pos += _S_2Q.size
                if kind == 6 and n < 1:
                    raise PeerFormatError("request")
                m = _INT_PAIRS[kind](shard, n)
            elif kind in (4, 5):
                _, shard = _S_Q.unpack_from(data, pos)
                key, pos = _r_str(data, pos + _S_Q.size)
                if kind == 5:
                    m = RouteRemove(shard, key)
                else:
                    request, durable = _S_QB.unpack_from(data, pos)
                    pos += _S_QB.size
                    if durable > 1:
                        raise PeerFormatError("bool")
                    m = RouteAdd(shard, key, request, durable == 1)
            elif kind == 7:
                _, shard = _S_Q.unpack_from(data, pos)
                pos += _S_Q.size
                m = RoutesQuery(shard)
            elif kind == 8:
                _, shard, n = _S_QI.unpack_from(data, pos)
                pos += _S_QI.size
                keys = []
                for _ in range(n):
                    key, pos = _r_str(data, pos)
                    flag = data[pos]
                    if flag > 1:
                        raise PeerFormatError("bool")
                    keys.append((key, flag == 1))
                    pos += 1
                m = Routes(shard, tuple(keys))
            else:
                raise PeerFormatError("kind")
            append(m)
    except (struct.error, IndexError, UnicodeDecodeError):
        raise PeerFormatError("truncated or malformed") from None
    if pos != len(data):
        raise PeerFormatError("trailing bytes")
    return out


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def _as_lists(ms: Sequence[PeerMessage]) -> list[list[Any]]:
    return [to_lists(m) for m in ms]


OPTIONS: tuple[tuple[str, Callable[[list[PeerMessage]], Any], Encode, Decode], ...] = (
    ("marshal, lists (today)", _as_lists, marshal.dumps, marshal.loads),
    ("marshal", list, marshal_encode, marshal_decode),
    ("msgpack (the module)", list, pm.encode_batch, pm.decode_batch),
    ("cbor2", list, cbor2_encode, cbor2_decode),
    ("struct", list, struct_encode, struct_decode),
)


def best_us(fn: Callable[[Any], Any], arg: Any, loops: int, repeat: int) -> float:
    """Best time of ``repeat`` runs of ``loops`` calls, in µs per message of the batch."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn(arg)
        best = min(best, time.perf_counter() - t0)
    return best / loops / BATCH * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs per figure; the best is kept")
    ap.add_argument("--loops", type=int, default=100, help="batches per run")
    args = ap.parse_args(argv)
    batches = (("Forward", forward_batch()), ("mixed", mixed_batch()))
    head = f"{'option':<24}" + "".join(
        f" | {name + ' enc':>12} {'dec':>6} {'total':>6} {'B/msg':>6}" for name, _ in batches)
    print(f"µs per message, batches of {BATCH}, best of {args.repeat} x {args.loops}")
    print(head)
    print("-" * len(head))
    for label, prepare, encode, decode in OPTIONS:
        row = f"{label:<24}"
        for _, batch in batches:
            value = prepare(batch)
            data = encode(value)
            if decode(data) != value:
                raise SystemExit(f"{label}: round trip differs")
            enc = best_us(encode, value, args.loops, args.repeat)
            dec = best_us(decode, data, args.loops, args.repeat)
            row += f" | {enc:>12.2f} {dec:>6.2f} {enc + dec:>6.2f} {len(data) / BATCH:>6.1f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
