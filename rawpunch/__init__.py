"""rawpunch: raw-packet TCP NAT traversal engine and NAT lab.

>>> sock = rawpunch.connect("203.0.113.10:3478", "a long random secret")   # doctest: +SKIP
>>> sock.sendall(b"hello")                                                 # doctest: +SKIP

Both peers call ``connect`` (or ``await connect_async``) with the same server and secret; each
gets an ordinary connected ``socket.socket`` to the other. Needs root (raw sockets, NFQUEUE,
iptables, TCP_REPAIR). Raises ``rawpunch.punch.session.PunchError`` or
``rawpunch.rendezvous.RendezvousError`` with a one-line reason.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

__version__ = "0.1.0"


async def connect_async(server: str, session: str | bytes, **settings: Any) -> socket.socket:
    """Punch a TCP connection to the peer using ``session`` at ``server`` (``HOST:PORT``).

    Keyword arguments are ``rawpunch.punch.session.PunchSettings`` fields: ``strategy`` (one of
    ``rawpunch.strategy.STRATEGY_NAMES``; default ``"auto"``), ``local_port``, ``priming_ttl``,
    ``deadline``, ``peer_timeout``, ``pcap``, ``on_event``.
    """
    from rawpunch.proto.codec import Endpoint  # noqa: PLC0415 - importing rawpunch stays cheap
    from rawpunch.punch.session import PunchSettings, punch  # noqa: PLC0415

    result = await punch(PunchSettings(Endpoint.parse(server, 3478), session, **settings))
    return result.sock


def connect(server: str, session: str | bytes, **settings: Any) -> socket.socket:
    """Blocking ``connect_async`` (runs its own event loop)."""
    return asyncio.run(connect_async(server, session, **settings))
