"""The probe adapter: sockets, raw SYNs and captures on the host behind the NAT (root).

It gathers the ``Observations`` that ``classify`` turns into a ``NatBehaviour`` (the theory is there).
The control conversation is the rendezvous protocol under a fresh random session: register, PROBE
HELLO (the server's second address and port), TCP discoveries to the server's four listeners, PROBE
FILTER / SIMOPEN / UNSOLICITED (the server's crafted SYNs leave before its answer), a barrier echo over
a held connection, PROBE REACTION. One raw TCP socket captures the SYNs that reach this host; one raw
IP socket sends the low-TTL simultaneous-open SYN and the hairpin SYN.

A server without ``--alt-address`` answers PROBE with NOT_SUPPORTED: the probe then still reports the
allocation, the NAT's presence and the hops, and ``unknown`` for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from rawpunch.probe import cache, packets
from rawpunch.probe.classify import Observations, classify, priming
from rawpunch.probe.result import NatBehaviour
from rawpunch.probe.timers import measure_timers
from rawpunch.proto.client import ProbeAnswer, frame
from rawpunch.proto.codec import Endpoint, ErrorCode, ProbeKind, Reaction
from rawpunch.punch import pathprobe
from rawpunch.punch.rawio import RawIOError, RawSender
from rawpunch.punch.segment import Flags, Segment
from rawpunch.rendezvous.client import RendezvousClient, RendezvousError

log = logging.getLogger("rawpunch.probe")

#: Port of our public address for the unsolicited SYN: below every allocator's range, and nothing of
#: this host listens there during the probe (the SYN must find no mapping).
UNSOLICITED_PORT = 1023
#: Offsets of the probe's local ports from a random base: mapping, allocation (non-monotonic, so that
#: sequential allocation cannot look like port preservation), filtering, simultaneous open, hairpin.
MAPPING, FILTER, SIMOPEN, HAIRPIN = 0, 12, 14, 16
ALLOCATION = (1, 5, 3, 9)
PORT_SPAN = 24
STEP_TIMEOUT = 3.0
#: What a server without the probe part (``--alt-address``) leaves undecided.
_UNTESTED = "mapping, filtering, unsolicited SYN, simultaneous open and hairpin unknown"


class ProbeError(Exception):
    """The probe could not run at all; ``str()`` says why and what to do."""


@dataclass
class _Run:
    client: RendezvousClient
    server: Endpoint
    base: int
    capture: socket.socket
    sender: RawSender
    local_address: str = ""
    alt: Endpoint | None = None
    probe_port: int | None = None
    held: list[socket.socket] = field(default_factory=list)
    syns: list[packets.Captured] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def main_p2(self) -> Endpoint:
        assert self.probe_port is not None
        return Endpoint(self.server.host, self.probe_port)


# --- sockets ----------------------------------------------------------------------------------------------


def _raw_sockets() -> tuple[socket.socket, RawSender]:
    """The capture (closed again if anything after its creation fails) and the sender, made last."""
    with contextlib.ExitStack() as undo:
        try:
            capture = undo.enter_context(socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
            capture.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
            packets.attach_filter(capture, packets.SYN_FILTER)  # bare SYNs only: all the probe looks for
            capture.setblocking(False)
            sender = RawSender()
        except (PermissionError, RawIOError):
            raise ProbeError(
                "rawpunch probe needs root: it captures SYNs and sends crafted ones (sudo)"
            ) from None
        undo.pop_all()
    return capture, sender


def _free_base() -> int:
    """A random base whose PORT_SPAN ports are all free (random per run: no TIME_WAIT of an earlier run)."""
    for _ in range(20):
        base = random.randrange(40000, 60000 - PORT_SPAN)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + PORT_SPAN):
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return base
    raise ProbeError("found no 24 free local TCP ports in 40000-59999")


def _send_syn(run: _Run, src_port: int, dst: Endpoint, ttl: int = 64) -> None:
    seq = int.from_bytes(os.urandom(4))
    run.sender.send(Segment(Endpoint(run.local_address, src_port), dst, seq=seq, flags=Flags.SYN, ttl=ttl))


def _drain(run: _Run) -> None:
    while True:
        try:
            data = run.capture.recv(256)
        except (BlockingIOError, InterruptedError):
            return
        found = packets.parse(data)
        if found is not None and found.bare_syn:
            run.syns.append(found)


def _syns_to(run: _Run, port: int) -> list[Endpoint]:
    _drain(run)
    return [s.src for s in run.syns if s.dst.port == port]


# --- the control conversation -----------------------------------------------------------------------------


async def _discover(run: _Run, local_port: int, remote: Endpoint, hold: bool) -> Endpoint:
    """The public endpoint of a TCP flow from *local_port* to *remote*; with *hold*, keep it open."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        sock.bind(("0.0.0.0", local_port))
        await asyncio.wait_for(loop.sock_connect(sock, (remote.host, remote.port)), STEP_TIMEOUT)
        await loop.sock_sendall(sock, frame(run.client.core.discovery_request(local_port)))
        (length,) = struct.unpack("!H", await _recv(sock, 2))
        mapping = run.client.core.discovery_response(await _recv(sock, length))
    except BaseException:
        sock.close()
        raise
    if hold:
        run.held.append(sock)
    else:
        sock.close()
    return mapping.public


async def _recv(sock: socket.socket, n: int, timeout: float = STEP_TIMEOUT) -> bytes:
    loop, buf = asyncio.get_running_loop(), b""
    while len(buf) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(buf)), timeout)
        if not chunk:
            raise ConnectionError("the server closed the connection early")
        buf += chunk
    return buf


async def _barrier(run: _Run, sock: socket.socket) -> None:
    """A byte echoed over a held connection through our NAT: all probe SYNs before it have been handled."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"B")
    await _recv(sock, 1)


async def _ask(run: _Run, kind: ProbeKind, **args: int) -> ProbeAnswer:
    answer = await run.client.probe(kind, **args)
    log.debug("%s: budget %d, SYNs from %s", kind.name, answer.budget, [str(s) for s in answer.sources])
    return answer


# --- the steps --------------------------------------------------------------------------------------------


async def _hello(run: _Run) -> bool:
    try:
        answer = await _ask(run, ProbeKind.HELLO)
    except RendezvousError as exc:
        if exc.code is not ErrorCode.NOT_SUPPORTED:
            raise
        run.notes.append(f"{exc}: {_UNTESTED}")
        return False
    run.alt, run.probe_port = answer.alt_address, answer.probe_port
    if run.alt is None or run.probe_port is None:
        run.notes.append(f"the server's PROBE_ACK named no second address or port: {_UNTESTED}")
        return False
    return True


async def _mapping(run: _Run) -> tuple[Endpoint, Endpoint, Endpoint]:
    assert run.alt is not None
    port = run.base + MAPPING
    seen_main = await _discover(run, port, run.server, hold=False)
    seen_p2 = await _discover(run, port, run.main_p2, hold=True)
    seen_alt = await _discover(run, port, run.alt, hold=True)
    return seen_main, seen_p2, seen_alt


async def _allocation(run: _Run) -> tuple[tuple[int, ...], tuple[int, ...]]:
    local = tuple(run.base + off for off in ALLOCATION)
    public = [(await _discover(run, port, run.server, hold=False)).port for port in local]
    return local, tuple(public)


async def _crafted_steps(run: _Run, obs: dict[str, Any], priming_ttl: int, offenders: dict[int, str]) -> None:
    """Filtering, simultaneous open, unsolicited SYN and hairpin: one barrier for all of them."""
    filter_port, simopen_port = run.base + FILTER, run.base + SIMOPEN
    public_f = await _discover(run, filter_port, run.main_p2, hold=True)
    await _discover(run, simopen_port, run.main_p2, hold=True)
    barrier = run.held[0]  # the mapping step's main:P2 connection: not touched by any probe SYN
    simopen_ok = _priming_stops_short(offenders, priming_ttl, run.server.host)
    if simopen_ok:
        _send_syn(run, simopen_port, run.server, ttl=priming_ttl)  # dies one hop past our NAT
    else:
        run.notes.append(f"simultaneous open not tested: TTL {priming_ttl} may reach the server")
    nat = public_f.host != run.local_address
    if nat:
        _send_syn(run, run.base + HAIRPIN, public_f)
    filter_answer = await _ask(run, ProbeKind.FILTER, local_port=filter_port)
    simopen_answer = await _ask(run, ProbeKind.SIMOPEN, local_port=simopen_port) if simopen_ok else None
    unsolicited = await _ask(run, ProbeKind.UNSOLICITED, target_port=UNSOLICITED_PORT)
    await _barrier(run, barrier)
    reached = _syns_to(run, filter_port)
    same, other = filter_answer.sources
    obs["filter_same_address"], obs["filter_other_address"] = same in reached, other in reached
    if simopen_answer is not None:
        obs["simultaneous_open"] = simopen_answer.sources[0] in _syns_to(run, simopen_port)
    obs["unsolicited_reached_host"] = unsolicited.sources[0] in _syns_to(run, UNSOLICITED_PORT)
    if nat:
        obs["hairpin_sources"] = tuple(
            ep.host for ep in reached if ep not in filter_answer.sources and ep.host != run.server.host
        )
    obs["reaction"] = (await _ask(run, ProbeKind.REACTION)).reaction or Reaction.NONE


def _priming_stops_short(offenders: dict[int, str], ttl: int, server: str) -> bool:
    """A router (not the server) answered the traceroute at this TTL: the SYN dies before the server."""
    router = offenders.get(ttl)
    return router is not None and router != server


def _local_address(server: Endpoint) -> str:
    """The source address toward *server*; ProbeError if there is no route."""
    try:
        return cache.source_address(server.host, server.port)
    except OSError as exc:
        raise ProbeError(f"cannot reach the rendezvous server {server}: {exc.strerror}") from None


async def probe(server: Endpoint, *, timers: bool = False, timer_limit: float = 16.0) -> NatBehaviour:
    """Probe the NAT between this host and *server*; raises ProbeError / RendezvousError if it cannot."""
    if os.geteuid() != 0:
        raise ProbeError("rawpunch probe needs root: it captures SYNs and sends crafted ones (sudo)")
    if ":" in server.host:
        raise ProbeError(f"{server}: the probe speaks IPv4 only (its crafted SYNs are IPv4)")
    started = time.monotonic()
    local, base = _local_address(server), _free_base()
    capture, sender = _raw_sockets()
    try:
        traceroute = asyncio.get_running_loop().run_in_executor(None, pathprobe.probe_offenders, server)
        client = RendezvousClient(server, os.urandom(16).hex(), request_timeout=STEP_TIMEOUT)
        run = _Run(client, server, base, capture, sender, local_address=local)
        obs: dict[str, Any] = {"local_address": local}
        try:
            await _converse(run, obs, traceroute, timers, timer_limit)
        finally:
            for sock in run.held:
                sock.close()
        obs["offenders"] = await traceroute
    finally:
        capture.close()
        sender.close()
    obs["notes"] = (*run.notes, f"probe took {time.monotonic() - started:.2f} s")
    return classify(Observations(**obs))


async def _converse(
    run: _Run, obs: dict[str, Any], traceroute: asyncio.Future[dict[int, str]], timers: bool, limit: float
) -> None:
    async with run.client:
        await run.client.register()
        probing = await _hello(run)
        if probing:
            obs["mapping_seen"] = await _mapping(run)
            obs["public_address"] = obs["mapping_seen"][0].host
        obs["allocation_local"], obs["allocation_public"] = await _allocation(run)
        if not probing:
            obs["public_address"] = (await _discover(run, run.base + MAPPING, run.server, False)).host
            return
        offenders = await traceroute
        _, ttl = priming(offenders)
        await _crafted_steps(run, obs, ttl, offenders)
        if timers:
            obs["timers"] = await measure_timers(run, ttl, limit)
