"""The broker core: MQTT semantics of one shard, sans-I/O.

Sessions and takeover, CONNECT, inbound and outbound publishes, subscriptions and
the route table, the durable outbox between shards, flow decisions and the sweep.
It talks to clients through ``client.Transport`` and to the store through the
batch it is given; time comes in as an argument. It imports no socket, ssl, zmq,
lmdb or asyncio (an import contract in ``pyproject.toml`` checks this).
"""
