"""The peer layer: what shards say to each other (``messages``) and how it travels (``bus``)."""
