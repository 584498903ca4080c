"""What one login costs the broker's CPU: a SCRAM exchange (server side: ``ScramExchange``,
HMACs only) against a password checked against its ``$7$`` hash (PBKDF2, the cost a
password login pays when its digest is not remembered yet).

    python -m loadtests.scram_cost [--iterations 210000] [--rounds 20]

The client's side of SCRAM (its PBKDF2 of the password, once per login) is outside the
timing: it is the client's CPU, not the broker's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import scramp

from shardbroker.security import scram
from shardbroker.security.passwords import hash_password


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtests.scram_cost")
    ap.add_argument("--iterations", type=int, default=210_000, help="PBKDF2 rounds of the user's hash")
    ap.add_argument("--rounds", type=int, default=20, help="exchanges timed per method")
    args = ap.parse_args(argv)
    entry = hash_password(b"pw", args.iterations)
    keys = scram.ScramFile()
    keys.entries["u"] = (scram.derive(scram.SHA256, "pw", args.iterations), scram.fingerprint(entry))
    for method in scram.METHODS:
        times = []
        for _ in range(args.rounds):
            client = scramp.ScramClient([method], "u", "pw")
            server = scram.ScramExchange(method, lambda user, m=method: scram.keys_for(m, entry, keys, user), b"k" * 32)
            t0 = time.perf_counter()
            first = server.first(client.get_client_first().encode())
            spent = time.perf_counter() - t0
            client.set_server_first(first.decode())
            final = client.get_client_final()  # the client's PBKDF2: not timed
            t0 = time.perf_counter()
            client.set_server_final(server.final(final.encode()).decode())
            times.append(spent + time.perf_counter() - t0)
        print(f"{method}: {statistics.median(times) * 1e6:.0f} us of broker CPU per login (median of {args.rounds})")
    t0 = time.perf_counter()
    entry.verify(b"pw")
    print(f"password against its $7$ hash ({args.iterations} rounds): {(time.perf_counter() - t0) * 1e3:.1f} ms per login "
          "(once per user and password: a verified one is remembered)")


if __name__ == "__main__":
    main()
