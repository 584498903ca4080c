"""Broker configuration: defaults, an optional TOML file, and command-line overrides.

What it does: ``load_config`` starts from the defaults, applies a TOML file if
one is given, then applies overrides (dotted names such as ``"server.port"``,
usually from CLI flags), checks every value and returns a frozen ``Config``.

Invariants:

* The dataclass fields below are the single source of truth: each field's
  default, description and allowed values (its ``metadata``) produce
  ``DEFAULT_TOML``, ``config_table()`` and the checks. Adding a setting means
  adding one field.
* A ``Config`` returned by ``load_config`` has been fully checked; a
  ``Config()`` built in code holds the defaults (the dataclasses themselves do
  not re-check values passed to them).
* Every problem is a ``ConfigError`` whose message is one line that starts
  with the setting's dotted name (or the file path for I/O and syntax errors).
  Only the first problem found is reported.

What it does not do: read environment variables, reload at runtime, create
``data_dir``, or know how the settings are used (the broker does).
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

__all__ = [
    "DEFAULT_TOML",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "MetricsConfig",
    "ServerConfig",
    "StorageConfig",
    "config_table",
    "load_config",
]


class ConfigError(Exception):
    """A configuration problem; ``str(e)`` is one line naming the setting (or file).

    ``setting`` is the dotted name concerned, or ``""`` for file-level problems.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}" if setting else message)
        self.setting = setting


# --------------------------------------------------------------------------- checks


class _Invalid(Exception):
    """Raised by a check; the loader turns it into a ``ConfigError`` naming the setting."""


_SHOW_CHARS = 60


def _show(value: object) -> str:
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + "..."


class _Check(Protocol):
    def check(self, value: object) -> object:
        """The value to store, or raise ``_Invalid``."""

    def from_text(self, text: str) -> object:
        """Interpret a command-line string (returned unchanged if it does not parse)."""

    def allowed(self) -> str:
        """Allowed values, for documentation."""


@dataclass(frozen=True, slots=True)
class _Int:
    lo: int
    hi: int

    def check(self, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int) or not self.lo <= value <= self.hi:
            raise _Invalid(
                f"must be an integer between {self.lo} and {self.hi}, got {_show(value)}"
            )
        return value

    def from_text(self, text: str) -> object:
        try:
            return int(text.strip())
        except ValueError:
            return text

    def allowed(self) -> str:
        return f"{self.lo}..{self.hi}"


@dataclass(frozen=True, slots=True)
class _Float:
    lo: float
    hi: float

    def check(self, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            ok = False
        else:
            value = float(value)
            ok = math.isfinite(value) and self.lo <= value <= self.hi
        if not ok:
            raise _Invalid(
                f"must be a number between {self.lo:g} and {self.hi:g}, got {_show(value)}"
            )
        return value

    def from_text(self, text: str) -> object:
        try:
            return float(text.strip())
        except ValueError:
            return text

    def allowed(self) -> str:
        return f"{self.lo:g}..{self.hi:g}"


@dataclass(frozen=True, slots=True)
class _Bool:
    def check(self, value: object) -> object:
        if not isinstance(value, bool):
            raise _Invalid(f"must be true or false, got {_show(value)}")
        return value

    def from_text(self, text: str) -> object:
        word = text.strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
        return text

    def allowed(self) -> str:
        return "true or false"


@dataclass(frozen=True, slots=True)
class _Choice:
    options: tuple[str, ...]

    def check(self, value: object) -> object:
        if not isinstance(value, str) or value not in self.options:
            listed = ", ".join(repr(o) for o in self.options)
            raise _Invalid(f"must be one of {listed}, got {_show(value)}")
        return value

    def from_text(self, text: str) -> object:
        return text

    def allowed(self) -> str:
        return "one of " + ", ".join(self.options)


@dataclass(frozen=True, slots=True)
class _Text:
    """A non-empty string; ``path`` also accepts ``os.PathLike`` (stored as ``str``);
    ``optional``: the empty string too (not set)."""

    path: bool = False
    optional: bool = False

    def check(self, value: object) -> object:
        if self.path and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or (not value and not self.optional):
            raise _Invalid(f"must be a non-empty string, got {_show(value)}")
        return value

    def from_text(self, text: str) -> object:
        return text

    def allowed(self) -> str:
        return "a path, or \"\" for none" if self.optional else "non-empty string"


@dataclass(frozen=True, slots=True)
class _BoolOrAuto:
    """true, false, or "auto" (the setting follows from others)."""

    def check(self, value: object) -> object:
        if value == "auto" or isinstance(value, bool):
            return value
        raise _Invalid(f'must be true, false or "auto", got {_show(value)}')

    def from_text(self, text: str) -> object:
        word = text.strip().lower()
        return word if word == "auto" else _Bool().from_text(word)

    def allowed(self) -> str:
        return 'true, false or "auto"'


def _network(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_network(text.strip(), strict=True))
    except ValueError as exc:
        raise _Invalid(f"{text!r} is not an IP address or network: {exc}") from None


def _topic_filter(text: str) -> str:
    from shardbroker.core.topics import validate_topic_filter
    from shardbroker.protocol.errors import ProtocolError

    try:
        validate_topic_filter(text)
    except ProtocolError as exc:
        raise _Invalid(f"{text!r} is not a valid topic filter: {exc.message}") from None
    return text


@dataclass(frozen=True, slots=True)
class _Listed:
    """A list of strings, each checked (and put in its normal form) by ``item``; stored as a tuple."""

    what: str
    item: Callable[[str], str]  # raises _Invalid

    def check(self, value: object) -> object:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise _Invalid(f"must be a list of {self.what}, got {_show(value)}")
        return tuple(self.item(v) for v in value)

    def from_text(self, text: str) -> object:
        return [part.strip() for part in text.split(",") if part.strip()]

    def allowed(self) -> str:
        return f"list of {self.what}"


def _endpoint(text: str) -> str:
    from urllib.parse import urlsplit

    url = text.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _Invalid(f"{text!r} is not an http(s)://HOST:PORT URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None or parts.path:
        raise _Invalid(f"{text!r} is not an http(s)://HOST:PORT URL")
    return url


def _advertise(text: str) -> str:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _Invalid(f"{text!r} is not HOST:PORT")
    return text.strip()


@dataclass(frozen=True, slots=True)
class _Advertise:
    """HOST:PORT, or "" (not set)."""

    def check(self, value: object) -> object:
        if not isinstance(value, str):
            raise _Invalid(f"must be HOST:PORT, got {_show(value)}")
        return _advertise(value) if value else value

    def from_text(self, text: str) -> object:
        return text

    def allowed(self) -> str:
        return 'HOST:PORT, or "" for none'


@dataclass(frozen=True, slots=True)
class _NodeId:
    """A node ID: letters, digits, '.', '_', '-' (it is part of etcd keys), or "" (off)."""

    def check(self, value: object) -> object:
        if not isinstance(value, str) or len(value) > 64 or any(
                not (c.isascii() and (c.isalnum() or c in "._-")) for c in value):
            raise _Invalid(f"must be up to 64 letters, digits, '.', '_' or '-', got {_show(value)}")
        return value

    def from_text(self, text: str) -> object:
        return text

    def allowed(self) -> str:
        return 'letters, digits, ".", "_", "-"; "" for no clustering'


_Filters = functools.partial(_Listed, "topic filters", _topic_filter)
_Networks = functools.partial(_Listed, "IP addresses or CIDR networks", _network)
_Endpoints = functools.partial(_Listed, "http(s)://HOST:PORT URLs", _endpoint)


def _setting(default: Any, doc: str, check: _Check) -> Any:
    """A dataclass field carrying its description and check."""
    return field(default=default, metadata={"doc": doc, "check": check})


# --------------------------------------------------------------------------- the settings


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Process-level settings: where to listen, how many shards, where data lives."""

    host: str = _setting("127.0.0.1", "address to listen on (MQTT over TCP)", _Text())
    port: int = _setting(1883, "TCP port; 0 picks a free port", _Int(0, 65535))
    workers: int = _setting(0, "worker processes (shards); 0 means one per CPU core", _Int(0, 256))
    data_dir: str = _setting("./shardbroker-data", "where the LMDB stores live", _Text(path=True))
    log_level: str = _setting("info", "log level", _Choice(("debug", "info", "warning", "error")))
    log_format: str = _setting("text", "log lines as text, or as JSON objects (one per line)",
                               _Choice(("text", "json")))
    shutdown_timeout: float = _setting(
        5.0, "seconds for an orderly shutdown before processes are killed", _Float(0.0, 3600.0)
    )
    sys_interval: float = _setting(
        10.0, "seconds between $SYS statistics publishes ($SYS/broker/... and $SYS/shardbroker/...); 0 turns them off",
        _Float(0.0, 86400.0),
    )

    @property
    def worker_count(self) -> int:
        """``workers``, with 0 resolved to the number of CPU cores (at least 1)."""
        if self.workers > 0:
            return self.workers
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Per-connection and per-session limits."""

    connect_timeout: float = _setting(
        10.0, "seconds a new connection has to send CONNECT", _Float(0.001, 3600.0)
    )
    max_packet_size: int = _setting(1048576, "largest packet accepted, bytes", _Int(64, 268435455))
    max_keepalive: int = _setting(
        65535,
        "larger keepalives are lowered to this (sent as Server Keep Alive to 5.0 clients)",
        _Int(1, 65535),
    )
    receive_maximum: int = _setting(
        100, "QoS 1/2 publishes a client may have unacknowledged toward the broker", _Int(1, 65535)
    )
    max_inflight: int = _setting(
        100,
        "QoS 1/2 messages sent to a client before waiting for acknowledgements"
        " (the lower of this and the client's Receive Maximum)",
        _Int(1, 65535),
    )
    max_queued_messages: int = _setting(
        1000,
        "messages queued per session while it is offline or a slow subscriber (an online one"
        " that keeps acknowledging holds its publishers back instead)",
        _Int(1, 10_000_000),
    )
    max_queued_bytes: int = _setting(
        16777216, "payload bytes queued per session (offline or slow, as above)", _Int(1, 2**40)
    )
    queue_full_policy: str = _setting(
        "drop_oldest",
        "when a session queue is full: drop_oldest (the oldest queued message is dropped),"
        " or reject_new (the new message is not queued); both are counted",
        _Choice(("drop_oldest", "reject_new")),
    )
    ack_timeout: float = _setting(
        0.0,
        "seconds a subscriber with a full inflight window may acknowledge nothing before it is"
        " slow: its publishers are no longer held and its queue falls under the limits above;"
        " 0 means its keep-alive, at most 60 s",
        _Float(0.0, 86400.0),
    )
    slow_ack_rate: float = _setting(
        100.0,
        "acknowledgements/s below which a subscriber whose queue has reached its high-water mark"
        " (512) with a full inflight window is slow, judged over each 2 s: as above; 0 = only"
        " ack_timeout decides",
        _Float(0.0, 1e9),
    )
    queue_qos0: bool = _setting(
        False, "also queue QoS 0 messages for offline persistent sessions", _Bool()
    )
    max_sessions: int = _setting(
        1000000, "sessions per broker (connected + persistent offline)", _Int(1, 2**31)
    )
    topic_alias_maximum: int = _setting(
        10, "topic aliases a 5.0 client may use toward the broker", _Int(0, 65535)
    )
    max_session_expiry: int = _setting(
        4294967295, "cap on Session Expiry Interval, seconds", _Int(0, 4294967295)
    )
    max_message_expiry: int = _setting(
        0, "cap on message expiry, seconds; 0 means no cap", _Int(0, 4294967295)
    )
    retain_available: bool = _setting(True, "whether retained messages are supported", _Bool())
    max_client_id_length: int = _setting(
        1024, "longest client ID accepted, UTF-8 bytes (more: CONNACK 0x85 / 2)", _Int(23, 65535)
    )
    strict_utf8: bool = _setting(
        True,
        "refuse UTF-8 control characters (U+0001-U+001F, U+007F-U+009F) and non-characters "
        "(U+FDD0-U+FDEF, U+nFFFE, U+nFFFF) in every string a client sends (MQTT 1.5.4): in the "
        "client ID, CONNACK 0x85 / 2; elsewhere (user name, will topic, topic names and filters, "
        "5.0 string and user properties) malformed: CONNACK or DISCONNECT 0x81, 3.1.1 close; "
        "false accepts them",
        _Bool(),
    )
    max_topic_levels: int = _setting(
        128,
        "most levels in a topic name or filter (a PUBLISH with more: 5.0 DISCONNECT 0x90, 3.1.1 close; "
        "a filter with more: SUBACK 0x8F / 0x80)",
        _Int(1, 65535),
    )
    max_topic_length: int = _setting(
        65535,
        "longest topic name or filter, UTF-8 bytes (MQTT's own limit is 65535; a PUBLISH with a longer one: "
        "5.0 DISCONNECT 0x90, 3.1.1 close; a filter: SUBACK 0x8F / 0x80)",
        _Int(1, 65535),
    )
    max_subscriptions: int = _setting(
        10000, "subscriptions per session (more: SUBACK 0x97 / 0x80); 0 means no limit", _Int(0, 100_000_000)
    )
    max_publish_rate: int = _setting(
        0,
        "PUBLISH packets per second one client may send; beyond it its socket is not read until the "
        "next second, and after 10 s of that, DISCONNECT 0x96 (3.1.1: close); 0 means no limit",
        _Int(0, 100_000_000),
    )
    max_publish_bytes_rate: int = _setting(
        0, "payload bytes per second one client may publish, handled as max_publish_rate; 0 means no limit",
        _Int(0, 1 << 40),
    )
    max_will_size: int = _setting(
        65536, "largest will payload accepted, bytes (more: CONNACK 0x95 in 5.0, a close in 3.1.1)",
        _Int(0, 268435455),
    )
    max_connection_rate: int = _setting(
        0,
        "new connections per second from one address, over all listeners (more are closed at once, "
        "counted and logged); 0 means no limit",
        _Int(0, 1_000_000),
    )
    max_connections: int = _setting(
        1000000,
        "open connections over all listeners, those still before CONNECT included (more are closed "
        "as soon as they are accepted, counted and logged); 0 means no limit",
        _Int(0, 100_000_000),
    )
    max_connections_per_address: int = _setting(
        0,
        "open connections from one address (the PROXY protocol's or a trusted proxy's X-Forwarded-For "
        "address where there is one); more are closed at once, counted and logged; 0 means no limit",
        _Int(0, 100_000_000),
    )


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """LMDB persistence settings."""

    durability: str = _setting(
        "fsync",
        "fsync: every group commit is fsynced before acknowledging (survives process, OS and power"
        " failure); no-fsync: survives any process crash incl. kill -9, but an OS crash or power loss"
        " may lose the last acknowledged messages",
        _Choice(("fsync", "no-fsync")),
    )
    map_size: int = _setting(
        67108864,
        "initial LMDB map size per environment, bytes; grows by itself",
        _Int(2**20, 2**40),
    )
    max_map_size: int = _setting(
        17179869184,
        "the map never grows past this, bytes; then new QoS 1/2 work is refused as if the disk were full",
        _Int(2**20, 2**40),
    )


@dataclass(frozen=True, slots=True)
class AclConfig:
    """What clients may not do. A topic matched by a listed filter is refused."""

    deny_subscribe: tuple[str, ...] = _setting(
        (), "subscriptions to topics under these filters are refused (SUBACK 0x80)", _Filters()
    )
    deny_publish: tuple[str, ...] = _setting(
        (),
        "publishes to topics under these filters are dropped (5.0: PUBACK/PUBREC 0x87); "
        "a will to one is refused (CONNACK 0x87 / 5)",
        _Filters(),
    )


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Who may connect (a password file) and what each client may do (an ACL file)."""

    allow_anonymous: bool | str = _setting(
        "auto",
        "whether clients without a username may connect; auto: yes unless a password file is set",
        _BoolOrAuto(),
    )
    password_file: str = _setting(
        "", "users and their password hashes (Mosquitto's format, see `shardbroker passwd`)",
        _Text(path=True, optional=True),
    )
    acl_file: str = _setting(
        "", "what each user may read and write (Mosquitto's ACL file syntax)", _Text(path=True, optional=True)
    )
    max_failures: int = _setting(
        10,
        "failed logins from one address within a minute (on any worker) before it is refused for "
        "auth.ban_time; from the 4th on, refusals are answered late; 0: no limit",
        _Int(0, 1_000_000),
    )
    ban_time: float = _setting(
        60.0, "seconds an address stays refused after auth.max_failures", _Float(0.0, 86400.0)
    )

    @property
    def anonymous(self) -> bool:
        """``allow_anonymous`` decided: "auto" is true without a password file."""
        if isinstance(self.allow_anonymous, bool):
            return self.allow_anonymous
        return not self.password_file


LISTENER_TYPES = ("mqtt", "mqtts", "ws", "wss")
LISTENER_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 8083, "wss": 8084}
TLS_VERSIONS = ("tlsv1.2", "tlsv1.3")
CERTIFICATE_IDENTITIES = ("cn", "san")
WS_PATH = "/mqtt"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics and health checks over HTTP, served by the supervisor."""

    enabled: bool = _setting(False, "serve /metrics, /healthz and /readyz over HTTP", _Bool())
    host: str = _setting("127.0.0.1", "address the metrics endpoint listens on (loopback by default)", _Text())
    port: int = _setting(9883, "TCP port of the metrics endpoint; 0 picks a free port (logged)", _Int(0, 65535))


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Several nodes as one broker, coordinated through etcd (docs/CLUSTERING.md). Off while
    ``node_id`` is empty; with it, ``serve`` registers the node and serves the virtual shards
    the shard map gives it (cluster/node.py)."""

    node_id: str = _setting("", "this node's name in the cluster; empty: no clustering", _NodeId())
    etcd_endpoints: tuple[str, ...] = _setting(
        (), "etcd client URLs (http://HOST:PORT), any member of one etcd cluster", _Endpoints())
    advertise: str = _setting(
        "", "HOST:PORT of this node's bus between nodes (not its MQTT listener): worker w binds"
        " PORT + w, so HOST must be this host's and PORT..PORT+workers-1 free and reachable"
        " from the other nodes", _Advertise())
    lease_ttl: int = _setting(
        10, "seconds a node stays registered without renewing its etcd lease; it stops serving"
        " before that when it cannot renew", _Int(2, 300))
    virtual_shards: int = _setting(
        1024, "client IDs hash to this many virtual shards, the unit the shard map places on"
        " node x worker; fixed for the life of a cluster (1024: about even over up to ~100"
        " node x worker slots, and the map stays one small etcd value)", _Int(16, 16384))
    redirect: bool = _setting(
        False, "send an MQTT 5.0 client of a virtual shard another node serves CONNACK 0x9C"
        " (Use another server) with that node's client address as Server Reference, instead of"
        " relaying it; 3.1.1 and 3.1 clients, and those of TLS and WebSocket listeners, are"
        " still relayed", _Bool())

    @property
    def enabled(self) -> bool:
        return bool(self.node_id)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One ``[[listener]]`` table: where clients connect, and over what."""

    type: str = "mqtt"
    host: str = "127.0.0.1"
    port: int = 1883
    certfile: str = ""  # mqtts: the server's certificate chain (PEM)
    keyfile: str = ""  # mqtts: its private key (PEM)
    cafile: str = ""  # mqtts: CAs whose client certificates are accepted
    require_certificate: bool = False  # mqtts: a client without a valid certificate is refused
    use_identity_as_username: bool = False  # mqtts: the certificate's CN is the username
    certificate_identity: str = "cn"  # which name of the certificate: "cn" or "san" (its first DNS/email/URI name)
    tls_version: str = "tlsv1.2"  # mqtts: the lowest TLS version accepted
    ciphers: str = ""  # mqtts: OpenSSL cipher list for TLS 1.2 ("" = OpenSSL's defaults)
    path: str = WS_PATH  # ws, wss: the HTTP path of the WebSocket endpoint
    proxy_protocol: bool = False  # every connection starts with a PROXY protocol v2 header
    trusted_proxies: tuple[str, ...] = ()  # ws, wss: peers whose X-Forwarded-For / Forwarded is believed
    # Authentication on this listener; None: as [auth] says.
    allow_anonymous: bool | str | None = None
    password_file: str | None = None
    acl_file: str | None = None

    @property
    def tls(self) -> bool:
        return self.type in ("mqtts", "wss")

    @property
    def name(self) -> str:
        return f"{self.type} {self.host}:{self.port}"


_LISTENER_CHECKS: dict[str, _Check] = {
    "type": _Choice(LISTENER_TYPES), "host": _Text(), "port": _Int(0, 65535),
    "certfile": _Text(path=True, optional=True), "keyfile": _Text(path=True, optional=True),
    "cafile": _Text(path=True, optional=True), "require_certificate": _Bool(),
    "use_identity_as_username": _Bool(), "certificate_identity": _Choice(CERTIFICATE_IDENTITIES),
    "tls_version": _Choice(TLS_VERSIONS), "ciphers": _Text(optional=True),
    "path": _Text(), "proxy_protocol": _Bool(), "trusted_proxies": _Networks(), "allow_anonymous": _BoolOrAuto(),
    "password_file": _Text(path=True, optional=True), "acl_file": _Text(path=True, optional=True),
}
_INHERITED = ("allow_anonymous", "password_file", "acl_file")  # [auth]'s unless a listener sets them
_NOT_YET: dict[str, str] = {}
_NOT_YET_KEYS: dict[str, str] = {}


def _listeners(value: object) -> tuple[ListenerConfig, ...]:
    """``[[listener]]`` tables, checked; ``ConfigError`` naming ``listener[i].key``."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError("listener", "must be an array of tables ([[listener]])")
    out = []
    for i, table in enumerate(value):
        where = f"listener[{i}]"
        kind = table.get("type", "mqtt")
        if kind in _NOT_YET:
            raise ConfigError(f"{where}.type", f"{kind!r} ({_NOT_YET[kind]}) is not implemented yet; "
                                                f"one of {', '.join(LISTENER_TYPES)}")
        kwargs: dict[str, Any] = {}
        for key, v in table.items():
            if key in _NOT_YET_KEYS:
                raise ConfigError(f"{where}.{key}", f"{_NOT_YET_KEYS[key]} is not implemented yet")
            if v is None and key in _INHERITED:  # (not from TOML: how a child process is given them)
                continue
            check = _LISTENER_CHECKS.get(key)
            if check is None:
                raise ConfigError(f"{where}.{key}", f"unknown listener setting; one of {', '.join(_LISTENER_CHECKS)}")
            try:
                kwargs[key] = check.check(v)
            except _Invalid as e:
                raise ConfigError(f"{where}.{key}", str(e)) from None
        kwargs.setdefault("port", LISTENER_PORTS[kind])
        lst = ListenerConfig(**kwargs)
        if lst.tls and not (lst.certfile and lst.keyfile):
            raise ConfigError(where, f"an {lst.type} listener needs certfile and keyfile")
        if not lst.tls and (lst.certfile or lst.keyfile or lst.cafile or lst.require_certificate
                            or lst.use_identity_as_username):
            raise ConfigError(where, "certfile, keyfile, cafile, require_certificate and "
                                     "use_identity_as_username are for mqtts and wss listeners")
        if lst.path != WS_PATH and lst.type not in ("ws", "wss"):
            raise ConfigError(f"{where}.path", "is for ws and wss listeners")
        if lst.trusted_proxies and lst.type not in ("ws", "wss"):
            raise ConfigError(f"{where}.trusted_proxies", "is for ws and wss listeners")
        if not lst.path.startswith("/"):
            raise ConfigError(f"{where}.path", f"must start with '/', got {lst.path!r}")
        if lst.require_certificate and not lst.cafile:
            raise ConfigError(where, "require_certificate needs a cafile")
        if lst.certificate_identity != "cn" and not lst.use_identity_as_username:
            raise ConfigError(f"{where}.certificate_identity", "is for use_identity_as_username = true")
        if lst.use_identity_as_username and not lst.require_certificate:
            raise ConfigError(where, "use_identity_as_username needs require_certificate = true")
        out.append(lst)
    seen: set[tuple[str, int]] = set()
    for i, lst in enumerate(out):
        if lst.port and (lst.host, lst.port) in seen:
            raise ConfigError(f"listener[{i}]", f"{lst.host}:{lst.port} is listed twice")
        seen.add((lst.host, lst.port))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, one nested dataclass per TOML section (and the
    ``[[listener]]`` tables)."""

    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    acl: AclConfig = field(default_factory=AclConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    listeners: tuple[ListenerConfig, ...] = ()  # none: one mqtt listener on server.host:server.port

    @property
    def effective_listeners(self) -> tuple[ListenerConfig, ...]:
        """The listeners to open: ``[[listener]]``, or ``server.host``/``server.port`` as mqtt."""
        return self.listeners or (ListenerConfig("mqtt", self.server.host, self.server.port),)

    def listener_auth(self, lst: ListenerConfig) -> ListenerAuth:
        """Who may connect on ``lst``: its own ``allow_anonymous``, ``password_file`` and
        ``acl_file`` where it sets them, ``[auth]``'s otherwise ("auto" decided against the
        password file that applies on the listener)."""
        auth = self.auth
        password_file = auth.password_file if lst.password_file is None else lst.password_file
        acl_file = auth.acl_file if lst.acl_file is None else lst.acl_file
        allow = auth.allow_anonymous if lst.allow_anonymous is None else lst.allow_anonymous
        anonymous = allow if isinstance(allow, bool) else not password_file
        return ListenerAuth(anonymous, password_file, acl_file)

    def listeners_auth(self) -> tuple[ListenerAuth, ...]:
        """``listener_auth`` of every listener, in order (a hand-off names its listener by index)."""
        return tuple(self.listener_auth(lst) for lst in self.effective_listeners)


@dataclass(frozen=True, slots=True)
class ListenerAuth:
    """The authentication settings in force on one listener."""

    allow_anonymous: bool
    password_file: str
    acl_file: str


_Section = (ServerConfig | LimitsConfig | StorageConfig | AclConfig | AuthConfig | MetricsConfig
            | ClusterConfig)
_SECTIONS: dict[str, type[_Section]] = {
    "server": ServerConfig,
    "limits": LimitsConfig,
    "storage": StorageConfig,
    "acl": AclConfig,
    "auth": AuthConfig,
    "metrics": MetricsConfig,
    "cluster": ClusterConfig,
}
"""TOML section name -> dataclass, in file order (the same names as ``Config``'s fields)."""


@dataclass(frozen=True, slots=True)
class _Spec:
    section: str
    key: str
    default: object
    doc: str
    check: _Check

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


def _specs() -> dict[str, _Spec]:
    specs: dict[str, _Spec] = {}
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            assert f.default is not MISSING, f"{section}.{f.name} needs a default"
            spec = _Spec(section, f.name, f.default, f.metadata["doc"], f.metadata["check"])
            specs[spec.name] = spec
    return specs


_SPECS = _specs()


def _toml_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _describe(spec: _Spec) -> str:
    return f"{spec.doc} [{spec.check.allowed()}]"


def _default_toml() -> str:
    lines = ["# ShardBroker configuration. Every setting is listed with its default value."]
    for section in _SECTIONS:
        lines += ["", f"[{section}]"]
        for spec in _SPECS.values():
            if spec.section == section:
                lines.append(f"# {_describe(spec)}")
                lines.append(f"{spec.key} = {_toml_value(spec.default)}")
    return "\n".join(lines) + "\n"


DEFAULT_TOML: str = _default_toml()
"""The default configuration as TOML text, one commented line per setting."""


def config_table() -> list[tuple[str, str, str]]:
    """``(dotted name, default as TOML text, description)`` for every setting, in file order."""
    return [(s.name, _toml_value(s.default), _describe(s)) for s in _SPECS.values()]


# --------------------------------------------------------------------------- loading


def _unknown(name: str) -> ConfigError:
    if name in _SECTIONS:
        return ConfigError(
            name, "is a section, not a setting (use a dotted name such as server.port)"
        )
    section, _, key = name.rpartition(".")
    # Compare keys, not dotted names: a shared "server." prefix says nothing.
    close = [s.name for s in _SPECS.values() if s.key == key]  # right key, wrong section
    if not close:
        in_section = [s.key for s in _SPECS.values() if s.section == section]
        close = [f"{section}.{k}" for k in difflib.get_close_matches(key, in_section, n=1)]
    if not close:
        by_key = {s.key: s.name for s in _SPECS.values()}
        close = [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=1)]
    if not close and not section:
        close = difflib.get_close_matches(key, list(_SECTIONS), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(name, f"unknown setting{hint}")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError("", f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        message = " ".join(str(e).split())
        raise ConfigError("", f"{path}: invalid TOML: {message}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            "", f"{path}: invalid TOML: not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    except OSError as e:
        raise ConfigError("", f"{path}: cannot read config file: {e.strerror or e}") from None


def _from_file(document: Mapping[str, Any]) -> dict[str, object]:
    values: dict[str, object] = {}
    for section, table in document.items():
        if section == "listener":
            values["listener"] = table
            continue
        if section not in _SECTIONS:
            if isinstance(table, dict):
                hint = difflib.get_close_matches(section, list(_SECTIONS), n=1, cutoff=0.6)
                suffix = f"; did you mean [{hint[0]}]?" if hint else ""
                raise ConfigError(section, f"unknown section{suffix}")
            raise _unknown(section)
        if not isinstance(table, dict):
            raise ConfigError(section, f"must be a table ([{section}]), got {_show(table)}")
        for key, value in table.items():
            name = f"{section}.{key}"
            if name not in _SPECS:
                raise _unknown(name)
            values[name] = value
    return values


def _check(name: str, value: object) -> object:
    try:
        return _SPECS[name].check.check(value)
    except _Invalid as e:
        raise ConfigError(name, str(e)) from None


_S = TypeVar("_S", ServerConfig, LimitsConfig, StorageConfig, AclConfig, AuthConfig, MetricsConfig,
             ClusterConfig)


def _build(cls: type[_S], section: str, values: Mapping[str, object]) -> _S:
    kwargs: dict[str, Any] = {
        s.key: values[s.name] for s in _SPECS.values() if s.section == section
    }
    return cls(**kwargs)


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, object] | None = None
) -> Config:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides``; all checked.

    ``overrides`` maps dotted names (``"server.port"``) to values; ``None``
    values are ignored (a CLI flag that was not given). A string given for a
    number or boolean setting is parsed (``"1884"``, ``"true"``), since CLI
    flags are text; values in the file must have the right TOML type.
    """
    values: dict[str, object] = {name: spec.default for name, spec in _SPECS.items()}
    listeners: tuple[ListenerConfig, ...] = ()
    if path is not None:
        for name, value in _from_file(_read_file(Path(path))).items():
            if name == "listener":
                listeners = _listeners(value)
                continue
            values[name] = _check(name, value)
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name == "listener":
            listeners = _listeners(value)
            continue
        if name not in _SPECS:
            raise _unknown(name)
        if isinstance(value, str):
            value = _SPECS[name].check.from_text(value)
        values[name] = _check(name, value)

    map_size = cast(int, values["storage.map_size"])
    max_map_size = cast(int, values["storage.max_map_size"])
    if max_map_size < map_size:
        raise ConfigError(
            "storage.max_map_size",
            f"must be at least storage.map_size ({map_size}), got {max_map_size}",
        )

    cluster = _build(ClusterConfig, "cluster", values)
    if cluster.enabled and not (cluster.etcd_endpoints and cluster.advertise):
        missing = "cluster.etcd_endpoints" if not cluster.etcd_endpoints else "cluster.advertise"
        raise ConfigError(missing, "must be set when cluster.node_id is set")

    return Config(
        server=_build(ServerConfig, "server", values),
        limits=_build(LimitsConfig, "limits", values),
        storage=_build(StorageConfig, "storage", values),
        acl=_build(AclConfig, "acl", values),
        auth=_build(AuthConfig, "auth", values),
        metrics=_build(MetricsConfig, "metrics", values),
        cluster=cluster,
        listeners=listeners,
    )
