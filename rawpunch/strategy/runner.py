"""The cascade of ``session.punch``: meet the peer once, then try strategies until one connects.

::

    register -> discover DISCOVERIES local ports (TCP) -> classify own NAT -> exchange sealed info
      -> for each strategy of the cascade:  READY(attempt i) -> GO -> attempt (budget) -> event
      -> connected: report to the server

Both peers compute the same cascade (``auto.cascade`` over both peers' NAT knowledge, in slot order), and
attempt ``i`` uses, on each side, the ``i``-th discovered local port (modulo their number): every attempt
starts on fresh conntrack entries, and the peer knows our public endpoint for it without another exchange.
Each attempt starts at its own GO (the server's READY/GO repeated with an ``ATTEMPT`` number), so a peer
that gives up early waits for the other at the next GO instead of running ahead. The total ``deadline``
counts from the moment the peer was found; an attempt gets ``BUDGETS[strategy]`` of it, the last one all
that is left.

A requested cascade that ends in the crafted handshake repeats it once on the next port (``with_retry``; the
crafted handshake alone discovers a spare port for it): a blind forgery can poison a NAT's conntrack entry
of the punch so that the flow drops at that NAT, and only a new port gets new entries. The two share what
is left, half each. ``auto``'s cascades are left as they are: their later attempts run on fresh ports too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from rawpunch.probe.result import NatBehaviour
from rawpunch.proto.client import PeerFound
from rawpunch.proto.codec import Endpoint, TcpMapping
from rawpunch.proto.keys import SessionKeys
from rawpunch.proto.peerinfo import Capability, PeerInfo
from rawpunch.punch.segment import TcpOptions
from rawpunch.rendezvous.client import RendezvousClient
from rawpunch.strategy import AUTO, STRATEGY_NAMES, auto, classify, get_strategy
from rawpunch.strategy.base import AttemptContext, AttemptFailed, EventSink, PeerView

log = logging.getLogger("rawpunch.strategy")

BUDGETS = {
    "crafted-handshake": 4.0,
    "simultaneous-open": 2.5,
    "low-ttl-listen": 2.5,
    "port-prediction": 3.0,
    "birthday": 5.0,
    "port-exhaustion": 45.0,
}
#: ``--deadline`` when none is given: enough for the cheap strategies, or for a port exhaustion (its SYNs at
#: the rate, both sides' opens and a few knock rounds, after the attempts before it).
DEFAULT_DEADLINE = 10.0
EXHAUSTION_DEADLINE = 60.0
GO_SLACK = 5.0  # beyond the deadline, for the rendezvous round trips of the GOs
ALL_CAPABILITIES = (
    Capability.CRAFTED_HANDSHAKE
    | Capability.SIMULTANEOUS_OPEN
    | Capability.LOW_TTL_LISTEN
    | Capability.PORT_PREDICTION
    | Capability.BIRTHDAY
    | Capability.PORT_EXHAUSTION
)


def check_strategy(text: str) -> str:
    """``auto``, a strategy name, or a comma-separated cascade of names (``birthday,crafted-handshake``)."""
    names = [n.strip() for n in text.split(",")]
    for name in names:
        if name not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGY_NAMES)}")
    if AUTO in names and len(names) > 1:
        raise ValueError(f"{text!r}: 'auto' is a cascade of its own; list strategies without it")
    if len(set(names)) != len(names):
        raise ValueError(f"{text!r} names a strategy twice")
    return ",".join(names)


def budget(strategy: str, remaining: float, last: bool) -> float:
    return max(0.0, remaining if last else min(BUDGETS[strategy], remaining))


#: Strategies that need nothing but one public endpoint of one port: run alone, they skip the extra
#: discoveries (each a TCP round trip to the server after both peers registered, so on the clock).
SINGLE_PORT = frozenset({"crafted-handshake", "low-ttl-listen", "simultaneous-open"})
#: Ports discovered beyond the first for a single-port strategy alone: for its retry on fresh NAT entries.
SPARE_PORTS = 1
#: Strategies repeated on the next discovered port when they end a requested cascade (``with_retry``).
RETRIED = frozenset({"crafted-handshake"})


def discoveries(strategy: str) -> int:
    """How many local ports to discover: one for a single-port strategy alone, plus ``SPARE_PORTS`` if it is
    retried (``with_retry``), else enough to classify the allocation (auto, port prediction, birthday) and
    to give each attempt of a cascade a fresh port."""
    if strategy in SINGLE_PORT:
        return 1 + (SPARE_PORTS if strategy in RETRIED else 0)
    return classify.DISCOVERIES


async def discover(
    client: RendezvousClient, first_port: int, emit: EventSink, count: int = classify.DISCOVERIES
) -> list[TcpMapping]:
    """Public endpoints of ``first_port`` and fresh ports, one after the other (allocation order); fewer
    than ``classify.DISCOVERIES`` (a single-port strategy and its spare: nothing to classify) all at once,
    so a spare costs no round trip. To classify, the last port is discovered once more at the server's
    mapping-check port, if it has one, and that mapping comes last (``classify.classify_discoveries``; the
    server now holds it for that port, and a sequential NAT's next port follows it)."""
    if count < classify.DISCOVERIES:
        found = await asyncio.gather(
            *(client.discover_tcp(first_port if i == 0 else 0) for i in range(count))
        )
    else:
        found = [await client.discover_tcp(first_port if i == 0 else 0) for i in range(count)]
        check_port = client.registered.mapping_port if client.registered else None
        if check_port:
            found.append(await client.discover_tcp(found[-1].local_port, server_port=check_port))
    for i, mapping in enumerate(found):
        emit(
            {
                "event": "tcp_endpoint",
                "local": str(Endpoint(client.local_address.host, mapping.local_port)),
                "public": str(mapping.public),
                **({"mapping_check": True} if i and mapping.local_port == found[i - 1].local_port else {}),
            }
        )
    return found


def own_info(
    mappings: list[TcpMapping], options: TcpOptions, isn: int, known: NatBehaviour, strategy: str = AUTO
) -> PeerInfo:
    return PeerInfo(
        capabilities=ALL_CAPABILITIES,
        isn=isn,
        mss=options.mss,
        wscale=options.wscale,
        sack=options.sack_permitted,
        timestamps=options.timestamp is not None,
        tcp_port=mappings[0].local_port,
        punch_ports=tuple(dict.fromkeys(m.local_port for m in mappings)),  # the mapping check repeats one
        strategy=strategy,
        **classify.info_fields(known),
    )


def views(
    slot: int, info: PeerInfo, mappings: list[TcpMapping], found: PeerFound
) -> tuple[PeerView, PeerView]:
    me = PeerView(
        slot,
        info,
        classify.from_info(info),
        {m.local_port: m.public for m in mappings},
        mappings[-1].public.port,
    )
    public = {m.local_port: m.public for m in found.tcp}
    ports = found.info.punch_ports or ((found.info.tcp_port,) if found.info.tcp_port is not None else ())
    known = [p for p in ports if p in public]
    if not known:
        raise AttemptFailed(
            "the server has no public TCP endpoint for the peer's ports: the peer's TCP endpoint discovery "
            "failed (is TCP to the server blocked on its side?)"
        )
    peer = PeerView(found.slot, found.info, classify.from_info(found.info), public, public[known[-1]].port)
    return me, peer


def default_deadline(names: tuple[str, ...]) -> float:
    """The deadline for a cascade when ``--deadline`` is not given (both peers compute the same)."""
    return EXHAUSTION_DEADLINE if "port-exhaustion" in names else DEFAULT_DEADLINE


def attempt_budget(names: tuple[str, ...], i: int, remaining: float) -> float:
    """Seconds for attempt ``i``: ``budget``, except that the last strategy and its retry (``with_retry``)
    share what is left, half each."""
    if names[i] in RETRIED and names[i + 1 :] == (names[i],):
        return remaining / 2
    return budget(names[i], remaining, last=i == len(names) - 1)


def attempt_port(view: PeerView, attempt: int) -> int:
    usable = _usable_ports(view)
    return usable[attempt % len(usable)]


def _usable_ports(view: PeerView) -> list[int]:
    ports = view.info.punch_ports or ((view.info.tcp_port,) if view.info.tcp_port is not None else ())
    return [p for p in ports if p in view.public]


def plan_cascade(strategy: str, me: PeerView, peer: PeerView) -> tuple[str, ...]:
    if peer.info.strategy and peer.info.strategy != strategy:
        raise AttemptFailed(
            f"the peer runs --strategy {peer.info.strategy}, this side {strategy}: both must use the same"
        )
    if strategy != AUTO:
        return with_retry(tuple(check_strategy(strategy).split(",")), me, peer)
    slot0, slot1 = (me, peer) if me.slot == 0 else (peer, me)
    return auto.cascade(slot0.behaviour, slot1.behaviour)  # its later attempts run on fresh ports anyway


def with_retry(names: tuple[str, ...], me: PeerView, peer: PeerView) -> tuple[str, ...]:
    """``names``, and once more its last strategy if that is in ``RETRIED`` and both peers have a port left
    for it: a blind forgery can poison a NAT's conntrack entry of the punch (the flow then drops at that
    NAT, session.punch_and_splice), and only a fresh port gets fresh entries. Both peers compute the same
    from the same two infos; the repeat runs only if the first failed, on the next discovered port."""
    ports = min(len(_usable_ports(me)), len(_usable_ports(peer)))
    if names and names[-1] in RETRIED and len(names) < ports:
        return (*names, names[-1])
    return names


async def run_cascade(
    client: RendezvousClient,
    keys: SessionKeys,
    me: PeerView,
    peer: PeerView,
    names: tuple[str, ...],
    common: dict[str, object],
    deadline: float,
    emit: EventSink,
) -> tuple[socket.socket, AttemptContext]:
    """Run the attempts in order; the first connected, authenticated socket and its attempt's context."""
    slot0, slot1 = (me, peer) if me.slot == 0 else (peer, me)
    stable = auto.stable_side(slot0.behaviour, slot1.behaviour)
    started = time.monotonic()
    failures = []
    for i, name in enumerate(names):
        remaining = deadline - (time.monotonic() - started)
        if remaining <= 0:
            break
        local_port = attempt_port(me, i)
        ctx = AttemptContext(
            attempt=i,
            client=client,
            keys=keys,
            me=me,
            peer=peer,
            local=Endpoint(client.local_address.host, local_port),
            peer_public=peer.public[attempt_port(peer, i)],
            budget=attempt_budget(names, i, remaining),
            emit=emit,
            stable_slot=auto.stable_slot_for(names, i, stable),
            **common,  # type: ignore[arg-type]
        )
        strategy = get_strategy(name)
        t0 = ctx.started = time.monotonic()
        outcome = "connected"
        try:
            sock = await strategy.attempt(ctx)
        except AttemptFailed as exc:
            outcome = f"failed: {exc}"
            failures.append(f"{name}: {exc}")
            if not ctx.went:  # the peer waits at this attempt's GO: take it, or both wait forever
                await ctx.go()
        ms = round((time.monotonic() - t0) * 1000, 2)
        detail = {
            "ports": [],
            "ttl": None,
            **ctx.detail,
        }  # an attempt that gave up before sending has neither
        emit({"event": "attempt", "attempt": i, "strategy": name, **detail, "outcome": outcome, "ms": ms})
        if outcome == "connected":
            return sock, ctx
    raise AttemptFailed(
        f"no strategy connected within {deadline:g} s ({'; '.join(failures) or 'no attempt made'}); "
        "try --deadline with more seconds, or another --strategy"
    )
