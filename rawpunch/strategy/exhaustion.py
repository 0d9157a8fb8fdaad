"""``port-exhaustion`` as a strategy: the sweep of ``sweep.py`` over a raw socket and NFQUEUE, then the
crafted handshake's engine, splice and authentication on the 4-tuple the sweep found.

::

    FirewallGuard (all_ports)  TCP from the peer's host -> NFQUEUE; our kernel's RSTs to it and time-exceeded
                               about TCP to it dropped (one iptables-restore, while READY/GO runs)
    SegmentQueue               claims SYNs to our flows (read from the bytes; the rest goes to the kernel)
    RawSender.send_many        the sweep's opens, knocks and releases, patched from one template per shape
    Found                      -> PunchEngine on that 4-tuple, the found segment its first input; the same
                               queue then claims that 4-tuple's segments (like the crafted handshake's early
                               guard); splice; authentication; the other flows' NAT entries are released

Which side does what is decided by ``side_of`` from what both peers know (``auto.nat_class``): a stable
side punches from its attempt port, whose public port the server saw; a sequential side from ``REACH`` fresh
ports; any other side exhausts. Both compute the same two ``Side``\\s from the exchanged infos and the
server-observed endpoints, so the schedule agrees without a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time

from rawpunch.punch.engine import PunchConfig, PunchEngine, options_from_peer_info
from rawpunch.punch.firewall import FirewallGuard, PunchFlow
from rawpunch.punch.rawio import RawSender, SegmentQueue, packed_address
from rawpunch.punch.segment import Segment
from rawpunch.strategy import auto, sweep
from rawpunch.strategy.base import AttemptContext, AttemptFailed, PeerView
from rawpunch.strategy.plan import PORT_RANGE
from rawpunch.strategy.sweep import Found, Side, Sweep, SweepPlan

log = logging.getLogger("rawpunch.strategy")

#: Kernel queue bound: SYNs of the peer's knocks that get through (one, unless our NAT does not filter).
QUEUE_LEN = 4096
PACING_TICK = 0.005  # seconds between batches of SYNs
RELEASE_WAIT = 3.0  # seconds the attempt waits at most for the releases after authenticating
ALL_DUE = 3600.0  # "now" plus this: every segment of a schedule is due


def side_of(view: PeerView, public_port: int, attempt: int = 0) -> Side:
    """What ``view``'s side does in the sweep (``public_port``: its attempt port's, as the server saw it). A
    sequential side's window covers what the cascade's earlier attempts may have allocated (``REACH``), or
    as the first attempt only a margin for other flows (``FIRST_REACH``)."""
    kind = auto.nat_class(view.behaviour)
    if kind == "stable":
        return sweep.stable_side(public_port)
    if kind == "sequential":
        reach = sweep.FIRST_REACH if attempt == 0 else sweep.REACH
        return sweep.sequential_side(view.last_public_port, view.behaviour.allocation_delta or 1, reach)
    return sweep.exhausting_side(view.last_public_port)


def local_ports(side: Side, attempt_port: int) -> tuple[int, ...]:
    """The local ports of our flows: the attempt port alone (stable), ``flows`` others (sequential), or the
    NAT range's ports in order (exhausting; the NAT maps them to random ports whatever their order)."""
    if side.kind == "stable":
        return (attempt_port,)
    low, high = PORT_RANGE
    if side.kind == "sequential":
        return tuple(random.sample([p for p in range(low, high + 1) if p != attempt_port], side.flows))
    return tuple(range(low, high + 1))[: side.flows]


def plan_for(ctx: AttemptContext) -> SweepPlan:
    if ctx.peer.info.isn is None:
        raise AttemptFailed("the peer sent no ISN: is it running an older rawpunch?")
    mine = side_of(ctx.me, ctx.me.public[ctx.local.port].port, ctx.attempt)
    theirs = side_of(ctx.peer, ctx.peer_public.port, ctx.attempt)
    return SweepPlan(
        sides=(mine, theirs) if ctx.slot == 0 else (theirs, mine),
        slot=ctx.slot,
        local_ports=local_ports(mine, ctx.local.port),
        local_host=ctx.local.host,
        peer_host=ctx.peer_public.host,
        isn=ctx.isn,
        peer_isn=ctx.peer.info.isn,
        priming_ttl=ctx.priming_ttl,
        rtt=ctx.client.core.rtt,
        options=ctx.options,
    )


def claims(data: bytes, peer: bytes, peer_isn: bytes, ports: frozenset[int]) -> bool:
    """Whether the queue hands an IPv4 packet to the sweep: a SYN (or SYN-ACK) from the peer's host (``peer``,
    4 bytes) with the peer's ISN to one of our flows' ``ports``, read from the bytes (the rule queues all TCP
    from that host). Everything else -- our NAT's refusals of the peer's other knocks, a connection of
    another program on this host to the peer's address -- goes on to the kernel unparsed."""
    try:
        ihl = (data[0] & 0x0F) * 4
        ours = data[9] == socket.IPPROTO_TCP and data[12:16] == peer
        exact = data[ihl + 4 : ihl + 8] == peer_isn and bool(data[ihl + 13] & 0x02)
        return ours and exact and int.from_bytes(data[ihl + 2 : ihl + 4]) in ports
    except IndexError:
        return False


class PortExhaustion:
    name = "port-exhaustion"
    suits = (
        "per-destination NATs with random ports, both or one against a sequential NAT: fills the random "
        "NAT's ports towards one endpoint (up to 64,512 SYNs per side at 10,000/s)"
    )

    async def attempt(self, ctx: AttemptContext) -> socket.socket:
        plan = plan_for(ctx)
        ctx.detail.update(ports=[plan.target.port], syns=plan.me.flows, ttl=ctx.priming_ttl)
        ctx.emit(
            {
                "event": "port_exhaustion",
                "attempt": ctx.attempt,
                "sides": [{"kind": s.kind, "flows": s.flows, "aim": s.aim} for s in plan.sides],
                "target": str(plan.target),
                "probability": round(plan.probability, 4),
                "rate": plan.rate,
                "knock_start_s": round(plan.knock_start, 3),
                "first_knocker": plan.first_knocker,
            }
        )
        return await _SweepRun(ctx, Sweep(plan)).run()


class _SweepRun:
    """The adapter around one ``Sweep``: guard, queue, paced sends, then the engine on the found 4-tuple."""

    def __init__(self, ctx: AttemptContext, sw: Sweep) -> None:
        self.ctx, self.sw, self.plan = ctx, sw, sw.plan
        self.loop = asyncio.get_running_loop()
        self.found = asyncio.Event()
        self.peer_bytes = packed_address(sw.plan.peer_host)
        self.peer_isn = sw.plan.peer_isn.to_bytes(4, "big")
        self.sender = RawSender()  # first: it fails without root, before a queue is bound
        try:
            self.queue = SegmentQueue(self._on_segment, max_len=QUEUE_LEN)
        except BaseException:
            self.sender.close()
            raise
        self.queue.claim = self._claims

    def _claims(self, data: bytes) -> bool:
        return claims(data, self.peer_bytes, self.peer_isn, self.plan.port_set)

    def _on_segment(self, seg: Segment) -> None:
        if self.sw.receive(seg) is not None:
            self.found.set()

    async def run(self) -> socket.socket:
        from rawpunch.punch.session import _ready_with_guard  # noqa: PLC0415 - session imports the runner

        plan = self.plan
        flow = PunchFlow(
            self.ctx.local.port,
            plan.target,
            self.queue.queue_num,
            plan.local_host,
            crafted_rst_ttl=plan.priming_ttl,
            all_ports=True,
        )
        guard = FirewallGuard(flow)
        started = time.monotonic()
        try:
            self.queue.attach(self.loop)
            await _ready_with_guard(self.ctx, guard)
            self.sw.start(self.loop.time())
            found = await self._sweep()
            self.ctx.timings["punch"] = round((time.monotonic() - started) * 1000, 2)
            return await self._connect(found)
        finally:
            self._release_now()
            guard.remove()
            self.queue.close()
            self.sender.close()

    async def _sweep(self) -> Found:
        """Send the sweep's segments as they come due, until a segment of the peer names the 4-tuple."""
        budget_left = max(0.0, self.ctx.budget - (time.monotonic() - self.ctx.started))
        assert self.sw.started is not None, "start the sweep first"
        deadline = min(self.loop.time() + budget_left, self.sw.started + self.sw.schedule_end)
        while self.sw.found is None:
            now = self.loop.time()
            if now >= deadline:
                raise AttemptFailed(self._why())
            self._send(now)
            timer = self.sw.get_timer()
            wake = deadline if timer is None else min(deadline, max(timer, now + PACING_TICK))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.found.wait(), wake - now)
        return self.sw.found

    def _why(self) -> str:
        plan = self.plan
        kinds = " x ".join(f"{s.kind} ({s.flows} flows)" for s in plan.sides)
        return (
            f"port exhaustion: no SYN of the peer reached our {plan.me.flows} flow(s) by the end of the "
            f"schedule or the budget "
            f"({kinds}; expected chance {plan.probability:.0%}; {self.sw.ignored} segments from the peer's "
            "host did not fit): a NAT that limits ports per host, or a mapping that is not what both sides "
            "were classified as"
        )

    async def _connect(self, found: Found) -> socket.socket:
        """The crafted handshake's engine on the found 4-tuple, then splice and authentication; then the
        other flows' NAT entries are released."""
        from rawpunch.punch import session  # noqa: PLC0415 - session imports the runner

        ctx = self.ctx
        rtt = ctx.client.core.rtt
        config = PunchConfig(
            local=found.local,
            peer=found.peer,
            isn=ctx.isn,
            peer_isn=self.plan.peer_isn,
            options=ctx.options,
            peer_options=options_from_peer_info(ctx.peer.info),
            priming_ttl=ctx.priming_ttl,
            slot=ctx.slot,
            deadline=ctx.remaining(),
            syn_delay=0.0,  # both NATs hold the flow's entries already: the real SYN at once
            rtt=rtt,
        )
        ctx.emit({"event": "found", "local": str(found.local), "peer": str(found.peer)})
        driver = session._EngineDriver(PunchEngine(config), ctx.emit, self.queue)
        try:
            connected = await driver.run(first=found.segment)
            sock = session._splice(connected)
            self.queue.pass_to_kernel()
            await session._authenticate(sock, ctx.keys, ctx.slot, session.auth_timeout(rtt, ctx.remaining()))
        except session.WrongSecret:
            raise
        except session.PunchError as exc:
            raise AttemptFailed(str(exc)) from None
        finally:
            driver.close()
        ctx.usable_at = time.monotonic()
        # Only now: tens of thousands of RSTs (and our NAT's work on them) would slow down the handshake
        # and the authentication, whose segments still pass through our queue.
        self.sw.release(self.loop.time(), keep=found.local.port)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._release(), RELEASE_WAIT)
        ctx.timings["release"] = round((time.monotonic() - ctx.usable_at) * 1000, 2)
        return sock

    def _send(self, now: float) -> None:
        for batch in self.sw.to_send(now):
            self.sender.send_batch(batch.segment, batch.ports)

    async def _release(self) -> None:
        """The RSTs for every other flow, paced (``sweep.RELEASE_RATE``), yielding to the loop in between."""
        while not self.sw.idle:
            self._send(self.loop.time())
            await asyncio.sleep(PACING_TICK)

    def _release_now(self) -> None:
        """On every way out: whatever is left of the releases (all flows if nothing was found), at once."""
        try:
            if self.sw.found is None:
                self.sw.release(self.loop.time())
            self._send(self.loop.time() + ALL_DUE)
        except OSError as exc:
            log.info("port exhaustion: releasing the flows' NAT entries failed: %s", exc)
