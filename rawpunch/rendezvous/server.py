"""asyncio adapter of the rendezvous server: one UDP socket, two TCP discovery listeners.

The second discovery listener (``mapping_port``, by default the TCP port + 2) is the peers' fast mapping
check: the same local port discovered at both ports shows whether the NAT maps per remote port (RFC 4787
section 4.1), one round trip instead of a probe. If it cannot be bound the server runs without it and does
not advertise it; the peers then skip the check.

All protocol decisions live in ``rawpunch.proto.server.ServerCore``; this module only moves
bytes, reads the clock and keeps the TCP side bounded (concurrent connections, read deadline).

With ``alt_address`` it also runs the NAT probe's server part (root): TCP listeners on the second
address and on the second port (``probe_port``), which answer DISCOVER like the main one but then
*hold* the connection and echo what the client sends (the client's barrier: an echo that crossed
its NAT after the probe SYNs proves the NAT has handled them), one raw socket that sends the core's
crafted SYNs, and raw TCP and ICMP captures that feed RSTs and ICMP errors to the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections import Counter
from typing import Any

from rawpunch.probe import packets
from rawpunch.proto import codec
from rawpunch.proto.client import frame
from rawpunch.proto.errors import MalformedMessage, RemoteProtocolError
from rawpunch.proto.server import CraftedSyn, ServerConfig, ServerCore

log = logging.getLogger("rawpunch.server")

TCP_READ_TIMEOUT = 5.0
MAX_TCP_CONNECTIONS = 256
PROBE_HOLD = 30.0  # seconds a probe listener keeps a discovered connection open at most
PROBE_ECHO_LIMIT = 1024  # bytes echoed per held connection at most
PROBE_MAX_MAPPINGS = 16  # the probe discovers up to 12 local ports per run
PROBE_MAX_HELD_PER_SOURCE = 16  # held connections per client address: one source cannot take every slot
PROBE_MAX_HELD = MAX_TCP_CONNECTIONS // 2  # held connections in all: discovery always keeps half the slots


class ServerStartError(Exception):
    """The server could not bind its sockets; the message says what to do."""


class _UdpReader:
    """Reads the UDP socket straight from the event loop, many datagrams per wake-up.

    asyncio's datagram transport reads into a fresh 256 KiB buffer per datagram, which glibc
    serves with mmap/munmap: three extra system calls per message. Reading up to
    ``BATCH`` datagrams of at most MAX_MESSAGE_LEN + 1 bytes per readiness event avoids that
    and the per-datagram trip through epoll. Sends that would block are dropped, as UDP may.
    """

    BATCH = 64

    def __init__(self, server: RendezvousServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        core, sock, now = self.server.core, self.sock, self.loop.time()
        if self.server.probe is not None:
            self.server.probe.drain()  # reactions that arrived before this request count for it
        for _ in range(self.BATCH):
            try:
                data, addr = sock.recvfrom(codec.MAX_MESSAGE_LEN + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors queued on the socket
                log.debug("udp receive error: %s", exc)
                continue
            replies = core.receive_datagram(data, (addr[0], addr[1]), now)
            if self.server.probe is not None:
                self.server.probe.send(core.probes_to_send())  # before the PROBE_ACK that says they left
            for out, dst in replies:
                try:
                    sock.sendto(out, dst)
                except OSError as exc:
                    core.stats["send_errors"] += 1
                    log.debug("udp send to %s failed: %s", dst, exc)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class _ProbeIO:
    """The probe part's raw sockets: one to send crafted SYNs, two to capture what answers them."""

    def __init__(self, core: ServerCore) -> None:
        from rawpunch.punch.rawio import RawIOError, RawSender  # noqa: PLC0415 - scapy only when probing

        self.core = core
        with contextlib.ExitStack() as undo:  # a socket made before a failing one is closed again
            try:
                self.sender = RawSender()
                undo.callback(self.sender.close)
                self.captures = [
                    undo.enter_context(_raw_capture(socket.IPPROTO_TCP, packets.RST_FILTER)),
                    undo.enter_context(_raw_capture(socket.IPPROTO_ICMP, packets.UNREACHABLE_FILTER)),
                ]
            except (RawIOError, PermissionError):
                raise ServerStartError(
                    "--alt-address (the NAT probe part) sends crafted SYNs from raw sockets: run as root"
                ) from None
            undo.pop_all()
        self.loop = asyncio.get_running_loop()
        for sock in self.captures:
            self.loop.add_reader(sock.fileno(), self.drain)

    def drain(self) -> None:
        for sock in self.captures:
            for _ in range(256):  # bounded per call; the rest waits for the next one
                try:
                    data = sock.recv(256)
                except (BlockingIOError, InterruptedError):
                    break
                found = packets.parse(data)
                answer = packets.reaction(found) if found is not None else None
                if answer is not None:
                    ours, theirs, what = answer
                    self.core.receive_reaction((ours.host, ours.port), (theirs.host, theirs.port), what)

    def send(self, syns: list[CraftedSyn]) -> None:
        from rawpunch.punch.segment import Flags, Segment  # noqa: PLC0415

        for syn in syns:
            try:
                self.sender.send(
                    Segment(syn.src, syn.dst, seq=int.from_bytes(os.urandom(4)), flags=Flags.SYN)
                )
            except OSError as exc:
                self.core.stats["probe_send_errors"] += 1
                log.debug("probe SYN %s -> %s failed: %s", syn.src, syn.dst, exc)

    def close(self) -> None:
        self.sender.close()
        for sock in self.captures:
            self.loop.remove_reader(sock.fileno())
            sock.close()


def _raw_capture(proto: int, program: tuple[tuple[int, int, int, int], ...]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    try:
        packets.attach_filter(sock, program)
        sock.setblocking(False)
        while True:  # what arrived before the filter was attached
            sock.recv(1)
    except BlockingIOError:
        return sock
    except BaseException:
        sock.close()
        raise


class RendezvousServer:
    """``async with RendezvousServer("0.0.0.0", 3478) as srv: await srv.serve_forever()``.

    ``alt_address`` (a second address of this machine) enables the NAT probe's server part (root);
    its second TCP port is ``probe_port`` (default: the TCP port + 1). ``mapping_port``: the second
    discovery port (default: the TCP port + 2, an ephemeral one when the TCP port is); ``mapping_check``
    False runs without it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tcp_port: int | None = None,
        alt_address: str | None = None,
        probe_port: int | None = None,
        mapping_port: int | None = None,
        mapping_check: bool = True,
        **config: Any,
    ) -> None:
        self.host = host
        self.port = port
        self.tcp_port = port if tcp_port is None else tcp_port
        self.alt_address = alt_address
        self.probe_port = probe_port
        self.mapping_port = mapping_port if mapping_check else None
        self._mapping_check = mapping_check
        self._mapping: asyncio.Server | None = None
        self.probe: _ProbeIO | None = None
        self._probe_servers: list[asyncio.Server] = []
        self._held: Counter[str] = Counter()
        self._config = config
        self.core: ServerCore
        self._udp: _UdpReader | None = None
        self._tcp: asyncio.Server | None = None
        self._timer: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_TCP_CONNECTIONS)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        wanted = self.tcp_port
        self._tcp = await self._bind("TCP", asyncio.start_server(self._on_tcp, self.host, self.tcp_port))
        self.tcp_port = self._tcp.sockets[0].getsockname()[1]
        config = dict(self._config)
        if self._mapping_check:
            config["mapping_port"] = await self._start_mapping_listener(wanted)
        if self.alt_address is not None:
            config.update(await self._start_probe_listeners())
        self.core = ServerCore(ServerConfig(tcp_port=self.tcp_port, **config), loop.time())
        if self.alt_address is not None:
            self.probe = _ProbeIO(self.core)
        sock = await self._bind("UDP", self._udp_socket())
        self.port = sock.getsockname()[1]
        self._udp = _UdpReader(self, sock)
        self._timer = asyncio.create_task(self._run_timer())
        log.info("listening on %s udp %d, tcp discovery %d", self.host, self.port, self.tcp_port)

    async def _start_mapping_listener(self, wanted_tcp_port: int) -> int | None:
        """The second discovery listener; its port, or None (logged) if it cannot be bound."""
        port = self.mapping_port
        if port is None:
            port = wanted_tcp_port + 2 if wanted_tcp_port else 0
        try:
            self._mapping = await asyncio.start_server(self._on_tcp, self.host, port)
        except OSError as exc:
            log.warning("no mapping-check port (TCP %d: %s): peers skip that check", port, exc.strerror)
            self.mapping_port = None
            return None
        self.mapping_port = self._mapping.sockets[0].getsockname()[1]
        return self.mapping_port

    async def _start_probe_listeners(self) -> dict[str, Any]:
        """Listeners on main:probe_port, alt:tcp_port and alt:probe_port; the core's probe settings."""
        assert self.alt_address is not None
        if ":" in self.host or ":" in self.alt_address:
            raise ServerStartError("the NAT probe part (--alt-address) speaks IPv4 only")
        if self.host in ("0.0.0.0", self.alt_address):
            raise ServerStartError(
                "--alt-address needs --listen with this machine's main address (not 0.0.0.0), "
                "and a different second address"
            )
        port = self.probe_port if self.probe_port is not None else self.tcp_port + 1
        for host, p in ((self.host, port), (self.alt_address, self.tcp_port), (self.alt_address, port)):
            where = f"the probe listener {host}:{p} (--alt-address, --probe-port)"
            self._probe_servers.append(
                await self._bind(where, asyncio.start_server(self._on_probe_tcp, host, p))
            )
        self.probe_port = port
        return {
            "probe_addresses": (self.host, self.alt_address),
            "probe_port": port,
            "max_tcp_mappings": max(self._config.get("max_tcp_mappings", 0), PROBE_MAX_MAPPINGS),
        }

    async def _udp_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        return sock

    async def _bind(self, proto: str, coro: Any) -> Any:
        try:
            return await coro
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and proto.startswith("the probe"):
                raise ServerStartError(f"{proto} is in use: choose another --probe-port") from None
            if exc.errno == errno.EADDRNOTAVAIL and proto.startswith("the probe"):
                raise ServerStartError(f"{proto}: not an address of this machine") from None
            if exc.errno == errno.EADDRINUSE:
                port = self.port if proto == "UDP" else self.tcp_port
                raise ServerStartError(
                    f"{proto} port {port} on {self.host} is in use: "
                    "stop the other program or choose another port (--listen HOST:PORT, --tcp-port)"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ServerStartError(f"{self.host} is not an address of this machine") from None
            raise ServerStartError(f"cannot listen on {self.host} {proto}: {exc.strerror}") from None

    async def _run_timer(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self.core.get_timer() - loop.time()))
            self.core.handle_timer(loop.time())

    async def _on_tcp(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hold: bool = False
    ) -> None:
        peer = writer.get_extra_info("peername")
        if self._slots.locked():
            log.warning("tcp discovery from %s refused: %d connections open", peer, MAX_TCP_CONNECTIONS)
            writer.close()
            return
        async with self._slots:
            try:
                data = await asyncio.wait_for(_read_frame(reader), TCP_READ_TIMEOUT)
                now = asyncio.get_running_loop().time()
                via = writer.get_extra_info("sockname")[:2] if self.probe is not None else None
                writer.write(frame(self.core.receive_discovery(data, (peer[0], peer[1]), now, via)))
                await writer.drain()
                if hold and self.may_hold(peer[0]):
                    await self._hold(reader, writer, peer[0])
            except (RemoteProtocolError, TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                self.core.stats[f"tcp_dropped_{type(exc).__name__}"] += 1
                log.debug("tcp discovery from %s dropped: %s", peer, exc or type(exc).__name__)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    def may_hold(self, source: str) -> bool:
        """Room for one more held probe connection from *source*: per address and in all (slots are shared
        with discovery, which must not starve while probes hold connections for up to PROBE_HOLD)."""
        return self._held[source] < PROBE_MAX_HELD_PER_SOURCE and self._held.total() < PROBE_MAX_HELD

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str) -> None:
        self._held[source] += 1
        try:
            await _echo(reader, writer)
        finally:
            self._held[source] -= 1
            if not self._held[source]:
                del self._held[source]

    async def _on_probe_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._on_tcp(reader, writer, hold=True)

    async def serve_forever(self) -> None:
        assert self._tcp is not None
        await self._tcp.serve_forever()

    async def close(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self._udp:
            self._udp.close()
        for srv in [*(s for s in (self._tcp, self._mapping) if s), *self._probe_servers]:
            srv.close()
            await srv.wait_closed()
        if self.probe is not None:
            self.probe.close()
        if hasattr(self, "core"):
            log.info("stopped; counters: %s", dict(sorted(self.core.stats.items())))

    async def __aenter__(self) -> RendezvousServer:
        try:
            await self.start()
        except BaseException:
            await self.close()  # what did bind (e.g. before a probe part that needs root) is let go
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Hold a probe connection: echo what the client sends (bounded in bytes and time) until it closes.

    ``W`` followed by a byte *n* is answered ``W`` only *n* seconds later (within the hold time): the
    client's ESTABLISHED-lifetime test, in which the first segment after the idle time comes from outside,
    as a peer's would (an outbound one could make a NAT pick the flow up again).
    """
    loop = asyncio.get_running_loop()
    deadline, echoed = loop.time() + PROBE_HOLD, 0
    while echoed < PROBE_ECHO_LIMIT:
        try:
            data = await asyncio.wait_for(reader.read(64), max(0.0, deadline - loop.time()))
            if data == b"W":
                data += await asyncio.wait_for(reader.readexactly(1), max(0.0, deadline - loop.time()))
        except (TimeoutError, asyncio.IncompleteReadError):
            return
        if not data:
            return
        if data[:1] == b"W" and len(data) == 2:
            await asyncio.sleep(min(data[1], max(0.0, deadline - loop.time())))
            data = b"W"
        writer.write(data)
        await writer.drain()
        echoed += len(data)


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = struct.unpack("!H", await reader.readexactly(2))
    if not codec.MIN_MESSAGE_LEN <= length <= codec.MAX_MESSAGE_LEN:
        raise MalformedMessage(f"TCP frame of {length} bytes")
    return await reader.readexactly(length)
