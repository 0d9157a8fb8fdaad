"""One punch from start to finish: rendezvous, strategy attempts, and the crafted handshake's adapter.

``punch()`` meets the peer (register, TCP endpoint discovery of a few local ports, sealed info) and then runs
the strategy cascade (``rawpunch.strategy.runner``; one attempt per strategy, each from its own GO). The
``crafted-handshake`` attempt (``punch_and_splice``) is the asyncio adapter that wires the sans-IO engine to
the kernel::

    rendezvous (UDP)        READY(attempt) -> GO; the peer's public endpoint of its port for this attempt
    SegmentQueue (NFQUEUE)  inbound segments of (P, peer) -> PunchEngine; the kernel never sees them
    FirewallGuard           capture rule, OUTPUT RST drop, ICMP rules, in its own chain
    RawSender               the engine's crafted segments, each with its own TTL
    splice (TCP_REPAIR)     Connected -> an ESTABLISHED kernel socket on (P, peer)
    authenticate            HMAC challenge both ways on that socket before anyone uses it

Ordering matters (FACTS.md, "TCP_REPAIR"): the queue is bound before the rules go in (a segment in between
would reach the kernel and be answered with RST). Once our socket is spliced, the queue passes the flow's
segments on to it (a verdict change, no iptables call on this path). We send our challenge at once; a
peer that has not spliced yet holds it in its queue without a verdict (NFQUEUE lets a verdict wait) and
lets it through to its socket once that exists, instead of dropping it and leaving it to our kernel's
retransmission 200 ms or more later. The RST drop stays until the authentication has crossed both ways,
which proves both sockets exist, and then every rule goes.

``syn_delay`` (priming SYN to real SYN) covers the skew between the two GOs, which the server's
RTT-compensated delays keep to the error of the RTT estimates: a quarter of the RTT to the server,
clamped to 1..50 ms. Too short costs one RTO (the engine reopens after the peer NAT's RST), not the punch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import logging
import os
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rawpunch.proto.client import Go
from rawpunch.proto.codec import Endpoint, ResultCode, ResultInfo
from rawpunch.proto.keys import SessionKeys
from rawpunch.punch import firewall
from rawpunch.punch.engine import (
    Connected,
    Failed,
    IcmpKind,
    PunchConfig,
    PunchEngine,
    PunchState,
    event_record,
)
from rawpunch.punch.firewall import FirewallGuard, PunchFlow
from rawpunch.punch.pathprobe import choose_priming_ttl
from rawpunch.punch.rawio import IcmpError, RawSender, SegmentQueue, from_peer
from rawpunch.punch.segment import Segment, TcpOptions, seq_add
from rawpunch.punch.splice import kernel_wscale, splice
from rawpunch.rendezvous.client import RendezvousClient
from rawpunch.strategy.plan import BIRTHDAY_SYN_BUDGET

if TYPE_CHECKING:
    from rawpunch.strategy.base import AttemptContext

log = logging.getLogger("rawpunch.punch")

CHALLENGE_LEN = 32
_GAVE_UP = (
    "no strategy connected within {:g} s: the last attempt or its GO never ended (the peer gave up, or the "
    "rendezvous became unreachable)"
)
EventSink = Callable[[dict[str, Any]], None]


class PunchError(Exception):
    """The punch failed; ``str()`` is one line saying why and what to do."""


@dataclass
class PunchSettings:
    server: Endpoint
    secret: str | bytes | SessionKeys
    local_port: int = 0
    """Local TCP port to punch from (0: any free port)."""
    priming_ttl: int | None = None
    """TTL of the priming SYN; None: chosen from the path (``--ttl`` overrides)."""
    deadline: float | None = None
    """Seconds for the punch once the peer was found: all attempts of the strategy cascade together; None:
    ``runner.default_deadline`` of the cascade (10 s, or 60 s with a port exhaustion in it)."""
    strategy: str = "auto"
    """A name of ``rawpunch.strategy.STRATEGY_NAMES``; ``auto`` chooses a cascade from both NATs."""
    syn_budget: int = BIRTHDAY_SYN_BUDGET
    """SYNs of a birthday attempt, both sides together: success ~ 1 - exp(-(budget/2)^2 / 64512)."""
    peer_timeout: float = 60.0
    authenticate: bool = True
    pcap: str | None = None
    on_event: EventSink | None = None


@dataclass
class PunchResult:
    sock: socket.socket
    local: Endpoint
    peer: Endpoint
    strategy: str
    timings: dict[str, float] = field(default_factory=dict)
    """Milliseconds per phase: register, discover, exchange, punch, splice, authenticate, total."""


class _Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: dict[str, float] = {}
        self._last = self.start
        self.usable_at = self.start  # when the authenticated socket was ready

    def phase(self, name: str) -> float:
        now = time.monotonic()
        self.marks[name] = round((now - self._last) * 1000, 2)
        self._last = now
        return self.marks[name]


async def punch(settings: PunchSettings) -> PunchResult:
    """Meet the peer at the rendezvous and return a connected, authenticated TCP socket to it.

    The strategy (``settings.strategy``; ``auto``: a cascade chosen from both NATs) runs in attempts, each
    from its own GO (``rawpunch.strategy.runner``).
    """
    from rawpunch.strategy import preload, runner  # noqa: PLC0415 - the strategies import this module

    strategy = runner.check_strategy(settings.strategy)  # before anything goes out: a typo fails at once
    preload()
    emit = settings.on_event or (lambda record: None)
    clock = _Clock()
    # The traceroute needs only the server's address: it runs while the key is derived (scrypt), while we
    # register, and while we wait for the peer, instead of after the peer was found.
    path = asyncio.create_task(_priming_ttl(settings))
    # Root, iptables, the backend and the startup sweep of dead runs' rules: all before the clock runs, so
    # that a guard later costs one iptables-restore.
    host = asyncio.create_task(asyncio.to_thread(firewall.prepare_host))
    # The first attempt's port is fixed now, so its crafted handshake's guard can go in while we register.
    first_port = settings.local_port or _free_port()
    early = (
        asyncio.create_task(_install_early_guard(first_port, path, host))
        if _may_start_crafted(strategy)
        else None
    )
    token = _EARLY.set(early)
    try:
        secret = settings.secret
        keys = (
            secret if isinstance(secret, SessionKeys) else await asyncio.to_thread(SessionKeys.derive, secret)
        )
        return await _meet_and_punch(settings, first_port, strategy, keys, emit, clock, path, host)
    finally:
        _EARLY.reset(token)
        path.cancel()
        host.cancel()
        if early is not None:
            await _release_early(early)


async def _meet_and_punch(
    settings: PunchSettings,
    first_port: int,
    strategy: str,
    keys: SessionKeys,
    emit: EventSink,
    clock: _Clock,
    path: asyncio.Task[int],
    host: asyncio.Task[str],
) -> PunchResult:
    from rawpunch.strategy import classify, runner  # noqa: PLC0415 - the strategies import this module
    from rawpunch.strategy.base import AttemptFailed  # noqa: PLC0415

    async with RendezvousClient(settings.server, keys, peer_timeout=settings.peer_timeout) as client:
        reg = await client.register()
        emit({"event": "registered", "slot": reg.slot, "udp": str(reg.udp), "ms": clock.phase("register")})
        mappings = await runner.discover(client, first_port, emit, runner.discoveries(strategy))
        cached = classify.cached_behaviour()
        known = classify.merge(cached, classify.classify_discoveries(mappings))
        emit(
            {
                "event": "own_nat",
                "from_probe": cached is not None,
                **known.to_json(),
                "ms": clock.phase("discover"),
            }
        )
        own = _own_options()
        isn = int.from_bytes(os.urandom(4), "big")
        info = runner.own_info(mappings, own, isn, known, strategy)
        await host  # a host that cannot punch says so before the peer is kept waiting
        found = await client.exchange(info)
        ttl = await path
        paired_at = time.monotonic()
        both_registered = _both_registered(paired_at, found.paired_age, client.core.rtt)
        try:
            me, peer = runner.views(reg.slot, info, mappings, found)
        except AttemptFailed as exc:
            raise PunchError(str(exc)) from None
        emit(
            {
                "event": "peer",
                "slot": found.slot,
                "udp": str(found.udp),
                "tcp": str(peer.public[runner.attempt_port(peer, 0)]),
                "nat": classify.info_fields(peer.behaviour),
                "paired_age_ms": None if found.paired_age is None else round(found.paired_age * 1000, 2),
                "ms": clock.phase("exchange"),
            }
        )
        emit(
            {
                "event": "priming_ttl",
                "ttl": ttl,
                "chosen_by": "--ttl" if settings.priming_ttl else "path probe",
            }
        )
        try:
            names = runner.plan_cascade(strategy, me, peer)
        except AttemptFailed as exc:
            await _report(client, ResultCode.FAILED, paired_at, str(exc))
            raise PunchError(str(exc)) from None
        emit({"event": "cascade", "requested": strategy, "strategies": list(names)})
        if names[0] != "crafted-handshake":
            _early_not_needed()
        common = {
            "options": own,
            "isn": isn,
            "priming_ttl": ttl,
            "pcap": settings.pcap,
            "syn_budget": settings.syn_budget,
        }
        deadline = settings.deadline or runner.default_deadline(names)
        try:
            # The GOs are rendezvous round trips: a peer that gave up must not keep us waiting for its READY.
            async with asyncio.timeout(deadline + runner.GO_SLACK):
                sock, ctx = await runner.run_cascade(client, keys, me, peer, names, common, deadline, emit)
        except (AttemptFailed, TimeoutError) as exc:
            why = str(exc) if isinstance(exc, AttemptFailed) else _GAVE_UP.format(deadline)
            await _report(client, ResultCode.FAILED, paired_at, why)
            raise PunchError(why) from None
        clock.usable_at = ctx.usable_at or time.monotonic()
        clock.phase("attempts")
        del clock.marks["attempts"]
        clock.marks.update(ctx.timings)
        clock.marks["earlier_attempts"] = round((ctx.started - paired_at) * 1000, 2)
        elapsed = (clock.usable_at - both_registered) * 1000
        clock.marks["total"] = round((time.monotonic() - clock.start) * 1000, 2)
        name = names[ctx.attempt]
        peer_seen = Endpoint(*sock.getpeername()[:2])  # a guessed or predicted port: not the discovered one
        local_seen = Endpoint(*sock.getsockname()[:2])  # a port exhaustion's flow: not the attempt's port
        emit(
            {
                "event": "connected",
                "elapsed_ms": round(elapsed, 2),
                "strategy": name,
                "attempt": ctx.attempt,
                "local": str(local_seen),
                "peer": str(peer_seen),
                "priming_ttl": ttl,
                "phases_ms": clock.marks,
            }
        )
        await _report(client, ResultCode.CONNECTED, paired_at, name)
        return PunchResult(sock, local_seen, peer_seen, name, clock.marks)


def _both_registered(paired_at: float, paired_age: float | None, rtt: float | None) -> float:
    """Our monotonic time of the server's both-registered instant: the PEER message says how long before it
    left the server that was (server clock), and it took about half a round trip to reach us. A server
    without that field: the PEER's arrival (later, so ``elapsed_ms`` comes out shorter)."""
    if paired_age is None:
        return paired_at
    return paired_at - paired_age - (rtt or 0.0) / 2


async def punch_and_splice(ctx: AttemptContext, config: PunchConfig) -> socket.socket:
    """The crafted-handshake attempt: guard, GO, engine, splice, peer authentication."""
    early = await _adopt_early_guard(config.local.port)
    driver = _EngineDriver(PunchEngine(config), ctx.emit, None if early is None else early.queue)
    if early is None:
        flow = PunchFlow(
            config.local.port,
            config.peer,
            driver.queue.queue_num,
            config.local.host,
            crafted_rst_ttl=config.priming_ttl,
        )
        guard = FirewallGuard(flow)
    else:
        guard = early.guard
    mark = _Marks(ctx.timings)
    try:
        if early is None:
            driver.queue.attach(asyncio.get_running_loop())
            await _ready_with_guard(ctx, guard)
        else:
            await ctx.go()  # the early guard has been in place since before we met the peer
        connected = await driver.run()
        mark("punch")
        sock = _splice(connected)
        # Our socket exists: let the flow's segments reach it, the peer's challenge first if it came
        # already. Switching the queue's verdict costs nothing, where removing the capture rule would
        # cost an iptables-restore on this path.
        driver.queue.pass_to_kernel()
        mark("splice")
        # A few RTTs, within the attempt's budget: a flow that carries nothing by then runs over a NAT
        # entry poisoned by a forgery, and the cascade retries on a fresh port (runner.with_retry).
        await _authenticate(sock, ctx.keys, ctx.slot, auth_timeout(ctx.client.core.rtt, ctx.remaining()))
        mark("authenticate")
        ctx.usable_at = time.monotonic()
        return sock
    finally:
        guard.remove()  # whatever apply_async got to install; idempotent
        driver.close()


class _Marks:
    """Milliseconds since the previous mark, into ``into``."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into, self.last = into, time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.into[name] = round((now - self.last) * 1000, 2)
        self.last = now


async def _ready_with_guard(ctx: AttemptContext, guard: FirewallGuard) -> Go:
    """READY/GO while the rules go in: iptables-restore (~5 ms) overlaps the wait for GO.

    Nothing can reach the punch port before GO: the peer's SYN cannot pass our NAT until our
    priming SYN, sent after GO, has opened it. The rules must only be in place before that send.
    """
    applying = asyncio.create_task(guard.apply_async())
    try:
        go = await ctx.go()
    except BaseException:
        with contextlib.suppress(Exception):
            await applying  # let it finish, so the caller's guard.remove() removes what it installed
        raise
    await applying
    return go


class _EngineDriver:
    """Runs a PunchEngine against the NFQUEUE reader and the raw socket.

    With *queue* (the early guard's, bound and attached already, behind a port-scoped rule) the driver
    claims from it only the punch 4-tuple's segments and the ICMP errors about them.
    """

    def __init__(self, engine: PunchEngine, emit: EventSink, queue: SegmentQueue | None = None) -> None:
        self.engine = engine
        self.emit = emit
        self.loop = asyncio.get_running_loop()
        self.wakeup = asyncio.Event()
        self.connected: Connected | None = None
        if queue is None:
            self.queue = SegmentQueue(self._on_segment, on_icmp=self._on_icmp)
        else:
            self.queue = queue
            queue.handlers(self._on_segment, self._on_icmp, self._claims)
        self.queue.hold = self._holds
        self.sender = RawSender()

    def _holds(self, seg: Segment) -> bool:
        """The peer's first data (its challenge), sent once its socket existed, before ours does: exactly
        where our socket's receive sequence will start, so nothing else gets into it this way. Judged
        after the engine saw it (its ACK can be the one that completes our handshake)."""
        config = self.engine.config
        return (
            bool(seg.payload)
            and self.engine.state is PunchState.ESTABLISHED
            and seg.seq == seq_add(config.peer_isn, 1)
            and seg.ack == seq_add(config.isn, 1)
        )

    def _claims(self, data: bytes) -> bool:
        return from_peer(data, self.engine.config.peer)

    def _on_segment(self, seg: Segment) -> None:
        self.engine.receive_segment(seg, self.loop.time())
        self.wakeup.set()

    def _on_icmp(self, err: IcmpError) -> None:
        kind = IcmpKind.from_type(err.type)
        if kind is not None:
            self.engine.receive_icmp(kind, err.router, err.quoted, self.loop.time())
            self.wakeup.set()

    def _flush(self) -> None:
        for seg in self.engine.segments_to_send(self.loop.time()):
            self.sender.send(seg)
        while (event := self.engine.next_event()) is not None:
            self.emit(event_record(event))
            if isinstance(event, Connected):
                self.connected = event
            elif isinstance(event, Failed):
                raise PunchError(f"punch failed: {event.reason}")

    async def run(self, first: Segment | None = None) -> Connected:
        """Start the engine (and feed it ``first``, a segment of the flow that came before it existed: the
        port exhaustion's finding); return once it is connected."""
        self.engine.start(self.loop.time())
        if first is not None:
            self.engine.receive_segment(first, self.loop.time())
        while self.connected is None:
            self._flush()
            if self.connected is not None:
                break
            await self._sleep_until_timer()
        self._keepalive = asyncio.create_task(self._drain_timers())
        return self.connected

    async def _sleep_until_timer(self) -> None:
        timer = self.engine.get_timer()
        self.wakeup.clear()
        timeout = None if timer is None else max(0.0, timer - self.loop.time())
        try:
            await asyncio.wait_for(self.wakeup.wait(), timeout)
        except TimeoutError:
            self.engine.handle_timer(self.loop.time())

    async def _drain_timers(self) -> None:
        """After Connected the engine still repeats its final ACK a few times (see engine docstring)."""
        with contextlib.suppress(PunchError, OSError):
            while self.engine.get_timer() is not None:
                self._flush()
                await self._sleep_until_timer()
            self._flush()

    def close(self) -> None:
        task = getattr(self, "_keepalive", None)
        if task is not None:
            task.cancel()
        self.queue.close()
        self.sender.close()


def _splice(c: Connected) -> socket.socket:
    # The splice follows Connected within a millisecond, so the engine's TSval needs no advancing.
    return splice(
        c.local,
        c.remote,
        c.snd_nxt,
        c.rcv_nxt,
        mss=c.mss,
        snd_wscale=c.snd_wscale,
        rcv_wscale=c.rcv_wscale,
        sack=c.sack,
        timestamps=c.timestamps,
        snd_wnd=c.snd_wnd,
        rcv_wnd=c.rcv_wnd,
        snd_wl1=c.snd_wl1,
        max_window=c.max_window,
        rcv_wup=c.rcv_wup,
    )


class WrongSecret(PunchError):
    """The peer's proof arrived and does not verify: the other end does not know the session secret. No
    other attempt can change that, so the cascade stops here (the strategies let it through)."""


#: Authentication on a punched connection that gets nothing through within this long (or ``AUTH_RTTS``
#: round trips, if more) counts as a broken path: a NAT entry poisoned by a forgery drops the flow. The
#: floor leaves room for two kernel retransmissions (RTO >= 200 ms) of a lost challenge.
AUTH_FLOOR, AUTH_RTTS = 1.0, 8
CONFIRM = b"\x01"  # "your proof verified": the last message of the authentication


def auth_timeout(rtt: float | None, remaining: float) -> float:
    """How long the crafted attempt's authentication may take: a few RTTs, within the attempt's budget."""
    return min(remaining, max(AUTH_FLOOR, AUTH_RTTS * (rtt or 0.0)))


async def _authenticate(sock: socket.socket, keys: SessionKeys, slot: int, timeout: float = 10.0) -> None:
    """Both ends prove they know the session secret before the socket is handed over.

    Each sends a fresh challenge, answers the other's with HMAC(auth_key, prover's slot || challenge),
    and checks the answer to its own. A racing attacker who completed a handshake without the secret
    (it cannot, the ISNs are sealed, but defence in depth) fails here and the socket is closed
    (``WrongSecret``, at once).

    Success needs both: the peer's proof verified, and the peer's ``CONFIRM`` that ours did. Without the
    second, one side could hand over a socket while the other, whose NAT drops our segments, gives up and
    moves on to the next attempt. (The last message can still be lost with the path, the two generals'
    problem; TCP retransmits it within the peer's timeout, which leaves room for two retransmissions.)
    Anything short of both within ``timeout`` is a ``PunchError`` naming the step that got no answer: a
    broken path, which another attempt on fresh NAT entries may not have.
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    # Each message follows one not yet acknowledged (the peer, sending right after receiving, delays its
    # ACKs): Nagle's algorithm would hold each back for that delayed ACK, about 40 ms.
    _nodelay(sock, True)
    mine = os.urandom(CHALLENGE_LEN)
    step = "no challenge from the peer"
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_sendall(sock, mine)
            theirs = await _recv_exactly(loop, sock, CHALLENGE_LEN)
            step = "the peer's challenge came, but no proof"
            await loop.sock_sendall(sock, keys.prove(theirs, struct.pack("!B", slot)))
            proof = await _recv_exactly(loop, sock, hashlib.sha256().digest_size)
            if not hmac.compare_digest(proof, keys.prove(mine, struct.pack("!B", 1 - slot))):
                sock.close()
                raise WrongSecret(
                    "the other end of the punched connection does not know the session secret: closed"
                )
            step = "the peer's proof verified, but no word that ours did"
            await loop.sock_sendall(sock, CONFIRM)
            if await _recv_exactly(loop, sock, len(CONFIRM)) != CONFIRM:
                raise OSError("the peer's confirmation is garbled")
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        sock.close()
        why = f"within {timeout:.3g} s" if isinstance(exc, TimeoutError) else f"({str(exc) or repr(exc)})"
        raise PunchError(f"peer authentication on the punched connection failed: {step} {why}") from None
    _nodelay(sock, False)  # handed over with the kernel's defaults
    sock.setblocking(True)


def _nodelay(sock: socket.socket, on: bool) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(on))


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise asyncio.IncompleteReadError(buf, n)
        buf += chunk
    return buf


async def _report(client: RendezvousClient, code: ResultCode, since: float, detail: str) -> None:
    """Tell the server how it went; never fail the punch over it."""
    elapsed = int((time.monotonic() - since) * 1000)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(3):
            await client.report(ResultInfo(code, elapsed, detail[:200]))


async def _priming_ttl(settings: PunchSettings) -> int:
    """``--ttl`` if given, else one past our outermost NAT as a traceroute to the server finds it."""
    if settings.priming_ttl is not None:
        return settings.priming_ttl
    ttl, offenders = await asyncio.to_thread(choose_priming_ttl, settings.server)
    log.info("path to the server: %s -> priming TTL %d", offenders or "no ICMP answers", ttl)
    return ttl


def _own_options() -> TcpOptions:
    tsval = int.from_bytes(os.urandom(4), "big") & ~1  # even: bit 0 would switch the kernel to usec TSvals
    return TcpOptions(mss=1460, wscale=kernel_wscale(), sack_permitted=True, timestamp=(tsval, 0))


# --- the early guard -----------------------------------------------------------------------------------


@dataclass
class _EarlyGuard:
    """The first attempt's crafted-handshake guard, port-scoped (``PunchFlow`` with no peer), installed
    while we register: meeting the peer then costs no iptables-restore before the priming SYN (``bench-punch``
    measured that call at about 5 ms of a 17 ms punch). Its queue gives every packet back to the kernel
    until the attempt claims the punch 4-tuple's (``SegmentQueue.claim``)."""

    port: int
    queue: SegmentQueue
    guard: FirewallGuard
    taken: bool = False
    releasing: asyncio.Task[None] | None = None

    def release_soon(self) -> None:
        """Unbind the queue now (the rule's --queue-bypass then passes everything), the rules in a thread."""
        if self.taken or self.releasing is not None:
            return
        self.queue.close()
        self.releasing = asyncio.ensure_future(asyncio.to_thread(self.guard.remove))


_EARLY: contextvars.ContextVar[asyncio.Task[_EarlyGuard] | None] = contextvars.ContextVar(
    "rawpunch_early_guard", default=None
)


def _may_start_crafted(strategy: str) -> bool:
    """Whether the cascade may begin with the crafted handshake (auto does so between stable NATs)."""
    from rawpunch.strategy import AUTO  # noqa: PLC0415 - the strategies import this module

    return strategy.split(",", maxsplit=1)[0].strip() in (AUTO, "crafted-handshake")


def _free_port() -> int:
    """A port the kernel would give us now: chosen before the discovery binds it, so the guard can be
    scoped to it ahead of time."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("0.0.0.0", 0))
        return int(probe.getsockname()[1])


async def _install_early_guard(port: int, path: asyncio.Task[int], host: asyncio.Task[str]) -> _EarlyGuard:
    await host  # root, iptables, backend, sweep: its errors are reported by the punch itself
    ttl = await path
    queue = SegmentQueue(_unclaimed, on_icmp=None)
    queue.claim = _claim_nothing
    queue.attach(asyncio.get_running_loop())
    guard = FirewallGuard(PunchFlow(port, None, queue.queue_num, crafted_rst_ttl=ttl))
    applying = asyncio.ensure_future(guard.apply_async())
    try:
        await asyncio.shield(applying)
    except BaseException:
        with contextlib.suppress(BaseException):
            await applying  # let it finish, so that remove() removes everything it installed
        queue.close()
        await asyncio.to_thread(guard.remove)
        raise
    return _EarlyGuard(port, queue, guard)


def _unclaimed(seg: Segment) -> None:
    raise AssertionError(f"the early guard's queue claims nothing, yet got {seg}")


def _claim_nothing(data: bytes) -> bool:
    return False


async def _adopt_early_guard(port: int) -> _EarlyGuard | None:
    """The early guard for this attempt's port, taken over by the attempt; None: it builds its own."""
    task = _EARLY.get()
    if task is None:
        return None
    try:
        early = await asyncio.shield(task)  # normally done long before the peer was found
    except Exception as exc:  # the attempt's own guard will fail the same way and say so
        log.info("early firewall guard unavailable: %s", exc)
        return None
    if early.taken or early.releasing is not None or early.port != port:
        return None
    early.taken = True
    return early


def _early_not_needed() -> None:
    task = _EARLY.get()
    if task is not None and task.done() and not task.cancelled() and task.exception() is None:
        task.result().release_soon()


async def _release_early(task: asyncio.Task[_EarlyGuard]) -> None:
    """On every way out of ``punch``: whatever of the early guard no attempt took over goes."""
    if not task.done():
        task.cancel()
    try:
        early = await task
    except BaseException:  # cancelled or failed: _install_early_guard removed what it had installed
        return
    early.release_soon()
    if early.releasing is not None:
        await early.releasing


class _Capture:
    """``--pcap``: tcpdump of the punch port and ICMP while the handshake runs."""

    def __init__(self, path: str | None, port: int) -> None:
        self.path, self.port = path, port
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Capture:
        if self.path:
            self.proc = subprocess.Popen(
                ["tcpdump", "-i", "any", "-U", "-w", self.path, f"tcp port {self.port} or icmp"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            assert self.proc.stderr is not None
            self.proc.stderr.readline()  # "listening on ...": capture is running
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
