"""22: flow control. A publisher faster than its subscribers is held back (TCP back-pressure)
instead of being read into memory and dropped; a stuck subscriber does not hold the others
back for longer than the slow-consumer grace, and only its own QoS 0 copies are dropped."""

from __future__ import annotations

import socket
import threading
import time

import mqttbytes as mb
from conftest import client_id_on_shard, skip_unless_shardbroker, wait_until

SHARDS = 2
N = 150_000
PAYLOAD = 300  # 150,000 x ~320 bytes: about 48 MB, beyond every buffer on the way


def _subscriber(port: int, cid: str, topic: str, rcvbuf: int | None = None) -> mb.RawClient:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so that the window stays small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    c = mb.RawClient(port=port, sock=sock)
    c.connect_mqtt(cid, version=4)
    c.subscribe(topic, 0)
    return c


def _flood(port: int, cid: str, blob: bytes) -> threading.Thread:
    pub = mb.RawClient(port=port)
    pub.connect_mqtt(cid, version=4)

    def run() -> None:
        assert pub.sock is not None
        pub.sock.settimeout(60)
        pub.sock.sendall(blob)  # blocks while the broker holds it back

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.pub = pub  # type: ignore[attr-defined]
    return t


def _read_exactly(sock: socket.socket, n: int, timeout: float) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _blob(topic: str) -> bytes:
    # 3.1.1 QoS 0 without retain: the broker forwards exactly these bytes to a QoS 0 subscriber
    return b"".join(mb.publish(topic, i.to_bytes(4, "big") * (PAYLOAD // 4)) for i in range(N))


def test_fast_publisher_is_held_back_while_a_subscriber_catches_up(make_broker, uniq):
    skip_unless_shardbroker("flow control")
    b = make_broker(workers=SHARDS)
    topic = uniq.topic()
    sub = _subscriber(b.port, client_id_on_shard(uniq.prefix("s"), 0, SHARDS), topic, rcvbuf=32768)
    blob = _blob(topic)
    t = _flood(b.port, client_id_on_shard(uniq.prefix("p"), 1, SHARDS), blob)  # crosses shards
    time.sleep(0.6)  # the subscriber reads nothing for a while: buffers fill, the broker holds
    assert t.is_alive(), "the publisher was read in full while its subscriber read nothing"
    assert sub.sock is not None
    got = _read_exactly(sub.sock, len(blob), timeout=20)
    t.join(20)
    assert len(got) == len(blob), f"received {len(got)} of {len(blob)} bytes"
    assert got == blob  # every message, in order, none dropped
    t.pub.close()  # type: ignore[attr-defined]
    sub.close()


def test_stuck_subscriber_is_cut_loose_and_the_others_get_everything(make_broker, uniq):
    skip_unless_shardbroker("flow control")
    b = make_broker(workers=SHARDS, config="[server]\nsys_interval = 0.3\n")
    topic = uniq.topic()
    pre = uniq.prefix("s")
    stuck = _subscriber(b.port, client_id_on_shard(pre + "a", 0, SHARDS), topic, rcvbuf=8192)
    reader = _subscriber(b.port, client_id_on_shard(pre + "b", 0, SHARDS), topic)
    blob = _blob(topic)
    started = time.monotonic()
    t = _flood(b.port, client_id_on_shard(uniq.prefix("p"), 1, SHARDS), blob)
    assert reader.sock is not None
    got = _read_exactly(reader.sock, len(blob), timeout=30)
    took = time.monotonic() - started
    t.join(20)
    assert len(got) == len(blob), f"the reading subscriber got {len(got)} of {len(blob)} bytes"
    assert got == blob
    assert took < 20, f"a stuck subscriber held the others back for {took:.1f}s"
    # the stuck one's copies beyond its buffer were dropped, and counted
    watcher = mb.RawClient(port=b.port)
    watcher.connect_mqtt(client_id_on_shard(pre + "w", 0, SHARDS), version=4)
    watcher.subscribe("$SYS/shardbroker/shard/0/dropped_queue_full", 0)
    dropped = wait_until(lambda: int(watcher.recv_publish(3).payload) or None, timeout=10,
                         message="a drop counted for the stuck subscriber")
    assert 0 < dropped < N
    for c in (stuck, reader, watcher, t.pub):  # type: ignore[attr-defined]
        c.close()


def test_a_client_that_never_reads_is_cut_off_after_it_is_closed(make_broker, uniq):
    """Closing a connection waits for its output to be written, but not for ever: one whose
    client reads nothing is aborted after the close timeout, its unsent bytes dropped."""
    skip_unless_shardbroker("close timeout")
    from shardbroker.transport.tcp import CLOSE_TIMEOUT

    b = make_broker(workers=1)
    topic = uniq.topic()
    cid = uniq.cid("stuck")
    stuck = _subscriber(b.port, cid, topic, rcvbuf=8192)
    pub = mb.RawClient(port=b.port)
    pub.connect_mqtt(uniq.cid("p"), version=4)
    assert pub.sock is not None
    # 30 MB: more than the kernel buffers; 8 MB of it waits in the connection's write buffer
    # (the rest is dropped for this slow consumer)
    pub.sock.settimeout(30)
    pub.sock.sendall(b"".join(mb.publish(topic, b"x" * 1000) for _ in range(30_000)))
    pub.ping(timeout=30)
    taker = mb.RawClient(port=b.port)
    taker.connect_mqtt(cid, version=4)  # takes the session over: the stuck connection is closed
    time.sleep(CLOSE_TIMEOUT + 1.5)
    assert stuck.sock is not None
    stuck.sock.settimeout(5)
    got, ended = 0, False
    try:
        while True:
            chunk = stuck.sock.recv(1 << 16)
            if not chunk:
                ended = True
                break
            got += len(chunk)
    except ConnectionResetError:
        ended = True
    except TimeoutError:
        pass
    assert ended, "the connection was still open"
    # what the kernel had taken still arrives; the connection's own buffer (8 MB) does not
    assert got < 8_000_000, f"{got} bytes were still delivered after the close timeout"
    for c in (stuck, pub, taker):
        c.close()
