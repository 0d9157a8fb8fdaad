"""A TCP segment as plain data, the currency of the punch core (RFC 9293 section 3.1).

The sans-IO punch engine and the pure NAT model consume and produce ``Segment``s; only the
adapters convert to and from scapy packets, so the core tests need neither root nor scapy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from rawpunch.proto.codec import Endpoint

SEQ_MOD = 1 << 32


class Flags(enum.IntFlag):
    NONE = 0
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """The SYN options rawpunch negotiates (RFC 9293 3.7.1 MSS, RFC 7323 window scale and
    timestamps, RFC 2018 SACK-permitted). ``timestamp`` is (TSval, TSecr)."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamp: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Segment:
    src: Endpoint
    dst: Endpoint
    seq: int
    ack: int = 0
    flags: Flags = Flags.NONE
    window: int = 65535
    options: TcpOptions = field(default_factory=TcpOptions)
    ttl: int = 64
    payload: bytes = b""

    def reply_tuple(self) -> tuple[Endpoint, Endpoint]:
        return self.dst, self.src

    def with_(self, **changes: object) -> Segment:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def syn(self) -> bool:
        return bool(self.flags & Flags.SYN)

    @property
    def is_ack(self) -> bool:
        return bool(self.flags & Flags.ACK)

    @property
    def rst(self) -> bool:
        return bool(self.flags & Flags.RST)

    def __str__(self) -> str:
        names = "".join(f.name[0] for f in Flags if f in self.flags and f.name) or "."
        return f"{self.src} > {self.dst} [{names}] seq={self.seq} ack={self.ack} ttl={self.ttl}"


def seq_add(seq: int, n: int) -> int:
    return (seq + n) % SEQ_MOD
