"""What one peer tells the other through the rendezvous, sealed end to end.

The plaintext is a TLV list (the same framing as control attributes, ``codec.iter_tlv``) read
through one field table. The server relays it as an opaque ``SEALED`` attribute and cannot read
or alter it (``keys.SessionKeys.seal``). Unknown fields of 0x8000 and up are skipped, so the punch
can grow new capabilities without a protocol version bump: the strategy fields (``punch_ports`` and
the ``nat_*`` classification, read by ``rawpunch.strategy``) use such codes, so an older peer skips them.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from rawpunch.proto.codec import Endpoint, iter_tlv, pack_endpoint, pack_tlv, unpack_endpoint
from rawpunch.proto.errors import MalformedMessage

NONCE_LEN = 8
_NO_PAD = b"\x00" * 16


class Capability(enum.IntFlag):
    """What a peer's engine can do; the punch picks a strategy both support."""

    CRAFTED_HANDSHAKE = 1 << 0
    SIMULTANEOUS_OPEN = 1 << 1
    LOW_TTL_LISTEN = 1 << 2
    PORT_PREDICTION = 1 << 3
    BIRTHDAY = 1 << 4
    PORT_EXHAUSTION = 1 << 5


@dataclass(frozen=True)
class PeerInfo:
    """Peer-to-peer facts. ``nonce`` is fresh per run so two runs' blobs never look alike."""

    nonce: bytes = field(default_factory=lambda: os.urandom(NONCE_LEN))
    capabilities: int = 0
    isn: int | None = None
    ttl: int | None = None
    mss: int | None = None
    wscale: int | None = None
    sack: bool = False
    timestamps: bool = False
    tcp_port: int | None = None  # the local port this peer will punch from
    local: tuple[Endpoint, ...] = ()  # private endpoints, for peers behind the same NAT
    punch_ports: tuple[int, ...] = ()  # local ports with discovered public endpoints, one per cascade attempt
    nat_mapping: str = "unknown"  # what this peer knows of its NAT (rawpunch.probe.result.NatBehaviour)
    nat_filtering: str = "unknown"
    nat_allocation: str = "unknown"
    nat_delta: int | None = None  # sequential allocation: the step between consecutive public ports
    strategy: str = ""  # the --strategy this peer runs; both must run the same cascade


def _fixed(fmt: str) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    st = struct.Struct(fmt)

    def unpack(raw: bytes) -> Any:
        if len(raw) != st.size:
            raise MalformedMessage(f"peer info field of {len(raw)} bytes, expected {st.size}")
        return st.unpack(raw)[0]

    return st.pack, unpack


def _nonce_unpack(raw: bytes) -> bytes:
    if len(raw) != NONCE_LEN:
        raise MalformedMessage(f"peer info nonce of {len(raw)} bytes, expected {NONCE_LEN}")
    return bytes(raw)


def _text_unpack(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise MalformedMessage("peer info text is not UTF-8") from None


def _flag_unpack(raw: bytes) -> bool:
    if raw not in (b"\x00", b"\x01"):
        raise MalformedMessage("peer info flag is neither 0 nor 1")
    return raw == b"\x01"


_u8, _u16, _u32, _i16 = _fixed("!B"), _fixed("!H"), _fixed("!I"), _fixed("!h")

# NatBehaviour's words travel as one byte each; a code this version does not know reads as "unknown".
BEHAVIOUR_WORDS: dict[str, tuple[str, ...]] = {
    "mapping": ("unknown", "endpoint-independent", "address-dependent", "address-and-port-dependent"),
    "allocation": ("unknown", "port-preserving", "sequential", "random"),
}
BEHAVIOUR_WORDS["filtering"] = BEHAVIOUR_WORDS["mapping"]


def _word(kind: str) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    words = BEHAVIOUR_WORDS[kind]

    def pack(value: str) -> bytes:
        if value not in words:
            raise ValueError(f"NAT {kind} {value!r}: expected one of {', '.join(words)}")
        return bytes([words.index(value)])

    def unpack(raw: bytes) -> str:
        code = _u8[1](raw)
        return words[code] if code < len(words) else "unknown"

    return pack, unpack


_flag = (lambda v: bytes([int(v)]), _flag_unpack)
_endpoint = (lambda v: pack_endpoint(v, _NO_PAD), lambda raw: unpack_endpoint(raw, _NO_PAD))

# field name -> (TLV code, pack, unpack); ``local`` repeats, once per endpoint.
FIELDS: dict[str, tuple[int, Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    "nonce": (0x01, bytes, _nonce_unpack),
    "capabilities": (0x02, *_u32),
    "isn": (0x03, *_u32),
    "ttl": (0x04, *_u8),
    "mss": (0x05, *_u16),
    "wscale": (0x06, *_u8),
    "sack": (0x07, *_flag),
    "timestamps": (0x08, *_flag),
    "tcp_port": (0x09, *_u16),
    "local": (0x0A, *_endpoint),
    "punch_ports": (0x8001, *_u16),
    "nat_mapping": (0x8002, *_word("mapping")),
    "nat_filtering": (0x8003, *_word("filtering")),
    "nat_allocation": (0x8004, *_word("allocation")),
    "nat_delta": (0x8005, *_i16),
    "strategy": (0x8006, str.encode, _text_unpack),
}
REPEATED = frozenset({"local", "punch_ports"})
_BY_CODE = {code: name for name, (code, _, _) in FIELDS.items()}
_DEFAULTS = PeerInfo(nonce=b"\x00" * NONCE_LEN)


def encode_peer_info(info: PeerInfo) -> bytes:
    out = []
    for f in fields(PeerInfo):
        code, pack, _ = FIELDS[f.name]
        value = getattr(info, f.name)
        if f.name in REPEATED:
            out += [pack_tlv(code, pack(item)) for item in value]
        elif value is not None and (f.name == "nonce" or value != getattr(_DEFAULTS, f.name)):
            out.append(pack_tlv(code, pack(value)))
    return b"".join(out)


def decode_peer_info(data: bytes) -> PeerInfo:
    values: dict[str, Any] = {}
    repeated: dict[str, list[Any]] = {name: [] for name in REPEATED}
    for code, raw in iter_tlv(data):
        name = _BY_CODE.get(code)
        if name is None:
            if code < 0x8000:
                raise MalformedMessage(f"unknown peer info field 0x{code:04x}")
            continue
        value = FIELDS[name][2](raw)
        if name in REPEATED:
            repeated[name].append(value)
        elif name in values:
            raise MalformedMessage(f"peer info field {name} repeated")
        else:
            values[name] = value
    if "nonce" not in values:
        raise MalformedMessage("peer info lacks its nonce")
    values.update((name, tuple(items)) for name, items in repeated.items())
    return PeerInfo(**values)
