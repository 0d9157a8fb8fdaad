"""The built-in demo: a two-NAT lab, the rendezvous server, and two peers that meet there.

Run by ``scripts/demo``. Prints what each peer learned and checks it against the conntrack
table of its own NAT, then tears the lab down (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from rawpunch.lab.netns import Lab
from rawpunch.lab.scenario import PeerRun, ScenarioError, conntrack_public, run_peers, start_server
from rawpunch.lab.topology import two_nats
from rawpunch.proto.codec import Endpoint

HOSTS = {"a": "nat-a", "b": "nat-b"}


def _describe(lab: Lab, name: str, run: PeerRun) -> bool:
    nat = HOSTS[name]
    ev = run.events
    host = lab.node(name).address
    if run.returncode != 0 or "go" not in ev:
        print(f"  peer {name}: FAILED (exit {run.returncode})\n{run.stderr}")
        return False
    mine, peer = ev["tcp_endpoint"], ev["peer"]
    seen = conntrack_public(lab, nat, Endpoint(str(host), mine["local_port"]))
    agrees = Endpoint.parse(mine["public"]) in seen
    print(f"  peer {name} ({host}, behind {nat}):")
    print(f"    own public UDP endpoint     {ev['registered']['udp']}")
    print(
        f"    own public TCP endpoint     {mine['public']} (local port {mine['local_port']}); "
        f"conntrack on {nat}: {', '.join(map(str, seen)) or 'nothing'} -> {'agrees' if agrees else 'DIFFERS'}"
    )
    print(f"    peer's public UDP endpoint  {peer['udp']}")
    print(f"    peer's public TCP endpoint  {', '.join(t['public'] for t in peer['tcp']) or 'none'}")
    print(f"    go after                    {ev['go']['delay_ms']} ms")
    return agrees


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument("--hops", type=int, default=2, help="core routers between the NATs (default 2)")
    parser.add_argument("--profile", default="eim-apdf", help="NAT profile of both NATs (default eim-apdf)")
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
        runs = run_peers(lab, server.endpoint, secrets.token_urlsafe(16), timeout=30)
        ok = all([_describe(lab, name, runs[name]) for name in HOSTS])
    print("demo:", "both peers paired and learned each other's public endpoints" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
