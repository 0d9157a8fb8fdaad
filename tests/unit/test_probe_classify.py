"""The probe's pure parts: classifier (observations -> NatBehaviour), RFC 5382 checklist, packet parsing."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest

from rawpunch.lab.usernat import tcp_bytes
from rawpunch.probe import packets
from rawpunch.probe.classify import (
    Observations,
    classify,
    classify_allocation,
    classify_filtering,
    classify_hairpin,
    classify_mapping,
    classify_unsolicited,
    table,
)
from rawpunch.proto.codec import Endpoint, Reaction
from rawpunch.punch.segment import Flags, Segment

EIM, ADM, APDM = "endpoint-independent", "address-dependent", "address-and-port-dependent"
E1, E2, E3 = Endpoint("198.51.100.1", 5000), Endpoint("198.51.100.1", 5001), Endpoint("198.51.100.1", 5002)


@pytest.mark.parametrize(
    ("seen", "expected"),
    [
        ((E1, E1, E1), EIM),
        ((E1, E1, E2), ADM),
        ((E1, E2, E3), APDM),
        ((E1, E2, E1), "unknown"),  # alt equal to one of two different mappings: no RFC 4787 behaviour
        (None, "unknown"),
    ],
)
def test_mapping(seen: Any, expected: str) -> None:
    assert classify_mapping(seen) == expected


@pytest.mark.parametrize(
    ("public", "expected"),
    [
        ((101, 105, 103, 109), ("port-preserving", None)),
        ((61000, 61001, 61002, 61003), ("sequential", 1)),
        ((61010, 61008, 61006, 61004), ("sequential", -2)),
        ((61000, 1234, 64000, 33000), ("random", None)),
        ((101, 105, 103), ("unknown", None)),  # one missing: not enough to say
    ],
)
def test_allocation_from_non_monotonic_local_ports(public: tuple[int, ...], expected: Any) -> None:
    assert classify_allocation((101, 105, 103, 109), public) == expected


@pytest.mark.parametrize(
    ("same", "other", "expected"),
    [
        (True, True, EIM),
        (True, False, ADM),
        (False, False, APDM),
        (False, True, "unknown"),
        (None, True, "unknown"),
    ],
)
def test_filtering(same: bool | None, other: bool | None, expected: str) -> None:
    assert classify_filtering(same, other) == expected


@pytest.mark.parametrize(
    ("reached", "reaction", "expected"),
    [
        (True, Reaction.RST, "forward"),  # the host itself answered: no NAT in the way
        (False, Reaction.NONE, "drop"),
        (False, Reaction.RST, "rst"),
        (False, Reaction.ICMP, "icmp"),
        (None, None, "unknown"),
    ],
)
def test_unsolicited(reached: bool | None, reaction: Reaction | None, expected: str) -> None:
    assert classify_unsolicited(reached, reaction) == expected


@pytest.mark.parametrize(
    ("sources", "nat", "expected"),
    [
        (("198.51.100.1",), True, True),  # REQ-8a: the external source
        (("10.0.1.2",), True, False),  # internal source only: not what RFC 5382 REQ-8 asks
        ((), True, False),
        (None, True, None),
        ((), False, None),
    ],
)
def test_hairpin(sources: Any, nat: bool, expected: bool | None) -> None:
    assert classify_hairpin(sources, "198.51.100.1", nat) is expected


def _linux_nat(**changes: Any) -> Observations:
    base: dict[str, Any] = {
        "local_address": "10.0.1.2",
        "public_address": "198.51.100.1",
        "mapping_seen": (E1, E1, E1),
        "allocation_local": (101, 105, 103, 109),
        "allocation_public": (101, 105, 103, 109),
        "filter_same_address": False,
        "filter_other_address": False,
        "unsolicited_reached_host": False,
        "reaction": Reaction.NONE,
        "simultaneous_open": True,
        "offenders": {1: "10.0.1.1", 2: "198.51.100.2"},
        "hairpin_sources": (),
    }
    return Observations(**{**base, **changes})


def _checklist(obs: Observations) -> dict[str, str]:
    return {c["req"]: c["status"] for c in classify(obs).extra["rfc5382"]}


def test_a_linux_masquerade_nat_end_to_end() -> None:
    b = classify(_linux_nat())
    assert (b.nat, b.mapping, b.filtering, b.allocation) == (True, EIM, APDM, "port-preserving")
    assert (b.unsolicited_syn, b.simultaneous_open, b.hops_to_nat, b.priming_ttl, b.hairpin) == (
        "drop",
        True,
        1,
        2,
        False,
    )
    assert _checklist(_linux_nat()) == {
        "REQ-1": "pass",
        "REQ-2": "pass",
        "REQ-3": "fail",
        "REQ-4": "pass",
        "REQ-5": "unknown",
        "REQ-6": "unknown",
        "REQ-7": "unknown",
        "REQ-8": "fail",
        "REQ-9": "unknown",
        "REQ-10": "unknown",
    }
    assert "address-and-port-dependent" in table(b)


def test_a_double_nat_primes_past_the_outer_one() -> None:
    b = classify(_linux_nat(offenders={1: "10.0.1.1", 2: "100.64.1.1", 3: "198.51.100.2"}))
    assert (b.hops_to_nat, b.priming_ttl) == (2, 3)


def test_simultaneous_open_is_unknown_where_the_new_flow_gets_a_new_mapping() -> None:
    b = classify(_linux_nat(mapping_seen=(E1, E2, E3), simultaneous_open=False))
    assert b.simultaneous_open is None
    assert _checklist(_linux_nat(mapping_seen=(E1, E2, E3)))["REQ-2"] == "unknown"


def test_an_immediate_rst_fails_req_4_and_a_short_transitory_timer_fails_req_5() -> None:
    """REQ-5 holds both idle timeouts (RFC 5382 section 8); REQ-6 is about ALGs, which no probe sees."""
    timers = {
        "syn_sent": {"expired_within_s": 16.0},
        "established": {"alive_s": 16.0, "expired_within_s": None},
    }
    checklist = _checklist(_linux_nat(reaction=Reaction.RST, timers=timers))
    assert (checklist["REQ-4"], checklist["REQ-5"], checklist["REQ-6"]) == ("fail", "fail", "unknown")


@pytest.mark.parametrize(
    ("established", "syn_sent", "status"),
    [
        (None, None, "unknown"),  # survived every wait: the bounded test cannot prove hours
        (16.0, None, "fail"),  # established expired far below 2 h 4 min
        (None, 16.0, "fail"),  # SYN_SENT expired below 4 min
    ],
)
def test_req_5_fails_on_either_short_timer_and_never_passes(
    established: float | None, syn_sent: float | None, status: str
) -> None:
    timers = {
        "established": {"expired_within_s": established},
        "syn_sent": {"expired_within_s": syn_sent},
    }
    assert _checklist(_linux_nat(timers=timers))["REQ-5"] == status


def test_without_nat_the_host_endpoint_is_public_and_the_checklist_does_not_apply() -> None:
    obs = _linux_nat(
        local_address="198.51.100.162",
        public_address="198.51.100.162",
        allocation_public=(1, 2, 3, 4),  # whatever the flows looked like: no translation happened
        offenders={1: "198.51.100.161"},
        hairpin_sources=None,
    )
    b = classify(obs)
    assert (b.nat, b.allocation, b.hops_to_nat, b.priming_ttl, b.hairpin) == (
        False,
        "port-preserving",
        None,
        2,
        None,
    )
    assert set(_checklist(obs).values()) == {"unknown"}


def test_nothing_observed_is_unknown_everywhere_not_a_guess() -> None:
    b = classify(Observations(local_address="10.0.1.2"))
    assert (b.mapping, b.filtering, b.allocation, b.unsolicited_syn) == ("unknown",) * 4
    assert (b.nat, b.simultaneous_open, b.hairpin) == (None, None, None)


# --- packets ----------------------------------------------------------------------------------------------

SRV, HOST = Endpoint("203.0.113.10", 3479), Endpoint("198.51.100.1", 1023)


def _tcp(src: Endpoint, dst: Endpoint, flags: Flags) -> bytes:
    return tcp_bytes(Segment(src, dst, seq=1, flags=flags))


def _icmp_unreachable(router: str, quoted: bytes) -> bytes:
    body = struct.pack("!BBHI", 3, 3, 0, 0) + quoted[:28]
    header = bytearray(_tcp(Endpoint(router, 1), SRV, Flags.NONE)[:20])
    header[9], header[2:4] = 1, struct.pack("!H", 20 + len(body))
    return bytes(header) + body


def test_a_bare_syn_is_recognised_and_a_syn_ack_is_not() -> None:
    syn = packets.parse(_tcp(SRV, HOST, Flags.SYN))
    assert syn is not None and syn.bare_syn and (syn.src, syn.dst) == (SRV, HOST)
    synack = packets.parse(_tcp(SRV, HOST, Flags.SYN | Flags.ACK))
    assert synack is not None and not synack.bare_syn


def test_a_rst_answers_our_syn_with_the_ends_swapped() -> None:
    rst = packets.parse(_tcp(HOST, SRV, Flags.RST | Flags.ACK))
    assert rst is not None and packets.reaction(rst) == (SRV, HOST, Reaction.RST)


def test_an_icmp_unreachable_names_the_syn_it_quotes() -> None:
    icmp = packets.parse(_icmp_unreachable("198.51.100.1", _tcp(SRV, HOST, Flags.SYN)))
    assert icmp is not None and icmp.router == "198.51.100.1"
    assert packets.reaction(icmp) == (SRV, HOST, Reaction.ICMP)


@pytest.mark.parametrize("data", [b"", b"\x45" + bytes(10), b"\x60" + bytes(40)])
def test_junk_is_ignored(data: bytes) -> None:
    assert packets.parse(data) is None


@pytest.mark.parametrize("program", [packets.RST_FILTER, packets.SYN_FILTER, packets.UNREACHABLE_FILTER])
def test_the_kernel_accepts_the_capture_filters(program: tuple[tuple[int, int, int, int], ...]) -> None:
    # What they let through is checked in the lab (tests/lab/test_probe.py); here only that the kernel's
    # classic-BPF checker takes them, which needs no root on an ordinary socket.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        packets.attach_filter(sock, program)
