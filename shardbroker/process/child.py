"""Entry point of the supervisor's child processes:
``python -m shardbroker.process.child acceptor|worker N --run-dir DIR --shards N`` with the
resolved configuration as JSON in ``SHARDBROKER_CONFIG``.

Exit status 2 means a fatal configuration or store error that a restart cannot
fix (the supervisor then stops the broker instead of restarting the process).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from shardbroker.config import ConfigError, load_config
from shardbroker.process.runtime import setup_logging

FATAL = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardbroker.process.child")
    parser.add_argument("role", choices=["acceptor", "worker"])
    parser.add_argument("shard", nargs="?", type=int, default=0)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, action="append", default=[],
                        help="a listening socket, in the order of the configured listeners")
    args = parser.parse_args(argv)
    # SIGHUP asks a worker to reload its files; until its handler is in, and in the
    # acceptor, it must not end the process (its default action)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_parent()
    try:
        config = load_config(None, json.loads(os.environ["SHARDBROKER_CONFIG"]))
    except (ConfigError, KeyError, ValueError) as exc:
        print(f"shardbroker: bad configuration handed to child: {exc}", file=sys.stderr)
        return FATAL
    setup_logging(config.server.log_level, config.server.log_format)
    log = logging.getLogger("shardbroker.process.child")
    if args.role == "acceptor":
        from shardbroker.process import acceptor

        acceptor.run(config, args.listen_fd, args.run_dir, args.shards)
        return 0
    from shardbroker.process import worker
    from shardbroker.security.acl import AclFileError
    from shardbroker.security.passwords import PasswordFileError
    from shardbroker.storage.lmdb_store import StoreError

    try:
        worker.run(config, args.shard, args.shards, args.run_dir)
    except (StoreError, PasswordFileError, AclFileError) as exc:
        log.error("shard %d: %s", args.shard, exc)
        return FATAL
    return 0


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the supervisor dies, even by SIGKILL, so no child outlives it."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
