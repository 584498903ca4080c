"""Selections and previews for the control channel (``shardbroker ctl``), pure and small
enough for the supervisor to check a request before it asks the shards.

A topic selection (``ctl subscriptions FILTER``) is either a glob (it has ``*``, ``?`` or
``[``) on the filter as subscribed, or an MQTT filter that *covers* the subscription's
filter: every topic the subscription matches, it matches too (``$share/GROUP/`` set
aside). So ``a/#`` selects ``a/b`` and ``a/+/c``, and ``a/+`` does not select ``a/#``.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase

from shardbroker.core.topics import parse_shared, validate_topic_filter
from shardbroker.protocol.errors import ProtocolError
from shardbroker.security.acl import covers

RETAINED_LIMIT = 1000  # retained messages in one answer unless the request says otherwise
PREVIEW_BYTES = 32  # of a retained payload, shown escaped

_GLOB = frozenset("*?[")
_BYTES = tuple("\\\\" if b == 0x5C else chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in range(256))


def is_glob(text: str) -> bool:
    return not _GLOB.isdisjoint(text)


def checked_filter(text: str) -> str:
    """``text`` if it is a valid MQTT topic filter; ValueError (one line) otherwise."""
    try:
        validate_topic_filter(text)
    except ProtocolError as exc:
        raise ValueError(f"not a valid topic filter: {exc.message}") from None
    return text


def subscription_selector(selection: str | None) -> Callable[[str], bool]:
    """Whether a filter as subscribed is selected by ``selection`` (see the module's docstring)."""
    if not selection:
        return lambda flt: True
    if is_glob(selection):
        return lambda flt: fnmatchcase(flt, selection)
    checked_filter(selection)

    def covered(flt: str) -> bool:
        shared = parse_shared(flt)
        return covers(selection, shared[1] if shared is not None else flt)

    return covered


def preview(payload: bytes, size: int = PREVIEW_BYTES) -> str:
    """The first ``size`` bytes, printable ASCII as they are and the rest as ``\\xNN``."""
    out = "".join(_BYTES[b] for b in payload[:size])
    return out + "..." if len(payload) > size else out
