"""Every NAT profile behaves as its ground truth says: the self-test (two vantage hosts in the core) run
against each profile in a lab of its own; plus what makes the self-test and the userspace NAT trustworthy:
a false claim is caught, and a dead userspace NAT drops TCP instead of leaking private addresses.

Needs root (marked ``root``). Each test builds its own lab with a random run id, so ``-n 2`` is safe.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from rawpunch.lab.netns import Lab
from rawpunch.lab.nsproc import pids_in_netns
from rawpunch.lab.profiles import PROFILES
from rawpunch.lab.selftest import run_selftest
from rawpunch.lab.topology import two_nats
from rawpunch.lab.usernat import tcp_bytes
from rawpunch.proto.codec import Endpoint
from rawpunch.punch.segment import Flags, Segment

pytestmark = pytest.mark.root

LabFactory = Callable[..., Lab]


def selftest_lab(lab_factory: LabFactory, profile: str) -> Lab:
    """a behind *profile*, one core router with the probes (b's side is plain Linux: it is not measured)."""
    return lab_factory(two_nats(hops=1, profile_a=profile, profile_b="eim-apdf", probes=True))


def daemon_logs(lab: Lab) -> str:
    return "\n".join(f"--- {n}:\n{lab.daemon_log(n)}" for n in lab.namespaces if lab.daemon_log(n))


@pytest.mark.parametrize("profile", list(PROFILES))
def test_profile_behaves_as_its_ground_truth_says(lab_factory: LabFactory, profile: str) -> None:
    lab = selftest_lab(lab_factory, profile)
    result = run_selftest(lab, host="a")
    print(result)
    assert result.profile == profile
    assert result.ok, f"{result}\n{daemon_logs(lab)}"
    axes = {a.name for a in result.axes}
    assert axes >= {"nat", "mapping", "filtering", "allocation", "unsolicited_syn"}
    assert ("hairpin" in axes) == PROFILES[profile].nat


def test_the_self_test_names_the_axes_a_false_claim_gets_wrong(lab_factory: LabFactory) -> None:
    lab = selftest_lab(lab_factory, "eim-apdf")
    liar = replace(PROFILES["eim-apdf"], name="liar", filtering="endpoint-independent", unsolicited_syn="rst")
    result = run_selftest(lab, host="a", claimed=liar)
    assert not result.ok and result.disagreements == ["filtering", "unsolicited_syn"], str(result)


def send_syn(src: Endpoint, dst: Endpoint) -> None:
    """Runs in a node: one crafted SYN from a raw socket."""
    import socket  # noqa: PLC0415

    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        sock.sendto(tcp_bytes(Segment(src, dst, 1, flags=Flags.SYN)), (dst.host, 0))


def forward_drops(lab: Lab, nat: str) -> int:
    """Packets counted by the userspace profile's 'untranslated TCP never leaves' rule."""
    listing = lab.node(nat).run(["iptables", "-t", "filter", "-L", "FORWARD", "-v", "-x", "-n"]).stdout
    line = next(x for x in listing.splitlines() if "untranslated TCP never leaves" in x)
    return int(line.split()[0])


def test_a_dead_userspace_nat_drops_tcp_instead_of_leaking_it(lab_factory: LabFactory) -> None:
    lab = selftest_lab(lab_factory, "eim-eif")
    pids = pids_in_netns([lab.netns_name("nat-a")]).get(lab.netns_name("nat-a"), [])
    assert len(pids) == 1, f"expected the userspace NAT alone in nat-a, found {pids}"
    os.kill(pids[0], signal.SIGKILL)  # the process the lab started for nat-a; --queue-bypass now applies
    before = forward_drops(lab, "nat-a")
    a, server = lab.topology.address("a"), lab.topology.address("server")
    lab.node("a").call(send_syn, Endpoint(str(a), 45000), Endpoint(str(server), 9))
    deadline = time.monotonic() + 10
    while forward_drops(lab, "nat-a") == before:  # the kernel counts it in the softirq that got it
        assert time.monotonic() < deadline, "the untranslated SYN was not dropped in FORWARD"
        time.sleep(0.01)


def test_teardown_stops_the_userspace_nat(lab_factory: LabFactory) -> None:
    lab = selftest_lab(lab_factory, "apdm-sequential")
    netns = lab.netns_name("nat-a")
    (pid,) = pids_in_netns([netns])[netns]
    lab.close()
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(") ", 1)[1][0] == "Z"  # gone, or a zombie


def test_rawpunch_lab_selftest_command() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "rawpunch", "lab", "selftest", "eim-apdf-icmp", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["ok"] and result["axes"]["unsolicited_syn"]["observed"] == "icmp"
