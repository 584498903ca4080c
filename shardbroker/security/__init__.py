"""Security: authentication (CONNECT, then an AUTH exchange) and access-rule sources.

Empty so far. Access rules are checked through ``shardbroker.core.access``; an ACL
file will be one more source of rules for it, and authenticators will run before a
client reaches ``shardbroker.core.connect``.
"""
