"""The control channel: requests and answers between ``shardbroker ctl``, the supervisor and
the processes it runs, over Unix stream sockets.

A frame is a 4-byte big-endian length and that many bytes of JSON (an object). A request is
``{"op": NAME, ...arguments}``; its answer ``{"ok": true, "result": ...}`` or ``{"ok": false,
"error": TEXT}``. One request per connection: connect, write the request, read the answer,
close. JSON because the answers go to people and scripts as they are (``--json``), and a client
ID that is not valid UTF-8 (``limits.strict_utf8 = false``) still encodes (as ``\\udcXX``).

Sockets:

- ``DATA_DIR/control.sock``: the supervisor's, for ``shardbroker ctl``; owner-only (0600),
  no network port. Found through the data directory, so ``ctl --data-dir`` finds the broker
  that serves it.
- ``RUN_DIR/ctl-N.sock`` for worker N (``RUN_DIR`` is the broker's private run directory):
  the supervisor asks every worker at once and names those that did not answer in time
  (``gather``).

A Unix socket path holds at most 107 bytes; a longer one (a deep data directory) is bound and
reached relative to its directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

MAX_FRAME = 256 << 20  # an answer listing every client of a big broker fits
TIMEOUT = 2.0  # seconds a process has to answer
_HEAD = struct.Struct(">I")
_CHDIR = threading.Lock()  # the working directory is the process's: one relative bind at a time

Request = dict[str, Any]
Answer = dict[str, Any]
Handler = Callable[[Request], Any]


class ControlError(Exception):
    """The other end is not there, did not answer in time, or answered with an error."""


class Operations:
    """A handler that answers a request by the operation it names (``ops``: name → method)."""

    ops: dict[str, Handler]

    def __call__(self, request: Request) -> Any:
        op = self.ops.get(request["op"])
        if op is None:
            raise ValueError(f"unknown operation {request['op']!r}")
        return op(request)


def encode(obj: object) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _HEAD.pack(len(body)) + body


def answer_for(handler: Handler, request: object) -> Answer:
    """Run ``handler`` on a decoded request: its result, or the error it raised as text."""
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return {"ok": False, "error": "a request is an object with an 'op'"}
    try:
        return {"ok": True, "result": handler(request)}
    except (ControlError, KeyError, ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc) or type(exc).__name__}


def _short(path: str) -> tuple[str, str | None]:
    """``(address, directory to be in)`` for a socket path, relative when it is too long."""
    if len(os.fsencode(path)) <= 100:
        return path, None
    return os.path.basename(path), os.path.dirname(path) or "."


def bind_unix(path: str, mode: int = 0o600) -> socket.socket:
    """A listening Unix socket at ``path`` (a stale one removed), readable by the owner only."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    address, where = _short(path)
    old_umask = os.umask(0o177)
    try:
        if where is None:
            sock.bind(address)
        else:
            with _CHDIR:
                here = os.open(".", os.O_RDONLY)
                try:
                    os.chdir(where)
                    sock.bind(address)
                finally:
                    os.fchdir(here)
                    os.close(here)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(64)
    return sock


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    address, where = _short(path)
    try:
        if where is None:
            sock.connect(address)
        else:
            # connect(2) resolves a relative path against the working directory; /proc names the
            # directory without changing it
            fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
            try:
                sock.connect(f"/proc/self/fd/{fd}/{address}")
            finally:
                os.close(fd)
    except OSError:
        sock.close()
        raise
    return sock


def call(path: str, request: Request, timeout: float = TIMEOUT) -> Any:
    """Send one request and return the answer's result; ``ControlError`` otherwise."""
    try:
        sock = _connect(path, timeout)
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path}: is the broker running?") from None
    except ConnectionRefusedError:
        raise ControlError(f"nothing answers at {path}: is the broker running?") from None
    except OSError as exc:
        raise ControlError(f"cannot reach {path}: {exc.strerror or exc}") from None
    deadline = time.monotonic() + timeout
    try:
        sock.sendall(encode(request))
        data = b""
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
            if len(data) >= 4 and len(data) >= 4 + _HEAD.unpack_from(data)[0]:
                break
    except TimeoutError:
        raise ControlError(f"{path} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    answer = _decode(data)
    if answer is None:
        raise ControlError(f"{path} closed without an answer")
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "failed")))
    return answer.get("result")


def _decode(data: bytes) -> Answer | None:
    if len(data) < 4:
        return None
    (n,) = _HEAD.unpack_from(data)
    if n > MAX_FRAME or len(data) < 4 + n:
        return None
    try:
        obj = json.loads(data[4:4 + n])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def gather(paths: Mapping[str, str], request: Request, timeout: float = TIMEOUT) -> tuple[dict[str, Any], dict[str, str]]:
    """Ask every process in ``paths`` (name → socket) at once; ``(results by name, why each of
    the others gave none)``. Waits at most ``timeout`` for all of them together."""
    sel = selectors.DefaultSelector()
    results: dict[str, Any] = {}
    missing: dict[str, str] = {}
    pending: dict[str, tuple[socket.socket, bytearray]] = {}
    frame = encode(request)
    for name, path in paths.items():
        try:
            sock = _connect(path, timeout)
            sock.sendall(frame)
        except OSError as exc:
            missing[name] = f"not reachable: {exc.strerror or exc}"
            continue
        sock.setblocking(False)
        pending[name] = (sock, bytearray())
        sel.register(sock, selectors.EVENT_READ, name)
    deadline = time.monotonic() + timeout
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(left):
                name = key.data
                sock, buf = pending[name]
                try:
                    chunk = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    chunk = b""
                    missing[name] = f"failed: {exc.strerror or exc}"
                if chunk:
                    buf += chunk
                    if len(buf) < 4 or len(buf) < 4 + _HEAD.unpack_from(buf)[0]:
                        continue
                sel.unregister(sock)
                sock.close()
                del pending[name]
                answer = _decode(bytes(buf))
                if answer is None:
                    missing.setdefault(name, "closed without an answer")
                elif answer.get("ok"):
                    results[name] = answer.get("result")
                else:
                    missing[name] = f"error: {answer.get('error')}"
        for name, (sock, _) in pending.items():
            missing[name] = f"no answer within {timeout:g} s"
            sock.close()
    finally:
        sel.close()
    return results, missing


class _FrameProtocol(asyncio.Protocol):
    """One request on an asyncio loop: the handler runs on the loop, so it sees the broker's
    state between two events, never in the middle of one."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buf += data
        if len(self._buf) < 4:
            return
        (n,) = _HEAD.unpack_from(self._buf)
        if n > MAX_FRAME:
            self._transport.close()
            return
        if len(self._buf) < 4 + n:
            return
        try:
            request = json.loads(bytes(self._buf[4:4 + n]))
        except ValueError:
            request = None
        self._transport.write(encode(answer_for(self._handler, request)))
        self._transport.close()


async def serve(path: str, handler: Handler) -> asyncio.AbstractServer:
    """Answer requests at ``path`` on the running loop."""
    sock = bind_unix(path)
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: _FrameProtocol(handler), sock=sock)


class ThreadServer:
    """Answer requests at ``path`` from a thread (the supervisor, which runs no event loop)."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._sock = bind_unix(path)
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), name="control-request", daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            data = b""
            try:
                while len(data) < 4 or len(data) < 4 + _HEAD.unpack_from(data)[0]:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        return
                    data += chunk
                    if len(data) >= 4 and _HEAD.unpack_from(data)[0] > MAX_FRAME:
                        return
                try:
                    request = json.loads(data[4:])
                except ValueError:
                    request = None
                conn.settimeout(None)
                conn.sendall(encode(answer_for(self._handler, request)))
            except OSError:
                return

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
