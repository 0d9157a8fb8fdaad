"""``--strategy auto``: which strategies to try, in which order, for a pair of NATs.

Each peer knows its own NAT (``classify``) and learns the other's from the sealed peer info, so both look up
the same row of ``CASCADES`` and run the same attempts in the same order; each attempt starts at its own GO
(``READY``/``GO`` with an ``ATTEMPT`` number, docs/protocol.md). A NAT falls into one of three classes for
TCP hole punching (RFC 5382 sections 4.1 and 7.1; RFC 4787 sections 4.1, 4.2.1):

* **stable**: the public endpoint the server saw is the one the peer will see -- endpoint-independent
  mapping, or port preservation (or nothing known, which is the common case: try the cheap strategies);
* **sequential**: each new mapping gets the previous port plus ``delta``: the peer's endpoint can be
  predicted (``port-prediction``; between two sequential NATs both sides' next ports are predicted);
* **random**: each new mapping gets a random port: only guessing helps (``birthday``).

The crafted handshake comes first wherever both sides are stable: it works through NATs that answer
unsolicited SYNs with RST, which kernel simultaneous open may not (FACTS.md). A random NAT facing anything but
a stable one has no strategy here that reaches it reliably (both sides would have to guess); the cascade
still tries the cheap ones, within the deadline.
"""

from __future__ import annotations

from typing import Literal

from rawpunch.probe.result import NatBehaviour

NatClass = Literal["stable", "sequential", "random"]

CASCADES: dict[frozenset[NatClass], tuple[str, ...]] = {
    frozenset({"stable"}): ("crafted-handshake", "low-ttl-listen", "simultaneous-open"),
    frozenset({"stable", "sequential"}): ("port-prediction", "crafted-handshake"),
    frozenset({"stable", "random"}): ("birthday", "crafted-handshake"),
    frozenset({"sequential"}): ("port-prediction", "crafted-handshake"),
    frozenset({"sequential", "random"}): ("crafted-handshake", "simultaneous-open"),
    frozenset({"random"}): ("crafted-handshake", "simultaneous-open"),
}


def nat_class(b: NatBehaviour) -> NatClass:
    if b.mapping == "endpoint-independent" or b.nat is False:
        return "stable"
    if b.allocation == "sequential" and b.allocation_delta:
        return "sequential"
    if b.allocation == "random":
        return "random"
    return "stable"


def cascade(slot0: NatBehaviour, slot1: NatBehaviour) -> tuple[str, ...]:
    """The strategies to try, in order; symmetric in its arguments, so both peers agree."""
    return CASCADES[frozenset({nat_class(slot0), nat_class(slot1)})]


def stable_side(slot0: NatBehaviour, slot1: NatBehaviour) -> int:
    """The slot whose public endpoint is predictable as seen (the one that primes); slot 0 on a tie."""
    return 1 if nat_class(slot0) != "stable" and nat_class(slot1) == "stable" else 0
