"""``--strategy auto``: which strategies to try, in which order, for a pair of NATs.

Each peer knows its own NAT (``classify``) and learns the other's from the sealed peer info, so both look up
the same row of ``CASCADES`` and run the same attempts in the same order; each attempt starts at its own GO
(``READY``/``GO`` with an ``ATTEMPT`` number, docs/protocol.md). A NAT falls into one of three classes for
TCP hole punching (RFC 5382 sections 4.1 and 7.1; RFC 4787 sections 4.1, 4.2.1):

* **stable**: the public endpoint the server saw is the one the peer will see -- endpoint-independent
  mapping, or port preservation (or nothing known, which is the common case: try the cheap strategies);
* **sequential**: each new mapping gets the previous port plus ``delta``: the peer's endpoint can be
  predicted (``port-prediction``; between two sequential NATs both sides' next ports are predicted);
* **random**: each new mapping gets a random port and the mapping is known to depend on the remote (a probe
  said so): only guessing helps (``birthday``);
* **maybe-stable**: random ports, mapping unknown. The fast classification sees only new ports for new local
  ports, which an endpoint-independent NAT that does not preserve ports shows too (``eim-apdf-random``, a
  carrier-grade NAT): its endpoint may well be stable. It is tried as the stable side of port prediction
  and guessing, which is what works if it is, before the strategies for two random NATs.

The crafted handshake comes first wherever both sides are stable: it works through NATs that answer
unsolicited SYNs with RST, which kernel simultaneous open may not (FACTS.md). A random NAT facing anything but
a stable one has no strategy here that reaches it reliably (both sides would have to guess); the cascade
still tries the cheap ones, within the deadline.
"""

from __future__ import annotations

from typing import Literal

from rawpunch.probe.result import UNKNOWN, NatBehaviour

NatClass = Literal["stable", "maybe-stable", "sequential", "random"]
NAT_CLASSES: tuple[NatClass, ...] = ("stable", "maybe-stable", "sequential", "random")  # stable side first

CASCADES: dict[frozenset[NatClass], tuple[str, ...]] = {
    frozenset({"stable"}): ("crafted-handshake", "low-ttl-listen", "simultaneous-open"),
    frozenset({"stable", "maybe-stable"}): ("birthday", "crafted-handshake"),
    frozenset({"stable", "sequential"}): ("port-prediction", "crafted-handshake"),
    frozenset({"stable", "random"}): ("birthday", "crafted-handshake"),
    # Either may be the endpoint-independent one (or both): guess with each side as the stable one in turn.
    frozenset({"maybe-stable"}): ("birthday", "birthday", "crafted-handshake"),
    frozenset({"maybe-stable", "sequential"}): ("port-prediction", "crafted-handshake"),
    frozenset({"maybe-stable", "random"}): ("birthday", "crafted-handshake"),
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
        return "maybe-stable" if b.mapping == UNKNOWN else "random"
    return "stable"


def cascade(slot0: NatBehaviour, slot1: NatBehaviour) -> tuple[str, ...]:
    """The strategies to try, in order; symmetric in its arguments, so both peers agree."""
    return CASCADES[frozenset({nat_class(slot0), nat_class(slot1)})]


def stable_side(slot0: NatBehaviour, slot1: NatBehaviour) -> int:
    """The slot whose public endpoint is most likely as seen (the one that primes); slot 0 on a tie."""
    rank = NAT_CLASSES.index
    return 1 if rank(nat_class(slot1)) < rank(nat_class(slot0)) else 0


def stable_slot_for(names: tuple[str, ...], attempt: int, stable: int) -> int:
    """The stable slot for attempt ``attempt``: a strategy's repeat in the cascade swaps the roles."""
    repeats = names[:attempt].count(names[attempt])
    return stable if repeats % 2 == 0 else 1 - stable
