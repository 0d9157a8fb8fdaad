"""asyncio adapter of the rendezvous client, usable from the Python API.

``RendezvousClient`` drives a ``rawpunch.proto.client.ClientCore`` over a connected UDP socket
(the kernel then drops datagrams from anyone but the server) and runs TCP endpoint discovery:
a real TCP connection from the local port being discovered to the server's discovery port. The
socket is bound with SO_REUSEADDR and the server closes first, so the port is free again (no
TIME_WAIT on our side) for the punch that follows.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any, TypeVar

from rawpunch.proto.client import (
    ClientConfig,
    ClientCore,
    Event,
    Failed,
    Go,
    PeerFound,
    ProbeAnswer,
    Registered,
    ResultAcknowledged,
    frame,
)
from rawpunch.proto.codec import Endpoint, ErrorCode, ProbeKind, ResultInfo, TcpMapping
from rawpunch.proto.errors import RemoteProtocolError
from rawpunch.proto.keys import SessionKeys
from rawpunch.proto.peerinfo import PeerInfo

log = logging.getLogger("rawpunch.client")
T = TypeVar("T")


class RendezvousError(Exception):
    """The rendezvous failed; ``str()`` says why and what to do."""

    def __init__(self, reason: str, code: ErrorCode | None = None) -> None:
        super().__init__(reason)
        self.code = code


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, client: RendezvousClient) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            self.client.core.receive_datagram(data, asyncio.get_running_loop().time())
        except RemoteProtocolError as exc:
            log.debug("ignored datagram from %s: %s", addr, exc)
        self.client.wakeup.set()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable on a connected socket: the server is not (yet) there. Keep
        # retransmitting; the core's request timeout turns silence into a clear error.
        log.debug("udp error from the server's direction: %s", exc)


class RendezvousClient:
    """Register, discover TCP endpoints, exchange sealed peer info, and wait for GO."""

    def __init__(self, server: Endpoint, secret: str | bytes | SessionKeys, **config: Any) -> None:
        self.server = server
        keys = secret if isinstance(secret, SessionKeys) else SessionKeys.derive(secret)
        self.core = ClientCore(ClientConfig(keys, server=f"the rendezvous server {server}", **config))
        self.wakeup = asyncio.Event()
        self._transport: asyncio.DatagramTransport | None = None
        self.registered: Registered | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), remote_addr=(self.server.host, self.server.port)
            )
        except OSError as exc:
            raise RendezvousError(
                f"cannot reach the rendezvous server {self.server}: {exc.strerror}"
            ) from None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> RendezvousClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def local_address(self) -> Endpoint:
        assert self._transport is not None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return Endpoint(host, port)

    # --- the steps ------------------------------------------------------------------------------

    async def register(self) -> Registered:
        self.core.register(self._now())
        self.registered = await self._expect(Registered)
        return self.registered

    async def exchange(self, info: PeerInfo) -> PeerFound:
        self.core.exchange(info, self._now())
        return await self._expect(PeerFound)

    async def ready(self, attempt: int = 0) -> Go:
        """Ready for ``attempt``; returns GO once both peers are, after sleeping its delay."""
        self.core.ready(self._now(), attempt)
        go = await self._expect(Go)
        await asyncio.sleep(go.delay)
        return go

    async def probe(self, kind: ProbeKind, **args: int) -> ProbeAnswer:
        """One request to the server's NAT probe part (``rawpunch.probe``); RendezvousError if refused."""
        self.core.probe(kind, self._now(), **args)
        return await self._expect(ProbeAnswer)

    async def report(self, result: ResultInfo) -> None:
        self.core.report(result, self._now())
        await self._expect(ResultAcknowledged)

    async def discover_tcp(
        self,
        local_port: int = 0,
        local_host: str = "0.0.0.0",
        timeout: float = 10.0,
        server_port: int | None = None,
    ) -> TcpMapping:
        """The public endpoint a TCP flow from ``local_port`` gets, as the server sees it (at its discovery
        port, or ``server_port``: the mapping check's)."""
        assert self.registered is not None, "register() first"
        port = server_port or self.registered.tcp_port
        try:
            return await asyncio.wait_for(self._discover(local_host, local_port, port), timeout)
        except TimeoutError:
            raise RendezvousError(
                f"TCP endpoint discovery at {self.server.host}:{port} got no answer "
                f"within {timeout:.0f} s: is TCP to the server allowed?"
            ) from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise RendezvousError(f"TCP endpoint discovery failed: {exc}") from None
        except RemoteProtocolError as exc:
            raise RendezvousError(f"TCP endpoint discovery: bad answer from the server: {exc}") from None

    async def _discover(self, local_host: str, local_port: int, server_port: int) -> TcpMapping:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind((local_host, local_port))
            await loop.sock_connect(sock, (self.server.host, server_port))
            port = sock.getsockname()[1]
            await loop.sock_sendall(sock, frame(self.core.discovery_request(port)))
            (length,) = struct.unpack("!H", await _recv_exactly(loop, sock, 2))
            mapping = self.core.discovery_response(await _recv_exactly(loop, sock, length))
            await _recv_exactly(loop, sock, 0)  # wait for the server's FIN: it closes first
            return mapping
        finally:
            sock.close()

    # --- driving the core -----------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _flush(self) -> None:
        assert self._transport is not None, "open() first"
        for data in self.core.datagrams_to_send(self._now()):
            self._transport.sendto(data)

    async def _expect(self, kind: type[T]) -> T:
        event = await self._next_event()
        if isinstance(event, Failed):
            raise RendezvousError(event.reason, event.code)
        if not isinstance(event, kind):
            raise RendezvousError(f"protocol error: expected {kind.__name__}, got {type(event).__name__}")
        return event

    async def _next_event(self) -> Event:
        while True:
            self._flush()
            event = self.core.next_event()
            if event is not None:
                return event
            timer = self.core.get_timer()
            self.wakeup.clear()
            try:
                timeout = None if timer is None else max(0.0, timer - self._now())
                await asyncio.wait_for(self.wakeup.wait(), timeout)
            except TimeoutError:
                self.core.handle_timer(self._now())


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    """``n`` bytes; with ``n == 0``, wait for end of stream (and fail on extra bytes)."""
    buf = b""
    while len(buf) < n or n == 0:
        chunk = await loop.sock_recv(sock, max(n - len(buf), 1))
        if not chunk:
            if n == 0:
                return buf
            raise asyncio.IncompleteReadError(buf, n)
        if n == 0:
            raise ConnectionError("unexpected bytes after the discovery answer")
        buf += chunk
    return buf
