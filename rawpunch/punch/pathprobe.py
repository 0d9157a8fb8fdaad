"""Where is our NAT? A UDP traceroute toward the rendezvous server (adapter; theory in ``ttl``).

One UDP datagram per TTL 1..MAX_PROBE_TTL, all at once from separate sockets, each with
``IP_RECVERR`` so the kernel queues the ICMP time-exceeded it gets back on that socket's error
queue, with the router that sent it as the "offender" (ip(7), ``SO_EE_OFFENDER``). No raw socket
is needed, and the ICMP comes back through our NAT as RELATED traffic like any traceroute's.

A NAT answers from its inside address: with a home NAT, hop 1 answers from 10/8 or 192.168/16,
and hop 2 (the first router past it) from a public address; behind a carrier-grade NAT the
inside addresses of hop 2 are 100.64/10 as well. Our outermost NAT is therefore the last hop of
the leading run of non-public offenders (``nat_hop``). The priming TTL is one more: it passes that
NAT and dies at the first router beyond it, which assumes at least one router between the two
NATs (always so across the internet; ``ttl.priming_ttl`` explains why none works otherwise).
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time

from rawpunch.proto.codec import Endpoint

MAX_PROBE_TTL = 8
IP_RECVERR = 11
SO_EE_ORIGIN_ICMP = 2
ICMP_TIME_EXCEEDED = 11
_EXT_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err


# Address space a NAT's inside uses: RFC 1918, RFC 6598 (carrier-grade NAT), link-local.
_INSIDE = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16")
)


def _inside(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return any(ip in net for net in _INSIDE)


def nat_hop(offenders: dict[int, str]) -> int | None:
    """The hop of our outermost NAT from ``{ttl: router address}``; None if hop 1 is public or silent."""
    hop = None
    for ttl in range(1, max(offenders, default=0) + 1):
        addr = offenders.get(ttl)
        if addr is None or not _inside(addr):
            break
        hop = ttl
    return hop


def probe_offenders(server: Endpoint, timeout: float = 0.5, max_ttl: int = MAX_PROBE_TTL) -> dict[int, str]:
    """``{ttl: address of the router whose time-exceeded answered}`` for TTLs 1..max_ttl (blocking)."""
    socks: dict[socket.socket, int] = {}
    try:
        for ttl in range(1, max_ttl + 1):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            s.connect((server.host, server.port))
            s.send(b"rawpunch hop probe")  # the server drops it unread: not a control message
            socks[s] = ttl
        return _collect(socks, time.monotonic() + timeout)
    finally:
        for s in socks:
            s.close()


def _collect(socks: dict[socket.socket, int], deadline: float) -> dict[int, str]:
    found: dict[int, str] = {}
    waiting = set(socks)
    while waiting and (left := deadline - time.monotonic()) > 0:
        errored, _, _ = select.select(list(waiting), [], [], left)  # POLLERR reads as readable
        for s in errored or []:
            waiting.discard(s)
            router = _time_exceeded_from(s)
            if router is not None:
                found[socks[s]] = router
        if _settled(found):
            break
    return found


def _settled(found: dict[int, str]) -> bool:
    """Every hop up to the first outside one has answered: later answers cannot change ``nat_hop``."""
    for ttl in range(1, len(found) + 1):
        if ttl not in found:
            return False
        if not _inside(found[ttl]):
            return True
    return False


def _time_exceeded_from(s: socket.socket) -> str | None:
    try:
        _, ancdata, _, _ = s.recvmsg(512, 512, socket.MSG_ERRQUEUE)
    except OSError:
        return None
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_RECVERR and len(data) >= _EXT_ERR.size + 8:
            _, origin, icmp_type, _, _, _, _ = _EXT_ERR.unpack_from(data)
            if origin == SO_EE_ORIGIN_ICMP and icmp_type == ICMP_TIME_EXCEEDED:
                return socket.inet_ntoa(data[_EXT_ERR.size + 4 : _EXT_ERR.size + 8])  # sockaddr_in.sin_addr
    return None


def choose_priming_ttl(server: Endpoint) -> tuple[int, dict[int, str]]:
    """The priming TTL for this host's path, and the probe results it was chosen from."""
    offenders = probe_offenders(server)
    hop = nat_hop(offenders)
    return (hop + 1 if hop is not None else 2), offenders
