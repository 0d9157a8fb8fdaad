"""Benchmark of the rendezvous server: control messages per second on one core, bytes per waiting session.

Run as root: ``scripts/bench-rendezvous [--quick]``. Targets from the issue: at least 20,000 control messages
per second on one core, at most 2 KiB per waiting session. Three measurements:

network (the real path)
    ``rawpunch server`` runs in the ``server`` node of a throwaway lab (``two_nats(hops=1)``), pinned to CPU
    0, its bytecode precompiled as an installed package has it (see ``_cached_bytecode``). A load generator,
    forked into the neighbouring router ``r1`` and pinned to CPU 1, joins one session per UDP socket the way a
    client does (REGISTER, COOKIE, REGISTER with the cookie, INFO answered PENDING) and then sends INFO long
    polls closed-loop with a bounded window in flight per socket. Every request is valid (fresh transaction
    ids in sequence, a live cookie, a correct HMAC), so each PENDING counted went through the rate limiter,
    MAC check, cookie check, anti-replay window, session state and a signed reply. The server's CPU time
    (/proc/<pid>/stat) shows whether the server or the generator was the bottleneck.
core
    The same INFO long polls, pre-built, fed to an in-process ``ServerCore``: the protocol core without
    sockets or the event loop.
profiles (when the rate target is missed, or with ``--profile``)
    Separate short runs, not counted above: cProfile of the real server process (core vs system calls vs
    event loop), ``strace -c`` of it (system calls per reply: what cProfile cannot see inside C functions),
    and cProfile of the in-process core.
memory
    tracemalloc while an in-process ``ServerCore`` takes N sessions (real datagrams, one peer each, from
    distinct source addresses, ~100 bytes of sealed info, waiting), then after ``expire()`` removed them.

Every packet stays inside the lab's namespaces; the lab, the server and the generator are gone on every exit.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import cProfile
import functools
import gc
import hmac
import ipaddress
import itertools
import linecache
import os
import pstats
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rawpunch.bench.record import RECORD, Machine, append_section, machine
from rawpunch.lab.netns import Lab
from rawpunch.lab.nsproc import LAB_PREFIX, list_netns
from rawpunch.lab.topology import SERVER_ADDR, two_nats
from rawpunch.proto import codec
from rawpunch.proto.client import REGISTER_SIZE
from rawpunch.proto.codec import Attr, AttrValue, Endpoint, Message, MessageType
from rawpunch.proto.errors import RemoteProtocolError
from rawpunch.proto.keys import SessionKeys, control_key
from rawpunch.proto.peerinfo import Capability, PeerInfo, encode_peer_info
from rawpunch.proto.replay import WINDOW, TxidSource
from rawpunch.proto.server import Addr, ServerConfig, ServerCore

TARGET_RATE = 20_000
"""Control messages per second on one core (the issue's target)."""
TARGET_SESSION_BYTES = 2048
"""Server state per waiting session (the issue's target)."""

SERVER_PORT = 3478
SERVER_CPU, GENERATOR_CPU = 0, 1
GENERATOR_NODE = "r1"  # the router next to the server: one real veth hop, no NAT on the way
BENCH_RATE = 1_000_000.0
"""``--rate`` for the throughput runs. The generator's sockets share one source address and the default
200/s per source would measure the limiter; the token bucket is still checked on every message."""


# Offsets into the fixed header (codec.HEADER "!HBBHH12s16s"): the message type byte and the transaction id.
_TYPE_AT = 3
_TXID_AT = codec.HEADER.size - codec.SESSION_ID_LEN - codec.TXID_LEN
_PENDING = int(MessageType.PENDING)
_MAX_DATAGRAM = 2048
_NOW = 1000.0  # the in-process cores' clock: a fixed instant keeps cookies valid and timing out of the loop
# A realistic peer description: capabilities, ISN, TTL, TCP options, punch port and one private endpoint.
# Sealed it is 116 bytes, the size of what a real peer sends in INFO.
_PEER_INFO = PeerInfo(
    capabilities=Capability.CRAFTED_HANDSHAKE | Capability.SIMULTANEOUS_OPEN,
    isn=0x1234_5678,
    ttl=64,
    mss=1460,
    wscale=7,
    sack=True,
    timestamps=True,
    tcp_port=40_000,
    local=(Endpoint("10.0.1.2", 40_000),),
)


class BenchError(Exception):
    """The benchmark could not measure what it set out to (the message says what went wrong)."""


# --- building valid client messages ------------------------------------------------------------------------


class BenchClient:
    """One benchmark peer in a session of its own, with one fixed ``TxidSource`` instance."""

    def __init__(self) -> None:
        sid = os.urandom(codec.SESSION_ID_LEN)
        # SessionKeys.derive runs scrypt (~50 ms, 16 MiB): far too slow for 10,000 sessions. The server
        # only ever sees session_id and control_key, so random peer and auth keys change nothing for it.
        self.keys = SessionKeys(
            session_id=sid, control_key=control_key(sid), peer_key=os.urandom(32), auth_key=os.urandom(32)
        )
        self.txids = TxidSource()
        self.sealed = self.keys.seal(encode_peer_info(_PEER_INFO), 0)

    def encode(
        self, mtype: MessageType, attrs: tuple[tuple[Attr, AttrValue], ...], txid: bytes | None = None
    ) -> bytes:
        message = Message(mtype, txid or self.txids.next(), self.keys.session_id, attrs)
        return codec.encode(message, self.keys.control_key)

    def register(self, cookie: bytes | None) -> bytes:
        """REGISTER padded as the real client pads it: the server never answers with more than it got."""
        attrs: tuple[tuple[Attr, AttrValue], ...] = () if cookie is None else ((Attr.COOKIE, cookie),)
        txid = self.txids.next()
        pad = REGISTER_SIZE - len(self.encode(MessageType.REGISTER, attrs, txid)) - 4
        if pad >= 0:
            attrs = (*attrs, (Attr.PADDING, bytes(pad)))
        return self.encode(MessageType.REGISTER, attrs, txid)

    def info(self, cookie: bytes) -> bytes:
        return self.encode(MessageType.INFO, ((Attr.COOKIE, cookie), (Attr.SEALED, self.sealed)))

    def expect(self, reply: bytes, mtype: MessageType) -> Message:
        """Decode (MAC checked) a reply and insist on its type."""
        msg = codec.decode(reply, self.keys.control_key)
        if msg.type is not mtype:
            raise BenchError(
                f"expected {mtype.name}, the server answered {msg.type.name} {msg.get(Attr.ERROR)}"
            )
        if msg.transaction_id[: len(self.txids.instance)] != self.txids.instance:
            raise BenchError(f"{msg.type.name} names a transaction this client never sent")
        return msg


class InfoStream:
    """Valid INFO long polls of one client: consecutive transaction ids, each signed afresh.

    Only the transaction id and the MAC differ from one INFO to the next (INFO carries no endpoint XOR-ed with
    the transaction id), so the message is a template plus one HMAC call. That costs the generator about a
    microsecond per message instead of a full codec.encode, so the generator stays far cheaper per message
    than the server it measures. The template is checked byte for byte against codec.encode.
    """

    def __init__(self, client: BenchClient, cookie: bytes) -> None:
        self._key = client.keys.control_key
        self._next_txid = client.txids.next
        self.first = client.info(cookie)
        signed = self.first[: -codec.MAC_LEN]
        self._head, self._tail = signed[:_TXID_AT], signed[_TXID_AT + codec.TXID_LEN :]
        if self._sign(self.first[_TXID_AT : _TXID_AT + codec.TXID_LEN]) != self.first:
            raise BenchError("the INFO template does not reproduce codec.encode")

    def _sign(self, txid: bytes) -> bytes:
        signed = self._head + txid + self._tail
        return signed + hmac.digest(self._key, signed, "sha256")

    def take(self, count: int) -> list[bytes]:
        return [self._sign(self._next_txid()) for _ in range(count)]


Exchange = Callable[[bytes], bytes]
"""Deliver one request to the server and return its single reply."""


def join(client: BenchClient, exchange: Exchange) -> InfoStream:
    """REGISTER, COOKIE, REGISTER with it, INFO answered PENDING: a peer waiting for its partner."""
    cookie = client.expect(exchange(client.register(None)), MessageType.COOKIE).get(Attr.COOKIE)
    client.expect(exchange(client.register(cookie)), MessageType.REGISTERED)
    stream = InfoStream(client, cookie)
    client.expect(exchange(stream.first), MessageType.PENDING)
    return stream


def core_exchange(core: ServerCore, ip: int, port: int, now: float) -> Exchange:
    """Deliver datagrams from ``ip``:``port`` straight to a ServerCore, no sockets."""

    def exchange(data: bytes) -> bytes:
        # A fresh address tuple and string per datagram, as the asyncio adapter hands over: the server keeps
        # some of them (Peer.addr, rate-bucket and per-source keys), and they count in its memory.
        addr = (str(ipaddress.IPv4Address(ip)), port)
        out = core.receive_datagram(data, addr, now)
        if len(out) != 1 or out[0][1] != addr:
            raise BenchError(f"expected one reply to {addr}, the core returned {len(out)}: {core.stats}")
        return out[0][0]

    return exchange


# --- the protocol core alone, in process -------------------------------------------------------------------


@dataclass(frozen=True)
class CoreRun:
    messages: int
    """INFOs per trial."""
    rates: list[float]


def _bench_config() -> ServerConfig:
    return ServerConfig(tcp_port=SERVER_PORT, rate_per_source=BENCH_RATE, burst_per_source=2 * BENCH_RATE)


def _core_with_streams(sessions: int) -> tuple[ServerCore, list[tuple[InfoStream, Addr]]]:
    core = ServerCore(_bench_config(), _NOW)
    # One source address for all, as in the network run (the generator's sockets share r1's address).
    ip = int(ipaddress.IPv4Address("203.0.113.1"))
    streams = [join(BenchClient(), core_exchange(core, ip, 40_000 + i, _NOW)) for i in range(sessions)]
    return core, [(s, ("203.0.113.1", 40_000 + i)) for i, s in enumerate(streams)]


def _core_batch(streams: list[tuple[InfoStream, Addr]], per_stream: int) -> list[tuple[bytes, Addr]]:
    chunks = [(stream.take(per_stream), addr) for stream, addr in streams]
    # Round robin over the sessions, as the datagrams of concurrent clients interleave.
    return [(msgs[i], addr) for i in range(per_stream) for msgs, addr in chunks]


def _feed_core(core: ServerCore, batch: list[tuple[bytes, Addr]]) -> float:
    """Feed the batch; return messages per second. Every INFO must come back as exactly one PENDING."""
    receive = core.receive_datagram
    pending = 0
    start = time.perf_counter()
    for data, addr in batch:
        out = receive(data, addr, _NOW)
        pending += len(out) == 1 and out[0][0][_TYPE_AT] == _PENDING
    elapsed = time.perf_counter() - start
    if pending != len(batch):
        raise BenchError(f"the core answered PENDING to {pending} of {len(batch)} INFOs: {core.stats}")
    return len(batch) / elapsed


@contextlib.contextmanager
def _pinned(cpu: int) -> Iterator[None]:
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def measure_core(sessions: int, messages: int, trials: int) -> CoreRun:
    """In-process ServerCore rate on the server's CPU, several trials after a warm-up batch."""
    with _pinned(SERVER_CPU):
        core, streams = _core_with_streams(sessions)
        per_stream = max(1, messages // sessions)
        _feed_core(core, _core_batch(streams, per_stream))  # warm-up: caches, allocator, CPU frequency
        rates = [_feed_core(core, _core_batch(streams, per_stream)) for _ in range(trials)]
    return CoreRun(per_stream * sessions, rates)


# --- profiles ----------------------------------------------------------------------------------------------

ProfileKey = tuple[str, int, str]
ProfileRow = tuple[int, int, float, float, Any]  # primitive calls, calls, own time, cumulative time, callers
_NO_ROW: ProfileRow = (0, 0, 0.0, 0.0, {})


def _profile_table(source: cProfile.Profile | Path) -> dict[ProfileKey, ProfileRow]:
    stats = pstats.Stats(source if isinstance(source, cProfile.Profile) else str(source))
    table: dict[ProfileKey, ProfileRow] = stats.stats  # type: ignore[attr-defined]
    return table


def _row(table: dict[ProfileKey, ProfileRow], path_part: str, name: str) -> ProfileRow:
    return next((row for (p, _, n), row in table.items() if path_part in p and n == name), _NO_ROW)


def _where(path: str, line: int, name: str = "") -> str:
    if path == "~":  # a builtin: the name says it all
        return name
    parts = Path(path).parts
    short = "/".join(parts[parts.index("rawpunch") :]) if "rawpunch" in parts else Path(path).name
    return f"{short}:{line}" + (f"({name})" if name else "")


def _top_functions(
    table: dict[ProfileKey, ProfileRow], total: float, messages: int, top: int = 12
) -> list[str]:
    """The functions with the most own time, as shares of ``total``, with calls per message."""
    rows = sorted(table.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        f"{tt / total:6.1%} own {ct / total:6.1%} cum {calls / max(messages, 1):5.2f}/msg  {_where(*key)}"
        for key, (_, calls, tt, ct, _) in rows
    ]


def profile_core(sessions: int, messages: int) -> list[str]:
    """cProfile of the in-process core loop."""
    with _pinned(SERVER_CPU):
        core, streams = _core_with_streams(sessions)
        batch = _core_batch(streams, max(1, messages // sessions))
        prof = cProfile.Profile()
        prof.runcall(_feed_core, core, batch)
    table = _profile_table(prof)
    return _top_functions(table, sum(row[2] for row in table.values()), len(batch))


def server_profile_lines(path: Path) -> list[str]:
    """Split the real server's event-loop time: protocol core, the three system calls, and the rest."""
    table = _profile_table(path)
    loop = _row(table, "asyncio/base_events.py", "_run_once")[3]
    core = _row(table, "rawpunch/proto/server.py", "receive_datagram")
    if not loop or not core[1]:
        return ["(the server profile holds no event-loop or core entries)"]
    parts = {
        "protocol core: ServerCore.receive_datagram, cumulative": core[3],
        "sendto": _row(table, "~", "<method 'sendto' of '_socket.socket' objects>")[2],
        "recvfrom": _row(table, "~", "<method 'recvfrom' of '_socket.socket' objects>")[2],
        "epoll_wait, idle waiting included": _row(table, "~", "<method 'poll' of 'select.epoll' objects>")[2],
    }
    parts["asyncio event loop and adapter: the rest"] = loop - sum(parts.values())
    # Shares only: absolute times of one profiled run say little (the profiler inflates Python code).
    lines = [f"{t / loop:6.1%}  {name}" for name, t in parts.items()]
    return [*lines, "", *_top_functions(table, loop, core[1])]


# --- memory per waiting session ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRun:
    sessions: int
    per_session: float
    """Traced bytes the server holds per waiting session."""
    after_expire: float
    """Traced bytes left after expire() removed them all, per former session."""
    after_second_cycle: float | None
    """The same after a second fill and expire: no more than after_expire when the state is bounded."""
    sites: list[str]
    """Where the bytes of a waiting session are allocated, per session."""


_MEMORY_SOURCES = int(ipaddress.IPv4Address("198.18.0.1"))  # RFC 2544 benchmarking range; only data here


def _fill(core: ServerCore, sessions: int, now: float) -> None:
    """Each session: one peer from its own source address, registered, INFO sent, waiting for the other."""
    for i in range(sessions):
        exchange = core_exchange(core, _MEMORY_SOURCES + i, 40_000 + i % 20_000, now)
        join(BenchClient(), exchange)  # the stream is dropped here: only the server keeps state


def _waiting(core: ServerCore) -> int:
    return sum(1 for s in core.sessions.values() for p in s.peers if p is not None and p.waiting is not None)


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def measure_memory(sessions: int, second_cycle: bool) -> MemoryRun:
    config = ServerConfig(tcp_port=SERVER_PORT, max_sessions=max(sessions, 10_000))
    idle = config.peer_idle_timeout + config.cookie_lifetime + 1.0
    # Warm the process-wide caches (struct formats, enum lookups, logger levels) outside the measurement.
    _fill(ServerCore(config, _NOW), 64, _NOW)
    tracemalloc.start()
    try:
        core = ServerCore(config, _NOW)
        base = _traced()
        before = tracemalloc.take_snapshot()
        _fill(core, sessions, _NOW)
        filled = _traced() - base
        sites = _sites(tracemalloc.take_snapshot().compare_to(before, "lineno"), sessions)
        if _waiting(core) != sessions:
            raise BenchError(f"{_waiting(core)} of {sessions} sessions are waiting: the fill went wrong")
        core.expire(_NOW + idle)
        drained = _traced() - base
        again = None
        if second_cycle:
            _fill(core, sessions, _NOW + idle)
            core.expire(_NOW + 2 * idle)
            again = (_traced() - base) / sessions
        if core.sessions or core.buckets or core.peers_per_source:
            raise BenchError("expire() left sessions, rate buckets or per-source counts behind")
    finally:
        tracemalloc.stop()
    return MemoryRun(sessions, filled / sessions, drained / sessions, again, sites)


def _sites(diff: list[tracemalloc.StatisticDiff], sessions: int, top: int = 6) -> list[str]:
    out = []
    for stat in [d for d in diff if d.size_diff > 0][:top]:
        frame = stat.traceback[0]
        code = linecache.getline(frame.filename, frame.lineno).strip()
        out.append(f"{stat.size_diff / sessions:.0f} B {_where(frame.filename, frame.lineno)} `{code}`")
    return out


# --- the load generator (runs forked inside a lab namespace) -----------------------------------------------

SERVER_WAIT_S = 10.0
REPLY_TIMEOUT_S = 2.0
_PRESIGN = 1024  # requests signed per socket before the clock starts
_REFILL = 256  # requests signed when a socket runs out (a few hundred microseconds, seldom)
_MAX_DRAIN = 64  # bounds one socket's turn, so every socket is served in turn
_STALL_S = 0.3  # no reply for this long: what was in flight is lost (a full queue); send afresh
_STALL_CHECK_S = 0.1


@dataclass(frozen=True)
class LoadPlan:
    server: tuple[str, int]
    server_pid: int
    sessions: int
    window: int
    warmup: float
    trials: int
    duration: float

    def budget(self) -> float:
        """Upper bound on the generator's run time: server start, joins, warm-up, trials."""
        joins = self.sessions * 3 * REPLY_TIMEOUT_S
        return SERVER_WAIT_S + joins + self.warmup + self.trials * self.duration


@dataclass(frozen=True)
class Trial:
    replies: int
    unexpected: int
    wall: float
    server_user: float
    server_system: float
    generator_cpu: float
    server_core_busy: float
    """Share of the server's CPU busy with anything: the server, softirqs, or other processes."""
    generator_core_busy: float

    @property
    def rate(self) -> float:
        return self.replies / self.wall

    @property
    def server_share(self) -> float:
        return (self.server_user + self.server_system) / self.wall

    @property
    def per_cpu_second(self) -> float:
        """Messages per second of server CPU time: the one-core rate even when the core was shared."""
        return self.replies / max(self.server_user + self.server_system, 1e-9)


@dataclass(frozen=True)
class LoadRun:
    trials: list[Trial]
    sent: int
    replies: int
    lost: int
    verified: int
    """Sockets whose last reply decoded as a genuine PENDING (MAC, type, transaction id)."""


class _Flow:
    """One generator socket: its session's INFO stream, pre-signed requests, and the requests in flight."""

    __slots__ = ("heard", "inflight", "last", "lost", "next", "ready", "replies", "sent", "sock", "stream")

    def __init__(self, sock: socket.socket, stream: InfoStream) -> None:
        self.sock, self.stream = sock, stream
        self.ready = stream.take(_PRESIGN)
        self.next = 0
        self.inflight = self.sent = self.replies = self.lost = 0
        self.heard = time.perf_counter()
        self.last = b""

    def top_up(self, window: int) -> None:
        send = self.sock.send
        for _ in range(window - self.inflight):
            if self.next == len(self.ready):
                self.ready, self.next = self.stream.take(_REFILL), 0
            send(self.ready[self.next])  # blocking: a full send buffer waits rather than drops
            self.next += 1
            self.sent += 1
        self.inflight = window

    def drain(self, now: float) -> int:
        """Read what has arrived; return how many replies were not PENDING."""
        recv = self.sock.recv
        got = unexpected = 0
        for _ in range(_MAX_DRAIN):
            try:
                data = recv(_MAX_DATAGRAM, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            got += 1
            unexpected += data[_TYPE_AT] != _PENDING
            self.last = data
        if got:
            self.replies += got
            self.inflight = max(0, self.inflight - got)
            self.heard = now
        return unexpected

    def unstall(self, now: float) -> None:
        if self.inflight and now - self.heard > _STALL_S:
            self.lost += self.inflight
            self.inflight = 0
            self.heard = now


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_jiffies(cpus: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(busy, total) jiffies of each CPU from /proc/stat; busy is everything but idle and iowait."""
    rows: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
            rows[int(name[3:])] = (sum(v) - v[3] - v[4], sum(v))
    return tuple(rows[c] for c in cpus)


def _socket_exchange(sock: socket.socket) -> Exchange:
    def exchange(data: bytes) -> bytes:
        sock.send(data)
        try:
            return sock.recv(_MAX_DATAGRAM)
        except TimeoutError:
            raise BenchError(f"no reply from the server within {REPLY_TIMEOUT_S} s during setup") from None

    return exchange


def _wait_for_server(sock: socket.socket) -> None:
    """Resend a cookie-less REGISTER (it creates no server state) until the server answers, bounded."""
    probe = BenchClient().register(None)
    sock.settimeout(0.1)
    for _ in range(int(SERVER_WAIT_S / 0.1)):
        with contextlib.suppress(TimeoutError, ConnectionRefusedError):
            sock.send(probe)
            sock.recv(_MAX_DATAGRAM)
            break
    else:
        raise BenchError(f"the server did not answer within {SERVER_WAIT_S} s")
    with contextlib.suppress(TimeoutError):  # late answers to earlier probes
        for _ in range(int(SERVER_WAIT_S / 0.1)):
            sock.recv(_MAX_DATAGRAM)


@dataclass(frozen=True)
class _Mark:
    at: float
    replies: int
    unexpected: int
    server: tuple[float, float]
    generator_cpu: float
    cpus: tuple[tuple[int, int], ...]


def _mark(flows: Sequence[_Flow], unexpected: int, server_pid: int) -> _Mark:
    return _Mark(
        time.perf_counter(),
        sum(f.replies for f in flows),
        unexpected,
        process_cpu(server_pid),
        time.process_time(),
        cpu_jiffies((SERVER_CPU, GENERATOR_CPU)),
    )


def _busy(a: tuple[int, int], b: tuple[int, int]) -> float:
    return (b[0] - a[0]) / max(1, b[1] - a[1])


def _trial(a: _Mark, b: _Mark) -> Trial:
    return Trial(
        replies=b.replies - a.replies,
        unexpected=b.unexpected - a.unexpected,
        wall=b.at - a.at,
        server_user=b.server[0] - a.server[0],
        server_system=b.server[1] - a.server[1],
        generator_cpu=b.generator_cpu - a.generator_cpu,
        server_core_busy=_busy(a.cpus[0], b.cpus[0]),
        generator_core_busy=_busy(a.cpus[1], b.cpus[1]),
    )


def _drive(flows: Sequence[_Flow], plan: LoadPlan) -> list[_Mark]:
    """Closed loop until the last trial ends; a mark where the warm-up ends and after each trial."""
    by_fd = {f.sock.fileno(): f for f in flows}
    marks: list[_Mark] = []
    unexpected = 0
    with select.epoll() as ep:
        for fd in by_fd:
            ep.register(fd, select.EPOLLIN)
        start = time.perf_counter()
        for flow in flows:
            flow.top_up(plan.window)
        next_check = start + _STALL_CHECK_S
        for i in range(plan.trials + 1):
            edge = start + plan.warmup + i * plan.duration
            while (now := time.perf_counter()) < edge:
                for fd, _ in ep.poll(min(0.05, edge - now)):
                    flow = by_fd[fd]
                    unexpected += flow.drain(now)
                    flow.top_up(plan.window)
                if now >= next_check:
                    next_check = now + _STALL_CHECK_S
                    for flow in flows:
                        flow.unstall(now)
                        flow.top_up(plan.window)
            marks.append(_mark(flows, unexpected, plan.server_pid))
    return marks


def _verified(flow: _Flow, client: BenchClient) -> bool:
    try:
        client.expect(flow.last, MessageType.PENDING)
    except (BenchError, RemoteProtocolError):
        return False
    return True


def run_load(plan: LoadPlan) -> LoadRun:
    """The load generator; ``LabNode.call`` runs it in a forked child inside the generator's namespace."""
    os.sched_setaffinity(0, {GENERATOR_CPU})
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            for _ in range(plan.sessions)
        ]
        for sock in socks:
            sock.connect(plan.server)  # connected: send() needs no address, and only the server is heard
        _wait_for_server(socks[0])
        clients, flows = [], []
        for sock in socks:
            sock.settimeout(REPLY_TIMEOUT_S)
            clients.append(BenchClient())
            flows.append(_Flow(sock, join(clients[-1], _socket_exchange(sock))))
            sock.settimeout(None)  # blocking sends; the loop reads with MSG_DONTWAIT
        try:
            marks = _drive(flows, plan)
        except ConnectionRefusedError:  # ICMP port unreachable: nothing listens any more
            raise BenchError("the server stopped answering during the run (port unreachable)") from None
        verified = sum(_verified(f, c) for f, c in zip(flows, clients, strict=True))
    return LoadRun(
        [_trial(a, b) for a, b in itertools.pairwise(marks)],
        sent=sum(f.sent for f in flows),
        replies=sum(f.replies for f in flows),
        lost=sum(f.lost for f in flows),
        verified=verified,
    )


# --- the real server in the lab ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkRun:
    load: LoadRun
    sessions: int
    window: int
    duration: float
    run_id: str
    server_affinity: list[int]
    server_counters: dict[str, int]
    server_rss_kib: int


def _server_command(profile_to: Path | None) -> tuple[list[str], str]:
    """argv of the server pinned to its CPU, and the name (/proc/<pid>/comm) the process ends up with."""
    pin = ["taskset", "-c", str(SERVER_CPU)]
    server = ["server", "--listen", f"{SERVER_ADDR}:{SERVER_PORT}", "--rate", f"{BENCH_RATE:.0f}"]
    if profile_to is not None:  # cProfile writes its file when the server exits on SIGINT
        profiled = [sys.executable, "-m", "cProfile", "-o", str(profile_to), "-m", "rawpunch", *server]
        return [*pin, *profiled], Path(sys.executable).name
    rawpunch = Path(sys.executable).with_name("rawpunch")
    if not rawpunch.exists():
        raise BenchError(f"{rawpunch} is missing: install the package into the venv (scripts/setup)")
    return [*pin, str(rawpunch), *server], rawpunch.name


# Imports everything the server (plain or under cProfile) imports, writing bytecode as it goes.
_WARM_UP = (
    "import sys, runpy, cProfile, pstats, rawpunch.rendezvous.server; "
    "sys.argv = ['rawpunch', '--version']; runpy.run_module('rawpunch', run_name='__main__')"
)


@contextlib.contextmanager
def _cached_bytecode() -> Iterator[dict[str, str]]:
    """An environment in which the server finds all its bytecode precompiled, as an installed package does.

    Why: compiling modules from source at start-up leaves glibc's malloc with a raised mmap threshold, and
    that changes the server's system calls per datagram (asyncio receives every datagram into a 256 KiB
    buffer, which at the default threshold costs an mmap, an mremap and a munmap each time). Run from a tree
    without __pycache__ (PYTHONDONTWRITEBYTECODE), the server would measure that accident, not the deployed
    server. The bytecode goes to a private prefix: nothing is written into the source tree.
    """
    with tempfile.TemporaryDirectory(prefix="bench-rendezvous-pyc-") as prefix:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = prefix
        warm = subprocess.run(
            [sys.executable, "-c", _WARM_UP], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        if warm.returncode != 0:
            raise BenchError(f"precompiling the server failed: {warm.stderr.strip()[-500:]}")
        yield env


def _wait_exec(pid: int, comm: str) -> None:
    """``ip netns exec`` and ``taskset`` exec in place: wait until the pid is the server itself (bounded)."""
    for _ in range(500):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm[:15]:
                return
        time.sleep(0.01)
    raise BenchError(f"pid {pid} never became {comm!r}")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _stop_server(proc: subprocess.Popen[Any], log: IO[str]) -> dict[str, int]:
    """SIGINT lets the server close and log its counters; SIGKILL when it has not within 5 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.seek(0)
    for line in log:
        if "counters:" in line:
            counters: dict[str, int] = ast.literal_eval(line.split("counters:", 1)[1].strip())
            return counters
    return {}


Observer = Callable[[int], subprocess.Popen[Any]]
"""Started with the server's pid once it runs; stopped (bounded) before the server is."""


def measure_network(
    sessions: int,
    window: int,
    trials: int,
    duration: float,
    profile_to: Path | None = None,
    observe: Observer | None = None,
) -> NetworkRun:
    """The real server in the lab's server node on CPU 0, the generator in r1 on CPU 1."""
    argv, comm = _server_command(profile_to)
    with _cached_bytecode() as env, Lab(two_nats(hops=1)) as lab, tempfile.TemporaryFile("w+") as log:
        proc = lab.node("server").popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
        )
        observer = None
        try:
            _wait_exec(proc.pid, comm)
            observer = observe(proc.pid) if observe else None
            plan = LoadPlan(
                (str(SERVER_ADDR), SERVER_PORT), proc.pid, sessions, window, 0.5, trials, duration
            )
            load = _generate(lab, plan)
            affinity = sorted(os.sched_getaffinity(proc.pid))
            rss = _rss_kib(proc.pid)
        finally:
            if observer is not None:
                _stop_observer(observer)
            counters = _stop_server(proc, log)
    if list_netns(f"{LAB_PREFIX}{lab.run_id}-"):
        raise BenchError(f"namespaces of lab {lab.run_id} survived: run `rawpunch cleanup`")
    return NetworkRun(load, sessions, window, duration, lab.run_id, affinity, counters, rss)


def _generate(lab: Lab, plan: LoadPlan) -> LoadRun:
    try:
        return lab.node(GENERATOR_NODE).call(run_load, plan, timeout=plan.budget() + 10.0)
    except RuntimeError as exc:  # the forked generator died without a result (a signal, say)
        raise BenchError(f"the load generator died: {exc}") from None


def _stop_observer(proc: subprocess.Popen[Any]) -> None:
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is exactly what it started
        proc.wait()


def profile_server(sessions: int, window: int) -> list[str]:
    """One short network run with the server under cProfile; its time split and hottest functions."""
    with tempfile.TemporaryDirectory(prefix="bench-rendezvous-") as tmp:
        path = Path(tmp) / "server.prof"
        measure_network(sessions, window, 2, 1.0, profile_to=path)
        if not path.exists():
            return ["(the profiled server wrote no profile)"]
        return server_profile_lines(path)


def _strace(out: Path, pid: int) -> subprocess.Popen[Any]:
    # The delay skips the interpreter's start-up and the joins: the census is of the steady state.
    script = 'sleep 1.2 && exec timeout -s INT 1 strace -c -f -o "$0" -p "$1"'
    return subprocess.Popen(
        ["sh", "-c", script, str(out), str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def syscall_census(sessions: int, window: int) -> list[str]:
    """System calls of the real server per reply it sent, counted by ``strace -c`` in a separate short run.

    cProfile cannot see these: a system call made inside a C function (an allocation inside recvfrom, say)
    is charged to that function's own time.
    """
    if shutil.which("strace") is None:
        return ["(strace is not installed: no system-call census)"]
    with tempfile.TemporaryDirectory(prefix="bench-rendezvous-") as tmp:
        out = Path(tmp) / "strace.txt"
        measure_network(sessions, window, 2, 1.0, observe=functools.partial(_strace, out))
        calls = _strace_calls(out) if out.exists() else {}
    replies = calls.get("sendto", 0)  # each INFO is answered by exactly one PENDING, one sendto
    if not replies:
        return ["(strace counted no sendto: no census)"]
    ranked = sorted(calls.items(), key=lambda item: item[1], reverse=True)[:10]
    return [f"{n / replies:6.2f} per reply  {name}" for name, n in ranked]


def _strace_calls(path: Path) -> dict[str, int]:
    """The calls column of an ``strace -c`` summary: % time, seconds, usecs/call, calls, [errors], name."""
    calls = {}
    for line in path.read_text().splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[3].isdigit() and cols[-1] != "total":
            calls[cols[-1]] = int(cols[3])
    return calls


# --- reporting ---------------------------------------------------------------------------------------------


def _median_spread(values: Sequence[float]) -> str:
    median, low, high = statistics.median(values), min(values), max(values)
    return f"{median:,.0f} msg/s (min {low:,.0f}, max {high:,.0f}; {len(values)} trials)"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def _median(trials: Sequence[Trial], value: Callable[[Trial], float]) -> float:
    return statistics.median(value(t) for t in trials)


def bottleneck(trials: Sequence[Trial]) -> str:
    server, busy = _median(trials, lambda t: t.server_share), _median(trials, lambda t: t.server_core_busy)
    if server >= 0.9:
        return "server-bound: its core was saturated"
    if busy >= 0.95:
        return f"CPU {SERVER_CPU} was shared: busy {busy:.0%}, the server got {server:.0%} (other work?)"
    if _median(trials, lambda t: t.generator_cpu / t.wall) >= 0.9:
        return "GENERATOR-bound: the rate is a lower bound for the server"
    return "neither core saturated: latency-bound (raise --window or --sessions)"


def rate_verdict(trials: Sequence[Trial]) -> str:
    """Met, NOT met, or inconclusive: a miss only counts when the server had its core to itself."""
    if _median(trials, lambda t: t.rate) >= TARGET_RATE:
        return _met(True)
    if _median(trials, lambda t: t.server_share) >= 0.9:
        return _met(False)
    per_cpu = _median(trials, lambda t: t.per_cpu_second)
    would = "would meet" if per_cpu >= TARGET_RATE else "would miss"
    return f"**inconclusive** (per server CPU-second it {would} the target)"


def network_lines(net: NetworkRun) -> list[str]:
    trials = net.load.trials
    setup = (
        f"`rawpunch server --rate {BENCH_RATE:.0f}` pinned to CPU {net.server_affinity} in lab {net.run_id}; "
        f"generator pinned to CPU {GENERATOR_CPU} in `{GENERATOR_NODE}`; {net.sessions} sessions x "
        f"{net.window} INFO long polls in flight"
    )
    per_cpu = _median(trials, lambda t: t.per_cpu_second)
    return [
        f"- Real server, one core: **median {_median_spread([t.rate for t in trials])}** of "
        f"{net.duration:g} s. Target >= {TARGET_RATE:,} msg/s: {rate_verdict(trials)}; "
        f"{bottleneck(trials)}. Per second of server CPU time: median {per_cpu:,.0f} messages.",
        f"- Setup: {setup}.",
        f"- {_cpu_line(trials)}",
        f"- Checks: {_checks(net)}",
    ]


def _cpu_line(trials: Sequence[Trial]) -> str:
    user = _median(trials, lambda t: t.server_user / t.replies * 1e6)
    system = _median(trials, lambda t: t.server_system / t.replies * 1e6)
    server = _median(trials, lambda t: t.server_share)
    server_busy = _median(trials, lambda t: t.server_core_busy)
    generator = _median(trials, lambda t: t.generator_cpu / t.wall)
    generator_busy = _median(trials, lambda t: t.generator_core_busy)
    return (
        f"Server CPU {server:.0%} of one core = {user + system:.1f} us/msg (user {user:.1f}, kernel "
        f"{system:.1f}); CPU {SERVER_CPU} busy {server_busy:.0%}. Generator CPU {generator:.0%} "
        f"(CPU {GENERATOR_CPU} busy {generator_busy:.0%})."
    )


def _checks(net: NetworkRun) -> str:
    load, c = net.load, net.server_counters
    dropped = sum(v for k, v in c.items() if k.startswith("dropped_"))
    return (
        f"{sum(t.unexpected for t in load.trials)} replies other than PENDING; the last reply of "
        f"{load.verified}/{net.sessions} sockets verified (MAC, type, transaction id); {load.lost} of "
        f"{load.sent:,} requests presumed lost; server counters: {c.get('datagrams', '?')} datagrams, "
        f"{c.get('rate_limited', 0)} rate-limited, {dropped} dropped; server RSS "
        f"{net.server_rss_kib / 1024:.1f} MiB at the end."
    )


def core_lines(core: CoreRun) -> list[str]:
    where = f"in-process `ServerCore.receive_datagram`, pre-built INFOs, CPU {SERVER_CPU}"
    return [
        f"- Protocol core alone ({where}; {core.messages:,} per trial): median {_median_spread(core.rates)}."
    ]


def memory_lines(mem: MemoryRun) -> list[str]:
    again = ""
    if mem.after_second_cycle is not None:
        again = f"; after a second fill and expire {mem.after_second_cycle:,.0f} B/session"
    return [
        f"- Memory: {mem.sessions:,} waiting sessions (one peer each from its own source address, "
        f"{len(BenchClient().sealed)}-byte sealed info): **{mem.per_session:,.0f} B/session** (tracemalloc). "
        f"Target <= {TARGET_SESSION_BYTES:,} B: {_met(mem.per_session <= TARGET_SESSION_BYTES)}.",
        f"- After `expire()` removed them: {mem.after_expire:,.0f} B/session left{again} (emptied dicts keep "
        "their table until they next grow or shrink, so what stays is bounded by the peak).",
        "- Largest allocation sites per waiting session: " + "; ".join(mem.sites) + ".",
    ]


def profile_lines(title: str, lines: list[str]) -> list[str]:
    return [f"- {title}:", "", "  ```", *(f"  {line}" for line in lines), "  ```", ""]


_HEADER = """\
# Benchmarks

Appended by `scripts/bench-rendezvous` (`--quick`: fewer, shorter trials), one dated section per run.
Method. The real `rawpunch server` runs inside a throwaway network-namespace lab, pinned to CPU 0, with a high
per-source `--rate`: the load generator's sockets share one source address, and the token bucket is still
checked on every message. Its bytecode is precompiled (into a private cache), as an installed package has it:
compiling from source at start-up changes glibc's malloc state and with it the system calls per datagram. The
generator, pinned to CPU 1 in the neighbouring router's namespace, joins one session per socket as a client
does, then drives INFO long polls closed-loop with a bounded window per socket. Every request is valid (fresh
transaction ids in sequence, a live cookie, a correct HMAC), so each PENDING counted went through the MAC
check, cookie check, anti-replay window, session state and a signed reply. Rates are medians of several timed
trials with their spread; the server's CPU time (/proc/<pid>/stat) tells whether the server or the generator
was the bottleneck. The same requests fed to an in-process `ServerCore` give the protocol core's own rate.
Memory is measured in-process with tracemalloc over sessions of one peer each, from its own source address,
that sent real REGISTER and INFO datagrams and waits for its partner; then again after `expire()` removed
them. When the rate target is missed, separate short runs (not counted in the figures) profile the real server
(cProfile; `strace -c` for system calls per reply) and the in-process core. Targets from the issue: >= 20,000
control messages/s on one core, <= 2 KiB per waiting session.
"""


def record(lines: list[str], host: Machine, quick: bool) -> None:
    """Append a dated section to BENCHMARKS.md, creating the file with its title and method first."""
    append_section("", host, quick, lines, _HEADER)


# --- command line ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench-rendezvous",
        description="Benchmark the rendezvous server (messages/s on one core, bytes per waiting session) "
        "and append the results to BENCHMARKS.md. Needs root and CPUs 0 and 1.",
    )
    p.add_argument("--quick", action="store_true", help="3 trials of 1 s instead of 5 of 2 s")
    p.add_argument("--trials", type=int, help="timed trials (default 5, quick 3)")
    p.add_argument("--duration", type=float, help="seconds per trial (default 2, quick 1)")
    p.add_argument("--sessions", type=int, default=32, help="generator sockets, one session each (max 64)")
    p.add_argument("--window", type=int, default=4, help="requests in flight per socket (default 4)")
    p.add_argument("--memory-sessions", type=int, default=10_000)
    p.add_argument("--profile", action="store_true", help="profile even when the target is met")
    p.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.trials = args.trials or (3 if args.quick else 5)
    args.duration = args.duration or (1.0 if args.quick else 2.0)
    if not 1 <= args.sessions <= ServerConfig.max_peers_per_source:  # peers per source address
        p.error(f"--sessions must be 1..{ServerConfig.max_peers_per_source}")
    if not 1 <= args.window <= WINDOW:  # beyond the anti-replay window, reordering could drop requests
        p.error(f"--window must be 1..{WINDOW}")
    if not 2 <= args.trials <= 20 or not 0.2 <= args.duration <= 10:
        p.error("--trials must be 2..20 and --duration 0.2..10 s")
    if not 100 <= args.memory_sessions <= 100_000:
        p.error("--memory-sessions must be 100..100000")


def run(args: argparse.Namespace) -> list[str]:
    say = functools.partial(print, flush=True)
    say(f"core alone: {args.trials} trials ...")
    core = measure_core(args.sessions, 5_000 if args.quick else 20_000, args.trials)
    say(f"  {_median_spread(core.rates)}")
    say(f"memory: {args.memory_sessions:,} waiting sessions under tracemalloc ...")
    mem = measure_memory(args.memory_sessions, second_cycle=not args.quick)
    say(f"  {mem.per_session:,.0f} B per waiting session")
    say(f"real server in a lab: {args.trials} trials of {args.duration:g} s ...")
    net = measure_network(args.sessions, args.window, args.trials, args.duration)
    per_cpu = _median(net.load.trials, lambda t: t.per_cpu_second)
    say(f"  {_median_spread([t.rate for t in net.load.trials])}; {bottleneck(net.load.trials)}")
    say(f"  {per_cpu:,.0f} messages per second of server CPU time")
    lines = [*network_lines(net), *core_lines(core), *memory_lines(mem)]
    if args.profile or _median(net.load.trials, lambda t: t.rate) < TARGET_RATE:
        say("profiling: the real server (cProfile, strace: separate runs) and the core ...")
        title = "Where the real server's event-loop time goes (cProfile of the server process, separate run; "
        title += "the profiler slows Python code more than system calls)"
        lines += profile_lines(title, profile_server(args.sessions, args.window))
        lines += profile_lines("Core alone, own time (cProfile)", profile_core(args.sessions, 5_000))
        census = "System calls per reply of the real server (strace -c, separate run)"
        lines += profile_lines(census, syscall_census(args.sessions, args.window))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    if os.geteuid() != 0:
        print(
            "bench-rendezvous: needs root (network namespaces): sudo scripts/bench-rendezvous",
            file=sys.stderr,
        )
        return 3
    if not {SERVER_CPU, GENERATOR_CPU} <= os.sched_getaffinity(0):
        print(f"bench-rendezvous: needs CPUs {SERVER_CPU} and {GENERATOR_CPU}", file=sys.stderr)
        return 1
    host = machine()
    if host.load > 0.5:
        print(
            f"bench-rendezvous: load average {host.load:.2f}: other work may skew the figures",
            file=sys.stderr,
        )
    try:
        lines = run(args)
    except BenchError as exc:
        print(f"bench-rendezvous: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the lab and the server are already gone (context managers, finally)
        print("bench-rendezvous: interrupted; nothing recorded", file=sys.stderr)
        return 130
    print("\n".join(lines))
    if not args.no_record:
        record(lines, host, args.quick)
        print(f"appended to {RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
