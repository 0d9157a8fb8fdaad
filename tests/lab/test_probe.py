"""``rawpunch probe`` behind every lab NAT profile, checked axis by axis against the profile's ground truth.

Each case builds its own lab (``two_nats(server_alt=True)``: the server has a second address), starts
``rawpunch server --alt-address`` and runs ``rawpunch probe --json`` on host a, exactly as a user would.
The ground truth is the profile of a's NAT, or for a double NAT the composition of its layers
(``compose_chain``: what a host behind both sees, which is all a probe from inside can see).

Where the probe cannot see an axis from inside, the test says so instead of comparing:

* hairpinning without a NAT: a SYN to the host's own address never leaves the host; the probe reports
  None (not applicable) where the ground truth says False.
* simultaneous open has no ground-truth key: every lab NAT (conntrack, the userspace model) supports it,
  so the probe must report True where it can test it (mapping EIM or ADM: the low-TTL SYN's flow reuses
  the known mapping) and None for APDM.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from rawpunch.lab.netns import Lab
from rawpunch.lab.profiles import PROFILES, compose_chain, get_profile
from rawpunch.lab.scenario import RAWPUNCH, start_server
from rawpunch.lab.topology import SERVER_ALT_ADDR, two_nats
from rawpunch.probe.result import NatBehaviour

pytestmark = pytest.mark.root

AXES = ("nat", "mapping", "filtering", "allocation", "unsolicited_syn", "hairpin")
JSON_KEYS = {
    "mapping",
    "filtering",
    "allocation",
    "unsolicited_syn",
    "simultaneous_open",
    "hops_to_nat",
    "priming_ttl",
    "hairpin",
    "rfc5382",
}


def _run_probe(lab: Lab, cache_dir: Path, *args: str) -> tuple[dict[str, Any], str, float]:
    server = start_server(lab, args=("--alt-address", str(SERVER_ALT_ADDR)))
    argv = [*RAWPUNCH, "probe", "--server", str(server.endpoint), "--json", *args]
    started = time.monotonic()
    done = lab.node("a").run(["env", f"RAWPUNCH_CACHE_DIR={cache_dir}", *argv], check=False, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, f"rawpunch probe failed:\n{done.stderr}\nserver log:\n" + "\n".join(
        server.log
    )
    return json.loads(done.stdout), done.stderr, elapsed


def _truth(lab: Lab) -> Any:
    chain = [get_profile(lab.topology.node(n).profile or "") for n in lab.topology.nat_chain("a")]
    return compose_chain(chain)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_probe_agrees_with_the_ground_truth(profile: str, lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory(two_nats(hops=2, profile_a=profile, server_alt=True))
    result, stderr, elapsed = _run_probe(lab, tmp_path)
    print(f"{profile}: rawpunch probe took {elapsed:.2f} s (wall, including start-up)\n{stderr}")
    assert set(result) >= JSON_KEYS, f"{profile}: JSON lacks {JSON_KEYS - set(result)}"
    truth = _truth(lab)
    wrong = []
    for axis in AXES:
        expected: object = getattr(truth, axis)
        if axis == "hairpin" and not truth.nat:
            expected = None  # not applicable without a NAT (module docstring)
        if result[axis] != expected:
            wrong.append(f"{axis}: probe says {result[axis]!r}, ground truth {expected!r}")
    layers = len(lab.topology.nat_chain("a")) if truth.nat else None
    if result["hops_to_nat"] != layers:
        wrong.append(f"hops_to_nat: probe says {result['hops_to_nat']}, the lab has {layers} NAT hop(s)")
    if result["priming_ttl"] != (layers or 1) + 1:
        wrong.append(f"priming_ttl: probe says {result['priming_ttl']}, expected {(layers or 1) + 1}")
    simultaneous = True if truth.mapping != "address-and-port-dependent" else None
    if result["simultaneous_open"] is not simultaneous:
        wrong.append(f"simultaneous_open: probe says {result['simultaneous_open']}, expected {simultaneous}")
    assert not wrong, f"profile {profile}: " + "; ".join(wrong) + f"\n{stderr}"
    checklist = {c["req"]: c["status"] for c in result["rfc5382"]}
    if truth.nat:
        assert checklist["REQ-1"] == ("pass" if truth.mapping == "endpoint-independent" else "fail"), profile
        assert checklist["REQ-4"] == ("pass" if truth.unsolicited_syn == "drop" else "fail"), profile
    # The probe stored its result in the per-network cache (RAWPUNCH_CACHE_DIR keeps it inside the test).
    cached = json.loads((tmp_path / "probe-cache.json").read_text())
    assert [NatBehaviour.from_json(e["behaviour"]).mapping for e in cached.values()] == [result["mapping"]]


def test_probe_without_alt_address_reports_what_it_can(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory(two_nats(hops=2, profile_a="apdm-sequential", server_alt=True))
    server = start_server(lab)  # no --alt-address: the server has no probe part
    done = lab.node("a").run(
        [*RAWPUNCH, "probe", "--server", str(server.endpoint), "--json", "--no-cache"],
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "no NAT probe part" in done.stderr
    assert (result["allocation"], result["allocation_delta"]) == ("sequential", 1)
    assert result["hops_to_nat"] == 1
    for axis in ("mapping", "filtering", "unsolicited_syn"):
        assert result[axis] == "unknown", axis


def test_probe_of_an_unreachable_server_fails_with_one_clear_line(lab_factory: Any) -> None:
    lab = lab_factory(two_nats(hops=1, server_alt=True))  # nothing listens on the server
    done = lab.node("a").run(
        [*RAWPUNCH, "probe", "--server", "203.0.113.10:3478", "--no-cache"], check=False, timeout=60
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().startswith("rawpunch probe: no answer from"), done.stderr


def test_probe_timers_bracket_the_mapping_lifetimes(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory(two_nats(hops=2, profile_a="eim-apdf", server_alt=True))
    # conntrack's timeouts are per namespace: a NAT that forgets SYN_SENT and ESTABLISHED after 3 s. 3 s is
    # 2 s more than the 1 s wait that must survive (a loaded machine only delays the server's packet); the
    # 4 s wait must find the entry expired, and any delay only adds to that.
    for state in ("syn_sent", "established"):
        lab.node("nat-a").run(["sysctl", "-q", "-w", f"net.netfilter.nf_conntrack_tcp_timeout_{state}=3"])
    result, stderr, _ = _run_probe(lab, tmp_path, "--timers", "--timer-limit", "4")
    timers = result["extra"]["timers"]
    for name in ("syn_sent", "established"):
        assert timers[name]["waits_s"] == [1.0, 4.0], stderr
        assert timers[name]["alive"] == [True, False], f"{name}: {timers[name]}\n{stderr}"
        assert timers[name]["expired_within_s"] == 4.0
    checklist = {c["req"]: c["status"] for c in result["rfc5382"]}
    assert (checklist["REQ-5"], checklist["REQ-6"]) == ("fail", "unknown")  # REQ-6 is about ALGs
