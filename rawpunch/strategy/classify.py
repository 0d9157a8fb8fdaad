"""What a peer knows of its NAT: a cached probe result, or a fast classification made while registering.

Fast classification (RFC 4787 section 4.2.1; RFC 5382 section 7.1 for TCP). While registering,
a peer discovers the public endpoint of ``DISCOVERIES`` local ports, one after the other, each a new TCP flow
to the same server endpoint, so each needs a new mapping. The public ports tell the allocation:

* every public port equals its local port: **port-preserving** (Linux MASQUERADE keeps a free port);
* consecutive public ports differ by one constant step ``delta`` (``0 < |delta| <= MAX_DELTA``):
  **sequential**, and the next mapping will most likely get ``last + delta`` (RFC 4787 section 4.2.1 calls
  this predictable; "port prediction" relies on it);
* anything else: **random**.

One server endpoint cannot show the mapping behaviour (that needs one local port towards two destinations,
RFC 4787 section 4.1). A server with a second discovery port (``MAPPING_PORT``) shows half of it: the last
port discovered there again gets **another public port** if the NAT maps per remote port -- address-and-
port-dependent mapping, what makes port guessing hopeless between two such NATs (``auto``) -- and the same
one if it maps endpoint-independently *or* per address, which one address cannot tell apart (that stays
unknown). A probe result (``rawpunch probe``, cached by ``rawpunch.probe.cache``) fills what is left and
wins wherever it knows more. Both peers exchange what they
know in the sealed peer info (``nat_*`` fields), so both compute the same strategy cascade.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence
from typing import Any

from rawpunch.probe import cache
from rawpunch.probe.result import UNKNOWN, NatBehaviour
from rawpunch.proto.codec import TcpMapping
from rawpunch.proto.peerinfo import BEHAVIOUR_WORDS, PeerInfo

DISCOVERIES = 3
MAX_DELTA = 16
log = logging.getLogger("rawpunch.strategy")


def classify_discoveries(observed: Sequence[TcpMapping]) -> NatBehaviour:
    """The allocation behaviour shown by consecutive discoveries of distinct local ports (oldest first), and
    the mapping if the last one repeats the port before it at the server's other port (the mapping check)."""
    if len(observed) >= 2 and observed[-1].local_port == observed[-2].local_port:
        allocation = classify_discoveries(observed[:-1])
        if observed[-1].public.port == observed[-2].public.port:
            return allocation
        return dataclasses.replace(allocation, mapping="address-and-port-dependent")
    if len(observed) < 2:
        return NatBehaviour()
    if all(m.public.port == m.local_port for m in observed):
        return NatBehaviour(allocation="port-preserving")
    ports = [m.public.port for m in observed]
    deltas = {b - a for a, b in itertools.pairwise(ports)}
    if len(deltas) == 1 and 0 < abs(delta := deltas.pop()) <= MAX_DELTA:
        return NatBehaviour(allocation="sequential", allocation_delta=delta)
    return NatBehaviour(allocation="random")


def merge(known: NatBehaviour | None, quick: NatBehaviour) -> NatBehaviour:
    """``known`` (a probe result) wherever it knows a field, ``quick`` elsewhere."""
    if known is None:
        return quick
    changes: dict[str, Any] = {}
    for f in ("mapping", "filtering", "allocation"):
        if getattr(known, f) == UNKNOWN:
            changes[f] = getattr(quick, f)
    if known.allocation_delta is None and changes.get("allocation", known.allocation) == quick.allocation:
        changes["allocation_delta"] = quick.allocation_delta
    return dataclasses.replace(known, **changes)


def cached_behaviour() -> NatBehaviour | None:
    """The cached probe result of this host's network, or None (no probe run yet, or an unreadable cache)."""
    try:
        result = cache.load()
    except Exception as exc:  # a broken cache must not stop the punch: it only informs the choice
        log.info("ignoring the cached probe result: %s", exc)
        return None
    return result if isinstance(result, NatBehaviour) else None


def info_fields(b: NatBehaviour) -> dict[str, Any]:
    """The ``PeerInfo`` fields that carry ``b`` to the peer."""

    def word(kind: str, value: str) -> str:
        return value if value in BEHAVIOUR_WORDS[kind] else UNKNOWN

    delta = b.allocation_delta
    if delta is not None and not -0x8000 <= delta < 0x8000:
        delta = None
    return {
        "nat_mapping": word("mapping", b.mapping),
        "nat_filtering": word("filtering", b.filtering),
        "nat_allocation": word("allocation", b.allocation),
        "nat_delta": delta,
    }


def from_info(info: PeerInfo) -> NatBehaviour:
    return NatBehaviour(
        mapping=info.nat_mapping,
        filtering=info.nat_filtering,
        allocation=info.nat_allocation,
        allocation_delta=info.nat_delta,
    )
