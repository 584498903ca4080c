"""process/reload.py: which changed settings a reload applies and which need a restart."""

from __future__ import annotations

import dataclasses

from shardbroker.config import Config, load_config
from shardbroker.process.reload import LIVE, plan


def _cfg(**overrides: object) -> Config:
    return load_config(None, overrides)


def test_nothing_changed_is_an_empty_plan():
    p = plan(_cfg(), _cfg())
    assert p.changed == () and p.restart_needed == () and p.config == _cfg()


def test_live_settings_are_applied_and_the_others_keep_their_running_value():
    running = _cfg(**{"server.port": 1883, "limits.max_topic_length": 1000})
    new = _cfg(**{"server.port": 1999, "limits.max_topic_length": 100, "limits.receive_maximum": 5,
                  "storage.durability": "no-fsync", "acl.deny_publish": ["x/#"]})
    p = plan(running, new)
    assert p.changed == ("limits.max_topic_length", "acl.deny_publish")
    assert p.restart_needed == ("server.port", "limits.receive_maximum", "storage.durability")
    assert p.config.limits.max_topic_length == 100 and p.config.acl.deny_publish == ("x/#",)
    assert p.config.server.port == 1883 and p.config.limits.receive_maximum == 100
    assert p.config.storage.durability == "fsync"


def test_a_listener_s_auth_files_are_live_its_address_is_not():
    one = {"type": "mqtt", "host": "127.0.0.1", "port": 1883}
    running = _cfg(listener=[one])
    new = _cfg(listener=[dict(one, port=1884, password_file="/etc/pw", allow_anonymous=True)])
    p = plan(running, new)
    assert p.changed == ("listener[0].allow_anonymous", "listener[0].password_file")
    assert p.restart_needed == ("listener[0].port",)
    assert p.config.listeners[0].port == 1883 and p.config.listeners[0].password_file == "/etc/pw"
    more = plan(running, _cfg(listener=[one, dict(one, port=1885)]))
    assert more.restart_needed == ("listener",) and more.config.listeners == running.listeners


def test_every_live_name_is_a_setting():
    names = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config) if s.name != "listeners"
             for f in dataclasses.fields(getattr(Config(), s.name))}
    assert set(LIVE) <= names
    assert not {n for n in LIVE if n.startswith("storage.") or n in ("server.port", "server.workers")}
