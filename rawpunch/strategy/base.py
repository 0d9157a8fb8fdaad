"""The interface every strategy implements, and what an attempt gets to work with.

A strategy is a sans-IO core (its decisions: roles, ports, TTLs, timing, from data both peers share) plus the
shared adapters (raw sockets and NFQUEUE, the firewall guard, kernel sockets, the splice). The runner
(``runner.py``) meets the peer once, then runs one *attempt* per strategy of the cascade: each attempt gets
its own GO from the rendezvous (``AttemptContext.go``), so both peers start it together, and a budget.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rawpunch.probe.result import NatBehaviour
from rawpunch.proto.client import Go
from rawpunch.proto.codec import Endpoint
from rawpunch.proto.keys import SessionKeys
from rawpunch.proto.peerinfo import PeerInfo
from rawpunch.punch.segment import TcpOptions
from rawpunch.rendezvous.client import RendezvousClient
from rawpunch.strategy.plan import BIRTHDAY_SYN_BUDGET

EventSink = Callable[[dict[str, Any]], None]


class AttemptFailed(Exception):
    """One attempt did not connect; ``str()`` says why in one line. The cascade goes on."""


@dataclass(frozen=True)
class PeerView:
    """What both peers know of one peer."""

    slot: int
    info: PeerInfo
    behaviour: NatBehaviour
    public: dict[int, Endpoint]
    """Server-observed public endpoint per discovered local port."""
    last_public_port: int
    """The public port of the last discovery: the base of a sequential NAT's next allocation."""


@dataclass
class AttemptContext:
    attempt: int
    """Number of this attempt in the cascade (0, 1, ...): READY/GO carry it."""
    client: RendezvousClient
    keys: SessionKeys
    me: PeerView
    peer: PeerView
    local: Endpoint
    """Our local endpoint for this attempt (host: the address we reach the server from)."""
    peer_public: Endpoint
    """The peer's public endpoint for its port of this attempt, as the server saw it."""
    options: TcpOptions
    isn: int
    priming_ttl: int
    budget: float
    """Seconds from GO that this attempt may take."""
    emit: EventSink
    pcap: str | None = None
    syn_budget: int = BIRTHDAY_SYN_BUDGET
    """SYNs both sides of a birthday attempt may send together (``--syn-budget``)."""
    stable_slot: int = 0
    """The slot whose NAT is stable (auto.stable_side): it primes in prediction and guessing."""
    detail: dict[str, Any] = field(default_factory=dict)
    """What the attempt tried (ports, ttl, ...), for its ``attempt`` event."""
    timings: dict[str, float] = field(default_factory=dict)
    """Milliseconds of the attempt's phases (punch, splice, authenticate)."""
    started: float = 0.0
    """``time.monotonic()`` when the attempt began (the runner sets it)."""
    went: bool = False
    """Whether this attempt's GO was taken: one that fails before must still take it, to stay in step."""
    usable_at: float | None = None
    """``time.monotonic()`` when the authenticated socket was ready, before the attempt's clean-up (removing
    the firewall guard takes an iptables-save and -restore, and the socket does not wait for it)."""

    @property
    def slot(self) -> int:
        return self.me.slot

    def remaining(self, floor: float = 1.0) -> float:
        """Seconds left of the budget, at least ``floor``: what a last step (authentication) may wait."""
        return max(floor, self.budget - (time.monotonic() - self.started))

    async def go(self) -> Go:
        """Ready for this attempt; returns once the server's GO (and its delay) says both start now."""
        self.went = True
        go = await self.client.ready(self.attempt)
        self.emit({"event": "go", "attempt": self.attempt, "delay_ms": round(go.delay * 1000, 2)})
        return go


class Strategy(Protocol):
    name: str
    suits: str
    """Which NAT pairs it is for, in a line (``rawpunch peer --help``, the README)."""

    async def attempt(self, ctx: AttemptContext) -> socket.socket:
        """An ESTABLISHED, authenticated socket to the peer, or ``AttemptFailed``."""
        ...
