"""Finding our NAT's hop from traceroute answers (pure part of ``pathprobe``)."""

import pytest

from rawpunch.punch.pathprobe import _settled, nat_hop


@pytest.mark.parametrize(
    ("offenders", "hop"),
    [
        ({1: "10.0.1.1", 2: "198.51.100.2", 3: "198.51.100.6"}, 1),  # home NAT, then the internet
        ({1: "192.168.1.1", 2: "100.64.0.1", 3: "203.0.113.1"}, 2),  # home NAT behind a CGNAT
        ({1: "10.0.1.1", 3: "198.51.100.6"}, 1),  # hop 2 silent: stop at the gap
        ({1: "198.51.100.1", 2: "10.9.9.9"}, None),  # no NAT in front (public first hop)
        ({}, None),  # nothing answered
        ({2: "10.0.0.1"}, None),  # hop 1 silent: unknown
    ],
)
def test_nat_hop_is_the_last_of_the_leading_inside_addresses(
    offenders: dict[int, str], hop: int | None
) -> None:
    assert nat_hop(offenders) == hop


@pytest.mark.parametrize(
    ("found", "settled"),
    [
        ({1: "10.0.1.1", 2: "198.51.100.2"}, True),
        ({2: "198.51.100.2"}, False),  # hop 1 may still answer from inside
        ({1: "10.0.1.1"}, False),  # hop 2 may be another NAT
        ({1: "198.51.100.1"}, True),
    ],
)
def test_probing_stops_once_the_first_outside_hop_answered(found: dict[int, str], settled: bool) -> None:
    assert _settled(found) is settled
