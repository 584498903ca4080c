"""What a reload changes: the settings a running broker applies live, and those that need a restart.

``plan(running, new)`` compares two checked configurations setting by setting and returns the
configuration to run with from now on: the running one with every changed *live* setting taken
from the new one. A changed setting that is not live keeps its running value and is named in
``restart_needed``, so the processes never hold a mix the code was not written for (a worker
restarted later gets the same configuration as the others).

A setting is live only where the running processes really apply a new value (``LIVE`` says
how); everything else (addresses and ports, the listener set and its TLS settings, the worker
count, the data directory, ``[storage]``, ``[metrics]``, and the limits a 5.0 client is told in its CONNACK and
held to on every packet) needs a restart. The password and ACL files are read again at every
reload whether or not their names changed; a TLS listener's certificate files are watched by
the acceptor (a new file content needs no reload at all).

Pure: no I/O, no processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shardbroker.config import Config, ListenerConfig

__all__ = ["LIVE", "LIVE_LISTENER", "Plan", "plan"]

_NEW_CONNECTIONS = "new connections (those already up keep what their CONNECT agreed)"
_EVERY_EVENT = "at once, for every client"

LIVE: dict[str, str] = {
    "server.log_level": "every process, at once",
    "server.sys_interval": "the next $SYS publish (the supervisor's totals, every worker's own)",
    "server.shutdown_timeout": "the next shutdown",
    "limits.connect_timeout": "connections accepted from now on",
    "limits.max_packet_size": _NEW_CONNECTIONS,
    "limits.max_keepalive": _NEW_CONNECTIONS,
    "limits.max_inflight": _NEW_CONNECTIONS,
    "limits.strict_utf8": _NEW_CONNECTIONS,
    "limits.max_client_id_length": "CONNECTs from now on",
    "limits.max_will_size": "CONNECTs from now on",
    "limits.max_session_expiry": "CONNECTs and DISCONNECTs from now on",
    "limits.max_message_expiry": "PUBLISHes from now on",
    "limits.max_queued_messages": _EVERY_EVENT,
    "limits.max_queued_bytes": _EVERY_EVENT,
    "limits.queue_full_policy": _EVERY_EVENT,
    "limits.queue_qos0": _EVERY_EVENT,
    "limits.ack_timeout": _EVERY_EVENT,
    "limits.slow_ack_rate": _EVERY_EVENT,
    "limits.max_sessions": "sessions created from now on",
    "limits.max_topic_levels": _EVERY_EVENT + " (PUBLISH and SUBSCRIBE)",
    "limits.max_topic_length": _EVERY_EVENT + " (PUBLISH and SUBSCRIBE)",
    "limits.max_subscriptions": "SUBSCRIBEs from now on",
    "limits.max_publish_rate": _EVERY_EVENT,
    "limits.max_publish_bytes_rate": _EVERY_EVENT,
    "limits.max_connection_rate": "connections accepted from now on",
    "limits.max_connections": "connections accepted from now on",
    "acl.deny_publish": "every PUBLISH and will from now on",
    "acl.deny_subscribe": "SUBSCRIBEs from now on (subscriptions already made stay)",
    "auth.allow_anonymous": "CONNECTs from now on; connected clients it no longer lets in are disconnected",
    "auth.password_file": "as auth.allow_anonymous",
    "auth.acl_file": "at once: every connected client gets its new view of the file",
    "auth.max_failures": "failed logins from now on",
    "auth.ban_time": "failed logins from now on",
    "cluster.redirect": "CONNECTs from now on",
}
"""Every live setting, with when its new value applies."""

LIVE_LISTENER = ("allow_anonymous", "password_file", "acl_file")
"""The settings of a ``[[listener]]`` table applied live (as their ``[auth]`` namesakes)."""

_SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "listeners")


@dataclass(frozen=True, slots=True)
class Plan:
    """What a reload does: ``config`` to run with, the live settings it changes and the changed
    settings that keep their running value until a restart (dotted names, in file order)."""

    config: Config
    changed: tuple[str, ...]
    restart_needed: tuple[str, ...]


def _listeners(running: tuple[ListenerConfig, ...], new: tuple[ListenerConfig, ...],
               changed: list[str], restart: list[str]) -> tuple[ListenerConfig, ...]:
    if len(running) != len(new):
        restart.append("listener")
        return running
    out = []
    for i, (old, lst) in enumerate(zip(running, new, strict=True)):
        kept: dict[str, Any] = {}
        for f in dataclasses.fields(old):
            if getattr(old, f.name) == getattr(lst, f.name):
                continue
            name = f"listener[{i}].{f.name}"
            if f.name in LIVE_LISTENER:
                changed.append(name)
                kept[f.name] = getattr(lst, f.name)
            else:
                restart.append(name)
        out.append(dataclasses.replace(old, **kept))
    return tuple(out)


def plan(running: Config, new: Config) -> Plan:
    """The reload from ``running`` to ``new`` (both checked by ``load_config``)."""
    changed: list[str] = []
    restart: list[str] = []
    sections: dict[str, Any] = {}
    for section in _SECTIONS:
        old_values, new_values = getattr(running, section), getattr(new, section)
        kept: dict[str, Any] = {}
        for f in dataclasses.fields(old_values):
            value = getattr(new_values, f.name)
            if getattr(old_values, f.name) == value:
                continue
            name = f"{section}.{f.name}"
            if name in LIVE:
                changed.append(name)
                kept[f.name] = value
            else:
                restart.append(name)
        sections[section] = dataclasses.replace(old_values, **kept)
    listeners = _listeners(running.listeners, new.listeners, changed, restart)
    config = dataclasses.replace(running, listeners=listeners, **sections)
    return Plan(config, tuple(changed), tuple(restart))
