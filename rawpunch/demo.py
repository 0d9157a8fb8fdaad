"""The built-in demo: a two-NAT lab, the rendezvous server, and a punch between two peers.

Run by ``scripts/demo``. Builds ``two_nats`` in network namespaces, starts ``rawpunch server`` in
the core, runs ``rawpunch peer`` on both hosts behind their NATs (each sends a line through the
punched connection and prints what it received), shows the strategy and the time of each phase,
checks the endpoints against each NAT's conntrack table, and tears the lab down (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from rawpunch.lab.netns import Lab
from rawpunch.lab.scenario import PunchRun, ScenarioError, conntrack_public, punch_peers, start_server
from rawpunch.lab.topology import DEFAULT_HOPS, DEFAULT_PROFILE, two_nats
from rawpunch.proto.codec import Endpoint

NATS = {"a": "nat-a", "b": "nat-b"}
PHASES = ("register", "discover", "exchange", "punch", "splice", "authenticate", "total")


def _describe(lab: Lab, name: str, run: PunchRun, expected: bytes) -> bool:
    connected, endpoint = run.event("connected"), run.event("tcp_endpoint")
    if run.returncode != 0 or connected is None or endpoint is None:
        print(f"  peer {name}: FAILED (exit {run.returncode})\n{run.stderr}")
        return False
    local, public = Endpoint.parse(endpoint["local"]), Endpoint.parse(endpoint["public"])
    seen = conntrack_public(lab, NATS[name], local)
    phases = connected["phases_ms"]
    print(
        f"  peer {name} ({local}, behind {NATS[name]}, public {public}; conntrack on {NATS[name]}: "
        f"{', '.join(sorted({str(e) for e in seen})) or 'nothing'})"
    )
    print(
        f"    connected to {connected['peer']} with {connected['strategy']}, priming TTL "
        f"{connected['priming_ttl']}, {connected['elapsed_ms']:.1f} ms after both registered"
    )
    print("    phases (ms): " + ", ".join(f"{p} {phases[p]:.1f}" for p in PHASES if p in phases))
    print(f"    received: {run.received.decode(errors='replace').strip()!r}")
    return public in seen and run.received == expected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument(
        "--hops", type=int, default=DEFAULT_HOPS, help=f"core routers (default {DEFAULT_HOPS})"
    )
    parser.add_argument(
        "--profile", default=DEFAULT_PROFILE, help=f"NAT profile of both NATs (default {DEFAULT_PROFILE})"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/demo: needs root to build network namespaces: sudo scripts/demo", file=sys.stderr)
        return 3
    topo = two_nats(hops=args.hops, profile_a=args.profile, profile_b=args.profile)
    with Lab(topo) as lab:
        routers = " -- ".join(f"r{i}" for i in range(1, args.hops + 1))
        print(f"lab {lab.run_id}: a -- nat-a [{args.profile}] -- {routers} -- nat-b [{args.profile}] -- b")
        try:
            server = start_server(lab)
        except ScenarioError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"rendezvous server on {server.endpoint} (node 'server')")
        send = {n: f"hello from {n}, through two NATs\n".encode() for n in NATS}
        runs = punch_peers(lab, server.endpoint, secrets.token_urlsafe(16), send, timeout=60)
        ok = all([_describe(lab, n, runs[n], send["b" if n == "a" else "a"]) for n in NATS])
    print("demo:", "direct TCP connection punched, data went both ways" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
