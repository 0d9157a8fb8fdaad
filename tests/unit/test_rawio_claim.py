"""``rawio.from_peer``: which packets the early guard's queue claims for the punch, read from raw bytes.

Packets are built with scapy (with and without IP options, so the header-length arithmetic is exercised);
the function itself never calls scapy because it runs for every packet to the punch port.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror

from rawpunch.proto.codec import Endpoint
from rawpunch.punch.rawio import from_peer

PEER = Endpoint("198.51.100.9", 40001)
OPTIONS = [b"\x01\x01\x01\x00"]  # four NOPs: a 24-byte header


def tcp(src: str, sport: int, options: bool = False) -> bytes:
    ip = IP(src=src, dst="10.0.1.2", options=OPTIONS if options else [])
    return bytes(ip / TCP(sport=sport, dport=40000, flags="S"))


def icmp_about(dst: str, dport: int, options: bool = False, kind: int = 11) -> bytes:
    quoted = IPerror(src="10.0.1.2", dst=dst, options=OPTIONS if options else []) / TCPerror(
        sport=40000, dport=dport, flags="S"
    )
    outer = IP(src="192.0.2.1", dst="10.0.1.2", options=OPTIONS if options else [])
    return bytes(outer / ICMP(type=kind) / quoted)


@pytest.mark.parametrize("options", [False, True])
def test_claims_the_peers_segments_only(options: bool) -> None:
    assert from_peer(tcp("198.51.100.9", 40001, options), PEER)
    assert not from_peer(tcp("198.51.100.9", 40002, options), PEER)  # another port of the peer's host
    assert not from_peer(tcp("198.51.100.10", 40001, options), PEER)  # the server, say


@pytest.mark.parametrize("options", [False, True])
@pytest.mark.parametrize("kind", [11, 3])
def test_claims_icmp_errors_about_our_segments_to_the_peer_only(options: bool, kind: int) -> None:
    assert from_peer(icmp_about("198.51.100.9", 40001, options, kind), PEER)
    assert not from_peer(icmp_about("198.51.100.9", 40009, options, kind), PEER)
    assert not from_peer(icmp_about("203.0.113.5", 40001, options, kind), PEER)


def test_leaves_other_protocols_and_junk_to_the_kernel() -> None:
    assert not from_peer(bytes(IP(src="198.51.100.9") / UDP(sport=40001, dport=40000)), PEER)
    assert not from_peer(b"", PEER)
    assert not from_peer(tcp("198.51.100.9", 40001)[:21], PEER)  # cut inside the TCP ports
    assert not from_peer(icmp_about("198.51.100.9", 40001)[:30], PEER)  # cut inside the quoted header
