"""Punches over a core with latency, jitter and loss: the lab's zero-delay links flatter every technique.

The middle core router delays each packet 20 ms +- 5 ms and drops 3% (userspace NFQUEUE impairment here;
netem where the kernel has it). Peers synchronise only through the rendezvous' GO and measured RTTs.
"""

from __future__ import annotations

import os

import pytest

from rawpunch.lab.impair import Impairment
from rawpunch.lab.netns import Lab
from rawpunch.lab.scenario import punch_peers, start_server
from rawpunch.lab.topology import two_nats

pytestmark = pytest.mark.root

PUNCHES = 5


@pytest.mark.parametrize("profile", ["eim-apdf", "eim-apdf-rst"])
def test_punches_succeed_over_an_impaired_core(profile: str) -> None:
    impairment = Impairment(delay_ms=20, jitter_ms=5, loss=0.03, seed=7)
    with Lab(two_nats(hops=2, profile_a=profile, profile_b=profile, impairment=impairment)) as lab:
        server = start_server(lab)
        for i in range(PUNCHES):
            send = {"a": f"a{i}".encode() * 1000, "b": f"b{i}".encode() * 1000}
            runs = punch_peers(lab, server.endpoint, os.urandom(12).hex(), send, timeout=90)
            for name, other in (("a", "b"), ("b", "a")):
                run = runs[name]
                assert run.returncode == 0, f"punch {i}, peer {name}:\n{run.stderr}"
                assert run.received == send[other]
                connected = run.event("connected")
                assert connected is not None
                # The handshake crossed the impaired core: at least one 20 ms-ish hop each way.
                assert connected["phases_ms"]["punch"] > 20
