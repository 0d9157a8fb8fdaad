"""The userspace NAT without root: the model's filtering, inbound-opened flows and hairpinning (natlab-style
tables), its wire codec (checked against scapy), and ``UserNat.handle`` from packet bytes to a verdict."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from scapy.layers.inet import ICMP, IP, TCP, IPerror, TCPerror

from rawpunch.lab.profiles import PROFILES
from rawpunch.lab.usernat import (
    PacketError,
    UserNat,
    checksum,
    icmp_bytes,
    parse_icmp_error,
    parse_tcp,
    rewrite_icmp_error,
    rewrite_tcp,
    tcp_bytes,
)
from rawpunch.proto.codec import Endpoint
from rawpunch.punch import natmodel
from rawpunch.punch.engine import IcmpKind
from rawpunch.punch.natmodel import Answer, CtState, Drop, Forward, Icmp, Nat, Verdict
from rawpunch.punch.segment import Flags, Segment, TcpOptions

PUBLIC, GATEWAY = "198.51.100.1", "10.0.1.1"
HOST = Endpoint("10.0.1.2", 40000)
HOST2 = Endpoint("10.0.1.3", 40000)
PEER = Endpoint("198.51.100.10", 50000)
PEER_OTHER_PORT = Endpoint("198.51.100.10", 50001)
OTHER = Endpoint("203.0.113.9", 50000)
SYN, SYNACK, ACK, RST = Flags.SYN, Flags.SYN | Flags.ACK, Flags.ACK, Flags.RST


@dataclass
class Box:
    nat: Nat
    now: float = 0.0
    log: list[Verdict] = field(default_factory=list)

    def out(self, src: Endpoint, dst: Endpoint, flags: Flags, seq: int = 1000, ack: int = 0) -> Verdict:
        self.nat, verdict = natmodel.outbound(self.nat, Segment(src, dst, seq, ack, flags), self.now)
        return verdict

    def into(self, src: Endpoint, dst: Endpoint, flags: Flags, seq: int = 7000, ack: int = 0) -> Verdict:
        self.nat, verdict = natmodel.inbound(self.nat, Segment(src, dst, seq, ack, flags), self.now)
        return verdict


def box(profile: str) -> Box:
    return Box(Nat(PUBLIC, GATEWAY, PROFILES[profile]))


def forwarded(verdict: Verdict) -> Segment:
    assert isinstance(verdict, Forward) and isinstance(verdict.item, Segment), verdict
    return verdict.item


# --- filtering: who gets in through a mapping ---------------------------------------------------------------


@dataclass(frozen=True)
class FilterCase:
    profile: str
    sender: Endpoint
    admitted: bool


FILTER_CASES = [
    FilterCase("eim-eif", PEER_OTHER_PORT, True),
    FilterCase("eim-eif", OTHER, True),
    FilterCase("eim-adf", PEER_OTHER_PORT, True),
    FilterCase("eim-adf", OTHER, False),
    FilterCase("adm-adf-sequential", PEER_OTHER_PORT, True),
    FilterCase("adm-adf-sequential", OTHER, False),
    FilterCase("apdm-sequential", PEER_OTHER_PORT, False),
    FilterCase("apdm-sequential", OTHER, False),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: f"{c.profile}-{c.sender}")
def test_filtering_through_a_mapping(case: FilterCase) -> None:
    b = box(case.profile)
    public = forwarded(b.out(HOST, PEER, SYN)).src
    verdict = b.into(case.sender, public, SYN)
    if case.admitted:
        assert forwarded(verdict).dst == HOST
        entry = b.nat.entry(HOST, case.sender, b.now)
        assert entry is not None and entry.inbound and entry.state is CtState.SYN_SENT
    else:
        expected = {"drop": Drop, "rst": Answer, "icmp": Answer}[PROFILES[case.profile].unsolicited_syn]
        assert isinstance(verdict, expected)


def test_an_inbound_flow_completes_its_handshake_through_the_mapping() -> None:
    b = box("eim-eif")
    public = forwarded(b.out(HOST, PEER, SYN)).src
    assert forwarded(b.into(OTHER, public, SYN, seq=7000)).dst == HOST
    synack = forwarded(b.out(HOST, OTHER, SYNACK, seq=5000, ack=7001))
    assert synack.src == public and synack.dst == OTHER
    assert forwarded(b.into(OTHER, public, ACK, seq=7001, ack=5001)).dst == HOST
    entry = b.nat.entry(HOST, OTHER, b.now)
    assert entry is not None and entry.state is CtState.ESTABLISHED and entry.public == public


def test_no_mapping_no_admission_and_mappings_expire() -> None:
    b = box("eim-eif")
    assert isinstance(b.into(OTHER, Endpoint(PUBLIC, 40000), SYN), Drop)  # nothing mapped yet
    public = forwarded(b.out(HOST, PEER, SYN)).src
    b.now += natmodel.TIMEOUTS[CtState.SYN_SENT] + 1
    assert isinstance(b.into(OTHER, public, SYN), Drop)


def test_a_public_port_belongs_to_one_lan_endpoint_without_overloading() -> None:
    b = box("eim-eif")
    assert forwarded(b.out(HOST, PEER, SYN)).src.port == 40000
    # Linux would give HOST2 port 40000 too (another destination); an EIF NAT must not.
    assert forwarded(b.out(HOST2, OTHER, SYN)).src.port != 40000
    linux = box("eim-apdf")
    linux.out(HOST, PEER, SYN)
    assert forwarded(linux.out(HOST2, OTHER, SYN)).src.port == 40000


def test_overloading_with_endpoint_independent_filtering_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="REQ-7"):
        Nat(PUBLIC, GATEWAY, replace(PROFILES["eim-eif"], port_overloading=True))


def test_icmp_errors_about_an_inbound_flow_are_translated() -> None:
    b = box("eim-eif")
    public = forwarded(b.out(HOST, PEER, SYN)).src
    b.into(OTHER, public, SYN)
    sent = forwarded(b.out(HOST, OTHER, SYNACK, seq=5000, ack=7001))
    icmp = Icmp(IcmpKind.UNREACHABLE, "203.0.113.1", PUBLIC, sent)
    _, verdict = natmodel.inbound_icmp(b.nat, icmp, b.now)
    assert isinstance(verdict, Forward) and isinstance(verdict.item, Icmp)
    assert verdict.item.dst == HOST.host and verdict.item.quoted.src == HOST


# --- hairpinning --------------------------------------------------------------------------------------------


def test_hairpinning_shows_the_external_source_both_ways() -> None:
    b = box("eim-eif")
    public = forwarded(b.out(HOST, PEER, SYN)).src  # HOST's mapping
    other_local = Endpoint(HOST.host, 40001)
    syn = forwarded(b.out(other_local, public, SYN, seq=1))
    assert syn.dst == HOST and syn.src == Endpoint(PUBLIC, 40001)  # RFC 5382 REQ-8a
    back = forwarded(b.out(HOST, syn.src, SYNACK, seq=900, ack=2))
    assert back.dst == other_local and back.src == public


def test_hairpinning_decrements_the_ttl_once() -> None:
    b = box("eim-eif")
    public = forwarded(b.out(HOST, PEER, SYN)).src
    _, verdict = natmodel.outbound(
        b.nat, Segment(Endpoint(HOST.host, 40001), public, 1, flags=SYN, ttl=64), 0
    )
    assert forwarded(verdict).ttl == 63


def test_hairpinning_through_a_filter_that_refuses() -> None:
    b = Box(Nat(PUBLIC, GATEWAY, replace(PROFILES["eim-adf"], hairpin=True)))
    public = forwarded(b.out(HOST, PEER, SYN)).src
    assert isinstance(b.out(Endpoint(HOST.host, 40001), public, SYN), Drop)  # ADF: our public address is new


# --- the wire codec -----------------------------------------------------------------------------------------

OPTIONS = TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(123, 0))


def scapy_agrees(data: bytes) -> None:
    """scapy parses *data* and, recomputing every checksum, produces the same bytes."""
    pkt = IP(data)
    del pkt[IP].chksum
    if TCP in pkt:
        del pkt[TCP].chksum
    if ICMP in pkt:
        del pkt[ICMP].chksum
    if IPerror in pkt:
        del pkt[IPerror].chksum
    assert bytes(IP(bytes(pkt))) == data


@pytest.mark.parametrize(
    "seg",
    [
        Segment(HOST, PEER, 1000, 0, SYN, options=OPTIONS),
        Segment(PEER, HOST, 7000, 1001, SYNACK, window=29200, options=OPTIONS, ttl=61),
        Segment(
            HOST, PEER, 1001, 7001, ACK | Flags.PSH, options=TcpOptions(timestamp=(5, 6)), payload=b"hello"
        ),
        Segment(PEER, HOST, 0, 1001, RST | ACK, window=0),
    ],
)
def test_tcp_round_trip(seg: Segment) -> None:
    data = tcp_bytes(seg)
    assert checksum(data[:20]) == 0
    scapy_agrees(data)
    assert parse_tcp(data) == seg


def test_rewrite_keeps_everything_but_addresses_and_ports() -> None:
    seg = Segment(HOST, PEER, 1001, 7001, ACK, options=TcpOptions(timestamp=(5, 6)), payload=b"x" * 33, ttl=7)
    out = rewrite_tcp(tcp_bytes(seg), Endpoint(PUBLIC, 1024), PEER)
    scapy_agrees(out)
    assert parse_tcp(out) == seg.with_(src=Endpoint(PUBLIC, 1024))


def test_icmp_round_trip_and_translation() -> None:
    quoted = Segment(Endpoint(PUBLIC, 1024), PEER, 1000, flags=SYN, options=OPTIONS, ttl=1)
    data = icmp_bytes(Icmp(IcmpKind.TIME_EXCEEDED, "198.51.100.6", PUBLIC, quoted))
    scapy_agrees(data)
    parsed = parse_icmp_error(data)
    assert parsed is not None and parsed.kind is IcmpKind.TIME_EXCEEDED
    assert (parsed.src, parsed.dst, parsed.quoted.src, parsed.quoted.dst) == (
        "198.51.100.6",
        PUBLIC,
        quoted.src,
        PEER,
    )
    back = rewrite_icmp_error(data, HOST.host, HOST)
    scapy_agrees(back)
    pkt = IP(back)
    assert pkt[IP].dst == HOST.host and pkt[IPerror].src == HOST.host and pkt[TCPerror].sport == HOST.port
    unreachable = IP(icmp_bytes(Icmp(IcmpKind.UNREACHABLE, PUBLIC, PEER.host, quoted)))
    assert (unreachable[ICMP].type, unreachable[ICMP].code) == (3, 3)  # RFC 5382 REQ-4: port unreachable


def test_junk_is_refused() -> None:
    with pytest.raises(PacketError):
        parse_tcp(b"\x45" + b"\0" * 10)
    with pytest.raises(PacketError):
        parse_tcp(icmp_bytes(Icmp(IcmpKind.UNREACHABLE, PUBLIC, PEER.host, Segment(HOST, PEER, 1))))
    assert parse_icmp_error(tcp_bytes(Segment(HOST, PEER, 1))) is None


# --- UserNat.handle: bytes in, verdict out ------------------------------------------------------------------


def usernat(profile: str) -> UserNat:
    return UserNat.for_profile(PROFILES[profile], PUBLIC, GATEWAY)


def test_outbound_is_translated_and_marked() -> None:
    nat = usernat("apdm-sequential")
    decision = nat.handle(tcp_bytes(Segment(HOST, PEER, 1000, flags=SYN, options=OPTIONS)), False, 0.0)
    assert decision.accept and decision.mark and decision.payload is not None
    assert parse_tcp(decision.payload).src == Endpoint(PUBLIC, 1024)
    assert nat.counters == {"forward": 1}


def test_unsolicited_inbound_is_answered_by_the_box() -> None:
    decision = usernat("apdm-sequential").handle(
        tcp_bytes(Segment(PEER, Endpoint(PUBLIC, 9), 5, flags=SYN)), True, 0
    )
    assert not decision.accept and len(decision.answers) == 1
    rst = parse_tcp(decision.answers[0])
    assert (rst.src, rst.dst, rst.flags, rst.ack) == (Endpoint(PUBLIC, 9), PEER, RST | ACK, 6)
    icmp = usernat("adm-adf-sequential").handle(
        tcp_bytes(Segment(PEER, Endpoint(PUBLIC, 9), 5, flags=SYN)), True, 0
    )
    assert parse_icmp_error(icmp.answers[0]) is not None


def test_what_is_not_the_nats_business_goes_to_the_kernel() -> None:
    nat = usernat("eim-adf")
    udp = bytearray(tcp_bytes(Segment(HOST, PEER, 1)))
    udp[9] = 17
    assert nat.handle(bytes(udp), False, 0).accept
    to_box = nat.handle(tcp_bytes(Segment(HOST, Endpoint(GATEWAY, 22), 1, flags=SYN)), False, 0)
    assert to_box.accept and not to_box.mark and to_box.kind == "local"
    hairpin_off = nat.handle(tcp_bytes(Segment(HOST, Endpoint(PUBLIC, 40000), 1, flags=SYN)), False, 0)
    assert hairpin_off.kind == "local"  # the box's own stack answers, as a Linux router's would
    assert not nat.handle(b"\x45\0\0", True, 0).accept


def test_icmp_errors_from_the_wan_are_translated_back() -> None:
    nat = usernat("eim-eif")
    out = nat.handle(tcp_bytes(Segment(HOST, PEER, 1000, flags=SYN)), False, 0)
    assert out.payload is not None
    sent = parse_tcp(out.payload)
    error = icmp_bytes(Icmp(IcmpKind.UNREACHABLE, "198.51.100.2", PUBLIC, sent))
    decision = nat.handle(error, True, 0.1)
    assert decision.accept and decision.mark and decision.payload is not None
    translated = parse_icmp_error(decision.payload)
    assert translated is not None and translated.dst == HOST.host and translated.quoted.src == HOST
    stray = icmp_bytes(Icmp(IcmpKind.UNREACHABLE, "198.51.100.2", PUBLIC, sent.with_(dst=OTHER)))
    assert not nat.handle(stray, True, 0.2).accept
