"""The control channel (operations/control.py): frames, long socket paths, answers gathered
at once with the silent ones named."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from shardbroker.operations.control import (
    ControlError,
    ThreadServer,
    bind_unix,
    call,
    gather,
    serve,
)


def echo(request: dict[str, object]) -> object:
    if request["op"] == "fail":
        raise ValueError("asked to fail")
    return {"echo": request}


@pytest.fixture
def server(tmp_path: Path):
    s = ThreadServer(str(tmp_path / "c.sock"), echo)
    s.start()
    yield s
    s.close()


def test_call_answers_and_errors(server: ThreadServer) -> None:
    assert call(server.path, {"op": "x", "n": 1}) == {"echo": {"op": "x", "n": 1}}
    with pytest.raises(ControlError, match="asked to fail"):
        call(server.path, {"op": "fail"})
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600


def test_a_request_without_op_is_refused(server: ThreadServer) -> None:
    with pytest.raises(ControlError, match="'op'"):
        call(server.path, {"no": "op"})


def test_no_server_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is the broker running"):
        call(str(tmp_path / "none.sock"), {"op": "x"})
    sock = bind_unix(str(tmp_path / "stale.sock"))
    sock.close()  # a socket file nobody listens on, as a killed broker leaves it
    with pytest.raises(ControlError, match="is the broker running"):
        call(str(tmp_path / "stale.sock"), {"op": "x"})


def test_a_path_longer_than_a_socket_address(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "control.sock")
    assert len(path) > 108
    s = ThreadServer(path, echo)
    s.start()
    try:
        assert call(path, {"op": "long"}) == {"echo": {"op": "long"}}
        assert os.getcwd() != str(deep)
    finally:
        s.close()
    assert not os.path.exists(path)


def test_gather_names_the_silent_and_the_absent(tmp_path: Path, server: ThreadServer) -> None:
    silent = bind_unix(str(tmp_path / "silent.sock"))  # accepts (backlog), never answers
    try:
        started = time.monotonic()
        results, missing = gather({"a": server.path, "b": str(tmp_path / "silent.sock"),
                                   "c": str(tmp_path / "absent.sock")}, {"op": "x"}, timeout=0.5)
        took = time.monotonic() - started
    finally:
        silent.close()
    assert results == {"a": {"echo": {"op": "x"}}}
    assert missing["b"] == "no answer within 0.5 s"
    assert missing["c"].startswith("not reachable")
    assert took < 2.0  # all at once: one timeout, not one per process


def test_asyncio_server_answers_on_the_loop(tmp_path: Path) -> None:
    path = str(tmp_path / "loop.sock")
    answers: list[object] = []

    async def main() -> None:
        srv = await serve(path, echo)
        loop = asyncio.get_running_loop()
        answers.append(await loop.run_in_executor(None, call, path, {"op": "y"}))
        big = "x" * 300_000  # several reads on both sides
        answers.append(await loop.run_in_executor(None, call, path, {"op": "big", "s": big}))
        srv.close()

    asyncio.run(main())
    assert answers[0] == {"echo": {"op": "y"}}
    assert answers[1] == {"echo": {"op": "big", "s": "x" * 300_000}}


def test_garbage_gets_an_error_not_a_hang(server: ThreadServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect(server.path)
        body = b"not json"
        s.sendall(len(body).to_bytes(4, "big") + body)
        data = s.recv(4096)
    assert b'"ok":false' in data


def test_many_at_once(server: ThreadServer) -> None:
    out: list[object] = []
    threads = [threading.Thread(target=lambda i=i: out.append(call(server.path, {"op": "n", "i": i})))
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 20
