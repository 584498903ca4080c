"""Operations: the control channel (``control``), what a worker answers on it (``shard``), and
what the supervisor answers ``shardbroker ctl`` with (``admin``)."""
