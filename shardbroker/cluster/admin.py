"""What ``shardbroker cluster status | drain | forget`` do, against etcd.

* ``status``: the registered nodes with their state and node number (``up``, ``leaving``, ``draining``: up
  but drained; ``down``: named by the map or drained, but not registered), the controller,
  the map version and the virtual shards per node.
* ``drain``: marks a registered node so the controller gives it no shards; the mark has no
  lease, so it outlives the node's restarts until ``forget`` (or ``undrain``) removes it.
* ``forget``: revokes the node's lease, which deletes its registration at once (a dead node's
  shards move without waiting for its TTL; a live node forgotten loses its lease and stops
  serving, as the fence requires), and removes its drain mark.
"""

from __future__ import annotations

from typing import Any

from shardbroker.cluster.controller import read_view
from shardbroker.cluster.etcd import Etcd
from shardbroker.cluster.shardmap import DRAIN_PREFIX, NODES_PREFIX

__all__ = ["UnknownNode", "drain", "forget", "status", "undrain"]


class UnknownNode(Exception):
    """The node named is not known to the cluster."""


def status(etcd: Etcd) -> dict[str, Any]:
    """The cluster's state as plain data (what ``status --json`` prints)."""
    view = read_view(etcd)
    per_node = view.map.per_node() if view.map is not None else {}
    names = sorted(set(view.nodes) | set(per_node) | view.drained)
    nodes = []
    for name in names:
        info = view.nodes.get(name)
        if info is None:
            state = "down"
        elif name in view.drained and info.state == "up":
            state = "draining"
        else:
            state = info.state
        nodes.append({
            "node_id": name, "state": state, "drained": name in view.drained,
            "advertise": info.advertise if info else None,
            "clients": (info.clients or None) if info else None,
            "workers": info.workers if info else None,
            "number": info.number if info else None,
            "vshards": per_node.get(name, 0),
        })
    unowned = sum(1 for v in view.map.vshards if v.slot is None) if view.map else 0
    return {
        "nodes": nodes,
        "controller": view.controller,
        "map_version": view.map.version if view.map is not None else 0,
        "virtual_shards": view.map.count if view.map is not None else None,
        "unassigned_vshards": unowned,
    }


def drain(etcd: Etcd, node_id: str) -> None:
    if etcd.get(NODES_PREFIX + node_id) is None:
        raise UnknownNode(f"node {node_id!r} is not registered")
    etcd.put(DRAIN_PREFIX + node_id, b"")


def undrain(etcd: Etcd, node_id: str) -> bool:
    """Remove the drain mark; whether there was one."""
    return etcd.delete(DRAIN_PREFIX + node_id)


def forget(etcd: Etcd, node_id: str) -> str:
    """Remove the node's registration and drain mark; what was done, in words."""
    entry = etcd.get(NODES_PREFIX + node_id)
    done = []
    if entry is not None:
        if entry.lease:
            etcd.revoke(entry.lease)
        etcd.delete(NODES_PREFIX + node_id)
        done.append("registration removed (lease revoked)")
    if etcd.delete(DRAIN_PREFIX + node_id):
        done.append("drain mark removed")
    if not done:
        view = read_view(etcd)
        if view.map is None or node_id not in view.map.per_node():
            raise UnknownNode(f"node {node_id!r} is not known to the cluster")
        done.append("not registered; the controller moves its shards at its next round")
    return f"node {node_id}: " + ", ".join(done)
