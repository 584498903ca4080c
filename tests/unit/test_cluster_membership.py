"""``cluster/membership.py`` without etcd: an object that answers as etcd would, slowly where
a test needs it (the real etcd: tests/integration/test_40_cluster_etcd.py)."""

from __future__ import annotations

import time

from shardbroker.cluster.etcd import Compare, Put
from shardbroker.cluster.membership import Membership, NodeInfo


class SlowGrantEtcd:
    """Grants a lease ``grant_delay`` seconds after it is asked (an answer that arrives late,
    once a link is back); keeps it alive at once, noting when."""

    def __init__(self, grant_delay: float) -> None:
        self.grant_delay = grant_delay
        self.keepalives: list[float] = []

    def grant(self, ttl: int) -> int:
        time.sleep(self.grant_delay)
        return 0x1234

    def txn(self, compare: list[Compare], success: list[Put]) -> bool:
        return True

    def keepalive(self, lease: int) -> int:
        self.keepalives.append(time.monotonic())
        return 3

    def revoke(self, lease: int) -> None:
        pass


def test_a_join_answered_late_is_renewed_before_the_watchdog_ends_the_lease() -> None:
    """TTL 3 s: the watchdog declares the lease lost 2 s after the grant was sent unless it
    was renewed. A grant answered 1.2 s late used to be renewed only a third of the TTL after
    the join (2.2 s after the grant was sent), so a node that joined after a partition lost
    its new lease at once and registered again."""
    etcd = SlowGrantEtcd(grant_delay=1.2)
    lost: list[float] = []
    member = Membership(etcd, NodeInfo("n1", "127.0.0.1:7100", 1), 3,  # type: ignore[arg-type]
                        lost.append)
    sent = time.monotonic()
    member.join()
    member.start()
    try:
        time.sleep(2.5)
        assert not lost, f"lost {lost} s before the end: no renewal in time"
        assert etcd.keepalives and etcd.keepalives[0] - sent < 2.0, etcd.keepalives
    finally:
        member.stop()


def test_a_prompt_join_is_first_renewed_a_third_of_the_ttl_later() -> None:
    etcd = SlowGrantEtcd(grant_delay=0.0)
    member = Membership(etcd, NodeInfo("n1", "127.0.0.1:7100", 1), 3,  # type: ignore[arg-type]
                        lambda left: None)
    member.join()
    joined = time.monotonic()
    member.start()
    try:
        time.sleep(1.3)
        assert len(etcd.keepalives) == 1 and 0.8 < etcd.keepalives[0] - joined < 1.2
    finally:
        member.stop()
