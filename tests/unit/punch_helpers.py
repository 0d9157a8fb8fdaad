"""Shared pieces of the punch tests (engine and NAT model), no root, no sockets, no sleeps.

* ``config_a()``/``config_b()``: the two peers' ``PunchConfig`` for the pump's topology; ``peer_segment``
  builds what the peer sends (after its NAT) for the engine's scripted tests; ``engine_in(state)`` drives
  a ``PunchEngine`` into any ``PunchState`` the shortest way.
* ``Pump``: h11's connection pair for the punch. Host a -- nat-a -- r1..rN -- nat-b -- host b, taken from the
  lab's ``two_nats`` topology (same addresses, same profiles), the NATs being ``natmodel.Nat`` values, with a
  fake clock, per-link one-way delay, seeded per-link loss, a GO skew between the peers, and taps that see
  (and may inject after) every packet arriving at a node::

      a  --  nat-a [lan|wan]  --  r1  --  ...  --  rN  --  [wan|lan] nat-b  --  b
      10.0.1.2                                                          10.0.2.2
"""

from __future__ import annotations

import functools
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from rawpunch.lab.profiles import get_profile
from rawpunch.lab.topology import Topology, two_nats
from rawpunch.proto.codec import Endpoint
from rawpunch.punch import natmodel
from rawpunch.punch.engine import (
    Connected,
    Event,
    Failed,
    PunchConfig,
    PunchEngine,
    PunchState,
)
from rawpunch.punch.natmodel import Answer, Drop, Forward, Icmp, Nat
from rawpunch.punch.segment import Flags, Segment, TcpOptions, seq_add

A_PORT, B_PORT = 40000, 50000
A_ISN, B_ISN = 1_000_000, 3_000_000_000
A_OPTIONS = TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(5000, 0))
B_OPTIONS = TcpOptions(mss=1400, wscale=9, sack_permitted=True, timestamp=(900_000, 0))
LAN_A, LAN_B = "10.0.1.2", "10.0.2.2"


@functools.cache
def topology(hops: int, profile_a: str = "eim-apdf", profile_b: str = "eim-apdf") -> Topology:
    return two_nats(hops, profile_a, profile_b)


def public_ips(hops: int = 2) -> tuple[str, str]:
    topo = topology(hops)
    return str(topo.public_address("nat-a")), str(topo.public_address("nat-b"))


def config_a(hops: int = 2, **overrides: Any) -> PunchConfig:
    """Peer a's config; port preservation means b's public port is its local one."""
    _, pub_b = public_ips(hops)
    base = PunchConfig(
        local=Endpoint(LAN_A, A_PORT),
        peer=Endpoint(pub_b, B_PORT),
        isn=A_ISN,
        peer_isn=B_ISN,
        options=A_OPTIONS,
        peer_options=B_OPTIONS,
        slot=0,
    )
    return replace(base, **overrides)


def config_b(hops: int = 2, **overrides: Any) -> PunchConfig:
    pub_a, _ = public_ips(hops)
    base = PunchConfig(
        local=Endpoint(LAN_B, B_PORT),
        peer=Endpoint(pub_a, A_PORT),
        isn=B_ISN,
        peer_isn=A_ISN,
        options=B_OPTIONS,
        peer_options=A_OPTIONS,
        slot=1,
    )
    return replace(base, **overrides)


# --- the engine alone, driven by scripted segments -------------------------------------------------------


def peer_segment(cfg: PunchConfig, kind: str, **changes: Any) -> Segment:
    """What the peer of ``cfg`` sends, as it arrives at us: "syn", "syn-ack", "ack", "rst" (the peer's host,
    seq = RCV.NXT), "nat-rst" (the peer's NAT answering our SYN), "fin"; ``changes`` alter any field."""
    peer_ts = (777, 0)
    shapes: dict[str, dict[str, Any]] = {
        "syn": {
            "seq": cfg.peer_isn,
            "flags": Flags.SYN,
            "options": replace(cfg.peer_options, timestamp=peer_ts),
        },
        "syn-ack": {
            "seq": cfg.peer_isn,
            "ack": seq_add(cfg.isn, 1),
            "flags": Flags.SYN | Flags.ACK,
            "options": replace(cfg.peer_options, timestamp=peer_ts),
        },
        "ack": {
            "seq": seq_add(cfg.peer_isn, 1),
            "ack": seq_add(cfg.isn, 1),
            "flags": Flags.ACK,
            "window": 512,
        },
        "rst": {"seq": seq_add(cfg.peer_isn, 1), "flags": Flags.RST, "window": 0},
        "nat-rst": {"seq": 0, "ack": seq_add(cfg.isn, 1), "flags": Flags.RST | Flags.ACK, "window": 0},
        "fin": {"seq": seq_add(cfg.peer_isn, 1), "ack": seq_add(cfg.isn, 1), "flags": Flags.FIN | Flags.ACK},
    }
    fields = {"src": cfg.peer, "dst": cfg.local, "ttl": 60, **shapes[kind], **changes}
    return Segment(**fields)


@dataclass
class Driven:
    """An engine in some state, its clock, and everything it emitted so far."""

    engine: PunchEngine
    now: float
    sent: list[Segment] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def feed(self, seg: Segment, after: float = 0.0) -> list[Segment]:
        """Deliver ``seg`` ``after`` seconds from now; returns what the engine sent in response."""
        self.now += after
        self.engine.receive_segment(seg, self.now)
        return self.collect()

    def tick(self) -> list[Segment]:
        """Advance to the engine's timer and fire it."""
        timer = self.engine.get_timer()
        assert timer is not None, "the engine has no timer"
        self.now = timer
        self.engine.handle_timer(self.now)
        return self.collect()

    def collect(self) -> list[Segment]:
        out = self.engine.segments_to_send(self.now)
        self.sent += out
        while (event := self.engine.next_event()) is not None:
            self.events.append(event)
        return out

    def of_type(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def engine_in(state: PunchState, now: float = 100.0, **overrides: Any) -> Driven:
    """An engine (peer a's config) brought into ``state`` by the shortest script."""
    cfg = config_a(**overrides)
    d = Driven(PunchEngine(cfg), now)
    if state is not PunchState.IDLE:
        d.engine.start(d.now)
        d.collect()
    if state in (PunchState.SYN_SENT, PunchState.SYN_RECEIVED, PunchState.ESTABLISHED):
        d.tick()  # the real SYN
    if state in (PunchState.SYN_RECEIVED, PunchState.ESTABLISHED):
        d.feed(peer_segment(cfg, "syn"), after=0.01)
    if state is PunchState.ESTABLISHED:
        d.feed(peer_segment(cfg, "syn-ack"), after=0.01)
    if state is PunchState.FAILED:
        d.now = d.now + cfg.deadline
        d.engine.handle_timer(d.now)
        d.collect()
    assert d.engine.state is state, f"wanted {state}, got {d.engine.state}"
    return d


# --- the pair and the pump -------------------------------------------------------------------------------

Item = Segment | Icmp
Tap = Callable[["Pump", str, Item], None]


@dataclass
class Hop:
    """A packet in flight: arrives at ``chain[index]`` at ``at``, travelling ``direction`` (+1 towards b)."""

    at: float
    order: int
    index: int
    direction: int
    item: Item

    def __lt__(self, other: Hop) -> bool:
        return (self.at, self.order) < (other.at, other.order)


class Pump:
    """Two engines and the path between them, pumped by a fake clock until both are done."""

    def __init__(
        self,
        *,
        hops: int = 2,
        profile_a: str = "eim-apdf",
        profile_b: str = "eim-apdf",
        owd: float | list[float] = 0.005,
        loss: float | list[float] = 0.0,
        seed: int = 0,
        skew: float = 0.0,
        a: dict[str, Any] | None = None,
        b: dict[str, Any] | None = None,
    ) -> None:
        """``owd``: one-way delay of each link (or one per link, a-side first); ``loss``: the chance that a
        packet is lost on a link, likewise; ``skew`` > 0: b starts that much after a (< 0: before)."""
        topo = topology(hops, profile_a, profile_b)
        self.chain = ["a", "nat-a", *(f"r{i}" for i in range(1, hops + 1)), "nat-b", "b"]
        links = len(self.chain) - 1
        self.owd = owd if isinstance(owd, list) else [owd] * links
        self.loss = loss if isinstance(loss, list) else [loss] * links
        assert len(self.owd) == len(self.loss) == links
        self.rng = random.Random(seed)
        self.nats = {
            name: Nat(str(topo.public_address(name)), str(topo.address(name)), get_profile(profile))
            for name, profile in (("nat-a", profile_a), ("nat-b", profile_b))
        }
        self.router_ip = {r: str(topo.interfaces(r)[0].address.ip) for r in self.chain if r.startswith("r")}
        self.engines = {
            "a": PunchEngine(config_a(hops, **(a or {}))),
            "b": PunchEngine(config_b(hops, **(b or {}))),
        }
        self.start_at = {"a": max(0.0, -skew), "b": max(0.0, skew)}
        self.now = 0.0
        self.queue: list[Hop] = []
        self.order = 0
        self.events: dict[str, list[tuple[float, Event]]] = {"a": [], "b": []}
        self.drops: list[tuple[float, str, str]] = []  # (time, node, reason)
        self.answers: list[tuple[float, str, Item]] = []  # what NATs and routers sent themselves
        self.trace: list[str] = []
        self.taps: list[Tap] = []

    # --- running -----------------------------------------------------------------------------------------

    def run(self, until: float = 30.0) -> Pump:
        while (t := self._next_time()) is not None and t <= until:
            self.now = t
            self._step()
        return self

    def _next_time(self) -> float | None:
        times = [t for t in self.start_at.values()]
        times += [t for e in self.engines.values() if (t := e.get_timer()) is not None]
        if self.queue:
            times.append(self.queue[0].at)
        return min(times) if times else None

    def _step(self) -> None:
        for host, at in list(self.start_at.items()):
            if at <= self.now:
                del self.start_at[host]
                self.engines[host].start(self.now)
                self._flush(host)
                return
        if self.queue and self.queue[0].at <= self.now:
            self._arrive(heapq.heappop(self.queue))
            return
        for host, engine in self.engines.items():
            timer = engine.get_timer()
            if timer is not None and timer <= self.now:
                engine.handle_timer(self.now)
                self._flush(host)
                return

    # --- the path ----------------------------------------------------------------------------------------

    def send(self, index: int, direction: int, item: Item, delay: float = 0.0) -> None:
        """Put ``item`` on the link leaving ``chain[index]`` towards ``direction``."""
        link = index if direction > 0 else index - 1
        self.trace.append(f"{self.now:.4f} {self.chain[index]} -> {_show(item)}")
        if self.rng.random() < self.loss[link]:
            self.trace.append(f"{self.now:.4f}   lost on link {link}")
            return
        self.order += 1
        at = self.now + delay + self.owd[link]
        heapq.heappush(self.queue, Hop(at, self.order, index + direction, direction, item))

    def inject(self, node: str, direction: int, item: Item) -> None:
        """An attacker's packet, arriving at ``node`` now as if travelling ``direction``."""
        self.order += 1
        heapq.heappush(self.queue, Hop(self.now, self.order, self.chain.index(node), direction, item))

    def _arrive(self, hop: Hop) -> None:
        node = self.chain[hop.index]
        for tap in self.taps:
            tap(self, node, hop.item)
        if node in self.engines:
            self._deliver(node, hop.item)
        elif node in self.nats:
            self._through_nat(node, hop)
        else:
            verdict = (
                natmodel.route(hop.item, self.router_ip[node]) if isinstance(hop.item, Segment) else None
            )
            self._apply(node, hop, verdict or Forward(hop.item))

    def _through_nat(self, node: str, hop: Hop) -> None:
        nat = self.nats[node]
        from_lan = (hop.direction > 0) == (node == "nat-a")
        item, now = hop.item, self.now
        verdict: natmodel.Verdict
        if from_lan and isinstance(item, Segment):
            nat, verdict = natmodel.outbound(nat, item, now)
        elif from_lan:
            verdict = Drop("ICMP from the LAN is not modelled")
        elif isinstance(item, Segment):
            nat, verdict = natmodel.inbound(nat, item, now)
        else:
            nat, verdict = natmodel.inbound_icmp(nat, item, now)
        self.nats[node] = nat
        self._apply(node, hop, verdict)

    def _apply(self, node: str, hop: Hop, verdict: natmodel.Verdict) -> None:
        if isinstance(verdict, Forward):
            self.send(hop.index, hop.direction, verdict.item)
        elif isinstance(verdict, Answer):
            self.answers.append((self.now, node, verdict.item))
            self.trace.append(f"{self.now:.4f} {node} answers {_show(hop.item)}: {verdict.reason or 'TTL'}")
            self.send(hop.index, -hop.direction, verdict.item)
        else:
            self.drops.append((self.now, node, verdict.reason))
            self.trace.append(f"{self.now:.4f} {node} drops {_show(hop.item)}: {verdict.reason}")

    def _deliver(self, host: str, item: Item) -> None:
        engine = self.engines[host]
        if isinstance(item, Segment):
            engine.receive_segment(item, self.now)
        else:
            engine.receive_icmp(item.kind, item.src, item.quoted, self.now)
        self._flush(host)

    def _flush(self, host: str) -> None:
        engine = self.engines[host]
        index, direction = (0, 1) if host == "a" else (len(self.chain) - 1, -1)
        for seg in engine.segments_to_send(self.now):
            self.send(index, direction, seg)
        while (event := engine.next_event()) is not None:
            self.events[host].append((self.now, event))

    # --- results -----------------------------------------------------------------------------------------

    def connected(self, host: str) -> Connected | None:
        found = [e for _, e in self.events[host] if isinstance(e, Connected)]
        assert len(found) <= 1, f"{host} connected twice"
        return found[0] if found else None

    def failed(self, host: str) -> Failed | None:
        return next((e for _, e in self.events[host] if isinstance(e, Failed)), None)

    def of_type(self, host: str, kind: type[Any]) -> list[Any]:
        return [e for _, e in self.events[host] if isinstance(e, kind)]

    def entry(self, nat: str) -> natmodel.Conntrack | None:
        """The conntrack entry of the punched flow at ``nat`` (as it is now)."""
        cfg = self.engines["a" if nat == "nat-a" else "b"].config
        return self.nats[nat].entry(cfg.local, cfg.peer, self.now)

    def explain(self) -> str:
        return "\n".join(self.trace[-60:])


def _show(item: Item) -> str:
    if isinstance(item, Segment):
        return str(item)
    return f"ICMP {item.kind.value} {item.src} > {item.dst} about [{item.quoted}]"
