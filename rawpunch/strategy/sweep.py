"""Port exhaustion, sans-IO: fill a NAT's port space towards one remote endpoint so the peer can aim anywhere.

Why guessing fails between two per-destination NATs
---------------------------------------------------
A NAT with address-and-port-dependent mapping (RFC 4787 section 4.1; RFC 5382 section 4.1 for TCP) and
random allocation (RFC 4787 section 4.2.1; Linux ``MASQUERADE --random-fully``) gives each new remote
endpoint a fresh random public port. A connection between such a host ``A`` and a peer ``B`` needs a pair of
mappings that name each other: ``A``'s NAT mapped some flow to public port ``h`` *towards* ``B:g``, and
``B``'s NAT mapped some flow to ``g`` towards ``A:h``. Birthday guessing (``plan.birthday``) sends flows to
many *different* guessed ports: each flow's port is a fresh draw, and a hit needs two independent draws to
land on two particular values, about ``n m / N^2`` for ``n`` and ``m`` flows over ``N`` ports -- hopeless for
``N = 64,512`` (``auto.py`` has the argument for a sequential NAT against a random one: ``n / N``).

What works instead: aim every flow at one endpoint
--------------------------------------------------
A NAT must give distinct flows towards *one* remote endpoint distinct public ports: their reply tuples
(remote endpoint -> public endpoint) must differ, or a reply could not be told apart (RFC 4787 section 4.1;
``nf_nat_core.c``, ``get_unique_tuple``). So if ``A`` sends ``n`` flows from ``n`` local ports, all to
``B:g``, its NAT hands out ``n`` *distinct* ports towards ``B:g``: for ``n = N`` every port of the range,
including ``h``, whatever ``h`` is. If ``B`` does the same towards ``A:h``, ``B``'s NAT hands out ``g``
among its ports towards ``A:h``. Both then hold the matching pair, ``A:h <-> B:g``, with probability
``min(1, n/N) * min(1, m/N)``: no birthday bound, but no square either. Against a *stable* side (its
endpoint known, one flow) or a *sequential* one (its next ports predicted, a window of flows that covers the
aimed-at port however many mappings it made since it was discovered) only the random side has to exhaust:
``n / N``.

``g`` and ``h`` must be ports the NATs use: each side aims at a port one above the peer's last observed
public port (a port its NAT hands out, and free unless taken since), or at the stable peer's endpoint, or
at the sequential peer's ``REACH``-th predicted port. Linux lets one public port serve flows to different
remote endpoints, so exhausting the ports towards ``B:g`` takes nothing from other traffic; a carrier-grade
NAT that limits ports per subscriber (RFC 6888 REQ-4) bounds ``n`` and makes this fail -- or, with a small
port block, makes it cheap.

The schedule (all from data both peers hold, no clock compared)
---------------------------------------------------------------
1. **Open** at GO: each side sends one SYN per flow with the priming TTL (``seq = ISN - 1``, as the crafted
   handshake's priming SYN): it passes the own NAT, which allocates the mapping (conntrack SYN_SENT, 120 s),
   and expires in the core before the peer's NAT, where it would be dropped or, worse, answered by a RST that
   closes the fresh entry on its way back (FACTS.md).
2. **Knock** once both sides' opens are out (``knock_start``: the longer open phase plus the GO skew margin):
   one side sends every flow's SYN again with the normal TTL (``seq = ISN``). All are dropped at the peer's
   NAT but the one from ``h`` to ``g``, which meets the peer's entry in the reply direction (conntrack's
   simultaneous open, SYN_SENT2) and reaches the peer. A stable or sequential side knocks in every round (its
   few SYNs are cheap; an exhausting side's would be tens of thousands of unsolicited SYNs at the peer's
   NAT); two exhausting sides take turns (a lost SYN gets a second chance from the other direction). Each
   round lasts its SYNs at the rate plus a few round trips.
3. **Found**: a SYN (or SYN-ACK) from the peer's address to one of our flows, carrying exactly the peer's ISN
   (and ``ack = ISN + 1`` for a SYN-ACK) from the sealed peer info -- a blind forgery cannot match. That names
   the 4-tuple; the crafted handshake's engine (``rawpunch.punch.engine``) finishes it from there, the caught
   segment its first input, and the TCP_REPAIR splice and authentication follow as in the crafted handshake.
   The peer finds the same 4-tuple when the engine's SYN or SYN-ACK reaches it.
4. **Release**: every other flow gets a RST with the priming TTL, which moves its NAT entry to CLOSE (10 s
   instead of 120 s in SYN_SENT): tens of thousands of half-open entries are not left to the NAT.

The SYN budget is bounded (``flows`` per side for the opens, the same per knock round, one RST each) and
so is the rate (``rate`` SYNs per second per side).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from rawpunch.proto.codec import Endpoint
from rawpunch.punch.segment import Flags, Segment, TcpOptions, seq_add
from rawpunch.strategy.plan import PORT_RANGE, lead_margin, predict_ports

#: Every port of Linux's NAT range for source ports >= 1024 (``plan.PORT_RANGE``).
RANGE_SIZE = PORT_RANGE[1] - PORT_RANGE[0] + 1
#: Flows of an exhausting side: the whole range, so the peer's aimed-at port is among them.
EXHAUSTION_FLOWS = RANGE_SIZE
#: SYNs per second, each side: 64,512 SYNs of 60 bytes in 6.5 s, about 5 Mbit/s.
EXHAUSTION_RATE = 10_000.0
#: Flows of a sequential side: its predicted port stays covered after up to REACH - 1 mappings it made since
#: its discovery (earlier attempts of a cascade: a birthday primer's 750 guesses among them) ...
REACH = 1024
#: ... or, as a cascade's first attempt, since the mapping check: other hosts' and programs' new flows only.
FIRST_REACH = 64
#: Knock rounds at most (they alternate between the sides).
MAX_ROUNDS = 4
#: RSTs per second that release the flows' NAT entries: they pass our NAT only, so faster than the SYNs.
RELEASE_RATE = 100_000.0

SideKind = Literal["stable", "sequential", "exhaust"]
Phase = Literal["open", "knock", "release"]


@dataclass(frozen=True)
class Side:
    """What one side does: how many flows, and which public port of its NAT the other side aims at."""

    kind: SideKind
    flows: int
    aim: int
    """The port of this side's public address that the *other* side's flows go to."""
    range_size: int = RANGE_SIZE
    """Ports the NAT allocates from (an exhausting side's ``N``)."""

    @property
    def probability(self) -> float:
        """Chance that one of this side's flows gets ``aim``: certain for a stable side, and for a
        sequential one within ``REACH``; ``flows / N`` for an exhausting side (distinct ports, see above)."""
        return 1.0 if self.kind != "exhaust" else min(1.0, self.flows / self.range_size)


def stable_side(public_port: int) -> Side:
    return Side("stable", 1, public_port)


def sequential_side(last: int, delta: int, reach: int = REACH) -> Side:
    """``reach`` flows; the aimed-at port is the ``reach``-th predicted one, which any flow may get."""
    return Side("sequential", reach, predict_ports(last, delta, reach)[-1])


def exhausting_side(
    last_public_port: int, flows: int = EXHAUSTION_FLOWS, port_range: tuple[int, int] = PORT_RANGE
) -> Side:
    """``flows`` flows; aimed at one above the last observed public port (below it at the range's top)."""
    size = port_range[1] - port_range[0] + 1
    aim = last_public_port + 1 if last_public_port < port_range[1] else last_public_port - 1
    return Side("exhaust", min(flows, size), aim, size)


@dataclass(frozen=True)
class SweepPlan:
    """Both sides' shapes and the shared schedule; ``me`` and ``peer`` are indexed by slot in ``sides``."""

    sides: tuple[Side, Side]
    slot: int
    local_ports: tuple[int, ...]
    """Our flows' local ports (``sides[slot].flows`` of them)."""
    local_host: str
    peer_host: str
    isn: int
    peer_isn: int
    priming_ttl: int
    rtt: float | None
    options: TcpOptions = field(default_factory=TcpOptions)
    """Our SYN options, the engine's: conntrack reads window scaling and SACK from the *first* SYNs it sees
    of a flow (a later SYN in SYN_SENT2 does not re-read them), so the sweep's SYNs must carry what the
    spliced socket will use, or the NATs judge its scaled windows unscaled and drop its data as INVALID."""
    rate: float = EXHAUSTION_RATE
    ttl: int = 64

    def __post_init__(self) -> None:
        if len(self.local_ports) != self.me.flows:
            raise ValueError(f"{len(self.local_ports)} local ports for {self.me.flows} flows")
        if self.rate <= 0:
            raise ValueError(f"rate must be positive, got {self.rate}")

    @cached_property
    def port_set(self) -> frozenset[int]:
        """``local_ports`` for membership tests (a segment's destination, a queued packet's)."""
        return frozenset(self.local_ports)

    @property
    def me(self) -> Side:
        return self.sides[self.slot]

    @property
    def peer(self) -> Side:
        return self.sides[1 - self.slot]

    @property
    def target(self) -> Endpoint:
        """Where every one of our flows goes: the peer's aimed-at port."""
        return Endpoint(self.peer_host, self.peer.aim)

    @property
    def probability(self) -> float:
        return self.sides[0].probability * self.sides[1].probability

    def open_time(self, slot: int) -> float:
        return self.sides[slot].flows / self.rate

    @property
    def knock_start(self) -> float:
        """Seconds after GO: both sides' opens have left, plus the margin for the GO skew."""
        return max(self.open_time(0), self.open_time(1)) + lead_margin(self.rtt)

    @property
    def first_knocker(self) -> int:
        """The side with fewer flows knocks first (cheaper, and a stable side's flow is known); slot 0 on a
        tie."""
        return 1 if self.sides[1].flows < self.sides[0].flows else 0

    def knocker(self, round_: int) -> int:
        """Who knocks in round ``round_``: a stable or sequential side in every round, against an exhausting
        one (tens of thousands of unsolicited SYNs at the peer's NAT buy nothing its few flows' knocks do
        not, and a NAT that answers each from its own stack, or a userspace one, drowns in them); two
        exhausting sides take turns, so a lost SYN gets a second chance from the other direction."""
        if min(s.flows for s in self.sides) <= REACH:
            return self.first_knocker
        return self.first_knocker if round_ % 2 == 0 else 1 - self.first_knocker

    def round_length(self, round_: int) -> float:
        """The knocker's SYNs at the rate, then time for the answer: a few round trips, at least 0.3 s."""
        return self.open_time(self.knocker(round_)) + max(0.3, 4 * (self.rtt or 0.2))


@dataclass(frozen=True)
class Batch:
    """``segment`` sent once from each of ``ports`` (its own source port is 0)."""

    segment: Segment
    ports: tuple[int, ...]

    def segments(self) -> Iterator[Segment]:
        for port in self.ports:
            yield self.segment.with_(src=Endpoint(self.segment.src.host, port))


@dataclass(frozen=True)
class Found:
    """The peer's segment that names the connection's 4-tuple: hand it to the crafted handshake's engine."""

    local: Endpoint
    peer: Endpoint
    segment: Segment


@dataclass
class _Sender:
    """One phase's SYNs (or RSTs), paced: ``due(now)`` gives the local ports whose turn has come."""

    ports: tuple[int, ...]
    start: float
    rate: float
    sent: int = 0

    def due(self, now: float) -> tuple[int, ...]:
        if now < self.start:
            return ()
        upto = min(len(self.ports), int((now - self.start) * self.rate) + 1)
        out, self.sent = self.ports[self.sent : upto], max(self.sent, upto)
        return out

    @property
    def done(self) -> bool:
        return self.sent >= len(self.ports)

    def next_time(self) -> float | None:
        return None if self.done else self.start + self.sent / self.rate


@dataclass
class Sweep:
    """The exhaustion schedule of one side: call ``start(now)`` at GO; send what ``to_send(now)`` gives; feed
    every TCP segment from the peer's address to ``receive``; wake at ``get_timer()``. ``found`` is set once a
    segment names the connection; ``release(now)`` then schedules the RSTs for every other flow."""

    plan: SweepPlan
    started: float | None = None
    found: Found | None = None
    ignored: int = 0
    """Segments from the peer's address that did not name a flow of ours with the exact numbers."""
    _senders: list[tuple[Phase, _Sender]] = field(default_factory=list)

    def start(self, now: float) -> None:
        p = self.plan
        self.started = now
        self._senders = [("open", _Sender(p.local_ports, now, p.rate))]
        at = now + p.knock_start
        for r in range(MAX_ROUNDS):
            if p.knocker(r) == p.slot:
                self._senders.append(("knock", _Sender(p.local_ports, at, p.rate)))
            at += p.round_length(r)

    @property
    def schedule_end(self) -> float:
        """Seconds after GO at which the last knock round (and the wait for its answer) ends: a sweep that
        has found nothing by then will not."""
        p = self.plan
        return p.knock_start + sum(p.round_length(r) for r in range(MAX_ROUNDS))

    def to_send(self, now: float) -> list[Batch]:
        """What is due by ``now``, as batches of one segment from many local ports: opens (priming TTL),
        knocks (normal TTL), releases (RST, priming TTL). Tens of thousands of segments that differ only in
        the source port are built once and patched (``rawio.RawSender.send_batch``)."""
        return [Batch(self._segment(phase), ports) for phase, s in self._senders if (ports := s.due(now))]

    def _segment(self, phase: Phase) -> Segment:
        """The phase's segment, from source port 0 (each batch port replaces it)."""
        p = self.plan
        src, dst = Endpoint(p.local_host, 0), p.target
        if phase == "open":
            return Segment(
                src, dst, seq_add(p.isn, -1), flags=Flags.SYN, options=p.options, ttl=p.priming_ttl
            )
        if phase == "knock":
            return Segment(src, dst, p.isn, flags=Flags.SYN, options=p.options, ttl=p.ttl)
        return Segment(src, dst, p.isn, flags=Flags.RST, ttl=p.priming_ttl, window=0)

    def get_timer(self) -> float | None:
        return min((t for _, s in self._senders if (t := s.next_time()) is not None), default=None)

    def receive(self, seg: Segment) -> Found | None:
        """A segment from the peer's address: the ``Found`` it proves, else None (counted in ``ignored``)."""
        p = self.plan
        ours = (seg.src.host, seg.dst.host) == (p.peer_host, p.local_host) and seg.dst.port in p.port_set
        if self.found is not None or not ours or not self._exact(seg):
            self.ignored += 1
            return None
        self.found = Found(seg.dst, seg.src, seg)
        self._senders = []  # no more opens or knocks: the engine takes the flow from here
        return self.found

    def _exact(self, seg: Segment) -> bool:
        """The peer's SYN (``seq`` its ISN) or its SYN-ACK to one of our flows (also ``ack = ISN + 1``)."""
        kind = seg.flags & (Flags.SYN | Flags.ACK | Flags.RST | Flags.FIN)
        if seg.seq != self.plan.peer_isn:
            return False
        return kind == Flags.SYN or (kind == Flags.SYN | Flags.ACK and seg.ack == seq_add(self.plan.isn, 1))

    def release(self, now: float, keep: int | None = None) -> None:
        """Stop opening and knocking; RST every flow that was opened but ``keep`` (a local port), at
        ``RELEASE_RATE`` from ``now`` (they expire in the core: only our own NAT sees them)."""
        if self.started is None:
            self._senders = []
            return
        ports = tuple(port for port in self.plan.local_ports if port != keep)
        self._senders = [("release", _Sender(ports, now, RELEASE_RATE))]

    @property
    def idle(self) -> bool:
        """Nothing left to send (after ``found``: the releases are out)."""
        return all(s.done for _, s in self._senders)
