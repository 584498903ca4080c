"""The service manager's readiness protocol (``sd_notify``), for systemd's ``Type=notify``.

When ``NOTIFY_SOCKET`` names a Unix datagram socket (a path, or ``@name`` in the abstract
namespace), the supervisor tells it ``READY=1`` (with ``MAINPID`` and a ``STATUS``) once every
child serves, ``RELOADING=1`` with ``MONOTONIC_USEC`` when a reload starts and ``READY=1`` when
it is done, and ``STOPPING=1`` at shutdown. Without ``NOTIFY_SOCKET`` every call does nothing.

A message that cannot be sent is dropped: the broker does not depend on a service manager.
The children are not given ``NOTIFY_SOCKET`` (``without_notify_socket``): only the main process
speaks for the service. Plain sockets, no dependency.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Notifier", "without_notify_socket"]

ENV = "NOTIFY_SOCKET"


def without_notify_socket(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process: the notification socket is the main process's."""
    return {k: v for k, v in env.items() if k != ENV}


class Notifier:
    """Sends state lines to the service manager, if there is one."""

    def __init__(self, address: str | None = None) -> None:
        self.address = os.environ.get(ENV) if address is None else address

    def send(self, *lines: str) -> bool:
        """One datagram of ``KEY=value`` lines; False when there is nobody to tell or it failed."""
        address = self.address
        if not address:
            return False
        target = "\0" + address[1:] if address.startswith("@") else address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), target)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"MAINPID={os.getpid()}", f"STATUS={status}")

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=shutting down")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")
