"""Just enough IPv4 parsing for the probe's raw captures (stdlib, no scapy: a server's raw socket sees
every TCP segment it receives, so this runs per packet and must be cheap).

A ``SOCK_RAW`` socket of protocol TCP or ICMP gets a copy of each such datagram the host receives, IP
header included (raw(7)). The probe wants three things from them: SYNs that reached the client (TCP,
flags exactly SYN), RSTs answering the server's unsolicited SYN, and ICMP destination-unreachable errors
(RFC 792) quoting it -- the quoted IP header plus at least the first 8 bytes of TCP, i.e. the ports.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass

from rawpunch.proto.codec import Endpoint, Reaction

TCP, ICMP = 6, 1
ICMP_UNREACHABLE = 3
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
SO_ATTACH_FILTER = 26

# Classic BPF (``struct sock_filter``: code, jt, jf, k) run on each datagram of a raw IP socket, which
# starts at the IP header. The kernel then queues only what the probe reads, so a busy host's other TCP
# neither costs a Python parse nor crowds a reaction out of the socket buffer.
_LOAD_IHL = (0xB1, 0, 0, 0)  # ldxb 4*([0]&0xf): X = IP header length
_ACCEPT, _DROP = (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)
#: TCP segments with RST set (the answer a NAT's or host's stack gives to an unsolicited SYN).
RST_FILTER = (_LOAD_IHL, (0x50, 0, 0, 13), (0x45, 0, 1, RST), _ACCEPT, _DROP)
#: TCP segments whose flags among FIN, SYN, RST, ACK are exactly SYN.
SYN_FILTER = (
    _LOAD_IHL,
    (0x50, 0, 0, 13),
    (0x54, 0, 0, FIN | SYN | RST | ACK),
    (0x15, 0, 1, SYN),
    _ACCEPT,
    _DROP,
)
#: ICMP destination unreachable.
UNREACHABLE_FILTER = (_LOAD_IHL, (0x50, 0, 0, 0), (0x15, 0, 1, ICMP_UNREACHABLE), _ACCEPT, _DROP)


class _Insn(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class _Program(ctypes.Structure):
    _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Insn)))


def attach_filter(sock: socket.socket, program: tuple[tuple[int, int, int, int], ...]) -> None:
    """Attach a classic BPF *program* (SO_ATTACH_FILTER, socket(7)); the kernel copies it."""
    insns = (_Insn * len(program))(*(_Insn(*insn) for insn in program))
    fprog = _Program(len(program), ctypes.cast(insns, ctypes.POINTER(_Insn)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


@dataclass(frozen=True)
class Captured:
    """A TCP segment (``flags`` its TCP flags) or an ICMP error (``icmp_type``, the quoted segment's ends)."""

    src: Endpoint
    dst: Endpoint
    flags: int = 0
    icmp_type: int | None = None
    router: str | None = None
    """For an ICMP error: who sent it. ``src``/``dst`` are then those of the *quoted* segment."""

    @property
    def bare_syn(self) -> bool:
        return self.icmp_type is None and self.flags & (SYN | ACK | RST) == SYN


def _addr(raw: bytes) -> str:
    return socket.inet_ntoa(raw)


def parse(data: bytes) -> Captured | None:
    """The TCP segment or ICMP error quoting TCP in one raw IPv4 datagram; None for anything else."""
    if len(data) < 20 or data[0] >> 4 != 4:
        return None
    ihl = (data[0] & 0x0F) * 4
    body = data[ihl:]
    src, dst = _addr(data[12:16]), _addr(data[16:20])
    if data[9] == TCP and len(body) >= 14:
        sport, dport = struct.unpack_from("!HH", body)
        return Captured(Endpoint(src, sport), Endpoint(dst, dport), flags=body[13])
    if data[9] == ICMP and len(body) >= 8 + 20 and body[0] == ICMP_UNREACHABLE:
        inner = body[8:]
        inner_ihl = (inner[0] & 0x0F) * 4
        if inner[9] != TCP or len(inner) < inner_ihl + 4:
            return None
        sport, dport = struct.unpack_from("!HH", inner, inner_ihl)
        quoted_src, quoted_dst = _addr(inner[12:16]), _addr(inner[16:20])
        return Captured(
            Endpoint(quoted_src, sport), Endpoint(quoted_dst, dport), icmp_type=body[0], router=src
        )
    return None


def reaction(packet: Captured) -> tuple[Endpoint, Endpoint, Reaction] | None:
    """(our SYN's source, its destination, what answered it) if *packet* could answer a SYN of ours."""
    if packet.icmp_type == ICMP_UNREACHABLE:
        return packet.src, packet.dst, Reaction.ICMP
    if packet.icmp_type is None and packet.flags & RST:
        return packet.dst, packet.src, Reaction.RST
    return None
