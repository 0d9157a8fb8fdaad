"""The kernel-socket strategies: simultaneous-open, low-ttl-listen, port-prediction, birthday.

Each turns the shared facts into a ``plan.KernelPlan`` (sans-IO) and hands it to ``run_plan``, the adapter:
firewall guard (only the ICMP time-exceeded drop, when a plan sends low-TTL SYNs), GO, then non-blocking
``connect()``\\s at the plan's rate. A SYN's TTL is set with ``IP_TTL`` around the ``connect()`` call, which
transmits the SYN before it returns, and restored at once: the SYN-ACK the same socket sends when the peer's
SYN comes in (simultaneous open) must reach the peer.

Choosing the connection. Birthday and port prediction between two sequential NATs can connect more than
once (two guesses hit, several predicted pairs, or the birthday primer's listener accepts several of the
connector's SYNs). The connector (or either side of a simultaneous open) takes its first connected socket
and starts the peer authentication on it (``session._authenticate``, both ends send a challenge first);
the primer takes the first of its connected sockets on which that challenge arrives. As soon as a side has
chosen, it stops sending SYNs and closes every other socket: unanswered SYN-SENT sockets would otherwise
retransmit (1 s, 3 s, ...) for the whole budget, hundreds of them, and a NAT that admits them all
(endpoint-independent filtering) has to track each one while the authentication waits behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import resource
import socket
import time
from collections.abc import Iterator
from typing import Any

from rawpunch.proto.codec import Endpoint
from rawpunch.punch.firewall import FirewallGuard, PunchFlow
from rawpunch.strategy import auto
from rawpunch.strategy import plan as plans
from rawpunch.strategy.base import AttemptContext, AttemptFailed, PeerView
from rawpunch.strategy.plan import NORMAL_TTL, KernelPlan, Role

log = logging.getLogger("rawpunch.strategy")
RETRY_DELAY = 0.05  # after a refusal (RST): the peer's NAT may not have its mapping yet
SHOWN_PORTS = 16  # ports listed in the attempt event
PACING_TICK = 0.005  # seconds between bursts of SYNs
SEQUENTIAL_PRIMER_BUDGET = 3.0  # seconds for a birthday attempt whose primer's NAT is sequential
SYMMETRIC_HINT = (
    "the sequential NAT let no SYN in from the peer's address: if it maps and filters per remote endpoint "
    "(symmetric), no port guessing reaches it from a random-port NAT (rawpunch.strategy.auto)"
)
LISTEN_BACKLOG = 64  # the birthday primer's listener: the connector's first SYNs, not all of them


def _role(ctx: AttemptContext, strategy: str) -> Role:
    return "primer" if ctx.slot == plans.primer_slot(strategy, ctx.stable_slot) else "connector"


def _public_host(view: PeerView) -> str:
    return next(iter(view.public.values())).host


def _rtt(ctx: AttemptContext) -> float | None:
    return ctx.client.core.rtt


class SimultaneousOpen:
    name = "simultaneous-open"
    suits = "the baseline: both connect() at GO (RTT/2 synchronised) and again after each refusal"

    async def attempt(self, ctx: AttemptContext) -> socket.socket:
        return await run_plan(plans.simultaneous_open(ctx.local.port, ctx.peer_public), ctx)


class LowTtlListen:
    name = "low-ttl-listen"
    suits = "two stable NATs (endpoint-independent mapping or port preservation), RST or drop"

    async def attempt(self, ctx: AttemptContext) -> socket.socket:
        role = _role(ctx, self.name)
        p = plans.low_ttl_listen(role, ctx.local.port, ctx.peer_public, ctx.priming_ttl, _rtt(ctx))
        return await run_plan(p, ctx)


class PortPrediction:
    name = "port-prediction"
    suits = "a sequentially allocating NAT (fixed delta) against a stable or another sequential one"

    async def attempt(self, ctx: AttemptContext) -> socket.socket:
        role = _role(ctx, self.name)
        # Both sides know both NATs (exchanged classification): each computes the same predictions.
        primer, connector = (ctx.me, ctx.peer) if role == "primer" else (ctx.peer, ctx.me)
        delta = connector.behaviour.allocation_delta
        if not delta:
            who = "the peer's" if role == "primer" else "our"
            raise AttemptFailed(
                f"port prediction: {who} NAT showed no fixed allocation delta to predict from"
            )
        predicted = plans.Prediction(_public_host(connector), connector.last_public_port, delta)
        aim: Endpoint | plans.Prediction = ctx.peer_public  # the connector's target: the primer's endpoint
        if auto.nat_class(primer.behaviour) == "sequential" and primer.behaviour.allocation_delta:
            aim = plans.Prediction(
                _public_host(primer), primer.last_public_port, primer.behaviour.allocation_delta
            )
        p = plans.port_prediction(role, ctx.local.port, predicted, aim, ctx.priming_ttl, _rtt(ctx))
        return await run_plan(p, ctx)


class Birthday:
    name = "birthday"
    suits = "a randomly allocating NAT against a stable or sequential one (guessed ports, bounded SYN budget)"

    async def attempt(self, ctx: AttemptContext) -> socket.socket:
        first, second = (ctx.me, ctx.peer) if ctx.slot == 0 else (ctx.peer, ctx.me)  # slot order: same seed
        seed = hashlib.sha256(first.info.nonce + second.info.nonce + bytes([ctx.attempt])).digest()
        if auto.guesses_both_ways(first.behaviour, second.behaviour):
            return await self._both_ways(ctx, seed)
        primer_slot = auto.birthday_primer(first.behaviour, second.behaviour, ctx.stable_slot)
        role: Role = "primer" if ctx.slot == primer_slot else "connector"
        primer = ctx.me if role == "primer" else ctx.peer
        aim: Endpoint | plans.Prediction = ctx.peer_public
        sequential = auto.nat_class(primer.behaviour) == "sequential"
        if role == "connector" and sequential:
            # The primer's NAT maps its priming SYNs anew: its next ports, not the one the server saw.
            delta = primer.behaviour.allocation_delta or 1
            aim = plans.Prediction(_public_host(primer), primer.last_public_port, delta)
        p = plans.birthday(role, ctx.local.port, aim, ctx.priming_ttl, _rtt(ctx), seed, budget=ctx.syn_budget)
        _ensure_open_files(p.syns)
        self._emit(ctx, role, p.probability)
        if not sequential:
            return await run_plan(p, ctx)
        # It connects within a round trip or two of the guesses, or not at all (auto: a symmetric NAT).
        ctx.budget = min(ctx.budget, SEQUENTIAL_PRIMER_BUDGET)
        try:
            return await run_plan(p, ctx)
        except AttemptFailed as exc:
            raise AttemptFailed(f"{exc}; {SYMMETRIC_HINT}") from None

    async def _both_ways(self, ctx: AttemptContext, seed: bytes) -> socket.socket:
        """Each side primes (and listens) and connects, each way with the whole SYN budget: neither NAT's
        mapping is known, and one of them may be endpoint-independent (``auto.guesses_both_ways``). Slot 0
        takes its first connection, slot 1 the one the challenge comes on."""
        own_seed = hashlib.sha256(seed + bytes([ctx.slot])).digest()
        args = (ctx.peer_public, ctx.priming_ttl, _rtt(ctx), own_seed)
        primer = plans.birthday("primer", ctx.local.port, *args, budget=ctx.syn_budget)
        # From fresh ports only: the punch port's one connection to the peer's endpoint is the primer's first.
        connector = plans.birthday("connector", 0, *args, budget=ctx.syn_budget)
        _ensure_open_files(primer.syns + connector.syns)
        self._emit(ctx, "both", primer.probability)
        return await run_plans((primer, connector), ctx, by_challenge=ctx.slot == 1)

    @staticmethod
    def _emit(ctx: AttemptContext, role: str, probability: float | None) -> None:
        size = plans.PORT_RANGE[1] - plans.PORT_RANGE[0] + 1
        n, m = plans.birthday_sizes(ctx.syn_budget, size)
        ctx.emit(
            {
                "event": "birthday",
                "attempt": ctx.attempt,
                "role": role,
                "connections": n,
                "guesses": m,
                "port_range": list(plans.PORT_RANGE),
                "probability": round(probability or 0.0, 4),
                "rate": plans.BIRTHDAY_RATE,
            }
        )


def _ensure_open_files(sockets: int) -> None:
    """One descriptor per socket: raise the soft limit towards the hard one if the plan needs it."""
    needed = sockets + 256  # and what the process already holds
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise AttemptFailed(
            f"birthday: {sockets} sockets need {needed} open files, the hard limit is {hard}: "
            "raise it (ulimit -Hn) or lower --syn-budget"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _pairs(p: KernelPlan) -> Iterator[tuple[int, Endpoint]]:
    if len(p.local_ports) == 1:
        return ((p.local_ports[0], target) for target in p.targets)
    return ((port, p.targets[i % len(p.targets)]) for i, port in enumerate(p.local_ports))


async def run_plan(p: KernelPlan, ctx: AttemptContext) -> socket.socket:
    """Carry out ``p`` from GO; return the authenticated socket, or raise ``AttemptFailed``."""
    return await run_plans((p,), ctx, by_challenge=p.role == "primer")


async def run_plans(ps: tuple[KernelPlan, ...], ctx: AttemptContext, by_challenge: bool) -> socket.socket:
    """Carry out the plans at once from GO (the first one's port and targets scope the firewall guard);
    ``by_challenge``: take the connection on which the peer's challenge comes, else the first connected."""
    from rawpunch.punch.session import PunchError, WrongSecret, _authenticate, _Capture  # noqa: PLC0415 - session imports us

    p = ps[0]
    ctx.detail.update(
        role=p.role if len(ps) == 1 else "both",
        ports=[t.port for q in ps for t in q.targets][:SHOWN_PORTS],
        syns=sum(q.syns for q in ps),
        ttl=min(q.ttl for q in ps),
    )
    guard = None
    if p.ttl < NORMAL_TTL:
        guard = FirewallGuard(PunchFlow(p.local_ports[0], p.targets[0], 0, kernel_sockets=True))
    started = time.monotonic()  # "punch" includes READY/GO, as the crafted handshake's does
    capture = _Capture(ctx.pcap, p.local_ports[0]) if p.local_ports[0] else contextlib.nullcontext()
    with capture, guard if guard is not None else contextlib.nullcontext():
        await ctx.go()
        dialer = _Dialer(ps, ctx.budget, by_challenge)
        try:
            sock = await dialer.run()
            ctx.timings["punch"] = round((time.monotonic() - started) * 1000, 2)
            try:
                await _authenticate(sock, ctx.keys, ctx.slot, timeout=ctx.remaining())
            except WrongSecret:
                raise  # no other attempt can fix it: the cascade stops
            except PunchError as exc:
                raise AttemptFailed(str(exc)) from None
            ctx.usable_at = time.monotonic()
            ctx.timings["authenticate"] = round((ctx.usable_at - started) * 1000 - ctx.timings["punch"], 2)
            dialer.keep(sock)
            return sock
        finally:
            dialer.close()


class _Dialer:
    """Non-blocking connects at each plan's rate (several plans: both roles at once, ``Birthday``); the
    first usable connection wins, or with ``by_challenge`` the first on which the peer's challenge came."""

    def __init__(self, ps: tuple[KernelPlan, ...], budget: float, by_challenge: bool) -> None:
        self.plans = ps
        self.by_challenge = by_challenge
        self.reuse_port = any(p.listen for p in ps)
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + budget
        self.socks: set[socket.socket] = set()
        self.connected: asyncio.Queue[socket.socket] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.errors: dict[str, int] = {}
        self.kept: socket.socket | None = None
        self.chosen_from = 0
        """Connections taken off ``connected`` by the primer's choice, still waiting for a challenge."""

    async def run(self) -> socket.socket:
        """The chosen connection; every other socket is closed and no more SYNs go out when it returns."""
        for p in self.plans:
            if p.listen:
                self._listen(p)
            self.tasks.append(asyncio.create_task(self._dial_all(p)))
        try:
            async with asyncio.timeout_at(self.deadline):
                sock = await (self._choose_by_challenge() if self.by_challenge else self.connected.get())
        except TimeoutError:
            raise AttemptFailed(
                f"{self.plans[0].strategy}: no connection within the budget ({self._why()})"
            ) from None
        self._close_all(but=sock)
        return sock

    def _listen(self, p: KernelPlan) -> None:
        """Accept, on the plan's port, connections from any port of the peer's host (``plan.listen``)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socks.add(listener)
        try:
            self._prepare(listener, p.local_ports[0])
            listener.listen(LISTEN_BACKLOG)
        except OSError as exc:
            self._failed(listener, exc.errno or errno.EIO)
            return
        self.loop.add_reader(listener.fileno(), self._accept, listener, p.targets[0].host)

    def _accept(self, listener: socket.socket, peer_host: str) -> None:
        while True:
            try:
                sock, (host, _) = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._failed(listener, exc.errno or errno.EIO)
                return
            if host != peer_host:  # someone else found the port: not the peer, not ours to judge
                sock.close()
                continue
            self.socks.add(sock)
            self.connected.put_nowait(sock)

    def _why(self) -> str:
        if not self.errors:
            return f"{sum(p.syns for p in self.plans)} SYNs unanswered"
        return ", ".join(f"{n} x {e}" for e, n in sorted(self.errors.items()))

    async def _dial_all(self, p: KernelPlan) -> None:
        """SYNs at the plan's rate: each tick sends what the rate allows by then (a sleep per SYN would
        stretch 500 SYNs far beyond the plan, and the connector's ``lead`` counts on the plan)."""
        await asyncio.sleep(p.lead)
        pairs = list(_pairs(p))
        start, sent = self.loop.time(), 0
        if p.burst:
            for port, target in pairs[: p.burst]:
                self._dial(p, port, target)
            sent = min(p.burst, len(pairs))
            await asyncio.sleep(p.pause)
            if not self.connected.empty() or self.chosen_from:
                return  # the listener's connection (or a lucky burst) came: the rest is not needed
            start = self.loop.time() - sent * p.interval  # the rate goes on from where it was
        while sent < len(pairs):
            due = len(pairs) if not p.interval else int((self.loop.time() - start) / p.interval) + 1
            for port, target in pairs[sent:due]:
                self._dial(p, port, target)
            sent = max(sent, min(due, len(pairs)))
            if sent < len(pairs):
                await asyncio.sleep(PACING_TICK)

    def _dial(self, p: KernelPlan, port: int, target: Endpoint) -> None:
        sock = self._start(p, port, target)
        if sock is not None:
            self.tasks.append(asyncio.create_task(self._finish(p, sock, port, target)))

    def _start(self, p: KernelPlan, port: int, target: Endpoint) -> socket.socket | None:
        """A socket whose SYN has left (``connect()`` sends it before returning), or None after an error."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socks.add(sock)
        try:
            self._prepare(sock, port)
            _connect_with_ttl(sock, target, p.ttl)
        except OSError as exc:
            self._failed(sock, exc.errno or errno.EIO)
            return None
        return sock

    async def _finish(self, p: KernelPlan, sock: socket.socket, port: int, target: Endpoint) -> None:
        """Wait for the handshake; on a refusal, connect again (if the plan retries) until the budget ends."""
        while True:
            await _writable(self.loop, sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                self.connected.put_nowait(sock)
                return
            self._failed(sock, err)
            if not p.retry or err not in (errno.ECONNREFUSED, errno.ECONNRESET):
                return
            await asyncio.sleep(RETRY_DELAY)
            if (retry := self._start(p, port, target)) is None:
                return
            sock = retry

    def _failed(self, sock: socket.socket, err: int) -> None:
        self._drop(sock)
        name = errno.errorcode.get(err, str(err))
        self.errors[name] = self.errors.get(name, 0) + 1

    def _prepare(self, sock: socket.socket, port: int) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # many sockets on the primer's one port
        if self.reuse_port:  # a listener and connecting sockets on one port: only SO_REUSEPORT allows both
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind(("0.0.0.0", port))  # an OSError (port taken) is counted like a failed connect

    async def _choose_by_challenge(self) -> socket.socket:
        """The primer: the connected socket on which the connector's challenge arrives first."""
        waiting: dict[asyncio.Task[Any], socket.socket] = {}
        getter = asyncio.create_task(self.connected.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter, *waiting}, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is getter:
                        sock = getter.result()
                        self.chosen_from += 1
                        waiting[asyncio.create_task(_readable(self.loop, sock))] = sock
                        getter = asyncio.create_task(self.connected.get())
                    elif _has_data(sock := waiting.pop(task)):
                        return sock
        finally:
            for task in (getter, *waiting):
                task.cancel()

    def keep(self, sock: socket.socket) -> None:
        self.kept = sock

    def _drop(self, sock: socket.socket) -> None:
        self.socks.discard(sock)
        if sock.fileno() >= 0:  # unregister before close: the number may be reused at once
            self.loop.remove_reader(sock.fileno())
            self.loop.remove_writer(sock.fileno())
        sock.close()

    def _close_all(self, but: socket.socket | None) -> None:
        """Stop dialing and close every socket except ``but``: no SYN retransmissions, no late accepts."""
        for task in self.tasks:
            task.cancel()
        for sock in list(self.socks):
            if sock is not but:
                self._drop(sock)

    def close(self) -> None:
        self._close_all(but=self.kept)


def _connect_with_ttl(sock: socket.socket, target: Endpoint, ttl: int) -> None:
    """Start the handshake; the SYN leaves inside ``connect()``, so the TTL can be restored right after."""
    normal = sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL)
    if ttl != NORMAL_TTL:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
    err = sock.connect_ex((target.host, target.port))
    if ttl != NORMAL_TTL:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, normal)
    if err not in (0, errno.EINPROGRESS):
        raise OSError(err, os.strerror(err))


def _has_data(sock: socket.socket) -> bool:
    """Readable with bytes to read, not just EOF or an error (a connection the connector dropped)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except OSError:
        return False


async def _wait_fd(loop: asyncio.AbstractEventLoop, sock: socket.socket, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, ready)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    await _wait_fd(loop, sock, write=True)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    await _wait_fd(loop, sock, write=False)
