"""Port exhaustion without root: the sweep's schedule and checks (``rawpunch.strategy.sweep``), two sweeps
pumped through the pure NAT model, the patched SYN template and the all-ports firewall rules."""

from __future__ import annotations

import dataclasses
import random

import pytest

from rawpunch.lab.profiles import get_profile
from rawpunch.probe.result import NatBehaviour
from rawpunch.proto.codec import Endpoint
from rawpunch.proto.peerinfo import PeerInfo
from rawpunch.punch import natmodel
from rawpunch.punch.firewall import PunchFlow, render_apply
from rawpunch.punch.natmodel import Forward, Nat
from rawpunch.punch.rawio import to_bytes, with_source_port
from rawpunch.punch.segment import Flags, Segment, TcpOptions, seq_add
from rawpunch.strategy import exhaustion, sweep
from rawpunch.strategy.base import PeerView
from rawpunch.strategy.sweep import Side, Sweep, SweepPlan

A_PUB, B_PUB = "198.51.100.1", "198.51.100.18"
A_LAN, B_LAN = "10.0.1.2", "10.0.2.2"
CORE = "198.51.100.2"
A_ISN, B_ISN = 1_000_000, 3_000_000_000
OPTIONS = TcpOptions(1460, 10, True, (12345, 0))
SMALL = (50000, 50063)  # a 64-port NAT range: exhaustion in a unit test


def plan_pair(
    sides: tuple[Side, Side], ports: tuple[tuple[int, ...], tuple[int, ...]], **kw: object
) -> tuple[SweepPlan, SweepPlan]:
    common = {"priming_ttl": 2, "rtt": 0.06, "options": OPTIONS, **kw}
    a = SweepPlan(sides, 0, ports[0], A_LAN, B_PUB, A_ISN, B_ISN, **common)  # type: ignore[arg-type]
    b = SweepPlan(sides, 1, ports[1], B_LAN, A_PUB, B_ISN, A_ISN, **common)  # type: ignore[arg-type]
    return a, b


# --- the schedule -----------------------------------------------------------------------------------------


def test_knocking_starts_after_both_opens_and_the_side_with_few_flows_knocks_every_round() -> None:
    sides = (sweep.exhausting_side(5000), sweep.sequential_side(7000, 1))
    a, b = plan_pair(sides, (tuple(range(1024, 65536)), tuple(range(20000, 20000 + sweep.REACH))))
    assert a.knock_start == b.knock_start >= a.open_time(0) == 64512 / sweep.EXHAUSTION_RATE
    assert a.first_knocker == b.first_knocker == 1  # the sequential side's 1,024 flows: cheaper
    assert [a.knocker(r) for r in range(4)] == [1, 1, 1, 1]  # 64,512 unsolicited SYNs would buy nothing
    both = plan_pair((sides[0], sweep.exhausting_side(9000)), (a.local_ports, a.local_ports))[0]
    assert [both.knocker(r) for r in range(4)] == [0, 1, 0, 1]  # two exhausting sides take turns
    assert a.target == Endpoint(B_PUB, sides[1].aim) and b.target == Endpoint(A_PUB, sides[0].aim)
    assert sides[1].aim == 7000 + sweep.REACH  # the REACH-th next port: any of its flows may get it
    assert a.probability == pytest.approx(1.0)


def test_opens_go_out_at_the_rate_with_the_priming_ttl_and_knocks_at_the_knockers_turn() -> None:
    n = 2000  # more than REACH: two exhausting sides, which take turns
    sides = (sweep.exhausting_side(5000, flows=n), sweep.exhausting_side(6000, flows=n))
    a, b = plan_pair(sides, (tuple(range(2000, 2000 + n)), tuple(range(7000, 7000 + n))), rate=10_000.0)
    sw = Sweep(a)
    sw.start(10.0)
    first = sw.to_send(10.0)
    assert [len(x.ports) for x in first] == [1]
    opened = first[0].segment
    assert (opened.flags, opened.seq, opened.ttl, opened.options) == (Flags.SYN, A_ISN - 1, 2, OPTIONS)
    assert sum(len(x.ports) for x in sw.to_send(10.04995)) == 499  # 10,000 per second
    assert sum(len(x.ports) for x in sw.to_send(10.21)) == n - 500 and sw.to_send(10.21) == []  # no knock yet
    assert sw.get_timer() == pytest.approx(10.0 + a.knock_start)  # slot 0 knocks first (a tie)
    knocks = sw.to_send(10.0 + a.knock_start + 0.3)  # round 0 only: round 2 (ours again) starts later
    assert sum(len(x.ports) for x in knocks) == n
    assert {(x.segment.seq, x.segment.ttl) for x in knocks} == {(A_ISN, 64)}
    other = Sweep(b)
    other.start(10.0)
    other.to_send(10.21)  # its opens
    assert other.get_timer() == pytest.approx(10.0 + b.knock_start + b.round_length(0))  # its turn: round 1


def peer_segment(plan: SweepPlan, port: int, **kw: object) -> Segment:
    fields = {"seq": plan.peer_isn, "flags": Flags.SYN, **kw}
    return Segment(Endpoint(plan.peer_host, 40000), Endpoint(plan.local_host, port), **fields)  # type: ignore[arg-type]


def test_only_the_peers_exact_syn_or_syn_ack_to_one_of_our_flows_is_found() -> None:
    sides = (sweep.exhausting_side(5000, flows=10), sweep.exhausting_side(6000, flows=10))
    a, _ = plan_pair(sides, (tuple(range(2000, 2010)), tuple(range(3000, 3010))))
    sw = Sweep(a)
    sw.start(0.0)
    misfits = [
        peer_segment(a, 2003, seq=B_ISN + 1),  # not the peer's ISN
        peer_segment(a, 1999),  # not one of our flows
        peer_segment(a, 2003, flags=Flags.SYN | Flags.ACK, ack=A_ISN),  # SYN-ACK acking the wrong number
        peer_segment(a, 2003, flags=Flags.RST | Flags.ACK, ack=A_ISN + 1),
        peer_segment(a, 2003, flags=Flags.ACK, ack=A_ISN + 1),
        dataclasses.replace(peer_segment(a, 2003), src=Endpoint("203.0.113.66", 40000)),  # another host
    ]
    assert [sw.receive(seg) for seg in misfits] == [None] * len(misfits)
    assert sw.ignored == len(misfits) and sw.found is None
    synack = peer_segment(a, 2004, flags=Flags.SYN | Flags.ACK, ack=seq_add(A_ISN, 1))
    found = sw.receive(synack)
    assert found is not None and found.local == Endpoint(A_LAN, 2004) and found.segment == synack
    assert sw.to_send(100.0) == []  # no more opens or knocks once found
    assert sw.receive(peer_segment(a, 2005)) is None  # one connection


def test_release_resets_every_opened_flow_but_the_kept_one_with_the_priming_ttl() -> None:
    sides = (sweep.exhausting_side(5000, flows=50), sweep.exhausting_side(6000, flows=50))
    a, _ = plan_pair(sides, (tuple(range(2000, 2050)), tuple(range(3000, 3050))))
    idle = Sweep(a)
    idle.release(0.0)  # never started: nothing was opened, nothing to release
    assert idle.to_send(1.0) == [] and idle.idle
    sw = Sweep(a)
    sw.start(0.0)
    sw.release(0.001, keep=2007)
    batches = sw.to_send(10.0)
    ports = [p for x in batches for p in x.ports]
    assert sorted(ports) == [p for p in range(2000, 2050) if p != 2007] and sw.idle
    assert {(x.segment.flags, x.segment.ttl, x.segment.seq) for x in batches} == {(Flags.RST, 2, A_ISN)}


# --- two sweeps through the NAT model ----------------------------------------------------------------------


def pump(
    nats: list[Nat], sweeps: tuple[Sweep, Sweep], lans: tuple[str, str], until: float, step: float = 0.01
) -> list[Nat]:
    """Run both sweeps from t=0: every segment passes its own NAT, one core router and the other NAT; what
    reaches a LAN host is fed to that host's sweep. A side that found sends what the engine would first:
    its SYN on the found flow (the peer finds that). Both sides stop sending once they found."""
    t = 0.0
    answered = [False, False]
    for s in sweeps:
        s.start(0.0)
    while t < until and not all(s.found for s in sweeps):
        for side, s in enumerate(sweeps):
            for batch in s.to_send(t):
                for seg in batch.segments():
                    nats = _cross(nats, side, seg, sweeps, lans, t)
            if s.found is not None and not answered[side]:
                answered[side] = True
                engine_syn = Segment(s.found.local, s.found.peer, s.plan.isn, flags=Flags.SYN)
                nats = _cross(nats, side, engine_syn, sweeps, lans, t)
        t += step
    return nats


def _cross(
    nats: list[Nat], side: int, seg: Segment, sweeps: tuple[Sweep, Sweep], lans: tuple[str, str], t: float
) -> list[Nat]:
    try:
        nats[side], out = natmodel.outbound(nats[side], seg, t)
    except RuntimeError:  # the model's "no free public port": a real NAT drops the SYN
        return nats
    if not isinstance(out, Forward) or not isinstance(out.item, Segment):
        return nats
    core = natmodel.route(out.item, CORE)
    if not isinstance(core, Forward) or not isinstance(core.item, Segment):
        return nats  # the low-TTL open expired in the core
    other = 1 - side
    nats[other], into = natmodel.inbound(nats[other], core.item, t)
    if isinstance(into, Forward) and isinstance(into.item, Segment) and into.item.dst.host == lans[other]:
        sweeps[other].receive(into.item)
    return nats


def symmetric_random(public: str, lan: str, seed: int) -> Nat:
    profile = dataclasses.replace(get_profile("apdm-random"))
    return Nat(public, lan.rsplit(".", 1)[0] + ".1", profile, port_range=SMALL, seed=seed)


@pytest.mark.parametrize("seed", range(6))
def test_two_symmetric_random_nats_meet_when_both_sides_exhaust_the_range(seed: int) -> None:
    """Guessing needs two independent draws to hit (1 / N^2 per pair); flows from every port to one
    endpoint make each NAT hand out every port towards it, so the pair that names each other exists."""
    rng = random.Random(seed)
    a_aim, b_aim = rng.randint(*SMALL), rng.randint(*SMALL)
    sides = (Side("exhaust", 64, a_aim, 64), Side("exhaust", 64, b_aim, 64))
    plans = plan_pair(sides, (tuple(range(30000, 30064)), tuple(range(40000, 40064))), rate=2000.0)
    sweeps = (Sweep(plans[0]), Sweep(plans[1]))
    nats = [symmetric_random(A_PUB, A_LAN, seed), symmetric_random(B_PUB, B_LAN, seed + 100)]
    nats = pump(nats, sweeps, (A_LAN, B_LAN), until=5.0)
    a, b = (s.found for s in sweeps)
    assert a is not None and b is not None
    # The two findings name each other: a's flow is mapped to the port b aimed at, and the other way round.
    assert a.peer == Endpoint(B_PUB, b_aim) and b.peer == Endpoint(A_PUB, a_aim)
    assert nats[0].mapping(a.local, Endpoint(B_PUB, b_aim), 5.0) == Endpoint(A_PUB, a_aim)
    assert nats[1].mapping(b.local, Endpoint(A_PUB, a_aim), 5.0) == Endpoint(B_PUB, b_aim)


def test_half_the_range_meets_about_a_quarter_of_the_time_and_the_plan_says_so() -> None:
    sides = (Side("exhaust", 32, 50010, 64), Side("exhaust", 32, 50020, 64))
    assert plan_pair(sides, (tuple(range(30000, 30032)), tuple(range(40000, 40032))))[0].probability == 0.25
    met = 0
    for seed in range(40):
        plans = plan_pair(sides, (tuple(range(30000, 30032)), tuple(range(40000, 40032))), rate=2000.0)
        sweeps = (Sweep(plans[0]), Sweep(plans[1]))
        nats = [symmetric_random(A_PUB, A_LAN, seed), symmetric_random(B_PUB, B_LAN, seed + 1000)]
        pump(nats, sweeps, (A_LAN, B_LAN), until=1.5)
        met += sweeps[0].found is not None
    assert 3 <= met <= 20  # 40 x 0.25 = 10 expected; far from both 0 and every time


def test_a_sequential_nat_is_met_by_its_reach_th_next_port_despite_foreign_mappings_in_between() -> None:
    seq = Nat(A_PUB, "10.0.1.1", get_profile("apdm-sequential"), next_port=20000)
    for i in range(3):  # other traffic takes ports after the discovery (an earlier attempt, another host)
        seq, _ = natmodel.outbound(
            seq, Segment(Endpoint(A_LAN, 5000 + i), Endpoint(CORE, 80), 1, flags=Flags.SYN), 0.0
        )
    reach = 8
    sides = (sweep.sequential_side(19999, 1, reach), Side("exhaust", 64, 50030, 64))
    plans = plan_pair(sides, (tuple(range(30000, 30000 + reach)), tuple(range(40000, 40064))), rate=2000.0)
    sweeps = (Sweep(plans[0]), Sweep(plans[1]))
    nats = pump([seq, symmetric_random(B_PUB, B_LAN, 5)], sweeps, (A_LAN, B_LAN), until=5.0)
    a, b = (s.found for s in sweeps)
    assert a is not None and b is not None
    assert b.peer == Endpoint(A_PUB, 19999 + reach) and a.peer == Endpoint(B_PUB, 50030)
    assert nats[0].mapping(a.local, a.peer, 5.0) == b.peer


# --- both peers derive the same sides -----------------------------------------------------------------------


def view(slot: int, behaviour: NatBehaviour, public: dict[int, Endpoint], last: int) -> PeerView:
    return PeerView(slot, PeerInfo(punch_ports=tuple(public), isn=1), behaviour, public, last)


def test_each_nat_class_gets_its_side_and_only_a_random_one_exhausts() -> None:
    stable = view(0, NatBehaviour(mapping="endpoint-independent"), {4000: Endpoint(A_PUB, 4000)}, 4000)
    sequential = view(
        1, NatBehaviour(allocation="sequential", allocation_delta=2), {5: Endpoint(B_PUB, 7000)}, 7000
    )
    random_ = view(1, NatBehaviour(allocation="random"), {5: Endpoint(B_PUB, 33333)}, 33333)
    assert exhaustion.side_of(stable, 4000) == Side("stable", 1, 4000)
    assert exhaustion.side_of(sequential, 7000) == Side("sequential", 64, 7000 + 2 * sweep.FIRST_REACH)
    later = exhaustion.side_of(sequential, 7000, attempt=2)  # after attempts that may have taken ports
    assert later == Side("sequential", sweep.REACH, 7000 + 2 * sweep.REACH)
    assert exhaustion.side_of(random_, 33333) == Side("exhaust", 64512, 33334)
    assert exhaustion.side_of(dataclasses.replace(random_, last_public_port=65535), 1).aim == 65534
    assert exhaustion.local_ports(Side("stable", 1, 4000), 4000) == (4000,)
    ports = exhaustion.local_ports(later, 4000)
    assert len(set(ports)) == sweep.REACH and 4000 not in ports and min(ports) >= 1024
    assert exhaustion.local_ports(Side("exhaust", 64512, 1), 4000) == tuple(range(1024, 65536))


# --- the wire: patched templates and the all-ports guard --------------------------------------------------


def test_a_patched_template_is_byte_for_byte_what_scapy_builds_for_that_port() -> None:
    rng = random.Random(7)
    for _ in range(300):
        seg = Segment(
            Endpoint(A_LAN, 0),
            Endpoint(B_PUB, rng.randrange(1, 65536)),
            rng.randrange(2**32),
            flags=rng.choice([Flags.SYN, Flags.RST]),
            options=TcpOptions(1460, rng.randrange(15), True, (rng.randrange(2**32), 0)),
            ttl=rng.randrange(1, 65),
        )
        port = rng.randrange(65536)
        expected = to_bytes(dataclasses.replace(seg, src=Endpoint(A_LAN, port)))
        assert with_source_port(to_bytes(seg), port) == expected


def test_the_all_ports_guard_queues_the_peer_hosts_tcp_and_drops_our_kernels_rsts_to_it() -> None:
    flow = PunchFlow(40000, Endpoint(B_PUB, 1027), 21000, A_LAN, crafted_rst_ttl=2, all_ports=True)
    rules = [line for line in render_apply("x1", flow).splitlines() if line.startswith("-A RAWPUNCH-x1-")]
    icmp, capture, rst = rules
    assert "--icmp-type 11" in icmp and icmp.endswith("-j DROP") and "@8>>22" not in icmp  # no port test
    assert capture == (
        f"-A RAWPUNCH-x1-IN -s {B_PUB}/32 -d {A_LAN}/32 -p tcp "
        '-m comment --comment "rawpunch x1 capture punch segments" '
        "-j NFQUEUE --queue-num 21000 --queue-bypass"
    )
    assert f"-d {B_PUB}/32" in rst and "--sport" not in rst and "--dport" not in rst
    assert "--tcp-flags RST RST -m ttl --ttl-gt 2" in rst  # our low-TTL releases pass, the kernel's do not
    with pytest.raises(ValueError, match="needs the peer's address"):
        PunchFlow(40000, None, 1, all_ports=True)


def test_the_queue_claims_only_the_peers_exact_syns_to_our_flows_and_leaves_the_rest_to_the_kernel() -> None:
    peer, isn, ports = bytes([198, 51, 100, 18]), B_ISN.to_bytes(4, "big"), frozenset({2000, 2001})

    def wire(**kw: object) -> bytes:
        fields = {"seq": B_ISN, "flags": Flags.SYN, **kw}
        return to_bytes(Segment(Endpoint(B_PUB, 40000), Endpoint(A_LAN, 2001), **fields))  # type: ignore[arg-type]

    assert exhaustion.claims(wire(), peer, isn, ports)
    assert exhaustion.claims(wire(flags=Flags.SYN | Flags.ACK, ack=A_ISN + 1), peer, isn, ports)
    assert not exhaustion.claims(wire(seq=B_ISN + 1), peer, isn, ports)  # someone else's SYN-ACK
    assert not exhaustion.claims(wire(flags=Flags.RST | Flags.ACK), peer, isn, ports)
    assert not exhaustion.claims(wire(), peer, isn, frozenset({2000}))  # not one of our flows
    assert not exhaustion.claims(wire(), bytes([203, 0, 113, 9]), isn, ports)  # another host
    assert not exhaustion.claims(wire()[:30], peer, isn, ports)  # truncated: the kernel's business
