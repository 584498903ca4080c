"""ShardBroker: a sharded, durable MQTT 3.1 / 3.1.1 / 5.0 broker."""

__version__ = "0.1.0"

from shardbroker import _compiled

_compiled.decide()  # the mypyc-compiled modules, or their sources (``_compiled.py``)
