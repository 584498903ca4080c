"""Prometheus metrics and health checks over HTTP, served by a thread of the supervisor.

``[metrics] enabled = true``: ``GET /metrics`` (Prometheus text format), ``/healthz`` (200
while the supervisor lives) and ``/readyz`` (200 when every shard answers, has the routes of
every other shard and can write its store, and the acceptor answers; otherwise 503 and one
line per reason, in plain text).

The values are gathered at each scrape from the processes themselves, over the control
sockets (``Admin.gather_stats``), rather than with the client library's multiprocess mode:
its files of a worker that restarted would have to be cleaned up by hand and would add a
dead process's values to a live one's; a shard's answer is consistent in itself (read
between two events of its loop); and a shard that does not answer is visible
(``shardbroker_shard_up{shard="N"} 0``) instead of silently missing from a sum.

Naming: ``shardbroker_<what>_<unit>``, counters ending in ``_total``, seconds and bytes.
Per-shard series carry a ``shard`` label; totals are ``sum without (shard) (...)``. No
total series is added beside them, which ``sum`` would count twice; the retained messages
(one store shared by every worker) and the acceptor have no shard label.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shardbroker import __version__
from shardbroker.operations.admin import Admin, Gathered
from shardbroker.process.runtime import ANNOUNCE

log = logging.getLogger("shardbroker.operations.metrics")

SCRAPE_TIMEOUT = 2.0  # seconds every process has to answer a scrape
READY_TIMEOUT = 1.0  # seconds every process has to answer /readyz

# (metric, help, counter in a shard's answer, extra labels)
_SHARD_COUNTERS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    *(("shardbroker_messages_received_total", "PUBLISH messages received from clients", f"received_qos{q}",
       {"qos": str(q)}) for q in range(3)),
    *(("shardbroker_messages_sent_total", "PUBLISH messages sent to subscribers (resends not counted)",
       f"delivered_qos{q}", {"qos": str(q)}) for q in range(3)),
    ("shardbroker_publish_received_bytes_total", "payload bytes of the PUBLISH messages received",
     "received_bytes", {}),
    ("shardbroker_publish_sent_bytes_total", "payload bytes of the PUBLISH messages sent", "delivered_bytes", {}),
    ("shardbroker_messages_forwarded_total", "messages sent to other shards", "forwarded", {}),
    ("shardbroker_vshards_moved_total", "virtual shards that took persistent sessions to or from another node",
     "shards_moved_out", {"direction": "out"}),
    ("shardbroker_vshards_moved_total", "virtual shards that took persistent sessions to or from another node",
     "shards_moved_in", {"direction": "in"}),
    ("shardbroker_sessions_moved_total", "persistent sessions moved to or from another node",
     "sessions_moved_out", {"direction": "out"}),
    ("shardbroker_sessions_moved_total", "persistent sessions moved to or from another node",
     "sessions_moved_in", {"direction": "in"}),
    *(("shardbroker_messages_dropped_total", "messages not delivered, by reason", key, {"reason": reason})
      for reason, key in (("queue_full", "dropped_queue_full"), ("too_large", "dropped_too_large"),
                          ("not_authorized", "dropped_not_authorized"), ("expired", "expired"))),
    ("shardbroker_protocol_errors_total", "clients disconnected for a protocol error", "protocol_errors", {}),
    ("shardbroker_auth_failures_total", "failed logins", "auth_failures", {}),
    ("shardbroker_subscriptions_refused_total", "subscriptions refused", "subscriptions_refused", {}),
    ("shardbroker_store_commits_total", "group commits of the shard's store", "commits", {}),
    ("shardbroker_backlogs_total", "backlogs that held publishers back", "backlogs", {}),
    ("shardbroker_publisher_holds_total", "times a publisher was held back by a backlog", "holds", {}),
    ("shardbroker_slow_subscribers_total", "subscribers found too slow to hold publishers for",
     "slow_subscribers", {}),
    ("shardbroker_publish_rate_holds_total", "times a client was held to its publish rate", "publish_rate_holds", {}),
    ("shardbroker_bus_sent_messages_total", "peer messages sent to other shards", "bus_sent", {}),
    ("shardbroker_bus_received_messages_total", "peer messages received from other shards", "bus_received", {}),
    ("shardbroker_bus_waited_batches_total", "peer batches that waited for room in a full pipe", "bus_waited", {}),
    ("shardbroker_bus_holds_total", "times the shard held its inputs while the bus was full", "flow_holds", {}),
    ("shardbroker_bus_refused_keys_total",
     "connections from other nodes refused: not a registered node's key", "bus_refused_keys", {}),
    ("shardbroker_bus_refused_frames_total",
     "batches from other nodes refused: the sender is not registered under that lease", "bus_refused_frames", {}),
    ("shardbroker_bus_shed_batches_total", "batches dropped for a worker of another node that took nothing",
     "bus_shed", {}),
    ("shardbroker_move_relayed_messages_total",
     "copies of QoS 1/2 publishes relayed to the node a moving session went to", "moves_relayed", {}),
    ("shardbroker_move_duplicate_messages_total",
     "copies for a moved-in session that came both straight and relayed, taken once", "moves_duplicates", {}),
    ("shardbroker_move_unrelayed_messages_total", "QoS 0 copies for a moving session, not relayed",
     "moves_not_relayed", {}),
    ("shardbroker_move_unmatched_messages_total", "relayed copies for a session not held here, dropped",
     "moves_unmatched", {}),
    ("shardbroker_move_merged_sessions_total",
     "moved sessions that met one of the same client ID here: one kept, with the messages of both",
     "moves_merged", {}),
    ("shardbroker_route_repairs_total", "peers asked for all their routes again after a route digest differed",
     "route_repairs", {}),
    ("shardbroker_replica_records_sent_total",
     "session copies sent to the backups of this worker's virtual shards", "replicas_sent", {}),
    ("shardbroker_sessions_restored_total",
     "sessions taken from copies held here when their node was lost", "sessions_restored", {}),
    ("shardbroker_replica_queries_total",
     "virtual shards taken here with no session copies, whose copies were asked of the other workers",
     "replicas_asked", {}),
    ("shardbroker_replica_queries_unanswered_total",
     "of those, the ones served without copies (nobody answered in time: new sessions)",
     "replicas_not_found", {}),
    ("shardbroker_qos2_resends_waited_total",
     ("QoS 2 publishes sent again to a session taken from a copy, under an id the copy did not name, that"
      " waited for the lost node's session"), "resends_waited", {}),
    ("shardbroker_qos2_resends_had_total",
     "of those, the ones the lost node had taken and routed: acknowledged only", "resends_had", {}),
    ("shardbroker_move_refilled_messages_total",
     "QoS 2 messages of a lost node sent again under the packet id held for them", "moves_refilled", {}),
    ("shardbroker_lost_routes_total",
     ("workers of nodes whose registration ended whose durable routes were kept for their virtual shards to be"
      " taken, by event (kept; dropped once taken, or when the time ran out)"), "lost_routes_kept", {"event": "kept"}),
    ("shardbroker_lost_routes_total", "", "lost_routes_taken", {"event": "taken"}),
    ("shardbroker_lost_routes_total", "", "lost_routes_expired", {"event": "expired"}),
    ("shardbroker_forwarded_to_lost_total",
     "QoS 1/2 publishes put in the outbox for a lost node's sessions before their shards were taken",
     "forwarded_to_lost", {}),
    ("shardbroker_bus_unreached_messages_total",
     "peer messages dropped: for a worker of another node no longer reached (durable ones are resent once it is back)",
     "bus_unreached", {}),
)
_SHARD_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("shardbroker_connections", "client connections", "connections"),
    ("shardbroker_sessions", "sessions, connected or not", "sessions"),
    ("shardbroker_sessions_offline", "sessions without a connection (persistent ones)", "sessions_offline"),
    ("shardbroker_subscriptions", "subscriptions of the sessions", "subscriptions"),
    ("shardbroker_queued_messages", "messages queued for sessions", "queued"),
    ("shardbroker_queued_bytes", "payload bytes queued for sessions", "queued_bytes"),
    ("shardbroker_inflight_messages", "QoS 1/2 messages sent and not yet acknowledged", "inflight"),
    ("shardbroker_inflight_bytes", "payload bytes in flight", "inflight_bytes"),
    ("shardbroker_local_filters", "filters this shard's sessions subscribe to", "filters"),
    ("shardbroker_route_table_filters", "filters in the shard's route table (every shard's)", "routes"),
    ("shardbroker_outbox_messages", "durable forwards not yet acknowledged by their shard", "handover_pending"),
    ("shardbroker_bus_backlog_batches", "peer batches waiting for room", "bus_backlog"),
    ("shardbroker_synced_peers", "shards whose routes this shard knows", "synced_peers"),
    ("shardbroker_remote_peers", "workers of other nodes this shard's bus reaches", "remote_peers"),
    ("shardbroker_vshards_moving_in", "virtual shards served here still waiting for their sessions",
     "vshards_moving_in"),
    ("shardbroker_replica_sessions", "session copies held here as the backup of other nodes' virtual shards",
     "replicas_held"),
    ("shardbroker_outbox_remote_messages", "durable forwards not yet acknowledged by workers of other nodes",
     "handover_remote"),
    ("shardbroker_route_digest",
     "top 48 bits of the digest of this shard's own routes; its peers hold the same", "route_digest"),
    ("shardbroker_store_used_bytes", "bytes of the store file in use", "store_used_bytes"),
    ("shardbroker_store_map_bytes", "the store's current map size", "store_map_bytes"),
    ("shardbroker_store_full", "1 while the store refuses new QoS 1/2 work", "store_full"),
)
_SHARD_HISTOGRAMS = (
    ("shardbroker_store_commit_duration_seconds", "time of one group commit of the shard's store", "commit_seconds"),
    ("shardbroker_store_commit_operations", "store operations in one group commit", "commit_ops"),
)
_ACCEPTOR_COUNTERS = (
    ("shardbroker_acceptor_accepted_connections_total", "connections accepted", "accepted", {}),
    ("shardbroker_acceptor_handed_off_connections_total", "connections handed to a worker", "handed_off", {}),
    ("shardbroker_acceptor_unserved_connections_total",
     "CONNECTs a cluster node refused: their virtual shard is not served here", "refused_unserved", {}),
    ("shardbroker_acceptor_relayed_connections_total",
     "clients a cluster node relayed to the node that serves their virtual shard", "relayed", {}),
    ("shardbroker_acceptor_relay_failed_connections_total",
     "clients a cluster node refused because the node that serves them could not be reached",
     "relay_failed", {}),
    ("shardbroker_acceptor_redirected_connections_total",
     "MQTT 5.0 clients a cluster node redirected to the node that serves them (CONNACK 0x9C)",
     "redirected", {}),
    *(("shardbroker_acceptor_refused_connections_total", "connections closed by a limit, by limit", key,
       {"limit": limit}) for limit, key in (("max_connection_rate", "refused_rate"),
                                            ("max_connections", "refused_max_connections"),
                                            ("max_connections_per_address", "refused_max_connections_per_address"))),
)
_ACCEPTOR_GAUGES = (
    ("shardbroker_acceptor_open_connections", "open connections counted by the acceptor", "open"),
    ("shardbroker_acceptor_pending_connections", "connections whose CONNECT has not arrived yet", "pending"),
    ("shardbroker_acceptor_relays", "connections relayed by the acceptor (TLS, WebSocket, to another node)",
     "relays"),
)


def _histogram(family: HistogramMetricFamily, labels: list[str], snap: dict[str, Any]) -> None:
    buckets = [(str(float(b)), float(n)) for b, n in zip(snap["bounds"], snap["cumulative"], strict=True)]
    buckets.append(("+Inf", float(snap["count"])))
    family.add_metric(labels, buckets, float(snap["sum"]))


def cluster_families(status: dict[str, Any]) -> Iterator[Metric]:
    """A cluster node's own state (``cluster.node.ClusterNode.status``)."""
    yield GaugeMetricFamily("shardbroker_cluster_member", "1 while this node holds a lease in etcd",
                            value=1 if status["member"] else 0)
    yield GaugeMetricFamily("shardbroker_cluster_lease_remaining_seconds",
                            "seconds this node's lease is sure to live (0 without one)",
                            value=status["lease_seconds"])
    yield GaugeMetricFamily("shardbroker_cluster_controller", "1 while this node is the placement controller",
                            value=1 if status["controller"] else 0)
    yield GaugeMetricFamily("shardbroker_cluster_map_version",
                            "version of the shard map this node's processes serve from (0: none)",
                            value=status["map_version"])
    shards = GaugeMetricFamily("shardbroker_cluster_virtual_shards",
                               "virtual shards of this node: served now, or the map's that it holds back"
                               " until every other node has applied the map", labels=["state"])
    shards.add_metric(["served"], status["served"])
    shards.add_metric(["held_back"], status["held_back"])
    yield shards


def families(got: Gathered, shards: int, started: float, took: float) -> Iterator[Metric]:
    """The metric families of one gathering (``started``: the supervisor's wall-clock start)."""
    info = GaugeMetricFamily("shardbroker_info", "the broker's version", labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    yield GaugeMetricFamily("shardbroker_start_time_seconds", "when the broker started (Unix time)", value=started)
    yield GaugeMetricFamily("shardbroker_scrape_gather_seconds", "time to gather this scrape from the processes",
                            value=took)
    if got.cluster is not None:
        yield from cluster_families(got.cluster)
    up = GaugeMetricFamily("shardbroker_shard_up", "1 if the shard answered this scrape", labels=["shard"])
    for n in range(shards):
        up.add_metric([str(n)], 1 if str(n) in got.shards else 0)
    yield up
    answers = sorted(got.shards.items(), key=lambda kv: int(kv[0]))
    counters: dict[str, CounterMetricFamily] = {}
    for name, doc, key, extra in _SHARD_COUNTERS:
        family = counters.get(name)
        if family is None:
            family = counters[name] = CounterMetricFamily(name, doc, labels=["shard", *extra])
        for shard, answer in answers:
            family.add_metric([shard, *extra.values()], answer["counters"].get(key, 0))
    held = CounterMetricFamily("shardbroker_bus_hold_seconds_total", "seconds the shard held its inputs while the "
                               "bus was full", labels=["shard"])
    fill = GaugeMetricFamily("shardbroker_store_fill_ratio", "pages in use over storage.max_map_size",
                             labels=["shard"])
    for shard, answer in answers:
        held.add_metric([shard], answer["values"]["flow_held_seconds"])
        fill.add_metric([shard], answer["values"]["store_fill"])
    yield from counters.values()
    yield held
    yield fill
    for name, doc, key in _SHARD_GAUGES:
        gauge = GaugeMetricFamily(name, doc, labels=["shard"])
        for shard, answer in answers:
            gauge.add_metric([shard], answer["counters"].get(key, 0))
        yield gauge
    for name, doc, key in _SHARD_HISTOGRAMS:
        hist = HistogramMetricFamily(name, doc, labels=["shard"])
        for shard, answer in answers:
            _histogram(hist, [shard], answer["histograms"][key])
        yield hist
    if answers:
        yield GaugeMetricFamily("shardbroker_retained_messages", "retained messages (one store for every shard)",
                                value=max(answer["values"]["retained"] for _, answer in answers))
    acceptor = got.acceptor
    yield GaugeMetricFamily("shardbroker_acceptor_up", "1 if the acceptor answered this scrape",
                            value=0 if acceptor is None else 1)
    if acceptor is None:
        return
    acc_counters: dict[str, CounterMetricFamily] = {}
    for name, doc, key, extra in _ACCEPTOR_COUNTERS:
        family = acc_counters.get(name)
        if family is None:
            family = acc_counters[name] = CounterMetricFamily(name, doc, labels=list(extra))
        family.add_metric(list(extra.values()), acceptor["counters"].get(key, 0))
    yield from acc_counters.values()
    for name, doc, key in _ACCEPTOR_GAUGES:
        yield GaugeMetricFamily(name, doc, value=acceptor["counters"].get(key, 0))
    hist = HistogramMetricFamily("shardbroker_acceptor_handoff_duration_seconds",
                                 "from the first byte of a CONNECT read to its hand-off sent to the worker")
    _histogram(hist, [], acceptor["histograms"]["handoff_seconds"])
    yield hist


class BrokerCollector(Collector):
    """Gathers from every process at each scrape."""

    def __init__(self, admin: Admin, started: float) -> None:
        self.admin = admin
        self.started = started

    def collect(self) -> Iterable[Metric]:
        begun = time.monotonic()
        got = self.admin.gather_stats(SCRAPE_TIMEOUT)
        return list(families(got, self.admin.shards, self.started, time.monotonic() - begun))


def not_ready(got: Gathered, shards: int) -> list[str]:
    """Why the broker is not ready (empty: it is): one line per process and reason."""
    reasons: list[str] = []
    for shard in range(shards):
        answer = got.shards.get(str(shard))
        if answer is None:
            reasons.append(f"shard {shard}: {got.missing.get(str(shard), 'no answer')}")
            continue
        ready = answer["ready"]
        if ready["unsynced"]:
            reasons.append(f"shard {shard}: routes not synced with shards {ready['unsynced']}")
        if not ready["store_writable"]:
            reasons.append(f"shard {shard}: store not writable (full)")
    cluster = got.cluster
    if cluster is not None:
        if not cluster["member"]:
            reasons.append(f"cluster: node {cluster['node_id']} holds no lease (etcd not reached, or"
                           " its lease was lost)")
        elif not cluster["served"]:
            reasons.append(f"cluster: node {cluster['node_id']} serves no virtual shard (map version"
                           f" {cluster['map_version']})")
    if got.acceptor is None:
        reasons.append(f"acceptor: {got.acceptor_missing or 'no answer'}")
    return reasons


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def application(admin: Admin, started: float) -> WsgiApp:
    """The WSGI application: ``/metrics``, ``/healthz``, ``/readyz``; 404 otherwise."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(admin, started))
    metrics = make_wsgi_app(registry)

    def plain(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
        body = text.encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            return plain(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            reasons = not_ready(admin.gather_stats(READY_TIMEOUT), admin.shards)
            if reasons:
                return plain(start_response, "503 Service Unavailable", "".join(r + "\n" for r in reasons))
            return plain(start_response, "200 OK", "ready\n")
        return plain(start_response, "404 Not Found", "not found: try /metrics, /healthz or /readyz\n")

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one line every few seconds per scraper)."""


class MetricsServer:
    """The HTTP server, bound at construction (a port in use fails before any child starts)."""

    def __init__(self, host: str, port: int, admin: Admin) -> None:
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = make_server(host, port, application(admin, time.time()), server_class, _QuietHandler)
        except OSError as exc:
            raise SystemExit(f"shardbroker: cannot serve metrics on {host}:{port}: "
                             f"{exc.strerror or exc} (metrics.host, metrics.port)") from None
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()
        logging.getLogger(ANNOUNCE).info("metrics on http://%s:%d (/metrics, /healthz, /readyz)",
                 f"[{self.host}]" if ":" in self.host else self.host, self.port)

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
