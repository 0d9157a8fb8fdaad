"""Link impairment for the lab's core: latency, jitter and loss on what a core router forwards.

Two backends, one request (``Impairment``):

* **netem** (``tc qdisc replace dev IF root netem delay D J loss P%``) on every interface of the router, so
  each forwarded packet is impaired once, on its way out. netem's jitter without a distribution table is
  uniform in ``[D - J, D + J]``; it reorders packets whose delays cross, and so does the userspace backend.
* **userspace** (this module run as ``python -m rawpunch.lab.impair``) where the kernel lacks ``sch_netem``
  (this machine's does: FACTS.md). ``FORWARD -j NFQUEUE --queue-bypass`` hands every forwarded packet to
  the process, which drops a share ``loss`` of them at once and holds the rest, giving each its ACCEPT
  verdict ``D +- uniform(J)`` later (NFQUEUE lets a verdict wait: the kernel keeps the packet meanwhile).
  It asks only for packet metadata (``COPY_META``): nothing is copied or rewritten. If the process dies,
  ``--queue-bypass`` lets traffic through unimpaired rather than blackholing the lab.

``Lab`` picks netem when it works in the router's namespace and the userspace process otherwise
(``backend="auto"``). The schedule (``Schedule``: which packet is dropped, when each is released) and the
holding queue (``Held``) are pure and take the time as an argument, so they test without root; the NFQUEUE
loop is the adapter.

Measuring it (``ping`` from one node, ``python -m rawpunch.lab.impair echo`` in another): UDP echoes paced at
a fixed interval, each stamped with ``CLOCK_MONOTONIC`` when sent, when the echo server received it and when
it came back. Every network namespace shares the one monotonic clock, so the two one-way delays are measured
directly; one-way loss comes from the server's count of requests (asked for at the end, repeatedly until an
answer gets through) and the count of echoes that came back.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import logging
import math
import os
import random
import select
import signal
import socket
import statistics
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Generic, Literal, TypeVar

from rawpunch.lab.profiles import iptables_empty, iptables_rule, iptables_table

log = logging.getLogger(__name__)

ImpairBackend = Literal["auto", "netem", "userspace"]
#: The NFQUEUE number of the impairment process in its router's namespace (queue numbers are per netns).
IMPAIR_QUEUE = 0x5310
#: Kernel queue bound: at 20 ms and 100k packets/s, 2000 packets are held at once.
QUEUE_MAX_LEN = 16384
READY_LINE = "ready"
MAX_DELAY_MS = 10_000.0
T = TypeVar("T")


@dataclass(frozen=True)
class Impairment:
    """What a core router does to each packet it forwards: delay ``delay_ms`` +- ``jitter_ms`` (uniform),
    and drop it with probability ``loss``. ``seed`` fixes the userspace backend's random choices."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    seed: int | None = None
    backend: ImpairBackend = "auto"

    def __post_init__(self) -> None:
        for name in ("delay_ms", "jitter_ms", "loss"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"impairment: {name} must be a finite number, got {value!r}")
        if not 0 <= self.delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"impairment: delay_ms must be in 0..{MAX_DELAY_MS:g}, got {self.delay_ms}")
        if not 0 <= self.jitter_ms <= self.delay_ms:
            raise ValueError(f"impairment: jitter_ms must be in 0..delay_ms, got {self.jitter_ms}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"impairment: loss must be a share in [0, 1), got {self.loss}")
        if self.backend not in ("auto", "netem", "userspace"):
            raise ValueError(f"impairment: backend {self.backend!r} is not auto, netem or userspace")

    @property
    def active(self) -> bool:
        return bool(self.delay_ms or self.loss)

    def netem_args(self) -> list[str]:
        """The netem part of ``tc qdisc replace dev IF root netem ...``."""
        args = ["delay", f"{self.delay_ms:g}ms"]
        if self.jitter_ms:
            args.append(f"{self.jitter_ms:g}ms")
        if self.loss:
            args += ["loss", f"{self.loss * 100:g}%"]
        return args

    def process_args(self) -> list[str]:
        """Command-line arguments of the userspace process (``python -m rawpunch.lab.impair``)."""
        args = [
            "--delay-ms",
            f"{self.delay_ms!r}",
            "--jitter-ms",
            f"{self.jitter_ms!r}",
            "--loss",
            f"{self.loss!r}",
        ]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        return args

    def __str__(self) -> str:
        return f"delay {self.delay_ms:g} ms +- {self.jitter_ms:g} ms, loss {self.loss:.2%}"


def iptables_restore(impairment: Impairment, queue_num: int = IMPAIR_QUEUE) -> str:
    """The router's filter table for the userspace backend: everything forwarded goes to the queue."""
    rule = iptables_rule(
        f"FORWARD -j NFQUEUE --queue-num {queue_num} --queue-bypass", f"impairment: {impairment}"
    )
    return "\n".join(iptables_table("filter", [rule])) + "\n"


def iptables_undo() -> str:
    return iptables_empty("filter")


def parse_impairment(text: str) -> Impairment:
    """``delay=20,jitter=5,loss=0.02[,seed=1][,backend=userspace]`` (milliseconds, loss as a share)."""
    keys = {"delay": "delay_ms", "jitter": "jitter_ms", "loss": "loss", "seed": "seed", "backend": "backend"}
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            raise ValueError(f"impairment {text!r}: expected key=value with keys {', '.join(keys)}")
        if key == "backend":
            values[keys[key]] = value
        elif key == "seed":
            values[keys[key]] = int(value)
        else:
            values[keys[key]] = float(value)
    return Impairment(**values)


# --- the pure core ------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    """Decides each packet's fate: ``release_at(now)`` is when to let it go, or None to drop it."""

    impairment: Impairment
    rng: random.Random = field(default_factory=random.Random)

    def release_at(self, now: float) -> float | None:
        imp = self.impairment
        if imp.loss and self.rng.random() < imp.loss:
            return None
        delay_ms = imp.delay_ms
        if imp.jitter_ms:
            delay_ms += self.rng.uniform(-imp.jitter_ms, imp.jitter_ms)
        return now + max(delay_ms, 0.0) / 1000.0


class Held(Generic[T]):
    """Items waiting for their release time (a heap; ties keep arrival order)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, release_at: float, item: T) -> None:
        heapq.heappush(self._heap, (release_at, next(self._counter), item))

    def next_release(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> Iterator[T]:
        """Pop and yield every item whose time has come, earliest first."""
        while self._heap and self._heap[0][0] <= now:
            yield heapq.heappop(self._heap)[2]

    def drain(self) -> Iterator[T]:
        while self._heap:
            yield heapq.heappop(self._heap)[2]


# --- the NFQUEUE adapter (runs in the router's namespace) ---------------------------------------------------


class _Stop(Exception):
    """Raised by the SIGTERM/SIGINT handler to leave the loop."""


def _on_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def serve(impairment: Impairment, queue_num: int) -> None:
    """Bind the queue, say ``ready`` on stdout, then impair until SIGTERM (held packets are released)."""
    from netfilterqueue import COPY_META, NetfilterQueue  # noqa: PLC0415 - only the process needs it

    schedule = Schedule(impairment, random.Random(impairment.seed))
    held: Held[Any] = Held()
    counters = {"packets": 0, "dropped": 0}

    def on_packet(pkt: Any) -> None:
        counters["packets"] += 1
        now = time.monotonic()
        release = schedule.release_at(now)
        if release is None:
            counters["dropped"] += 1
            pkt.drop()
        elif release <= now:
            pkt.accept()
        else:
            held.push(release, pkt)  # the verdict waits; the kernel keeps the packet

    nfq = NetfilterQueue()
    nfq.bind(queue_num, on_packet, max_len=QUEUE_MAX_LEN, mode=COPY_META, sock_len=8 << 20)
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    print(READY_LINE, flush=True)
    fd = nfq.get_fd()
    try:
        while True:
            _release_due(held)
            nxt = held.next_release()
            timeout = None if nxt is None else max(nxt - time.monotonic(), 0.0)
            ready, _, _ = select.select([fd], [], [], timeout)
            if ready:
                nfq.run(block=False)
    except _Stop:
        pass
    finally:
        for pkt in held.drain():
            pkt.accept()
        nfq.unbind()
        log.info(
            "impairment %s: %d packets, %d dropped", impairment, counters["packets"], counters["dropped"]
        )


def _release_due(held: Held[Any]) -> None:
    for pkt in held.due(time.monotonic()):
        pkt.accept()


# --- measuring it -------------------------------------------------------------------------------------------

_PROBE = struct.Struct("!4sIq")  # magic, sequence number, send time (ns)
_ECHO = struct.Struct("!4sIqq")  # ... and the server's receive time (ns)
_MAGIC, _STATS = b"rpim", b"rpst"


@dataclass(frozen=True)
class PingResult:
    """What ``ping`` measured: requests sent, requests the server got, echoes back, one-way delays (ms)."""

    sent: int
    server_received: int
    received: int
    forward_ms: tuple[float, ...]
    backward_ms: tuple[float, ...]

    @property
    def forward_loss(self) -> float:
        return 1 - self.server_received / self.sent

    @property
    def backward_loss(self) -> float:
        return 1 - self.received / self.server_received

    def median_ms(self) -> tuple[float, float]:
        return statistics.median(self.forward_ms), statistics.median(self.backward_ms)

    def jitter_ms(self) -> tuple[float, float]:
        """Standard deviations of the one-way delays (uniform +-J has J / sqrt(3))."""
        return statistics.pstdev(self.forward_ms), statistics.pstdev(self.backward_ms)

    def __str__(self) -> str:
        fwd, back = self.median_ms()
        jf, jb = self.jitter_ms()
        return (
            f"{self.sent} sent, {self.server_received} arrived, {self.received} echoed back; one-way median "
            f"{fwd:.2f} / {back:.2f} ms, sd {jf:.2f} / {jb:.2f} ms, loss {self.forward_loss:.2%} / "
            f"{self.backward_loss:.2%} (forward / backward)"
        )


def echo_server(port: int, lifetime_s: float) -> None:
    """UDP echo that stamps each request with its arrival time; answers ``stats`` with its request count."""
    received = 0
    deadline = time.monotonic() + lifetime_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("0.0.0.0", port))
        print(READY_LINE, flush=True)
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                continue
            data, peer = sock.recvfrom(64)
            now = time.monotonic_ns()
            if data[:4] == _MAGIC and len(data) == _PROBE.size:
                received += 1
                sock.sendto(data + struct.pack("!q", now), peer)
            elif data[:4] == _STATS:
                sock.sendto(_STATS + struct.pack("!I", received), peer)


def ping(host: str, port: int, count: int, interval_s: float, drain_s: float) -> PingResult:
    """Send *count* echo requests every *interval_s*, collect echoes until *drain_s* after the last (longer
    than any echo can be held: twice the impairment's delay + jitter, and a margin), then ask for the
    server's count."""
    forward: list[float] = []
    backward: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.connect((host, port))
        start = time.monotonic()
        for seq in range(count):
            _collect(sock, start + seq * interval_s, forward, backward)
            sock.send(_PROBE.pack(_MAGIC, seq, time.monotonic_ns()))
        _collect(sock, time.monotonic() + drain_s, forward, backward)
        server_received = _server_count(sock, drain_s)
    return PingResult(count, server_received, len(forward), tuple(forward), tuple(backward))


def _collect(sock: socket.socket, until: float, forward: list[float], backward: list[float]) -> None:
    """Read echoes until the monotonic time *until*."""
    while (left := until - time.monotonic()) > 0 or select.select([sock], [], [], 0)[0]:
        ready, _, _ = select.select([sock], [], [], max(left, 0.0))
        if not ready:
            continue
        data = sock.recv(64)
        now = time.monotonic_ns()
        if data[:4] == _MAGIC and len(data) == _ECHO.size:
            _, _, sent, arrived = _ECHO.unpack(data)
            forward.append((arrived - sent) / 1e6)
            backward.append((now - arrived) / 1e6)


def _server_count(sock: socket.socket, wait_s: float, attempts: int = 100) -> int:
    """The server's request count; the question and its answer cross the impairment too, so retry."""
    for _ in range(attempts):
        sock.send(_STATS)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            data = sock.recv(64)
            if data[:4] == _STATS:
                count: int = struct.unpack("!I", data[4:8])[0]
                return count
    raise TimeoutError(f"the echo server did not tell its count ({attempts} attempts)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["echo"]:
        echo = argparse.ArgumentParser(prog="python -m rawpunch.lab.impair echo")
        echo.add_argument("--port", type=int, required=True)
        echo.add_argument("--lifetime", type=float, default=120.0)
        opts = echo.parse_args(argv[1:])
        echo_server(opts.port, opts.lifetime)
        return 0
    parser = argparse.ArgumentParser(prog="python -m rawpunch.lab.impair", description=__doc__.split("\n")[0])
    parser.add_argument("--queue", type=int, default=IMPAIR_QUEUE)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"impair[{os.getpid()}] %(message)s", stream=sys.stderr)
    imp = Impairment(args.delay_ms, args.jitter_ms, args.loss, args.seed, backend="userspace")
    serve(imp, args.queue)
    return 0


if __name__ == "__main__":
    sys.exit(main())
