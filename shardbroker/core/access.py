"""Access rules: what a client may publish and subscribe to, checked in one place.

Every check goes through ``AccessRules``: a PUBLISH, a will (a publish made on the
client's behalf later), a SUBSCRIBE, a delivery, and ``$SYS``, which is the broker's own
and read-only for clients. The sources, in the order they are asked: the broker's own
rule (``$SYS``), ``[acl]`` in the configuration (filters kept in tries, so a check costs
one match whatever the number of rules), and the client's view of the ACL file
(``shardbroker.security.acl.ClientAcl``, None without one), which keeps its recent
answers.

A check returns ``None`` when allowed, else the reason for the log and the client.
No I/O; nothing here knows sessions or connections.
"""

from __future__ import annotations

from collections.abc import Iterable

from shardbroker.core.topics import TopicTrie, parse_shared
from shardbroker.security.acl import WRITE, ClientAcl

SYS_PREFIX = "$SYS"


def is_sys(topic: str) -> bool:
    """Whether ``topic`` is a ``$SYS`` topic (the broker's, read-only for clients)."""
    return topic[:1] == "$" and (topic.startswith("$SYS/") or topic == SYS_PREFIX)


class AccessRules:
    def __init__(self, deny_publish: Iterable[str] = (), deny_subscribe: Iterable[str] = ()) -> None:
        self.set_rules(deny_publish, deny_subscribe)

    def set_rules(self, deny_publish: Iterable[str], deny_subscribe: Iterable[str]) -> None:
        """The ``[acl]`` rules (at start, and at a reload: checks from then on use the new ones)."""
        publish: TopicTrie[int, None] = TopicTrie()
        subscribe: TopicTrie[int, None] = TopicTrie()
        for i, flt in enumerate(deny_publish):
            publish.add(flt, i, None)
        for i, flt in enumerate(deny_subscribe):
            subscribe.add(flt, i, None)
        self._deny_publish, self._deny_subscribe = publish, subscribe
        self._any_publish_rule = len(publish) > 0  # checked per PUBLISH: no trie call
        self._any_subscribe_rule = len(subscribe) > 0

    def publish_denied(self, topic: str, acl: ClientAcl | None = None) -> str | None:
        """Why a client may not publish to ``topic`` (a PUBLISH or a will), or None."""
        if is_sys(topic):
            return "$SYS is read-only for clients"
        if self._any_publish_rule and self._deny_publish.match(topic):
            return "refused by acl.deny_publish"
        if acl is not None and not acl.allows(topic, WRITE):
            return "not allowed to write by the ACL file"
        return None

    def subscribe_denied(self, topic_filter: str, acl: ClientAcl | None = None) -> str | None:
        """Why a client may not subscribe to ``topic_filter`` (shared or not), or None.

        A rule refuses a filter whose levels it matches as if they were a topic, so
        ``a/#`` refuses ``a/+/b`` and ``a/#`` alike. The ACL file refuses a filter under
        which nothing could ever be read (``ClientAcl.may_subscribe``).
        """
        shared = parse_shared(topic_filter)
        inner = shared[1] if shared is not None else topic_filter
        if self._any_subscribe_rule and self._deny_subscribe.match(inner):
            return "refused by acl.deny_subscribe"
        if acl is not None and not acl.may_subscribe(inner):
            return "nothing under it may be read by the ACL file"
        return None
