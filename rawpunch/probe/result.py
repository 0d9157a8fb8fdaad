"""What a probe learned about the NAT in front of a host, in the vocabulary of the lab's ground truth.

One dataclass, shared by ``rawpunch probe`` (which fills it), the lab's validation (which compares it with a
profile's ground truth, key by key) and ``--strategy auto`` (which picks a strategy from both peers' results).
The values are those of ``rawpunch.lab.profiles`` (``MAPPING_VALUES`` and friends) plus ``"unknown"`` where a
test could not decide.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

UNKNOWN = "unknown"


@dataclass(frozen=True)
class NatBehaviour:
    mapping: str = UNKNOWN
    """endpoint-independent / address-dependent / address-and-port-dependent (RFC 4787 section 4.1)."""
    filtering: str = UNKNOWN
    """endpoint-independent / address-dependent / address-and-port-dependent (RFC 4787 section 5)."""
    allocation: str = UNKNOWN
    """port-preserving / sequential / random (RFC 4787 section 4.2)."""
    allocation_delta: int | None = None
    """For sequential allocation: the step between consecutive public ports."""
    unsolicited_syn: str = UNKNOWN
    """drop / rst / icmp / forward (RFC 5382 REQ-4)."""
    simultaneous_open: bool | None = None
    """SYN out, then SYN in on the same mapping accepted (RFC 5382 REQ-2)."""
    hops_to_nat: int | None = None
    priming_ttl: int | None = None
    hairpin: bool | None = None
    nat: bool | None = None
    """False when no translation was seen at all (public address on the host)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else a probe measured (timers, RFC 5382 checklist, raw observations)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NatBehaviour:
        """The inverse of ``to_json``; unknown keys (a newer rawpunch's) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
