"""Tests for shardbroker.config: defaults, the TOML file, overrides, and error messages."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import pytest

from shardbroker.config import (
    DEFAULT_TOML,
    Config,
    ConfigError,
    LimitsConfig,
    ServerConfig,
    StorageConfig,
    config_table,
    load_config,
)

EXPECTED_DEFAULTS = {
    "server.host": "127.0.0.1",
    "server.port": 1883,
    "server.workers": 0,
    "server.data_dir": "./shardbroker-data",
    "server.log_level": "info",
    "server.log_format": "text",
    "server.shutdown_timeout": 5.0,
    "server.sys_interval": 10.0,
    "limits.connect_timeout": 10.0,
    "limits.max_packet_size": 1048576,
    "limits.max_keepalive": 65535,
    "limits.receive_maximum": 100,
    "limits.max_inflight": 100,
    "limits.max_queued_messages": 1000,
    "limits.max_queued_bytes": 16777216,
    "limits.queue_full_policy": "drop_oldest",
    "limits.ack_timeout": 0.0,
    "limits.slow_ack_rate": 100.0,
    "limits.queue_qos0": False,
    "limits.max_sessions": 1000000,
    "limits.topic_alias_maximum": 10,
    "limits.max_session_expiry": 4294967295,
    "limits.max_message_expiry": 0,
    "limits.retain_available": True,
    "limits.max_client_id_length": 1024,
    "limits.strict_utf8": True,
    "limits.max_topic_levels": 128,
    "limits.max_topic_length": 65535,
    "limits.max_subscriptions": 10000,
    "limits.max_publish_rate": 0,
    "limits.max_publish_bytes_rate": 0,
    "limits.max_will_size": 65536,
    "limits.max_connection_rate": 0,
    "limits.max_connections": 1000000,
    "limits.max_connections_per_address": 0,
    "storage.durability": "fsync",
    "storage.map_size": 67108864,
    "storage.max_map_size": 17179869184,
    "acl.deny_subscribe": (),
    "acl.deny_publish": (),
    "auth.allow_anonymous": "auto",
    "auth.password_file": "",
    "auth.acl_file": "",
    "auth.max_failures": 10,
    "auth.ban_time": 60.0,
    "metrics.enabled": False,
    "metrics.host": "127.0.0.1",
    "metrics.port": 9883,
    "cluster.node_id": "",
    "cluster.etcd_endpoints": (),
    "cluster.advertise": "",
    "cluster.lease_ttl": 10,
    "cluster.virtual_shards": 1024,
    "cluster.redirect": False,
}


def flatten(config: Config) -> dict[str, object]:
    out: dict[str, object] = {}
    for section in dataclasses.fields(config):
        table = getattr(config, section.name)
        if section.name == "listeners":  # [[listener]] tables, tested on their own
            continue
        for f in dataclasses.fields(table):
            out[f"{section.name}.{f.name}"] = getattr(table, f.name)
    return out


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shardbroker.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(
    tmp_path: Path, text: str | None = None, overrides: dict[str, object] | None = None
) -> ConfigError:
    path = write(tmp_path, text) if text is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return info.value


# --------------------------------------------------------------------------- defaults


def test_defaults_without_file() -> None:
    config = load_config()
    assert flatten(config) == EXPECTED_DEFAULTS
    assert config == Config()
    assert isinstance(config.server, ServerConfig)
    assert isinstance(config.limits, LimitsConfig)
    assert isinstance(config.storage, StorageConfig)


def test_default_toml_is_exactly_the_defaults(tmp_path: Path) -> None:
    document = tomllib.loads(DEFAULT_TOML)
    flat = {f"{s}.{k}": tuple(v) if isinstance(v, list) else v
            for s, table in document.items() for k, v in table.items()}
    assert flat == EXPECTED_DEFAULTS
    assert {k: type(v) for k, v in flat.items()} == {
        k: type(v) for k, v in EXPECTED_DEFAULTS.items()
    }
    assert load_config(write(tmp_path, DEFAULT_TOML)) == Config()


def test_default_toml_comments_every_setting() -> None:
    lines = DEFAULT_TOML.splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("# "), line


def test_config_table() -> None:
    table = config_table()
    assert [name for name, _, _ in table] == list(EXPECTED_DEFAULTS)
    rows = {name: (default, doc) for name, default, doc in table}
    assert rows["server.port"][0] == "1883"
    assert rows["server.host"][0] == '"127.0.0.1"'
    assert rows["limits.queue_qos0"][0] == "false"
    assert rows["limits.max_packet_size"][1].endswith("[64..268435455]")
    assert all(doc and "\n" not in doc for _, _, doc in table)


def test_config_is_frozen_and_slotted() -> None:
    config = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    for obj in (config, config.server, config.limits, config.storage):
        assert not hasattr(obj, "__dict__")


def test_worker_count() -> None:
    assert load_config(overrides={"server.workers": 3}).server.worker_count == 3
    auto = load_config().server.worker_count
    assert auto == max(1, os.cpu_count() or 1)
    assert auto >= 1


# --------------------------------------------------------------------------- file and overrides


def test_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [server]
        port = 1884
        data_dir = "/var/lib/sb"
        shutdown_timeout = 2     # an integer is fine for a float setting

        [limits]
        queue_full_policy = "reject_new"
        queue_qos0 = true

        [storage]
        durability = "no-fsync"
        """,
    )
    config = load_config(str(path))
    assert config.server.port == 1884
    assert config.server.data_dir == "/var/lib/sb"
    assert config.server.shutdown_timeout == 2.0
    assert isinstance(config.server.shutdown_timeout, float)
    assert config.limits.queue_full_policy == "reject_new"
    assert config.limits.queue_qos0 is True
    assert config.storage.durability == "no-fsync"
    assert config.server.host == "127.0.0.1"  # untouched settings keep defaults
    assert load_config(path) == config  # str or Path


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


def test_overrides_beat_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1884\nhost = '0.0.0.0'\n")
    config = load_config(
        path, {"server.port": 1999, "server.host": None, "limits.queue_qos0": True}
    )
    assert config.server.port == 1999
    assert config.server.host == "0.0.0.0"  # None means "flag not given"
    assert config.limits.queue_qos0 is True


def test_overrides_without_file() -> None:
    config = load_config(overrides={"server.data_dir": Path("/tmp/x"), "storage.map_size": 2**20})
    assert config.server.data_dir == "/tmp/x"
    assert config.storage.map_size == 2**20


def test_string_overrides_are_parsed() -> None:
    config = load_config(
        overrides={
            "server.port": "1884",
            "limits.connect_timeout": "2.5",
            "limits.queue_qos0": "true",
            "limits.retain_available": "no",
        }
    )
    assert config.server.port == 1884
    assert config.limits.connect_timeout == 2.5
    assert config.limits.queue_qos0 is True
    assert config.limits.retain_available is False


def test_limits_at_range_edges() -> None:
    config = load_config(
        overrides={
            "server.port": 0,
            "server.workers": 256,
            "limits.max_packet_size": 268435455,
            "limits.max_queued_messages": 10_000_000,
            "limits.max_queued_bytes": 2**40,
            "limits.max_sessions": 2**31,
            "limits.topic_alias_maximum": 0,
            "storage.map_size": 2**40,
            "storage.max_map_size": 2**40,
        }
    )
    assert config.server.port == 0
    assert config.storage.max_map_size == 2**40


# --------------------------------------------------------------------------- errors


def test_error_example_from_the_docs(tmp_path: Path) -> None:
    e = error_of(tmp_path, '[limits]\nmax_packet_size = "abc"\n')
    assert (
        str(e) == "limits.max_packet_size: must be an integer between 64 and 268435455, got 'abc'"
    )
    assert e.setting == "limits.max_packet_size"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nprot = 1\n", "server.prot: unknown setting; did you mean server.port?"),
        (
            "[server]\nmax_packet_size = 100\n",
            "server.max_packet_size: unknown setting; did you mean limits.max_packet_size?",
        ),
        ("[limit]\nmax_inflight = 5\n", "limit: unknown section; did you mean [limits]?"),
        ("[tls]\ncert = 'x'\n", "tls: unknown section"),
        ("port = 1883\n", "port: unknown setting; did you mean server.port?"),
        ("[server]\nzzz = 1\n", "server.zzz: unknown setting"),
        ("[server.tls]\ncert = 'x'\n", "server.tls: unknown setting"),
        ("server = 5\n", "server: must be a table ([server]), got 5"),
    ],
)
def test_unknown_names(tmp_path: Path, text: str, expected: str) -> None:
    assert str(error_of(tmp_path, text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # wrong types
        (
            "[server]\nport = '1883'\n",
            "server.port: must be an integer between 0 and 65535, got '1883'",
        ),
        (
            "[server]\nport = 1883.0\n",
            "server.port: must be an integer between 0 and 65535, got 1883.0",
        ),
        (
            "[server]\nworkers = true\n",
            "server.workers: must be an integer between 0 and 256, got True",
        ),
        ("[server]\nhost = 1\n", "server.host: must be a non-empty string, got 1"),
        ("[server]\ndata_dir = ['a']\n", "server.data_dir: must be a non-empty string, got ['a']"),
        (
            "[server]\nshutdown_timeout = '5'\n",
            "server.shutdown_timeout: must be a number between 0 and 3600, got '5'",
        ),
        ("[limits]\nqueue_qos0 = 1\n", "limits.queue_qos0: must be true or false, got 1"),
        (
            "[limits]\nretain_available = 'yes'\n",
            "limits.retain_available: must be true or false, got 'yes'",
        ),
        # out of range
        (
            "[server]\nport = 65536\n",
            "server.port: must be an integer between 0 and 65535, got 65536",
        ),
        ("[server]\nport = -1\n", "server.port: must be an integer between 0 and 65535, got -1"),
        (
            "[server]\nworkers = 257\n",
            "server.workers: must be an integer between 0 and 256, got 257",
        ),
        (
            "[limits]\nmax_packet_size = 63\n",
            "limits.max_packet_size: must be an integer between 64 and 268435455, got 63",
        ),
        (
            "[limits]\nmax_queued_messages = 0\n",
            "limits.max_queued_messages: must be an integer between 1 and 10000000, got 0",
        ),
        (
            "[limits]\nconnect_timeout = 0\n",
            "limits.connect_timeout: must be a number between 0.001 and 3600, got 0.0",
        ),
        (
            "[limits]\nconnect_timeout = nan\n",
            "limits.connect_timeout: must be a number between 0.001 and 3600, got nan",
        ),
        (
            "[storage]\nmap_size = 1000\n",
            "storage.map_size: must be an integer between 1048576 and 1099511627776, got 1000",
        ),
        ("[server]\nhost = ''\n", "server.host: must be a non-empty string, got ''"),
        ("[server]\ndata_dir = ''\n", "server.data_dir: must be a non-empty string, got ''"),
        # bad choices
        (
            "[server]\nlog_level = 'verbose'\n",
            "server.log_level: must be one of 'debug', 'info', 'warning', 'error', got 'verbose'",
        ),
        (
            "[limits]\nqueue_full_policy = 'drop_newest'\n",
            "limits.queue_full_policy: must be one of 'drop_oldest', 'reject_new', got 'drop_newest'",
        ),
        (
            "[storage]\ndurability = 'sync'\n",
            "storage.durability: must be one of 'fsync', 'no-fsync', got 'sync'",
        ),
        # across settings
        (
            "[storage]\nmap_size = 2097152\nmax_map_size = 1048576\n",
            "storage.max_map_size: must be at least storage.map_size (2097152), got 1048576",
        ),
    ],
)
def test_bad_values(tmp_path: Path, text: str, expected: str) -> None:
    assert str(error_of(tmp_path, text)) == expected


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"server.prot": 1}, "server.prot: unknown setting; did you mean server.port?"),
        ({"port": 1}, "port: unknown setting; did you mean server.port?"),
        (
            {"server": 1},
            "server: is a section, not a setting (use a dotted name such as server.port)",
        ),
        (
            {"server.port": "http"},
            "server.port: must be an integer between 0 and 65535, got 'http'",
        ),
        ({"server.port": True}, "server.port: must be an integer between 0 and 65535, got True"),
        ({"limits.queue_qos0": "maybe"}, "limits.queue_qos0: must be true or false, got 'maybe'"),
        (
            {"server.log_level": "INFO"},
            "server.log_level: must be one of 'debug', 'info', 'warning', 'error', got 'INFO'",
        ),
    ],
)
def test_bad_overrides(tmp_path: Path, overrides: dict[str, object], expected: str) -> None:
    assert str(error_of(tmp_path, None, overrides)) == expected


def test_bad_override_beats_good_file(tmp_path: Path) -> None:
    e = error_of(tmp_path, "[server]\nport = 1884\n", {"server.port": 70000})
    assert e.setting == "server.port"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: config file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: cannot read config file: ")
    assert "\n" not in message


@pytest.mark.parametrize(
    "text",
    [
        "[server\nport = 1\n",
        "[server]\nport = \n",
        "[server]\nport = 1\nport = 2\n",
        '[server]\nhost = "unterminated\n',
    ],
)
def test_bad_toml(tmp_path: Path, text: str) -> None:
    e = error_of(tmp_path, text)
    path = tmp_path / "shardbroker.toml"
    assert str(e).startswith(f"{path}: invalid TOML: ")
    assert "line" in str(e)  # the parser's message, with its position


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "shardbroker.toml"
    path.write_bytes(b"[server]\nhost = '\xff'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid TOML: ")
    assert "\n" not in str(info.value)


def test_acl_filters_are_validated(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[acl]\ndeny_subscribe = ["test/nosubscribe", "secret/#"]\n'))
    assert config.acl.deny_subscribe == ("test/nosubscribe", "secret/#")
    assert load_config(overrides={"acl.deny_publish": "a/+, b"}).acl.deny_publish == ("a/+", "b")
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, '[acl]\ndeny_subscribe = ["a/#/b"]\n'))
    assert str(exc.value).startswith("acl.deny_subscribe:") and "a/#/b" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "[acl]\ndeny_publish = 3\n"))
    assert "list of topic filters" in str(exc.value)


def test_listeners(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
[[listener]]
port = 1884
[[listener]]
type = "mqtts"
host = "0.0.0.0"
certfile = "/c.pem"
keyfile = "/k.pem"
cafile = "/ca.pem"
require_certificate = true
"""))
    plain, tls = config.listeners
    assert (plain.type, plain.host, plain.port) == ("mqtt", "127.0.0.1", 1884)
    assert (tls.type, tls.port, tls.require_certificate, tls.tls_version) == ("mqtts", 8883, True, "tlsv1.2")
    assert config.effective_listeners == config.listeners
    assert load_config().effective_listeners[0].name == "mqtt 127.0.0.1:1883"
    again = load_config(None, {"listener": [dataclasses.asdict(x) for x in config.listeners]})
    assert again.listeners == config.listeners  # how the children get them


def test_trusted_proxies_are_kept_in_normal_form(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[[listener]]\ntype = "ws"\n'
                                         'trusted_proxies = ["10.0.0.0/8", " 192.0.2.1", "2001:DB8::/32"]\n'))
    assert config.listeners[0].trusted_proxies == ("10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32")
    again = load_config(None, {"listener": [dataclasses.asdict(x) for x in config.listeners]})
    assert again.listeners == config.listeners


@pytest.mark.parametrize("table, error", [
    ('type = "wss"', "listener[0]: an wss listener needs certfile and keyfile"),
    ('type = "ws"\npath = "mqtt"', "listener[0].path: must start with '/'"),
    ('type = "mqtts"', "listener[0]: an mqtts listener needs certfile and keyfile"),
    ('certfile = "/c.pem"', "are for mqtts and wss listeners"),
    ('type = "mqtts"\ncertfile = "c"\nkeyfile = "k"\nrequire_certificate = true', "needs a cafile"),
    ('type = "mqtts"\ncertfile = "c"\nkeyfile = "k"\nuse_identity_as_username = true', "needs require_certificate"),
    ('bogus = 1', "listener[0].bogus: unknown listener setting"),
    ('port = 70000', "listener[0].port: must be an integer between 0 and 65535"),
    ('tls_version = "tlsv1.0"', "listener[0].tls_version: must be one of"),
    ('path = "/ws"', "listener[0].path: is for ws and wss listeners"),
    ('proxy_protocol = "yes"', "listener[0].proxy_protocol: must be true or false"),
    ('type = "ws"\ntrusted_proxies = ["10.0.0.300"]',
     "listener[0].trusted_proxies: '10.0.0.300' is not an IP address or network"),
    ('type = "ws"\ntrusted_proxies = ["10.1.2.3/8"]', "listener[0].trusted_proxies: '10.1.2.3/8' is not an IP"),
    ('type = "ws"\ntrusted_proxies = "10.0.0.1"', "listener[0].trusted_proxies: must be a list of IP addresses"),
    ('trusted_proxies = ["10.0.0.1"]', "listener[0].trusted_proxies: is for ws and wss listeners"),
])
def test_bad_listener_is_a_config_error_naming_it(tmp_path: Path, table: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[[listener]]\n" + table + "\n"))
    assert error in str(info.value)


def test_metrics_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[metrics]\nenabled = true\nhost = "::1"\nport = 0\n'))
    assert (config.metrics.enabled, config.metrics.host, config.metrics.port) == (True, "::1", 0)
    assert str(error_of(tmp_path, "[metrics]\nport = 70000\n")) == (
        "metrics.port: must be an integer between 0 and 65535, got 70000")
    assert str(error_of(tmp_path, '[metrics]\nenabled = "yes"\n')) == (
        "metrics.enabled: must be true or false, got 'yes'")


CLUSTER = """[cluster]
node_id = "node-1"
etcd_endpoints = ["http://127.0.0.1:2379/", "https://etcd.example:2379"]
advertise = "127.0.0.2:7000"
lease_ttl = 5
"""


def test_cluster_section(tmp_path: Path) -> None:
    cluster = load_config(write(tmp_path, CLUSTER)).cluster
    assert cluster.enabled and cluster.node_id == "node-1" and cluster.lease_ttl == 5
    assert cluster.etcd_endpoints == ("http://127.0.0.1:2379", "https://etcd.example:2379")
    assert (cluster.advertise, cluster.virtual_shards) == ("127.0.0.2:7000", 1024)
    assert not load_config().cluster.enabled
    overridden = load_config(None, {"cluster.etcd_endpoints": "http://a:1, http://b:2"})
    assert overridden.cluster.etcd_endpoints == ("http://a:1", "http://b:2")


@pytest.mark.parametrize(("text", "expected"), [
    ('[cluster]\nnode_id = "a b"\n',
     "cluster.node_id: must be up to 64 letters, digits, '.', '_' or '-', got 'a b'"),
    ('[cluster]\netcd_endpoints = ["127.0.0.1:2379"]\n',
     "cluster.etcd_endpoints: '127.0.0.1:2379' is not an http(s)://HOST:PORT URL"),
    ('[cluster]\netcd_endpoints = ["http://h:99999"]\n',
     ("cluster.etcd_endpoints: 'http://h:99999' is not an http(s)://HOST:PORT URL:"
      " Port out of range 0-65535")),
    ('[cluster]\nadvertise = "nohost"\n', "cluster.advertise: 'nohost' is not HOST:PORT"),
    ("[cluster]\nlease_ttl = 1\n", "cluster.lease_ttl: must be an integer between 2 and 300, got 1"),
    ("[cluster]\nvirtual_shards = 8\n",
     "cluster.virtual_shards: must be an integer between 16 and 16384, got 8"),
    ('[cluster]\nnode_id = "n"\nadvertise = "h:1"\n',
     "cluster.etcd_endpoints: must be set when cluster.node_id is set"),
    ('[cluster]\nnode_id = "n"\netcd_endpoints = ["http://h:1"]\n',
     "cluster.advertise: must be set when cluster.node_id is set"),
])
def test_bad_cluster_settings(tmp_path: Path, text: str, expected: str) -> None:
    assert str(error_of(tmp_path, text)) == expected


def test_serve_refuses_a_virtual_shard_count_it_cannot_serve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A node serves the 1024 virtual shards its stores index; another count is one line and
    exit status 2, before the data directory is made."""
    from shardbroker.cli.main import main

    data = tmp_path / "data"
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--config", str(write(tmp_path, CLUSTER + "virtual_shards = 2048\n")),
              "--data-dir", str(data)])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err == ("shardbroker: cluster.virtual_shards: a node serves 1024 virtual shards (the"
                   " store's); other counts are not served yet\n")
    assert not data.exists()
