"""ACL files in Mosquitto's syntax, with Mosquitto 2.0's precedence.

The file::

    # topics before the first "user" line are for clients without a username
    topic read public/#
    user alice
    topic readwrite alice/#
    topic deny alice/secret
    pattern readwrite devices/%c/#
    pattern read users/%u/inbox

``topic [read|write|readwrite|deny] FILTER`` (no access word means readwrite) grants
the current user (none before the first ``user`` line: anonymous clients);
``pattern ...`` grants every client, ``%c`` standing for its client ID and ``%u``
for its username (a pattern with ``%u`` does not apply to a client without one).
A line that is not a comment, blank, ``user``, ``topic`` or ``pattern`` is an error,
as is a filter that is not a valid topic filter.

A check, for one client, one topic and read or write:

1. the client's own rules (its user's, or the anonymous ones): a matching ``deny``
   refuses; otherwise a matching rule that grants the access allows;
2. if the client ID or username contains ``+`` or ``#`` and there are patterns,
   refused (such a value would turn a pattern into a wildcard);
3. the patterns, substituted: a matching ``deny`` refuses; otherwise a matching
   pattern that grants the access allows. A pattern whose substituted value holds a
   ``/`` never allows: ``devices/%c/#`` for client ID ``a/b`` would reach into the
   space of client ``a`` (Mosquitto's issue 3520). A ``deny`` pattern still applies;
4. refused.

Matching is topic-filter matching, so a rule never matches a ``$`` topic unless it
starts with ``$`` itself. With no ACL file there is nothing here and everything is
allowed (the broker's own ``$SYS`` rule aside, ``core.access``).

Subscriptions: Mosquitto 2.0 grants every SUBSCRIBE and filters at delivery. Here a
SUBSCRIBE is refused when no message could ever be delivered under it (no rule
that grants read overlaps the filter, or a ``deny`` covers all of it), and granted
otherwise; every message is still checked for read at delivery, retained messages
included, so a subscriber never receives what it may not read.

Pure: parsing from text, checks from strings; no I/O besides ``load``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shardbroker.core.topics import matches, validate_topic_filter
from shardbroker.protocol.errors import ProtocolError

__all__ = ["READ", "WRITE", "AclFile", "AclFileError", "ClientAcl", "covers", "load", "overlaps"]

READ = 1
WRITE = 2
DENY = 0
_ACCESS = {"read": READ, "write": WRITE, "readwrite": READ | WRITE, "deny": DENY}
CACHE_SIZE = 1024  # topics whose answer a client keeps


class AclFileError(Exception):
    """An ACL file that cannot be read or does not parse (the message names file and line)."""


@dataclass(frozen=True, slots=True)
class Rule:
    access: int  # READ | WRITE bits; DENY (0) refuses
    topic: str  # a topic filter; in a pattern, with %c / %u still in it


@dataclass(slots=True)
class AclFile:
    users: dict[str | None, list[Rule]] = field(default_factory=dict)  # None: clients without a username
    patterns: list[Rule] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, name: str = "acl file") -> AclFile:
        acl = cls()
        user: str | None = None
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.rstrip()
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            word, _, rest = line.strip().partition(" ")
            rest = rest.strip()
            if word == "user":
                if not rest:
                    raise AclFileError(f"{name}, line {n}: 'user' without a username")
                user = rest
                acl.users.setdefault(user, [])
            elif word in ("topic", "pattern"):
                access_word, _, topic = rest.partition(" ")
                topic = topic.strip()
                if not topic:  # "topic FILTER": readwrite
                    access_word, topic = "readwrite", access_word
                if not topic:
                    raise AclFileError(f"{name}, line {n}: '{word}' without a topic")
                if access_word not in _ACCESS:
                    raise AclFileError(f"{name}, line {n}: access {access_word!r} is not read, write, "
                                       "readwrite or deny")
                try:
                    validate_topic_filter(topic)
                except ProtocolError as exc:
                    raise AclFileError(f"{name}, line {n}: {exc.message}") from None
                rule = Rule(_ACCESS[access_word], topic)
                if word == "topic":
                    acl.users.setdefault(user, []).append(rule)
                else:
                    acl.patterns.append(rule)
            else:
                raise AclFileError(f"{name}, line {n}: {word!r} is not user, topic or pattern")
        return acl

    def for_client(self, username: str | None, client_id: str) -> ClientAcl:
        """The rules that apply to one client, patterns substituted."""
        own = self.users.get(username, [])
        dangerous = bool(self.patterns) and any(c in v for v in (client_id, username or "") for c in "+#")
        patterns: list[Rule] = []
        if not dangerous:
            for rule in self.patterns:
                if "%u" in rule.topic and username is None:
                    continue
                topic = rule.topic.replace("%c", client_id)
                if username is not None:
                    topic = topic.replace("%u", username)
                widened = ("/" in client_id and "%c" in rule.topic) or (
                    username is not None and "/" in username and "%u" in rule.topic)
                if widened and rule.access != DENY:
                    continue
                try:
                    validate_topic_filter(topic)
                except ProtocolError:
                    continue
                patterns.append(Rule(rule.access, topic))
        return ClientAcl(own, patterns, dangerous)


class ClientAcl:
    """One client's view of the ACL file: ``allows(topic, READ or WRITE)`` and
    ``may_subscribe(filter)``; answers for recent topics are kept."""

    __slots__ = ("_cache", "_dangerous", "_patterns", "_rules")

    def __init__(self, rules: list[Rule], patterns: list[Rule], dangerous: bool) -> None:
        self._rules = rules
        self._patterns = patterns
        self._dangerous = dangerous
        # answers by access and topic (no key to build per check: deliveries ask it per message)
        self._cache: dict[int, dict[str, bool]] = {READ: {}, WRITE: {}}

    def allows(self, topic: str, access: int) -> bool:
        cache = self._cache[access]
        known = cache.get(topic)
        if known is None:
            known = self._decide(topic, access)
            if len(cache) >= CACHE_SIZE:
                cache.clear()
            cache[topic] = known
        return known

    def _decide(self, topic: str, access: int) -> bool:
        for rules in (self._rules, self._patterns):
            if any(r.access == DENY and matches(r.topic, topic) for r in rules):
                return False
            if any(r.access & access and matches(r.topic, topic) for r in rules):
                return True
            if self._dangerous:
                return False  # the patterns do not apply to such a client
        return False

    def may_subscribe(self, topic_filter: str) -> bool:
        """Whether a message could ever be delivered under ``topic_filter`` (not shared)."""
        for rules in (self._rules, self._patterns):
            if any(r.access == DENY and covers(r.topic, topic_filter) for r in rules):
                return False
        return any(r.access & READ and overlaps(r.topic, topic_filter)
                   for rules in (self._rules, self._patterns) for r in rules)


def _levels(flt: str) -> list[str]:
    return flt.split("/")


def covers(rule: str, topic_filter: str) -> bool:
    """Whether every topic that ``topic_filter`` matches is matched by ``rule``."""
    if topic_filter[:1] == "$" and rule[:1] in ("+", "#"):
        return False  # the filter matches $ topics, which a wildcard first level never does
    r, f = _levels(rule), _levels(topic_filter)
    for i, level in enumerate(f):
        if i >= len(r):
            return False
        rl = r[i]
        if rl == "#":
            return True
        if level == "#":
            return False  # the filter reaches any depth; the rule stops somewhere
        if rl == "+":
            continue
        if level == "+" or level != rl:
            return False
    if len(r) == len(f):
        return True
    return len(r) == len(f) + 1 and r[-1] == "#"  # 'a/#' covers 'a'


def overlaps(rule: str, topic_filter: str) -> bool:
    """Whether some topic is matched by both filters."""
    if (rule[:1] == "$") != (topic_filter[:1] == "$"):
        # a $ topic is matched only by filters that start with its first level literally,
        # and such a filter matches no other topic
        return False
    r, f = _levels(rule), _levels(topic_filter)
    for i in range(max(len(r), len(f))):
        rl = r[i] if i < len(r) else None
        fl = f[i] if i < len(f) else None
        if rl == "#" or fl == "#":
            return True
        if rl is None or fl is None:
            return False
        if rl == "+" or fl == "+" or rl == fl:
            continue
        return False
    return True


def load(path: str | Path) -> AclFile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AclFileError(f"{path}: cannot read the ACL file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise AclFileError(f"{path}: the ACL file is not UTF-8 text") from None
    return AclFile.parse(text, str(path))
