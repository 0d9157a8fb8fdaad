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
  said so): guessing (``birthday``) against a stable or sequential side, port exhaustion
  (``port-exhaustion``, ``sweep.py``) against another random side or a symmetric sequential one;
* **maybe-stable**: random ports, mapping unknown. The fast classification sees only new ports for new local
  ports, which an endpoint-independent NAT that does not preserve ports shows too (``eim-apdf-random``, a
  carrier-grade NAT): its endpoint may well be stable. It is tried as the stable side of port prediction
  and guessing, which is what works if it is, before the strategies for two random NATs; two maybe-stable
  sides guess both ways in one attempt (``guesses_both_ways``), since a wrong choice of the one that
  primes would cost the first attempt half the time.

The crafted handshake comes first wherever both sides are stable: it works through NATs that answer
unsolicited SYNs with RST, which kernel simultaneous open may not (FACTS.md). Wherever a side is not stable,
``port-exhaustion`` comes last (or alone, where nothing else can work): it needs no guess to be lucky and
no race to be won -- it costs tens of thousands of SYNs against a random NAT (a few seconds at its rate),
a thousand against a sequential one -- so it catches whatever the cheap strategies missed.

Who primes in ``birthday`` (``birthday_primer``): the side whose public endpoint the other can aim at --
stable, else sequential (the connector aims at its predicted next ports), else maybe-stable. The primer
also listens, so a primer NAT that filters endpoint-independently or by address admits the random side's
SYN from any port, and guessing is needed only behind address-and-port-dependent filtering.

A random NAT against a sequential one: only the sequential side can prime, and its NAT decides. (Port
prediction comes first where the random side may be endpoint-independent; its connector, the sequential
side, listens too, so the same address-dependent filtering lets the random side's retransmitted priming
SYNs in there.)

* **Address-dependent or endpoint-independent mapping** (``adm-adf-sequential``): all priming SYNs to the
  peer's address share one mapping, the next port; with address-dependent filtering any port of the peer
  gets in (the listener takes it), with port-dependent filtering the guesses do (birthday bound as usual).
* **Address-and-port-dependent mapping and filtering** (a symmetric sequential NAT, ``apdm-sequential``):
  not traversable by guessing. Priming guess ``g_k`` gets its own mapping ``P+k`` that admits only
  ``peer:g_k``. The random side's SYN ``j`` leaves from a port ``X_j`` its NAT draws afresh for that
  destination, uniform over ``N`` ports and independent of which ``P+k`` it aims at; it gets in only if
  ``X_j == g_k`` for the one ``k`` it aimed at: probability ``1/N`` per SYN, ``n/N`` in all (0.8% for 500
  SYNs), with no birthday gain, since each SYN can meet one guess only. The roles swapped are the same: the
  sequential side's SYN to ``peer:y`` must hit the random port of the one priming SYN that went to its next
  port. Port exhaustion does not guess: the random side sends flows from *every* port of its NAT's range to
  one predicted port of the sequential side, so its NAT must hand out every public port towards it, the one
  the sequential side aims at included (``sweep.py``). So ``cascade`` goes straight to it when the probes
  say so; with only the fast classification (mapping unknown) it first makes the two cheap attempts that
  would work if either guess about the unknown behaviours is right. Two random NATs that both map per
  remote endpoint are the same, with both sides exhausting.
"""

from __future__ import annotations

from typing import Literal

from rawpunch.probe.result import UNKNOWN, NatBehaviour

NatClass = Literal["stable", "maybe-stable", "sequential", "random"]
NAT_CLASSES: tuple[NatClass, ...] = ("stable", "maybe-stable", "sequential", "random")  # stable side first

EXHAUSTION = "port-exhaustion"
CASCADES: dict[frozenset[NatClass], tuple[str, ...]] = {
    frozenset({"stable"}): ("crafted-handshake", "low-ttl-listen", "simultaneous-open"),
    frozenset({"stable", "maybe-stable"}): ("birthday", "crafted-handshake", EXHAUSTION),
    # Port exhaustion against a sequential side costs ~1,000 SYNs and no race: before the crafted
    # handshake, which only an endpoint-independent NAT with sequential ports would let through.
    frozenset({"stable", "sequential"}): ("port-prediction", EXHAUSTION, "crafted-handshake"),
    frozenset({"stable", "random"}): ("birthday", "crafted-handshake", EXHAUSTION),
    # Either may be the endpoint-independent one (or both): guess both ways at once (guesses_both_ways);
    # two that map per remote endpoint are left to port exhaustion.
    frozenset({"maybe-stable"}): ("birthday", EXHAUSTION),
    # The maybe-stable side is endpoint-independent (port prediction), or the sequential one lets the
    # peer's address in (birthday, the sequential side priming and listening); see the module doc.
    frozenset({"maybe-stable", "sequential"}): ("port-prediction", "birthday", EXHAUSTION),
    frozenset({"maybe-stable", "random"}): ("birthday", EXHAUSTION),
    frozenset({"sequential"}): ("port-prediction", EXHAUSTION, "crafted-handshake"),
    frozenset({"sequential", "random"}): ("birthday", EXHAUSTION),
    frozenset({"random"}): (EXHAUSTION,),
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
    """The strategies to try, in order; symmetric in its arguments, so both peers agree.

    A symmetric sequential NAT against a random one gets no guessing (module doc): port exhaustion at once
    when the random side is known to map per remote, else after port prediction."""
    names = CASCADES[frozenset({nat_class(slot0), nat_class(slot1)})]
    for seq, other in ((slot0, slot1), (slot1, slot0)):
        if _symmetric_sequential(seq) and nat_class(other) in ("random", "maybe-stable"):
            names = tuple(n for n in names if n != "birthday")
            if nat_class(other) == "random":
                names = (EXHAUSTION,)
    return names


def _symmetric_sequential(b: NatBehaviour) -> bool:
    """Sequential, and known to map (and not known not to filter) per remote endpoint: its priming SYNs
    let no other port of the peer in."""
    per_endpoint = "address-and-port-dependent"
    return (
        nat_class(b) == "sequential" and b.mapping == per_endpoint and b.filtering in (per_endpoint, UNKNOWN)
    )


def stable_side(slot0: NatBehaviour, slot1: NatBehaviour) -> int:
    """The slot whose public endpoint is most likely as seen (the one that primes); slot 0 on a tie."""
    rank = NAT_CLASSES.index
    return 1 if rank(nat_class(slot1)) < rank(nat_class(slot0)) else 0


#: Who primes in ``birthday``: the side the other can aim at (its endpoint known, else predicted).
GUESSING_ORDER: tuple[NatClass, ...] = ("stable", "sequential", "maybe-stable", "random")


def birthday_primer(slot0: NatBehaviour, slot1: NatBehaviour, stable_slot: int) -> int:
    """The slot that primes (and listens) in a birthday attempt whose ``stable_slot_for`` is ``stable_slot``:
    the better side by ``GUESSING_ORDER`` (slot 0 on a tie), swapped where the cascade repeats birthday."""
    rank = GUESSING_ORDER.index
    primer = 1 if rank(nat_class(slot1)) < rank(nat_class(slot0)) else 0
    return primer if stable_slot == stable_side(slot0, slot1) else 1 - primer


def guesses_both_ways(slot0: NatBehaviour, slot1: NatBehaviour) -> bool:
    """Whether a birthday attempt runs both ways at once: two maybe-stable sides, either of which may be
    the endpoint-independent one (a carrier-grade NAT) that must prime; guessing the wrong one costs an
    attempt, so each side primes and connects, each way with the whole SYN budget."""
    return nat_class(slot0) == nat_class(slot1) == "maybe-stable"


def stable_slot_for(names: tuple[str, ...], attempt: int, stable: int) -> int:
    """The stable slot for attempt ``attempt``: a strategy's repeat in the cascade swaps the roles."""
    repeats = names[:attempt].count(names[attempt])
    return stable if repeats % 2 == 0 else 1 - stable
