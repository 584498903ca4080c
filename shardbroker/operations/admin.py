"""What the supervisor answers on ``DATA_DIR/control.sock`` (``shardbroker ctl``).

Three ways to ask the workers:

- every shard at once (``control.gather``): ``stats``, ``clients``, ``subscriptions``,
  ``routes``; the lists are merged and sorted;
- the shard that owns a client ID (``sharding.shard_for``; on a cluster node the worker the
  shard map names, ``cluster.node.ClusterNode.owner``): ``client``, ``kick``;
- one live shard, the next when one does not answer: ``retained`` and ``retained_digest``
  (the retained store is shared by every worker).

Every answer carries ``missing`` (shard number → why it gave no answer), so a shard that
does not answer in time is named, never hidden. Selections are checked here, before any
shard is asked, so a bad one is an error of the request rather than of every shard.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardbroker.operations.control import TIMEOUT, Operations, Request, gather
from shardbroker.operations.select import RETAINED_LIMIT, checked_filter, subscription_selector
from shardbroker.sharding import shard_for

CONTROL_SOCKET = "control.sock"  # in the data directory: ``shardbroker ctl`` finds the broker by it


def shard_socket(run_dir: str, shard: int) -> str:
    return os.path.join(run_dir, f"ctl-{shard}.sock")


def acceptor_socket(run_dir: str) -> str:
    return os.path.join(run_dir, "ctl-acceptor.sock")


ACCEPTOR = "acceptor"


@dataclass(frozen=True, slots=True)
class Gathered:
    """The ``stats`` answers of one round: ``shards`` (shard number as text → answer),
    ``missing`` (→ why none came), the acceptor's answer or why it gave none, and on a
    cluster node what the node holds (``cluster.node.ClusterNode.status``)."""

    shards: dict[str, Any]
    missing: dict[str, str]
    acceptor: dict[str, Any] | None
    acceptor_missing: str | None
    cluster: dict[str, Any] | None = None

    def total(self) -> dict[str, int]:
        """The shards' ``counters`` summed over those that answered."""
        total: dict[str, int] = {}
        for result in self.shards.values():
            for name, value in result["counters"].items():
                total[name] = total.get(name, 0) + value
        return total


class Admin(Operations):
    """The supervisor's operations. ``reload`` is the supervisor's own (called from the control
    thread): it reloads the configuration, as SIGHUP does, and returns the answer; it raises
    ``ValueError`` (answered as the error) when the new configuration does not load."""

    def __init__(self, run_dir: str, shards: int, reload: Callable[[], dict[str, Any]]) -> None:
        self.run_dir = run_dir
        self.shards = shards
        self._reload = reload
        # the shard of a client ID (a cluster node sets the map's)
        self.owner: Callable[[str], int] = lambda client_id: shard_for(client_id, self.shards)
        # what a cluster node holds (set by the supervisor of a cluster node)
        self.cluster_status: Callable[[], dict[str, Any]] | None = None
        self.ops = {
            "stats": self.stats,
            "reload": self.reload,
            "clients": self.clients,
            "client": self.client,
            "kick": self.kick,
            "subscriptions": self.subscriptions,
            "routes": self.routes,
            "route_digests": self.route_digests,
            "retained": self.retained,
            "retained_digest": self.retained_digest,
        }

    def ask_shards(self, request: Request, shards: list[int] | None = None) -> dict[str, Any]:
        """``{"shards": {n: result}, "missing": {n: why}}`` for ``request`` sent to ``shards``
        (all of them by default)."""
        wanted = range(self.shards) if shards is None else shards
        results, missing = gather({str(i): shard_socket(self.run_dir, i) for i in wanted}, request)
        return {"shards": results, "missing": missing}

    def gather_stats(self, timeout: float = TIMEOUT) -> Gathered:
        """Every shard's and the acceptor's ``stats`` answer, asked all at once."""
        paths = {str(i): shard_socket(self.run_dir, i) for i in range(self.shards)}
        paths[ACCEPTOR] = acceptor_socket(self.run_dir)
        results, missing = gather(paths, {"op": "stats"}, timeout)
        acceptor = results.pop(ACCEPTOR, None)
        acceptor_missing = missing.pop(ACCEPTOR, None)
        cluster = self.cluster_status() if self.cluster_status is not None else None
        return Gathered(results, missing, acceptor, acceptor_missing, cluster)

    def tell_all(self, request: Request) -> dict[str, Any]:
        """``request`` to every shard and to the acceptor at once: ``ask_shards``' answer, with
        ``acceptor`` (its result, None when it gave none) and ``acceptor_missing`` (why not)."""
        paths = {str(i): shard_socket(self.run_dir, i) for i in range(self.shards)}
        paths["acceptor"] = acceptor_socket(self.run_dir)
        results, missing = gather(paths, request)
        out: dict[str, Any] = {"acceptor": results.pop("acceptor", None)}
        if "acceptor" in missing:
            out["acceptor_missing"] = missing.pop("acceptor")
        out.update(shards=results, missing=missing)
        return out

    def stats(self, request: Request) -> dict[str, Any]:
        """Every shard's counters, their totals over the shards that answered, and the
        acceptor's counters (``acceptor``, None when it did not answer)."""
        got = self.gather_stats()
        out: dict[str, Any] = {"shards": got.shards, "missing": got.missing,
                               "acceptor": got.acceptor["counters"] if got.acceptor else None}
        if got.acceptor_missing is not None:
            out["acceptor_missing"] = got.acceptor_missing
        out["total"] = got.total()
        if got.cluster is not None:
            out["cluster"] = got.cluster
        return out

    def reload(self, request: Request) -> dict[str, Any]:
        """Reload now; ``{"changed": [live settings applied], "restart_needed": [...], "shards":
        {n: result}, "missing": {n: why}, "acceptor": ...}``."""
        return self._reload()

    def _merged(self, request: Request, key: str, order: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        """The ``key`` lists of every shard's answer, as one list in ``order``."""
        out = self.ask_shards(request)
        rows = [row for result in out.pop("shards").values() for row in result[key]]
        rows.sort(key=order)
        return {key: rows, "missing": out["missing"]}

    def clients(self, request: Request) -> dict[str, Any]:
        """Connected clients of every shard (``pattern``: a glob on the client ID), by client ID."""
        pattern = request.get("pattern")
        if pattern is not None and not isinstance(pattern, str):
            raise TypeError("'pattern' is a string")
        return self._merged({"op": "clients", "pattern": pattern}, "clients", lambda c: c["client_id"])

    def _owner(self, request: Request) -> tuple[int, dict[str, Any]]:
        """Send ``request`` (which names a client ID) to the shard that owns the client."""
        client_id = request.get("client_id")
        if not isinstance(client_id, str):
            raise TypeError("'client_id' is a string")
        owner = self.owner(client_id)
        out = self.ask_shards({"op": request["op"], "client_id": client_id}, [owner])
        return owner, out

    def client(self, request: Request) -> dict[str, Any]:
        """One client in detail, from the shard that owns it; ``client`` None when unknown."""
        owner, out = self._owner(request)
        result = out["shards"].get(str(owner))
        return {"shard": owner, "client": result["client"] if result else None, "missing": out["missing"]}

    def kick(self, request: Request) -> dict[str, Any]:
        """Disconnect a client on the shard that owns it; ``kicked`` False when not connected."""
        owner, out = self._owner(request)
        result = out["shards"].get(str(owner)) or {"kicked": False, "version": None}
        return {"shard": owner, "client_id": request["client_id"], "kicked": result["kicked"],
                "version": result["version"], "missing": out["missing"]}

    def subscriptions(self, request: Request) -> dict[str, Any]:
        """Subscriptions of every shard's sessions (``filter``: a selection, see ``select``), by
        filter, then client ID."""
        selection = request.get("filter")
        if selection is not None and not isinstance(selection, str):
            raise TypeError("'filter' is a string")
        subscription_selector(selection)  # a bad filter: an error of the request
        return self._merged({"op": "subscriptions", "filter": selection}, "subscriptions",
                            lambda s: (s["filter"], s["client_id"]))

    def routes(self, request: Request) -> dict[str, Any]:
        """The route table: each key with the shards that hold it (and where it is durable), as
        the shards that answered know it (each keeps a full copy), and each one's count."""
        out = self.ask_shards({"op": "routes"})
        holders: dict[str, dict[int, bool]] = {}
        counts: dict[str, int] = {}
        for shard, result in out["shards"].items():
            counts[shard] = result["count"]
            for key, shards in result["routes"].items():
                seen = holders.setdefault(key, {})
                for s, durable in shards.items():
                    seen[int(s)] = seen.get(int(s), False) or durable
        routes = [{"filter": key, "shards": sorted(seen), "durable": sorted(s for s, d in seen.items() if d)}
                  for key, seen in sorted(holders.items())]
        return {"routes": routes, "count": len(routes), "counts": counts, "missing": out["missing"]}

    def route_digests(self, request: Request) -> dict[str, Any]:
        """Each shard's digest of its own routes and of those it holds for each peer
        (``ShardOps.route_digests``), and whether this node's shards agree among themselves:
        ``{"shards": {n: {"own", "peers"}}, "missing", "agree"}``. Another node's workers are
        peers by their peer id (number * 256 + worker); comparing across nodes takes every
        node's answer."""
        out = self.ask_shards({"op": "route_digests"})
        got = out["shards"]
        out["agree"] = not out["missing"] and all(
            int(digest) == got[peer]["own"] for result in got.values()
            for peer, digest in result["peers"].items() if peer in got)
        return out

    def retained(self, request: Request) -> dict[str, Any]:
        """Retained messages (``filter``, ``limit``) from the first shard that answers; those
        asked before it are under ``skipped``, and under ``missing`` only when none answered."""
        flt = request.get("filter") or "#"
        if not isinstance(flt, str):
            raise TypeError("'filter' is a string")
        limit = request.get("limit", RETAINED_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError("the limit is a positive integer")
        checked_filter(flt)
        return self._one_shard({"op": "retained", "filter": flt, "limit": limit},
                               {"retained": [], "truncated": False})

    def retained_digest(self, request: Request) -> dict[str, Any]:
        """The digest of the node's retained messages (``count``, ``digest``), from the first
        shard that answers, as ``retained``."""
        return self._one_shard({"op": "retained_digest"}, {"count": None, "digest": None})

    def _one_shard(self, ask: Request, nothing: dict[str, Any]) -> dict[str, Any]:
        """The answer of the first shard that answers ``ask``, with the shards asked before it
        under ``skipped``; ``nothing`` with every shard under ``missing`` when none does."""
        skipped: dict[str, str] = {}
        for shard in range(self.shards):
            out = self.ask_shards(ask, [shard])
            result = out["shards"].get(str(shard))
            if result is not None:
                result["skipped"] = skipped
                result["missing"] = {}
                return dict(result)
            skipped[str(shard)] = out["missing"][str(shard)]
        return {**nothing, "skipped": {}, "missing": skipped}
