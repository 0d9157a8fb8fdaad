"""Observability: a recorded run leaves, next to its results, a pcap of each NAT's WAN side with the run's
packets in it (and no private address: the WAN never sees one), conntrack events (or the userspace NAT's
log), the rules, the kernel release and each NAT's conntrack sysctls.

Needs root (marked ``root``); each test builds its own lab.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from rawpunch.lab.netns import Lab
from rawpunch.lab.observe import KEY_SYSCTLS, Recorder
from rawpunch.lab.selftest import MAPPING_PORT, run_selftest
from rawpunch.lab.topology import PRIVATE_RANGES, two_nats

pytestmark = pytest.mark.root

LabFactory = Callable[..., Lab]


def recorded_selftest(lab_factory: LabFactory, profile: str, directory: Path) -> Lab:
    lab = lab_factory(two_nats(hops=1, profile_a=profile, probes=True))
    with Recorder(lab, directory) as recorder:
        recorder.save("selftest", run_selftest(lab, host="a").as_dict())
    return lab


def test_a_recorded_run_keeps_pcaps_conntrack_events_and_the_environment(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = recorded_selftest(lab_factory, "eim-apdf", tmp_path)
    assert json.loads((tmp_path / "selftest.json").read_text())["ok"]

    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["kernel"] == os.uname().release
    assert set(environment["nats"]) == {"nat-a", "nat-b"}
    for nat in environment["nats"].values():
        assert set(KEY_SYSCTLS) <= set(nat["conntrack_sysctls"])
        assert nat["profile"]["name"] == "eim-apdf"

    public = str(lab.topology.public_address("nat-a"))
    packets = [p for p in rdpcap(str(tmp_path / "nat-a-wan.pcap")) if IP in p]
    syns = [p for p in packets if TCP in p and p[TCP].flags == "S" and p[IP].src == public]
    assert any(p[TCP].sport == MAPPING_PORT and p[TCP].dport == 7000 for p in syns)
    private = [p.summary() for p in packets if any(IPv4Address(p[IP].src) in r for r in PRIVATE_RANGES)]
    assert not private, private

    events = (tmp_path / "nat-a-conntrack.txt").read_text()
    a = lab.topology.address("a")
    assert f"[NEW] tcp      6 120 SYN_SENT src={a} dst=" in events
    assert "*nat" in (tmp_path / "nat-a-rules.txt").read_text()


def test_the_userspace_nat_logs_its_mappings(lab_factory: LabFactory, tmp_path: Path) -> None:
    recorded_selftest(lab_factory, "eim-eif", tmp_path)
    log = (tmp_path / "nat-a-usernat.log").read_text()
    assert "NEW outbound 10.0.1.2:41000 > " in log
    assert "NEW inbound " in log  # the filtering probes that EIF let in
