"""Anti-replay window per sender (RFC 4303 section 3.4.3, the IPsec sliding window).

A transaction id is ``instance (4 random bytes, fixed per client run) || sequence (8 bytes)``.
The sequence grows with every datagram the client sends, retransmissions included, so a
receiver needs only the highest sequence seen and a 64-bit bitmap of the ones just below it:
O(1) state per peer, where a cache of every id seen would grow with the message rate.
"""

from __future__ import annotations

import os
import struct

WINDOW = 64
INSTANCE_LEN = 4


def split_txid(txid: bytes) -> tuple[bytes, int]:
    return txid[:INSTANCE_LEN], struct.unpack_from("!Q", txid, INSTANCE_LEN)[0]


class TxidSource:
    """Mints transaction ids for one client run."""

    def __init__(self, instance: bytes | None = None) -> None:
        self.instance = instance or os.urandom(INSTANCE_LEN)
        self._seq = 0

    def next(self) -> bytes:
        self._seq += 1
        return self.instance + struct.pack("!Q", self._seq)


class ReplayWindow:
    __slots__ = ("bits", "top")

    def __init__(self) -> None:
        self.top = 0
        self.bits = 0  # bit i set: sequence top - i was seen

    def check_and_update(self, seq: int) -> bool:
        """True if ``seq`` is new (and record it); False for a replay or one too old to tell."""
        if seq > self.top:
            shift = seq - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << WINDOW) - 1) if shift < WINDOW else 1
            self.top = seq
            return True
        offset = self.top - seq
        if offset >= WINDOW or self.bits >> offset & 1:
            return False
        self.bits |= 1 << offset
        return True
