"""A small MQTT 5 client that logs in by SCRAM (enhanced authentication, MQTT 5 section 4.12),
usable as it is and as an example of the exchange (common clients such as paho-mqtt cannot do
an AUTH exchange):

    CONNECT (Authentication Method, client-first)  ->
                                                   <-  AUTH 0x18 (server-first)
    AUTH 0x18 (client-final)                       ->
                                                   <-  CONNACK 0x00 (server-final)

then, for a re-authentication, AUTH 0x19 (client-first), AUTH 0x18 both ways and AUTH 0x00.
The server's final message is checked (``scramp``), so the client knows the server holds its
keys, not just that it was let in.

    echo "$PASSWORD" | python -m loadtests.scram_client --port 1883 --user alice \\
        --method SCRAM-SHA-256 --password-stdin --publish demo/hello hi --reauth

It does not import the broker: the packets are built here and by ``mqttwire``.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import ssl
import struct
import sys

import scramp

from loadtests.mqttwire import publish, read_varint, subscribe, utf8, varint

AUTH_METHOD, AUTH_DATA, REASON_STRING = 0x15, 0x16, 0x1F
CONNACK, PUBLISH, PUBACK, SUBACK, DISCONNECT, AUTH = 2, 3, 4, 9, 14, 15


class ScramError(Exception):
    """The broker refused, or did not prove that it knows the user's keys."""


def _props(data: dict[int, bytes]) -> bytes:
    out = b""
    for pid, value in data.items():
        out += bytes((pid,)) + (utf8(value) if pid == AUTH_METHOD else struct.pack("!H", len(value)) + value)
    return varint(len(out)) + out


def _parse_props(body: bytes, pos: int) -> dict[int, bytes]:
    """The string and binary properties this client reads (others are skipped by their size)."""
    length, pos = read_varint(body, pos)
    end, out = pos + length, {}
    sizes = {0x01: 1, 0x02: 4, 0x11: 4, 0x13: 2, 0x21: 2, 0x22: 2, 0x23: 2, 0x24: 1, 0x25: 1, 0x27: 4,
             0x28: 1, 0x29: 1, 0x2A: 1}
    while pos < end:
        pid = body[pos]
        pos += 1
        if pid in sizes:
            pos += sizes[pid]
        elif pid == 0x0B:
            _, pos = read_varint(body, pos)
        elif pid == 0x26:  # user property: two strings
            for _ in range(2):
                (n,) = struct.unpack_from("!H", body, pos)
                pos += 2 + n
        else:
            (n,) = struct.unpack_from("!H", body, pos)
            out[pid] = body[pos + 2:pos + 2 + n]
            pos += 2 + n
    return out


class ScramMqttClient:
    """One blocking connection. ``connect`` logs in; ``reauthenticate``, ``publish``,
    ``subscribe`` and ``receive`` after that."""

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None = None, timeout: float = 10.0) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock: socket.socket = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        self._buf = b""
        self.method = ""
        self._next_id = 1

    def _packet(self) -> tuple[int, int, bytes]:
        """(type, flags, body) of the next packet; ``ScramError`` when the broker closes."""
        while True:
            if len(self._buf) >= 2:
                try:
                    length, start = read_varint(self._buf, 1)
                except (IndexError, ValueError):
                    length, start = -1, 0
                if length >= 0 and len(self._buf) >= start + length:
                    first, body = self._buf[0], self._buf[start:start + length]
                    self._buf = self._buf[start + length:]
                    return first >> 4, first & 0x0F, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ScramError("the broker closed the connection")
            self._buf += chunk

    def _expect_auth_step(self, client: scramp.ScramClient) -> dict[int, bytes]:
        kind, _flags, body = self._packet()
        if kind == AUTH and body[0] == 0x18:
            props = _parse_props(body, 1)
            client.set_server_first(props.get(AUTH_DATA, b"").decode())
            return props
        raise ScramError(self._refusal(kind, body, "AUTH 0x18"))

    @staticmethod
    def _refusal(kind: int, body: bytes, wanted: str) -> str:
        code = body[1] if kind == CONNACK else body[0] if body else 0
        props = _parse_props(body, 2 if kind == CONNACK else 1) if len(body) > (2 if kind == CONNACK else 1) else {}
        why = props.get(REASON_STRING, b"").decode(errors="replace")
        return f"expected {wanted}, got packet type {kind} with reason 0x{code:02X}" + (f": {why}" if why else "")

    def connect(self, client_id: str, user: str, password: str, method: str = "SCRAM-SHA-256", *,
                keepalive: int = 60, clean: bool = True) -> bool:
        """Log in; returns CONNACK's session present flag. ``ScramError`` when refused."""
        self.method = method
        client = scramp.ScramClient([method], user, password)
        props = _props({AUTH_METHOD: method.encode(), AUTH_DATA: client.get_client_first().encode()})
        body = utf8("MQTT") + bytes((5, 0x02 if clean else 0)) + struct.pack("!H", keepalive) + props + utf8(client_id)
        self.sock.sendall(bytes((0x10,)) + varint(len(body)) + body)
        self._expect_auth_step(client)
        final = _props({AUTH_METHOD: method.encode(), AUTH_DATA: client.get_client_final().encode()})
        self.sock.sendall(bytes((0xF0,)) + varint(1 + len(final)) + b"\x18" + final)
        kind, _flags, body = self._packet()
        if kind != CONNACK or body[1] != 0:
            raise ScramError(self._refusal(kind, body, "CONNACK 0x00"))
        client.set_server_final(_parse_props(body, 2).get(AUTH_DATA, b"").decode())  # raises if not the server's
        return bool(body[0] & 1)

    def reauthenticate(self, user: str, password: str) -> None:
        """AUTH 0x19 and the rest of the exchange (packets that arrive meanwhile are dropped here)."""
        client = scramp.ScramClient([self.method], user, password)
        first = _props({AUTH_METHOD: self.method.encode(), AUTH_DATA: client.get_client_first().encode()})
        self.sock.sendall(bytes((0xF0,)) + varint(1 + len(first)) + b"\x19" + first)
        self._expect_auth_step(client)
        final = _props({AUTH_METHOD: self.method.encode(), AUTH_DATA: client.get_client_final().encode()})
        self.sock.sendall(bytes((0xF0,)) + varint(1 + len(final)) + b"\x18" + final)
        while True:
            kind, _flags, body = self._packet()
            if kind == AUTH and body[0] == 0:
                client.set_server_final(_parse_props(body, 1).get(AUTH_DATA, b"").decode())
                return
            if kind in (AUTH, DISCONNECT):
                raise ScramError(self._refusal(kind, body, "AUTH 0x00"))

    def publish(self, topic: str, payload: bytes) -> int:
        """QoS 1; returns PUBACK's reason code."""
        pid, self._next_id = self._next_id, self._next_id % 65535 + 1
        self.sock.sendall(publish(topic, payload, qos=1, packet_id=pid, proto=5))
        while True:
            kind, _flags, body = self._packet()
            if kind == PUBACK and struct.unpack_from("!H", body)[0] == pid:
                return body[2] if len(body) > 2 else 0
            if kind == DISCONNECT:
                raise ScramError(self._refusal(kind, body, "PUBACK"))

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Returns SUBACK's reason code."""
        pid, self._next_id = self._next_id, self._next_id % 65535 + 1
        self.sock.sendall(subscribe(pid, [(topic_filter, qos)], proto=5))
        while True:
            kind, _flags, body = self._packet()
            if kind == SUBACK:
                length, pos = read_varint(body, 2)
                return body[pos + length]
            if kind == DISCONNECT:
                raise ScramError(self._refusal(kind, body, "SUBACK"))

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.scram_client", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--user", required=True)
    ap.add_argument("--method", default="SCRAM-SHA-256", choices=["SCRAM-SHA-256", "SCRAM-SHA-512"])
    ap.add_argument("--client-id", default="scram-client")
    ap.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    ap.add_argument("--cafile", help="connect with TLS, trusting this CA")
    ap.add_argument("--publish", nargs=2, metavar=("TOPIC", "MESSAGE"), help="publish one QoS 1 message")
    ap.add_argument("--reauth", action="store_true", help="re-authenticate once after logging in")
    args = ap.parse_args(argv)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass()
    tls = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    try:
        client = ScramMqttClient(args.host, args.port, tls=tls)
        client.connect(args.client_id, args.user, password, args.method)
        print(f"connected as {args.user} by {args.method}; the server proved it holds the keys")
        if args.reauth:
            client.reauthenticate(args.user, password)
            print("re-authenticated")
        if args.publish:
            code = client.publish(args.publish[0], args.publish[1].encode())
            print(f"published to {args.publish[0]}: PUBACK 0x{code:02X}")
        client.close()
    except (ScramError, scramp.ScramException, OSError) as exc:
        print(f"scram_client: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
