"""Locust load test for an MQTT broker (ShardBroker, Mosquitto, ...), loopback only.

Scenarios (after EMQ's open MQTT benchmark), chosen with ``--mqtt-scenario``:

* ``pairs``    every user is a publisher/subscriber pair on its own topic; the two
               client ids are picked with ``shardbroker.sharding.shard_for`` so that
               each pair crosses shards (``--mqtt-shards``, default CPU count)
* ``fanout``   one user in ``--mqtt-fanout-every`` (default 20) publishes to
               ``locust/fanout``; all the other users subscribe to it
* ``fanin``    one user in ``--mqtt-fanin-every`` (default 10) joins the shared
               subscription ``$share/g/locust/fanin/+``; the others publish to
               ``locust/fanin/<n>``
* ``connect``  connection ramp: users connect (the spawn rate ``-r`` is the ramp)
               and stay idle; watch ``connect`` times and failures

Reported to Locust's statistics (request type ``MQTT``): ``connect``,
``subscribe``, ``publish qosN`` (QoS 0: time in ``publish()``; QoS 1/2: time to
PUBACK / PUBCOMP) and ``deliver qosN`` (end-to-end latency at the subscriber,
from the monotonic timestamp in the first 8 payload bytes).

Options (command line, or the environment variable in brackets):
``--mqtt-scenario`` [MQTT_SCENARIO] pairs|fanout|fanin|connect (default pairs),
``--mqtt-qos`` [MQTT_QOS] 0|1|2 (default 1), ``--mqtt-payload`` [MQTT_PAYLOAD]
bytes (default 64, at least 8), ``--mqtt-rate`` [MQTT_RATE] msg/s per publishing
user (default 10), ``--mqtt-protocol`` [MQTT_PROTOCOL] 3.1.1|5 (default 3.1.1),
``--mqtt-shards`` [MQTT_SHARDS], ``--mqtt-fanout-every``, ``--mqtt-fanin-every``,
``--mqtt-keepalive``. The broker is ``--host mqtt://127.0.0.1:PORT``.

Commands (from the repository root; reports go to loadtests/reports/)::

    mkdir -p loadtests/reports
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 50 -r 25 -t 30s \\
        --host mqtt://127.0.0.1:1883 --mqtt-scenario pairs --mqtt-qos 1 \\
        --csv loadtests/reports/pairs --html loadtests/reports/pairs.html
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 105 -r 50 -t 30s \\
        --host mqtt://127.0.0.1:1883 --mqtt-scenario fanout --mqtt-qos 0 --mqtt-fanout-every 21 \\
        --csv loadtests/reports/fanout --html loadtests/reports/fanout.html
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 55 -r 25 -t 30s \\
        --host mqtt://127.0.0.1:1883 --mqtt-scenario fanin --mqtt-qos 1 --mqtt-fanin-every 11 \\
        --csv loadtests/reports/fanin --html loadtests/reports/fanin.html
    .venv/bin/locust -f loadtests/locustfile.py --headless -u 1000 -r 100 -t 30s \\
        --host mqtt://127.0.0.1:1883 --mqtt-scenario connect \\
        --csv loadtests/reports/connect --html loadtests/reports/connect.html

Locust and paho are pure Python: this tool measures what a realistic client
sees (latencies under a paced load), not the broker's ceiling. For maximum
throughput use ``python -m loadtests.bench``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import sys
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # locust puts only loadtests/ on the path
    sys.path.insert(0, _ROOT)

import gevent
from locust import User, events, task

from loadtests.mqtt_user import MQTTClient, make_payload, parse_host

try:
    from shardbroker.sharding import shard_for
except ImportError:  # pragma: no cover - same hash, for use without the package
    import hashlib

    def shard_for(client_id: str, shards: int) -> int:
        if shards <= 1:
            return 0
        digest = hashlib.blake2b(client_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % shards


SCENARIOS = ("pairs", "fanout", "fanin", "connect")
_seq = itertools.count()
_RUN = secrets.token_hex(3)  # per process: unique client ids across processes and runs


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _add_arguments(parser: Any) -> None:
    env = os.environ.get
    parser.add_argument("--mqtt-scenario", choices=SCENARIOS, env_var="MQTT_SCENARIO",
                        default="pairs", help="pairs | fanout | fanin | connect")
    parser.add_argument("--mqtt-qos", type=int, choices=(0, 1, 2), env_var="MQTT_QOS", default=1,
                        help="QoS of publishes and subscriptions")
    parser.add_argument("--mqtt-payload", type=int, env_var="MQTT_PAYLOAD", default=64,
                        help="payload bytes (at least 8: the timestamp)")
    parser.add_argument("--mqtt-rate", type=float, env_var="MQTT_RATE", default=10.0,
                        help="messages per second per publishing user")
    parser.add_argument("--mqtt-protocol", choices=("3.1.1", "5"), env_var="MQTT_PROTOCOL",
                        default="3.1.1", help="MQTT version")
    parser.add_argument("--mqtt-shards", type=int, env_var="MQTT_SHARDS",
                        default=int(env("MQTT_SHARDS", 0)) or (os.cpu_count() or 1),
                        help="broker shard count, to make pairs cross shards (default CPU count)")
    parser.add_argument("--mqtt-fanout-every", type=int, env_var="MQTT_FANOUT_EVERY", default=20,
                        help="fanout: one publisher per this many users")
    parser.add_argument("--mqtt-fanin-every", type=int, env_var="MQTT_FANIN_EVERY", default=10,
                        help="fanin: one shared subscriber per this many users")
    parser.add_argument("--mqtt-keepalive", type=int, env_var="MQTT_KEEPALIVE", default=60,
                        help="keepalive seconds")


class _Defaults:
    mqtt_scenario = "pairs"
    mqtt_qos = 1
    mqtt_payload = 64
    mqtt_rate = 10.0
    mqtt_protocol = "3.1.1"
    mqtt_shards = os.cpu_count() or 1
    mqtt_fanout_every = 20
    mqtt_fanin_every = 10
    mqtt_keepalive = 60


def _pair_ids(n: int, shards: int) -> tuple[str, str]:
    pub = f"lp-{_RUN}-{os.getpid()}-{n}"
    ps = shard_for(pub, shards)
    for k in range(1000):
        sub = f"ls-{_RUN}-{os.getpid()}-{n}-{k}"
        if shards <= 1 or shard_for(sub, shards) != ps:
            return pub, sub
    return pub, f"ls-{_RUN}-{os.getpid()}-{n}"


class MQTTUser(User):
    """One user: a pair, a publisher, a subscriber or an idle client (by scenario)."""

    host = "mqtt://127.0.0.1:1883"
    publisher: MQTTClient | None = None
    rate = 0.0

    def wait_time(self) -> float:
        if self.publisher is None or self.rate <= 0:
            return 1.0
        # constant pacing: one publish every 1/rate seconds
        return self._pacer(self)

    def on_start(self) -> None:
        from locust import constant_pacing

        o = self.environment.parsed_options or _Defaults()
        self.o = o
        self.n = next(_seq)
        self.qos = o.mqtt_qos
        self.rate = o.mqtt_rate
        self.payload_size = max(8, o.mqtt_payload)
        self._pacer = constant_pacing(1.0 / self.rate if self.rate > 0 else 1.0)
        self.publisher: MQTTClient | None = None
        self.clients: list[MQTTClient] = []
        self.topic = ""
        host, port = parse_host(self.host)
        proto = 5 if o.mqtt_protocol == "5" else 4

        def client(cid: str) -> MQTTClient | None:
            c = MQTTClient(self.environment, cid, host, port, protocol=proto,
                           keepalive=o.mqtt_keepalive)
            if not c.connect():
                return None
            self.clients.append(c)
            return c

        scen = o.mqtt_scenario
        base = f"lc-{_RUN}-{os.getpid()}-{self.n}"
        if scen == "pairs":
            pub_id, sub_id = _pair_ids(self.n, o.mqtt_shards)
            self.topic = f"locust/pairs/{pub_id}"
            sub = client(sub_id)
            if sub is not None and sub.subscribe(self.topic, self.qos):
                self.publisher = client(pub_id)
        elif scen == "fanout":
            if self.n % max(1, o.mqtt_fanout_every) == 0:
                self.topic = "locust/fanout"
                self.publisher = client(base)
            else:
                sub = client(base)
                if sub is not None:
                    sub.subscribe("locust/fanout", self.qos)
        elif scen == "fanin":
            if self.n % max(1, o.mqtt_fanin_every) == 0:
                sub = client(base)
                if sub is not None:
                    sub.subscribe("$share/g/locust/fanin/+", self.qos)
            else:
                self.topic = f"locust/fanin/{self.n}"
                self.publisher = client(base)
        else:  # connect: connect and stay idle
            client(base)

    @task
    def step(self) -> None:
        pub = self.publisher
        if pub is None:
            return
        if self.qos and pub.unacked() > 1000:  # the broker is not acknowledging: do not pile up
            pub.fire(f"publish qos{self.qos}", 0, 0, RuntimeError("over 1000 unacknowledged"))
            gevent.sleep(0.1)
            return
        pub.publish(self.topic, make_payload(self.payload_size), self.qos)

    def on_stop(self) -> None:
        for c in self.clients:
            c.close()
        self.clients = []
        self.publisher = None
