"""Benchmark of the rendezvous server: control messages per second on one core, bytes per waiting session.

Run as root: ``scripts/bench-rendezvous [--quick]``. Targets from the issue: at least 20,000 control messages
per second on one core, at most 2 KiB per waiting session. Three measurements:

network (the real path)
    ``rawpunch server`` runs in the ``server`` node of a throwaway lab (``two_nats(hops=1)``), pinned to
    CPU 0. A load generator, forked into the neighbouring router ``r1`` and pinned to CPU 1, joins one session
    per UDP socket the way a client does (REGISTER, COOKIE, REGISTER with the cookie, INFO answered PENDING)
    and then sends INFO long polls closed-loop with a bounded window in flight per socket. Every request is
    valid (fresh transaction ids in sequence, a live cookie, a correct HMAC), so each PENDING counted went
    through the rate limiter, MAC check, cookie check, anti-replay window, session state and a signed reply.
    The server's CPU time (/proc/<pid>/stat) shows whether the server or the generator was the bottleneck.
core
    The same INFO long polls, pre-built, fed to an in-process ``ServerCore``: the protocol core without
    sockets or the event loop. cProfile of this loop names the hot functions when the target is missed.
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
import gc
import hmac
import ipaddress
import itertools
import os
import platform
import pstats
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from rawpunch.lab.netns import Lab
from rawpunch.lab.topology import SERVER_ADDR, two_nats
from rawpunch.proto import codec
from rawpunch.proto.client import REGISTER_SIZE
from rawpunch.proto.codec import Attr, AttrValue, Endpoint, Message, MessageType
from rawpunch.proto.keys import SessionKeys, control_key
from rawpunch.proto.peerinfo import Capability, PeerInfo, encode_peer_info
from rawpunch.proto.replay import TxidSource
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

REPO = Path(__file__).resolve().parents[2]
RECORD = REPO / "BENCHMARKS.md"

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


def core_exchange(core: ServerCore, addr: Addr, now: float) -> Exchange:
    def exchange(data: bytes) -> bytes:
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
    profile: list[str] = field(default_factory=list)


def _bench_config() -> ServerConfig:
    return ServerConfig(tcp_port=SERVER_PORT, rate_per_source=BENCH_RATE, burst_per_source=2 * BENCH_RATE)


def _core_with_streams(sessions: int) -> tuple[ServerCore, list[tuple[InfoStream, Addr]]]:
    core = ServerCore(_bench_config(), _NOW)
    # One source address for all, as in the network run (the generator's sockets share r1's address).
    addrs = [("203.0.113.1", 40_000 + i) for i in range(sessions)]
    return core, [(join(BenchClient(), core_exchange(core, a, _NOW)), a) for a in addrs]


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


def measure_core(sessions: int, messages: int, trials: int, profile: bool) -> CoreRun:
    """In-process ServerCore rate on CPU 0 (the server's CPU in the network run), median over trials."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {SERVER_CPU})
    try:
        core, streams = _core_with_streams(sessions)
        per_stream = max(1, messages // sessions)
        _feed_core(core, _core_batch(streams, per_stream))  # warm-up: caches, allocator, branch predictors
        rates = [_feed_core(core, _core_batch(streams, per_stream)) for _ in range(trials)]
        hot = profile_core(core, _core_batch(streams, per_stream)) if profile else []
    finally:
        os.sched_setaffinity(0, previous)
    return CoreRun(per_stream * sessions, rates, hot)


def profile_core(core: ServerCore, batch: list[tuple[bytes, Addr]], top: int = 14) -> list[str]:
    """cProfile of the core loop: the functions with the most own time, as share of the total."""
    prof = cProfile.Profile()
    prof.runcall(_feed_core, core, batch)
    stats = pstats.Stats(prof)
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in table.values())
    rows = sorted(table.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        f"{tt / total:6.1%} own {ct / total:6.1%} cum {calls / len(batch):5.1f} calls/msg  "
        f"{_where(path, line, name)}"
        for (path, line, name), (_, calls, tt, ct, _) in rows
    ]


def _where(path: str, line: int, name: str) -> str:
    if path == "~":  # a builtin
        return name
    parts = Path(path).parts
    short = "/".join(parts[parts.index("rawpunch") :]) if "rawpunch" in parts else Path(path).name
    return f"{short}:{line}({name})"


# --- memory per waiting session ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryRun:
    sessions: int
    per_session: float
    """Traced bytes the server holds per waiting session."""
    after_expire: float
    """Traced bytes left after expire() removed them all, per former session."""
    after_second_cycle: float
    """The same after a second fill and expire: equal to after_expire when state is bounded."""
    sites: list[str]
    """Where the bytes of a waiting session are allocated (per session)."""


_MEMORY_SOURCES = int(ipaddress.IPv4Address("198.18.0.1"))  # RFC 2544 benchmarking range; data only here


def _fill(core: ServerCore, sessions: int, now: float) -> None:
    """Each session: one peer from its own source address, registered, INFO sent, waiting for the other."""
    for i in range(sessions):
        addr = (str(ipaddress.IPv4Address(_MEMORY_SOURCES + i)), 40_000 + i % 20_000)
        join(
            BenchClient(), core_exchange(core, addr, now)
        )  # the stream is dropped: only the server keeps state


def _waiting(core: ServerCore) -> int:
    return sum(1 for s in core.sessions.values() for p in s.peers if p is not None and p.waiting is not None)


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def measure_memory(sessions: int) -> MemoryRun:
    config = ServerConfig(tcp_port=SERVER_PORT, max_sessions=max(sessions, 10_000))
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
            raise BenchError(f"{_waiting(core)} of {sessions} sessions are waiting; the fill went wrong")
        later = _NOW + config.peer_idle_timeout + config.cookie_lifetime
        core.expire(later + 1.0)
        drained = _traced() - base
        _fill(core, sessions, later + 2.0)
        core.expire(later + 2.0 + config.peer_idle_timeout + config.cookie_lifetime)
        drained_again = _traced() - base
        if core.sessions:
            raise BenchError(f"expire() left {len(core.sessions)} sessions")
    finally:
        tracemalloc.stop()
    return MemoryRun(sessions, filled / sessions, drained / sessions, drained_again / sessions, sites)


def _sites(diff: list[tracemalloc.StatisticDiff], sessions: int, top: int = 8) -> list[str]:
    rows = [d for d in diff if d.size_diff > 0][:top]
    return [
        f"{d.size_diff / sessions:7.1f} B  {_where(d.traceback[0].filename, d.traceback[0].lineno, '')}"
        for d in rows
    ]


# --- the load generator (runs forked inside a lab namespace) -----------------------------------------------


@dataclass(frozen=True)
class LoadPlan:
    server: tuple[str, int]
    server_pid: int
    sessions: int
    window: int
    warmup: float
    trials: int
    duration: float
    cpu: int

    def budget(self) -> float:
        """Upper bound on the generator's run time: setup, warm-up, trials."""
        return SERVER_WAIT_S + self.sessions * 3 * REPLY_TIMEOUT_S + self.warmup + self.trials * self.duration


@dataclass(frozen=True)
class Trial:
    replies: int
    unexpected: int
    wall: float
    server_cpu: float
    generator_cpu: float

    @property
    def rate(self) -> float:
        return self.replies / self.wall


@dataclass(frozen=True)
class LoadRun:
    trials: list[Trial]
    sent: int
    replies: int
    lost: int
    verified: int
    """Sockets whose last reply decoded as a genuine PENDING (MAC, type, transaction id)."""


SERVER_WAIT_S = 10.0
REPLY_TIMEOUT_S = 2.0
_PRESIGN = 1024  # requests signed per socket before the clock starts
_REFILL = 256  # requests signed when a socket runs out (a few hundred microseconds, rarely)
_MAX_DRAIN = 64  # bounds one socket's turn, so every socket is served fairly
_STALL_S = 0.3  # no reply for this long: the requests in flight were lost (queue overflow); send afresh
_STALL_CHECK_S = 0.1


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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    deadline = time.monotonic() + SERVER_WAIT_S
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
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
    server_cpu: float
    generator_cpu: float


def _mark(flows: Sequence[_Flow], unexpected: int, server_pid: int) -> _Mark:
    return _Mark(
        time.perf_counter(),
        sum(f.replies for f in flows),
        unexpected,
        cpu_seconds(server_pid),
        time.process_time(),
    )


def _drive(flows: Sequence[_Flow], plan: LoadPlan) -> list[_Mark]:
    """Closed loop until the last trial ends; a mark at the end of the warm-up and of each trial."""
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
    except Exception:
        return False
    return True


def run_load(plan: LoadPlan) -> LoadRun:
    """The load generator; ``LabNode.call`` runs it in a forked child inside the generator's namespace."""
    os.sched_setaffinity(0, {plan.cpu})
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            for _ in range(plan.sessions)
        ]
        for sock in socks:
            sock.connect(plan.server)  # connected: send() without an address, and only the server's replies
        _wait_for_server(socks[0])
        clients, flows = [], []
        for sock in socks:
            sock.settimeout(REPLY_TIMEOUT_S)
            client = BenchClient()
            flows.append(_Flow(sock, join(client, _socket_exchange(sock))))
            clients.append(client)
            sock.settimeout(None)  # blocking sends; the loop reads with MSG_DONTWAIT
        marks = _drive(flows, plan)
        verified = sum(_verified(f, c) for f, c in zip(flows, clients, strict=True))
    trials = [
        Trial(
            b.replies - a.replies,
            b.unexpected - a.unexpected,
            b.at - a.at,
            b.server_cpu - a.server_cpu,
            b.generator_cpu - a.generator_cpu,
        )
        for a, b in itertools.pairwise(marks)
    ]
    return LoadRun(
        trials,
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
    server_affinity: list[int]
    server_counters: dict[str, int]
    server_rss_kib: int


def _server_argv() -> list[str]:
    rawpunch = Path(sys.executable).with_name("rawpunch")
    if not rawpunch.exists():
        raise BenchError(f"{rawpunch} is missing: install the package into the venv (scripts/setup)")
    listen = f"{SERVER_ADDR}:{SERVER_PORT}"
    return [
        "taskset",
        "-c",
        str(SERVER_CPU),
        str(rawpunch),
        "server",
        "--listen",
        listen,
        "--rate",
        str(BENCH_RATE),
    ]


def _wait_exec(pid: int, comm: str) -> None:
    """``ip netns exec`` and ``taskset`` exec in place: wait until the pid is the server itself (bounded)."""
    for _ in range(500):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                return
        time.sleep(0.01)
    raise BenchError(f"pid {pid} never became {comm!r}")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _stop_server(proc: subprocess.Popen[Any], log: IO[str]) -> dict[str, int]:
    """SIGINT lets the server close and log its counters; SIGKILL if it does not within 5 s."""
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


def measure_network(sessions: int, window: int, warmup: float, trials: int, duration: float) -> NetworkRun:
    with Lab(two_nats(hops=1)) as lab, tempfile.TemporaryFile("w+") as log:
        proc = lab.node("server").popen(
            _server_argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            _wait_exec(proc.pid, "rawpunch")
            plan = LoadPlan(
                (str(SERVER_ADDR), SERVER_PORT),
                proc.pid,
                sessions,
                window,
                warmup,
                trials,
                duration,
                GENERATOR_CPU,
            )
            load = lab.node(GENERATOR_NODE).call(run_load, plan, timeout=plan.budget() + 10.0)
            affinity = sorted(os.sched_getaffinity(proc.pid))
            rss = _rss_kib(proc.pid)
        finally:
            counters = _stop_server(proc, log)
    return NetworkRun(load, sessions, window, duration, affinity, counters, rss)


# --- reporting ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    cores: int
    cpu: str
    kernel: str
    python: str
    load: str
    commit: str


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def machine() -> Machine:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    # --no-optional-locks: reading the status must not rewrite the index of a tree others are working in.
    dirty = _git("--no-optional-locks", "status", "--porcelain")
    commit = (_git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if dirty else "")
    load = Path("/proc/loadavg").read_text().split()[0]
    return Machine(os.cpu_count() or 0, model, platform.release(), platform.python_version(), load, commit)


def _median_spread(values: Sequence[float]) -> str:
    return f"{statistics.median(values):,.0f} msg/s (min {min(values):,.0f}, max {max(values):,.0f}, {len(values)} trials)"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def _bottleneck(net: NetworkRun) -> str:
    server = statistics.median(t.server_cpu / t.wall for t in net.load.trials)
    generator = statistics.median(t.generator_cpu / t.wall for t in net.load.trials)
    if server >= 0.9:
        return "server-bound (its core saturated)"
    if generator >= 0.9:
        return "GENERATOR-BOUND: the figure is a lower bound for the server"
    return "neither core saturated: latency-bound (raise --window or --sessions)"


def network_lines(net: NetworkRun) -> list[str]:
    trials = net.load.trials
    rates = [t.rate for t in trials]
    server = statistics.median(t.server_cpu / t.wall for t in trials)
    generator = statistics.median(t.generator_cpu / t.wall for t in trials)
    per_msg = statistics.median(t.server_cpu / t.replies * 1e6 for t in trials if t.replies)
    c = net.server_counters
    dropped = sum(v for k, v in c.items() if k.startswith("dropped_"))
    unexpected = sum(t.unexpected for t in trials)
    return [
        f"- Real server, one core: **median {_median_spread(rates)}** of {net.duration:g} s each; "
        f"`rawpunch server --rate {BENCH_RATE:.0f}` on CPU {net.server_affinity}, generator on CPU {GENERATOR_CPU} "
        f"in `{GENERATOR_NODE}`, {net.sessions} sessions x {net.window} INFO long polls in flight. "
        f"Server CPU {server:.0%} of one core ({per_msg:.1f} us/msg), generator CPU {generator:.0%}: "
        f"{_bottleneck(net)}. Target >= {TARGET_RATE:,} msg/s: {_met(statistics.median(rates) >= TARGET_RATE)}.",
        f"- Checks: replies other than PENDING {unexpected}; last reply of {net.load.verified}/{net.sessions} "
        f"sockets verified (MAC, type, txid); requests presumed lost {net.load.lost} of {net.load.sent:,}; "
        f"server counters: datagrams {c.get('datagrams', '?')}, rate-limited {c.get('rate_limited', 0)}, "
        f"dropped {dropped}; server RSS {net.server_rss_kib / 1024:.1f} MiB at the end.",
    ]


def core_lines(core: CoreRun) -> list[str]:
    lines = [
        f"- Protocol core alone (in-process `ServerCore.receive_datagram`, pre-built INFOs, CPU {SERVER_CPU}, "
        f"{core.messages:,} per trial): median {_median_spread(core.rates)}."
    ]
    if core.profile:
        lines += [
            "- Profile of the core (cProfile, own time; the profiler inflates absolute times):",
            "",
            "```",
        ]
        lines += [*core.profile, "```", ""]
    return lines


def memory_lines(mem: MemoryRun) -> list[str]:
    return [
        f"- Memory: {mem.sessions:,} waiting sessions (one peer each, own source address, 116-byte sealed "
        f"info): **{mem.per_session:,.0f} B/session** (tracemalloc). After `expire()`: {mem.after_expire:,.0f} "
        f"B/session left; after a second fill and expire: {mem.after_second_cycle:,.0f} B/session. "
        f"Target <= {TARGET_SESSION_BYTES:,} B: {_met(mem.per_session <= TARGET_SESSION_BYTES)}.",
        "- Where a waiting session's bytes are allocated: "
        + "; ".join(s.strip() for s in mem.sites[:5])
        + ".",
    ]


_HEADER = """# Benchmarks

Appended by `scripts/bench-rendezvous` (`--quick` runs fewer, shorter trials); one dated section per run.
Method: the real `rawpunch server` runs inside a throwaway network-namespace lab, pinned to CPU 0, with a
high per-source `--rate` because the load generator's sockets share one source address (the token bucket is
still checked on every message). The generator, pinned to CPU 1 in the neighbouring router's namespace, joins
one session per socket as a client does and then drives INFO long polls closed-loop with a bounded window per
socket; every request is valid (fresh transaction ids in sequence, a live cookie, a correct HMAC), so every
PENDING counted went through the MAC check, cookie check, anti-replay window, session state and a signed reply.
Rates are medians of several timed trials with their spread; the server's CPU time (/proc/<pid>/stat) tells
whether the server or the generator was the bottleneck. The same requests fed to an in-process `ServerCore`
give the protocol core's own rate. Memory is measured in-process with tracemalloc: N sessions, each one peer
from its own source address that sent real REGISTER and INFO datagrams and waits for its partner, then again
after `expire()` removed them. Targets from the issue: >= 20,000 control messages/s on one core and <= 2 KiB
per waiting session.
"""


def record(lines: list[str], host: Machine, quick: bool) -> None:
    """Append a dated section to BENCHMARKS.md, creating it with its title and method first."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        f"## {stamp} - commit {host.commit}{' (quick)' if quick else ''}",
        "",
        f"- Machine: {host.cores} cores, {host.cpu}; kernel {host.kernel}; Python {host.python}; "
        f"1-minute load average at start {host.load}.",
    ]
    text = "\n".join([*head, *lines]).rstrip() + "\n"
    existing = RECORD.read_text() if RECORD.exists() else _HEADER
    RECORD.write_text(existing.rstrip() + "\n\n" + text)


# --- command line ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench-rendezvous",
        description="Benchmark the rendezvous server (messages/s on one core, bytes per waiting session) "
        "and append the results to BENCHMARKS.md. Needs root and two cores.",
    )
    p.add_argument("--quick", action="store_true", help="3 trials of 1 s instead of 5 of 2 s")
    p.add_argument("--trials", type=int, help="timed trials (default 5, quick 3)")
    p.add_argument("--duration", type=float, help="seconds per trial (default 2, quick 1)")
    p.add_argument("--sessions", type=int, default=32, help="generator sockets, one session each (max 64)")
    p.add_argument("--window", type=int, default=4, help="requests in flight per socket")
    p.add_argument("--memory-sessions", type=int, default=10_000)
    p.add_argument("--profile", action="store_true", help="profile the core even when the target is met")
    p.add_argument("--no-record", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.trials = args.trials or (3 if args.quick else 5)
    args.duration = args.duration or (1.0 if args.quick else 2.0)
    # The server admits at most 64 peers per source address (ServerConfig.max_peers_per_source).
    if not 1 <= args.sessions <= 64:
        p.error("--sessions must be 1..64")
    if not 1 <= args.window <= 64:  # beyond the 64-entry anti-replay window, reordering could drop requests
        p.error("--window must be 1..64")
    if not 2 <= args.trials <= 20 or not 0.2 <= args.duration <= 10:
        p.error("--trials must be 2..20 and --duration 0.2..10 s")
    if not 100 <= args.memory_sessions <= 100_000:
        p.error("--memory-sessions must be 100..100000")


def run(args: argparse.Namespace) -> list[str]:
    core = measure_core(args.sessions, 5_000 if args.quick else 20_000, args.trials, profile=False)
    print(f"core: {_median_spread(core.rates)}", flush=True)
    mem = measure_memory(args.memory_sessions)
    print(f"memory: {mem.per_session:,.0f} B per waiting session", flush=True)
    net = measure_network(args.sessions, args.window, 0.5, args.trials, args.duration)
    print(f"network: {_median_spread([t.rate for t in net.load.trials])}", flush=True)
    if args.profile or statistics.median(t.rate for t in net.load.trials) < TARGET_RATE:
        core = CoreRun(core.messages, core.rates, measure_core(args.sessions, 5_000, 2, profile=True).profile)
    return [*network_lines(net), *core_lines(core), *memory_lines(mem)]


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
    if len(os.sched_getaffinity(0)) < 2 or not {SERVER_CPU, GENERATOR_CPU} <= os.sched_getaffinity(0):
        print(f"bench-rendezvous: needs CPUs {SERVER_CPU} and {GENERATOR_CPU}", file=sys.stderr)
        return 1
    host = machine()
    try:
        lines = run(args)
    except BenchError as exc:
        print(f"bench-rendezvous: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    if not args.no_record:
        record(lines, host, args.quick)
        print(f"appended to {RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
