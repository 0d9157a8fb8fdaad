"""The pure NAT model: conntrack's table as data, mappings (tailscale natlab style ``wantNewMapping`` cases),
TTL expiry, unsolicited inbound per profile, RSTs, window checks; and the priming-TTL chooser."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
from punch_helpers import Pump

from rawpunch.lab.profiles import PROFILES, NatProfile
from rawpunch.proto.codec import Endpoint
from rawpunch.punch import natmodel
from rawpunch.punch.engine import IcmpKind
from rawpunch.punch.natmodel import (
    COLUMNS,
    TCP_CONNTRACKS,
    Answer,
    CtIndex,
    CtState,
    Direction,
    Drop,
    Forward,
    Icmp,
    Nat,
    Verdict,
)
from rawpunch.punch.segment import Flags, Segment, TcpOptions
from rawpunch.punch.ttl import NoPrimingTtl, initial_ttl, priming_ttl, sender_hop

PUBLIC, GATEWAY = "198.51.100.1", "10.0.1.1"
HOST = Endpoint("10.0.1.2", 40000)
HOST2 = Endpoint("10.0.1.3", 40000)
PEER = Endpoint("198.51.100.10", 50000)
PEER_OTHER_PORT = Endpoint("198.51.100.10", 50001)
OTHER = Endpoint("203.0.113.9", 50000)
ISN, PEER_ISN = 1000, 7_000_000
S, ORIG, REPLY = CtState, Direction.ORIGINAL, Direction.REPLY
A_PUBLIC = Endpoint(PUBLIC, HOST.port)


def make_nat(profile: str = "eim-apdf", **behaviour: Any) -> Nat:
    base = PROFILES[profile]
    return Nat(PUBLIC, GATEWAY, replace(base, **behaviour) if behaviour else base)


def out_seg(flags: Flags, seq: int = ISN, ack: int = 0, **kw: object) -> Segment:
    fields: dict[str, object] = {"src": HOST, "dst": PEER, "seq": seq, "ack": ack, "flags": flags, **kw}
    return Segment(**fields)  # type: ignore[arg-type]


def in_seg(flags: Flags, seq: int = PEER_ISN, ack: int = 0, **kw: object) -> Segment:
    fields: dict[str, object] = {"src": PEER, "dst": A_PUBLIC, "seq": seq, "ack": ack, "flags": flags, **kw}
    return Segment(**fields)  # type: ignore[arg-type]


SYN, SYNACK, ACK, RST = Flags.SYN, Flags.SYN | Flags.ACK, Flags.ACK, Flags.RST


@dataclass
class Box:
    """A NAT and a clock, stepping segments through it."""

    nat: Nat
    now: float = 0.0

    def out(self, seg: Segment, after: float = 0.0) -> Verdict:
        self.now += after
        self.nat, verdict = natmodel.outbound(self.nat, seg, self.now)
        return verdict

    def into(self, seg: Segment, after: float = 0.0) -> Verdict:
        self.now += after
        self.nat, verdict = natmodel.inbound(self.nat, seg, self.now)
        return verdict

    @property
    def state(self) -> CtState | None:
        entry = self.nat.entry(HOST, PEER, self.now)
        return entry.state if entry else None


def established_box() -> Box:
    """Simultaneous open through the NAT, ending ESTABLISHED."""
    box = Box(make_nat())
    box.out(out_seg(SYN))
    box.into(in_seg(SYN))
    box.out(out_seg(SYNACK, ack=PEER_ISN + 1))
    box.into(in_seg(SYNACK, ack=ISN + 1))
    box.out(out_seg(ACK, seq=ISN + 1, ack=PEER_ISN + 1))
    assert box.state is S.ESTABLISHED
    return box


# --- the conntrack table ------------------------------------------------------------------------------------


def test_table_is_total_and_uses_pseudo_states_only_as_outcomes() -> None:
    assert len(TCP_CONNTRACKS) == 2 * len(CtIndex) * len(COLUMNS)
    assert set(COLUMNS) == set(CtState) - {S.INVALID, S.IGNORE}
    assert set(TCP_CONNTRACKS.values()) <= set(CtState)


@pytest.mark.parametrize(
    ("direction", "index", "old", "new"),
    [
        (ORIG, CtIndex.SYN, S.NONE, S.SYN_SENT),  # a new flow
        (ORIG, CtIndex.SYN, S.SYN_SENT, S.SYN_SENT),  # priming SYN, then the real SYN
        (REPLY, CtIndex.SYN, S.SYN_SENT, S.SYN_SENT2),  # simultaneous open
        (ORIG, CtIndex.SYNACK, S.SYN_SENT, S.INVALID),  # a crafted SYN-ACK sent too early (FACTS.md)
        (ORIG, CtIndex.SYNACK, S.SYN_SENT2, S.SYN_RECV),  # the SYN-ACK after the peer's SYN came in
        (REPLY, CtIndex.SYNACK, S.SYN_SENT, S.SYN_RECV),  # standard open at the peer's NAT
        (REPLY, CtIndex.SYNACK, S.SYN_RECV, S.IGNORE),  # both SYN-ACKs crossing
        (ORIG, CtIndex.SYNACK, S.ESTABLISHED, S.INVALID),  # a retransmitted SYN-ACK after the peer's ACK
        (ORIG, CtIndex.ACK, S.SYN_RECV, S.ESTABLISHED),
        (REPLY, CtIndex.SYN, S.SYN_RECV, S.INVALID),  # the peer's late SYN after our SYN-ACK went out
        (REPLY, CtIndex.SYN, S.CLOSE, S.INVALID),
        (ORIG, CtIndex.SYN, S.CLOSE, S.SYN_SENT),  # reopen (if the RST came from this side)
        (REPLY, CtIndex.RST, S.SYN_SENT, S.CLOSE),
        (ORIG, CtIndex.ACK, S.NONE, S.ESTABLISHED),  # loose pickup
        (REPLY, CtIndex.ACK, S.NONE, S.INVALID),
        (ORIG, CtIndex.RST, S.NONE, S.INVALID),
    ],
)
def test_table_cells_the_punch_depends_on(
    direction: Direction, index: CtIndex, old: CtState, new: CtState
) -> None:
    assert TCP_CONNTRACKS[(direction, index, old)] is new


@pytest.mark.parametrize(
    ("flags", "index"),
    [
        (Flags.SYN, CtIndex.SYN),
        (Flags.SYN | Flags.ACK, CtIndex.SYNACK),
        (Flags.FIN | Flags.ACK, CtIndex.FIN),
        (Flags.ACK | Flags.PSH, CtIndex.ACK),
        (Flags.RST | Flags.ACK, CtIndex.RST),
        (Flags.RST | Flags.SYN, CtIndex.RST),
        (Flags.NONE, CtIndex.NONE),
    ],
)
def test_conntrack_index(flags: Flags, index: CtIndex) -> None:
    assert natmodel.conntrack_index(out_seg(flags)) is index


# --- flows through one NAT ----------------------------------------------------------------------------------


def test_new_flow_is_translated_with_the_source_port_kept() -> None:
    box = Box(make_nat())
    verdict = box.out(out_seg(SYN, ttl=64))
    assert verdict == Forward(out_seg(SYN, src=A_PUBLIC, ttl=63))
    assert box.state is S.SYN_SENT


def test_simultaneous_open_walks_conntracks_states() -> None:
    box = Box(make_nat())
    steps = [
        (box.out, out_seg(SYN), S.SYN_SENT),
        (box.into, in_seg(SYN), S.SYN_SENT2),
        (box.out, out_seg(SYNACK, ack=PEER_ISN + 1), S.SYN_RECV),
        (box.into, in_seg(SYNACK, ack=ISN + 1), S.SYN_RECV),  # IGNOREd, passes
        (box.out, out_seg(ACK, seq=ISN + 1, ack=PEER_ISN + 1), S.ESTABLISHED),
    ]
    for send, seg, state in steps:
        assert isinstance(send(seg), Forward), seg
        assert box.state is state, seg


def test_simultaneous_open_ends_established_on_the_peers_ack_too() -> None:
    box = Box(make_nat())
    box.out(out_seg(SYN))
    box.into(in_seg(SYN))
    box.out(out_seg(SYNACK, ack=PEER_ISN + 1))
    assert isinstance(box.into(in_seg(ACK, seq=PEER_ISN + 1, ack=ISN + 1)), Forward)
    assert box.state is S.ESTABLISHED  # SYN_RECV + reply ACK after SYN_SENT2 (IP_CT_TCP_SIMULTANEOUS_OPEN)


def test_standard_open_at_the_peers_nat() -> None:
    box = Box(make_nat())
    box.out(out_seg(SYN))
    assert isinstance(box.into(in_seg(SYNACK, ack=ISN + 1)), Forward)
    assert box.state is S.SYN_RECV
    box.out(out_seg(ACK, seq=ISN + 1, ack=PEER_ISN + 1))
    assert box.nat.entry(HOST, PEER, box.now).state is S.ESTABLISHED  # type: ignore[union-attr]


def test_synack_before_the_peers_syn_is_invalid_and_dropped() -> None:
    box = Box(make_nat("eim-apdf-rst"))
    box.out(out_seg(SYN))
    verdict = box.out(out_seg(SYNACK, ack=PEER_ISN + 1))
    assert isinstance(verdict, Drop) and "INVALID" in verdict.reason
    assert box.state is S.SYN_SENT


def test_priming_syn_with_isn_minus_one_then_the_real_syn() -> None:
    box = Box(make_nat())
    box.out(out_seg(SYN, seq=ISN - 1, ttl=2))
    assert isinstance(box.out(out_seg(SYN)), Forward)
    # conntrack re-read our side from the real SYN: the peer's SYN-ACK for ISN + 1 is in window
    assert isinstance(box.into(in_seg(SYNACK, ack=ISN + 1)), Forward)


@pytest.mark.parametrize(
    ("profile", "arriving", "expected"),
    [
        ("eim-apdf", in_seg(SYN), None),
        ("eim-apdf-rst", in_seg(SYN), in_seg(RST | ACK, seq=0, ack=PEER_ISN + 1)),
        ("eim-apdf-rst", in_seg(SYNACK, ack=ISN + 1), in_seg(RST, seq=ISN + 1)),
        ("eim-apdf-rst", in_seg(RST, seq=5), None),  # a RST is never answered
    ],
)
def test_unsolicited_inbound_by_profile(profile: str, arriving: Segment, expected: Segment | None) -> None:
    verdict = Box(make_nat(profile)).into(arriving)
    if expected is None:
        assert isinstance(verdict, Drop)
    else:
        answer = Segment(A_PUBLIC, PEER, expected.seq, expected.ack, expected.flags, window=0)
        assert verdict == Answer(answer)


def test_unsolicited_icmp_profile_answers_port_unreachable() -> None:
    verdict = Box(make_nat(unsolicited_syn="icmp")).into(in_seg(SYN))
    assert verdict == Answer(Icmp(IcmpKind.UNREACHABLE, PUBLIC, PEER.host, in_seg(SYN)))


def test_rst_before_any_reply_kills_the_mapping() -> None:
    box = Box(make_nat("eim-apdf-rst"))
    box.out(out_seg(SYN))
    verdict = box.into(in_seg(RST | ACK, seq=0, ack=ISN + 1))  # the peer NAT's answer to our SYN
    assert isinstance(verdict, Forward) and verdict.item.dst == HOST
    assert box.state is None
    assert isinstance(box.into(in_seg(SYN)), Answer)  # the peer's SYN now meets a closed NAT: RST


def test_rst_after_a_reply_leaves_close_for_ten_seconds() -> None:
    box = Box(make_nat("eim-apdf-rst"))
    box.out(out_seg(SYN))
    box.into(in_seg(SYN))
    assert isinstance(box.into(in_seg(RST, seq=PEER_ISN + 1)), Forward)
    assert box.state is S.CLOSE
    assert isinstance(box.into(in_seg(SYN), after=1.0), Answer)  # INVALID, answered by the router
    assert isinstance(box.out(out_seg(SYN)), Forward)  # our SYN is ignored: passes, changes nothing
    assert box.state is S.CLOSE
    assert box.state is S.CLOSE
    box.now += natmodel.TIMEOUTS[S.CLOSE]
    assert box.state is None  # expired
    box.out(out_seg(SYN))
    assert box.state is S.SYN_SENT


def test_our_rst_then_syn_reopens_a_closed_entry() -> None:
    box = Box(make_nat())
    box.out(out_seg(SYN))
    box.into(in_seg(SYN))
    box.into(in_seg(RST, seq=PEER_ISN + 1))
    assert isinstance(box.out(out_seg(RST, seq=ISN + 1, ttl=2)), Forward)
    assert isinstance(box.out(out_seg(SYN, ttl=2)), Forward)
    assert box.state is S.SYN_SENT
    assert isinstance(box.into(in_seg(SYN)), Forward)


def test_blind_rst_is_invalid_in_established() -> None:
    box = established_box()
    verdict = box.into(in_seg(RST, seq=PEER_ISN + 1 + 2**31))
    assert isinstance(verdict, Drop) and "SEQ is over the upper bound" in verdict.reason
    assert box.state is S.ESTABLISHED


def test_forged_synack_acking_unsent_data_is_invalid() -> None:
    box = Box(make_nat())
    box.out(out_seg(SYN))
    verdict = box.into(in_seg(SYNACK, ack=ISN + 1000))
    assert isinstance(verdict, Drop) and "ACK is over the upper bound" in verdict.reason
    assert box.state is S.SYN_SENT


def test_first_segment_initialises_window_data_even_when_invalid() -> None:
    """Linux's tcp_in_window keeps what it learnt from a side's first segment although the segment fails:
    a spoofed one can poison the window tracking of a flow in SYN_SENT."""
    box = Box(make_nat())
    box.out(out_seg(SYN))
    box.into(in_seg(SYNACK, seq=123, ack=ISN + 1000))
    entry = box.nat.entry(HOST, PEER, box.now)
    assert entry is not None and entry.seen[REPLY].td_end == 124


def test_stale_segment_below_the_window_passes_untracked() -> None:
    box = established_box()
    verdict = box.into(in_seg(ACK, seq=PEER_ISN + 1 - 200_000, ack=ISN + 1))
    assert isinstance(verdict, Forward)  # Linux >= 6.1: NFCT_TCP_IGNORE, not INVALID


@pytest.mark.parametrize("flags", [Flags.SYN | Flags.FIN, Flags.FIN, Flags.NONE])
def test_invalid_flag_combinations_never_pass(flags: Flags) -> None:
    box = established_box()
    assert isinstance(box.out(out_seg(flags, seq=ISN + 1)), Drop)


def test_entries_expire_by_state() -> None:
    box = Box(make_nat())
    box.out(out_seg(SYN))
    box.now += natmodel.TIMEOUTS[S.SYN_SENT] - 0.001
    assert box.state is S.SYN_SENT
    box.now += 0.002
    assert box.state is None


# --- TTL and ICMP -------------------------------------------------------------------------------------------


def test_router_decrements_ttl_or_answers_time_exceeded() -> None:
    seg = out_seg(SYN, src=A_PUBLIC, ttl=2)
    assert natmodel.route(seg, "198.51.100.2") == Forward(seg.with_(ttl=1))
    assert natmodel.route(seg.with_(ttl=1), "198.51.100.2") == Answer(
        Icmp(IcmpKind.TIME_EXCEEDED, "198.51.100.2", PUBLIC, seg.with_(ttl=1))
    )


def test_packet_expiring_at_the_nat_creates_no_mapping() -> None:
    box = Box(make_nat())
    verdict = box.out(out_seg(SYN, ttl=1))
    assert isinstance(verdict, Answer) and isinstance(verdict.item, Icmp)
    assert verdict.item.src == GATEWAY
    assert box.state is None


def test_icmp_error_is_related_and_translated_back() -> None:
    box = Box(make_nat())
    sent = box.out(out_seg(SYN, ttl=2))
    assert isinstance(sent, Forward) and isinstance(sent.item, Segment)
    icmp = Icmp(IcmpKind.TIME_EXCEEDED, "198.51.100.2", PUBLIC, sent.item.with_(ttl=1))
    box.nat, verdict = natmodel.inbound_icmp(box.nat, icmp, box.now)
    assert verdict == Forward(
        Icmp(IcmpKind.TIME_EXCEEDED, "198.51.100.2", HOST.host, icmp.quoted.with_(src=HOST))
    )
    assert box.state is S.SYN_SENT
    stray = replace(icmp, quoted=icmp.quoted.with_(dst=OTHER))
    assert isinstance(natmodel.inbound_icmp(box.nat, stray, box.now)[1], Drop)


# --- mappings (natlab's wantNewMapping style) ---------------------------------------------------------------


@dataclass(frozen=True)
class MappingCase:
    name: str
    behaviour: dict[str, str]
    flows: tuple[tuple[Endpoint, Endpoint], ...]
    want_ports: tuple[int | None, ...]  # None: anything but the ports listed before
    want_new_mapping: tuple[bool, ...]


MAPPING_CASES = [
    MappingCase("port preserved", {}, ((HOST, PEER),), (40000,), (True,)),
    MappingCase(
        "EIM: same LAN endpoint, new destination reuses the mapping",
        {},
        ((HOST, PEER), (HOST, OTHER)),
        (40000, 40000),
        (True, False),
    ),
    MappingCase(
        "Linux: two hosts may share a public port towards different destinations",
        {},
        ((HOST, PEER), (HOST2, OTHER)),
        (40000, 40000),
        (True, True),
    ),
    MappingCase(
        "Linux: same port, same destination: the second host is moved",
        {},
        ((HOST, PEER), (HOST2, PEER)),
        (40000, None),
        (True, True),
    ),
    MappingCase(
        "sequential allocation, EIM",
        {"allocation": "sequential"},
        ((HOST, PEER), (HOST2, PEER), (HOST, OTHER)),
        (1024, 1025, 1024),
        (True, True, False),
    ),
    MappingCase(
        "address-and-port-dependent mapping: each destination its own port",
        {"allocation": "sequential", "mapping": "address-and-port-dependent"},
        ((HOST, PEER), (HOST, PEER_OTHER_PORT)),
        (1024, 1025),
        (True, True),
    ),
    MappingCase(
        "address-dependent mapping: same destination address reuses, another address does not",
        {"allocation": "sequential", "mapping": "address-dependent"},
        ((HOST, PEER), (HOST, PEER_OTHER_PORT), (HOST, OTHER)),
        (1024, 1024, 1025),
        (True, False, True),
    ),
    MappingCase(
        "random allocation: not the source port",
        {"allocation": "random", "mapping": "address-and-port-dependent"},
        ((HOST, PEER), (HOST, OTHER)),
        (None, None),
        (True, True),
    ),
]


@pytest.mark.parametrize("case", MAPPING_CASES, ids=lambda c: c.name)
def test_mappings(case: MappingCase) -> None:
    box = Box(make_nat(**case.behaviour))
    seen: dict[Endpoint, set[int]] = {}
    ports: list[int] = []
    for (lan, remote), want, want_new in zip(case.flows, case.want_ports, case.want_new_mapping, strict=True):
        verdict = box.out(Segment(lan, remote, ISN, flags=SYN))
        assert isinstance(verdict, Forward) and isinstance(verdict.item, Segment)
        port = verdict.item.src.port
        assert verdict.item.src.host == PUBLIC
        if want is None:
            assert port not in ports and port != lan.port
        else:
            assert port == want
        assert (port not in seen.get(lan, set())) is want_new
        seen.setdefault(lan, set()).add(port)
        ports.append(port)


def test_random_allocation_is_reproducible_per_seed() -> None:
    def first_port(seed: int) -> int:
        nat = replace(make_nat(allocation="random"), seed=seed)
        _, verdict = natmodel.outbound(nat, out_seg(SYN), 0.0)
        assert isinstance(verdict, Forward) and isinstance(verdict.item, Segment)
        return verdict.item.src.port

    assert first_port(1) == first_port(1)
    assert len({first_port(s) for s in range(5)}) > 1


@pytest.mark.parametrize("filtering", ["endpoint-independent", "address-dependent"])
def test_unmodelled_filtering_is_refused_up_front(filtering: str) -> None:
    profile = NatProfile("x", "x", "endpoint-independent", filtering, "port-preserving", "drop")  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="filtering"):
        Nat(PUBLIC, GATEWAY, profile)


def test_hairpinning_is_not_modelled() -> None:
    with pytest.raises(NotImplementedError, match="hairpin"):
        natmodel.outbound(make_nat(), out_seg(SYN, dst=A_PUBLIC), 0.0)


def test_inbound_for_another_address_is_dropped() -> None:
    assert isinstance(Box(make_nat()).into(in_seg(SYN, dst=OTHER)), Drop)


# --- the priming TTL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("own", "peer", "ttl"),
    [(1, 3, 2), (1, 4, 2), (2, 4, 3), (1, 10, 2), (3, 9, 4)],
)
def test_priming_ttl_is_the_smallest_that_passes_our_nat(own: int, peer: int, ttl: int) -> None:
    assert priming_ttl(own, peer) == ttl


@pytest.mark.parametrize(("own", "peer"), [(1, 2), (2, 3)])
def test_adjacent_nats_have_no_priming_ttl(own: int, peer: int) -> None:
    with pytest.raises(NoPrimingTtl, match="no router between them"):
        priming_ttl(own, peer)


@pytest.mark.parametrize(("own", "peer"), [(0, 3), (3, 3), (4, 2)])
def test_priming_ttl_rejects_impossible_hops(own: int, peer: int) -> None:
    with pytest.raises(ValueError):
        priming_ttl(own, peer)


@pytest.mark.parametrize(
    ("received", "initial", "hop"),
    [(64, 64, 1), (57, 64, 8), (120, 128, 9), (250, 255, 6), (30, 64, 35)],
)
def test_hops_from_received_ttl(received: int, initial: int, hop: int) -> None:
    assert initial_ttl(received) == initial
    assert sender_hop(received) == hop


def test_sender_hop_with_a_known_initial_ttl() -> None:
    assert sender_hop(60, initial=64) == 5
    with pytest.raises(ValueError):
        sender_hop(70, initial=64)
    with pytest.raises(ValueError):
        initial_ttl(0)


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_chosen_priming_ttl_expires_in_the_core_of_the_lab_path(hops: int) -> None:
    """Seen from host a on two_nats(hops): nat-a is hop 1, nat-b hop hops + 2."""
    ttl = priming_ttl(1, hops + 2)
    pump = Pump(hops=hops, a={"priming_ttl": ttl}, b={"priming_ttl": ttl})
    at_nat_b: list[Segment] = []
    pump.taps.append(
        lambda p, node, item: at_nat_b.append(item) if node == "nat-b" and isinstance(item, Segment) else None
    )
    pump.run(until=0.02)  # priming only: the real SYNs leave at syn_delay = 0.05
    expired = [i for _, node, i in pump.answers if isinstance(i, Icmp)]
    assert {(i.src, i.dst) for i in expired} >= {(pump.router_ip["r1"], PUBLIC)}
    assert not [s for s in at_nat_b if s.src.host == PUBLIC]  # a's priming SYN never reached nat-b


def test_ttl_that_reaches_the_peers_nat_gets_a_rst_there() -> None:
    """TTL 3 on two_nats(hops=1) arrives at nat-b with TTL 1 but is addressed to the box: delivered locally,
    never expired, answered with a RST (b starts late, so it has no mapping yet)."""
    pump = Pump(hops=1, profile_a="eim-apdf-rst", profile_b="eim-apdf-rst", a={"priming_ttl": 3}, skew=0.02)
    pump.run(until=0.04)
    resets = [(node, i) for _, node, i in pump.answers if isinstance(i, Segment) and i.rst]
    assert [node for node, _ in resets] == ["nat-b"]
    assert resets[0][1].ack == pump.engines["a"].config.isn  # it answers the priming SYN, seq ISN - 1
    assert pump.engines["a"].resets["priming-answer"] == 1


def test_segments_keep_their_options_through_the_nat() -> None:
    opts = TcpOptions(1460, 7, True, (5, 0))
    verdict = Box(make_nat()).out(out_seg(SYN, options=opts))
    assert isinstance(verdict, Forward) and isinstance(verdict.item, Segment)
    assert verdict.item.options == opts
