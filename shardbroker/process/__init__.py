"""The processes: the supervisor (``serve``), the acceptor and the workers, and their plumbing.

These are the asyncio shells around the sans-I/O core: event loops, signals,
ordered shutdown, process restarts.
"""
