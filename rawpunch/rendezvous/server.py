"""asyncio adapter of the rendezvous server: one UDP socket, one TCP discovery listener.

All protocol decisions live in ``rawpunch.proto.server.ServerCore``; this module only moves
bytes, reads the clock and keeps the TCP side bounded (concurrent connections, read deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from typing import Any

from rawpunch.proto import codec
from rawpunch.proto.client import frame
from rawpunch.proto.errors import MalformedMessage, RemoteProtocolError
from rawpunch.proto.server import ServerConfig, ServerCore

log = logging.getLogger("rawpunch.server")

TCP_READ_TIMEOUT = 5.0
MAX_TCP_CONNECTIONS = 256


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
        for _ in range(self.BATCH):
            try:
                data, addr = sock.recvfrom(codec.MAX_MESSAGE_LEN + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors queued on the socket
                log.debug("udp receive error: %s", exc)
                continue
            for out, dst in core.receive_datagram(data, (addr[0], addr[1]), now):
                try:
                    sock.sendto(out, dst)
                except OSError as exc:
                    core.stats["send_errors"] += 1
                    log.debug("udp send to %s failed: %s", dst, exc)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class RendezvousServer:
    """``async with RendezvousServer("0.0.0.0", 3478) as srv: await srv.serve_forever()``."""

    def __init__(self, host: str, port: int, tcp_port: int | None = None, **config: Any) -> None:
        self.host = host
        self.port = port
        self.tcp_port = port if tcp_port is None else tcp_port
        self._config = config
        self.core: ServerCore
        self._udp: _UdpReader | None = None
        self._tcp: asyncio.Server | None = None
        self._timer: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_TCP_CONNECTIONS)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tcp = await self._bind("TCP", asyncio.start_server(self._on_tcp, self.host, self.tcp_port))
        self.tcp_port = self._tcp.sockets[0].getsockname()[1]
        self.core = ServerCore(ServerConfig(tcp_port=self.tcp_port, **self._config), loop.time())
        sock = await self._bind("UDP", self._udp_socket())
        self.port = sock.getsockname()[1]
        self._udp = _UdpReader(self, sock)
        self._timer = asyncio.create_task(self._run_timer())
        log.info("listening on %s udp %d, tcp discovery %d", self.host, self.port, self.tcp_port)

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

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._slots.locked():
            log.warning("tcp discovery from %s refused: %d connections open", peer, MAX_TCP_CONNECTIONS)
            writer.close()
            return
        async with self._slots:
            try:
                data = await asyncio.wait_for(_read_frame(reader), TCP_READ_TIMEOUT)
                now = asyncio.get_running_loop().time()
                writer.write(frame(self.core.receive_discovery(data, (peer[0], peer[1]), now)))
                await writer.drain()
            except (RemoteProtocolError, TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
                self.core.stats[f"tcp_dropped_{type(exc).__name__}"] += 1
                log.debug("tcp discovery from %s dropped: %s", peer, exc or type(exc).__name__)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    async def serve_forever(self) -> None:
        assert self._tcp is not None
        await self._tcp.serve_forever()

    async def close(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self._udp:
            self._udp.close()
        if self._tcp:
            self._tcp.close()
            await self._tcp.wait_closed()
        if hasattr(self, "core"):
            log.info("stopped; counters: %s", dict(sorted(self.core.stats.items())))

    async def __aenter__(self) -> RendezvousServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = struct.unpack("!H", await reader.readexactly(2))
    if not codec.MIN_MESSAGE_LEN <= length <= codec.MAX_MESSAGE_LEN:
        raise MalformedMessage(f"TCP frame of {length} bytes")
    return await reader.readexactly(length)
