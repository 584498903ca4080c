"""Transports: move a client's bytes and pause or resume reading; no MQTT semantics.

``tcp`` drives a plain TCP socket on readiness callbacks; ``fd_passing`` moves an
accepted socket from the acceptor to its worker. TLS and WebSocket transports go
here, each implementing ``shardbroker.core.client.Transport``.
"""
