"""Operations: metrics, the control socket, live admin.

Empty so far; the shard's counters are published as ``$SYS`` topics by the core
(``shardbroker.core.broker``) until metrics move here.
"""
