"""Wire format of the rawpunch control protocol, version 1.

The codec is one table of message types and one table of attributes (as aioice's ``stun.py``):
the encoder, the decoder and ``docs/protocol.md`` all read the same tables.

Every message, UDP datagram or TCP frame::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-------------------------------+---------------+---------------+
    |       magic 0x5250 ("RP")     |  version = 1  |  message type |
    +-------------------------------+---------------+---------------+
    |      attributes length        |        reserved (zero)        |
    +-------------------------------+-------------------------------+
    |                transaction id (12 bytes)                      |
    +---------------------------------------------------------------+
    |                session id (16 bytes)                          |
    +---------------------------------------------------------------+
    |      attributes: type (2) | length (2) | value, padded to 4   |
    +---------------------------------------------------------------+
    |   HMAC-SHA256 (32 bytes) over everything above (RFC 2104)     |
    +---------------------------------------------------------------+

The MAC is checked before any attribute is parsed. Unknown attribute types below 0x8000 are
an error (comprehension-required, as in STUN, RFC 8489 section 14); 0x8000 and up are skipped,
so a later version can add optional attributes without breaking this one.

Endpoints are XOR-ed with ``magic || transaction id || magic`` (as STUN's XOR-MAPPED-ADDRESS,
RFC 8489 section 14.2) so that NAT ALGs that rewrite addresses in payloads leave them alone.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rawpunch.proto.errors import AuthenticationError, MalformedMessage, UnsupportedVersion

MAGIC = 0x5250
VERSION = 1
HEADER = struct.Struct("!HBBHH12s16s")
HEADER_LEN = HEADER.size  # 36
MAC_LEN = 32
MIN_MESSAGE_LEN = HEADER_LEN + MAC_LEN
MAX_MESSAGE_LEN = 1200  # fits any path MTU; a datagram above this is refused unread
TXID_LEN = 12
SESSION_ID_LEN = 16


class MessageType(enum.IntEnum):
    REGISTER = 0x01
    COOKIE = 0x02
    REGISTERED = 0x03
    DISCOVER = 0x04
    DISCOVERED = 0x05
    INFO = 0x06
    PENDING = 0x07
    PEER = 0x08
    READY = 0x09
    GO = 0x0A
    RESULT = 0x0B
    RESULT_ACK = 0x0C
    ERROR = 0x0D
    PROBE = 0x0E
    PROBE_ACK = 0x0F


class Attr(enum.IntEnum):
    COOKIE = 0x0001
    MAPPED_UDP = 0x0002
    MAPPED_TCP = 0x0003
    PEER_UDP = 0x0004
    PEER_TCP = 0x0005
    SEALED = 0x0006
    TOKEN = 0x0007
    TCP_PORT = 0x0008
    DELAY_MS = 0x0009
    RTT_MS = 0x000A
    ERROR = 0x000B
    RESULT = 0x000C
    PADDING = 0x000D
    SLOT = 0x000E
    LOCAL_PORT = 0x000F
    PROBE_KIND = 0x0010
    TARGET_PORT = 0x0011
    ALT_ADDRESS = 0x0012
    PROBE_PORT = 0x0013
    PROBE_FROM = 0x0014
    PROBE_BUDGET = 0x0015
    REACTION = 0x0016
    ATTEMPT = 0x0020  # apart from the probe's block: which attempt of a strategy cascade
    PAIRED_US = 0x0021
    MAPPING_PORT = 0x0022


class ErrorCode(enum.IntEnum):
    BAD_REQUEST = 400
    UNKNOWN_PEER = 404  # not registered, or the session expired: register again
    SESSION_FULL = 409
    TOO_LARGE = 413
    RATE_LIMITED = 429  # also: the client's NAT probe budget is spent
    NOT_SUPPORTED = 501  # the server has no NAT probe part (started without --alt-address)
    SERVER_FULL = 503


class ProbeKind(enum.IntEnum):
    """What a PROBE asks the server to do (the NAT behaviour probe, ``rawpunch.probe``)."""

    HELLO = 0  # tell me your probe endpoints and my budget
    FILTER = 1  # SYNs to my mapping of LOCAL_PORT: from the other port and from the other address
    UNSOLICITED = 2  # a SYN from your probe port to my address, TARGET_PORT (no mapping there)
    SIMOPEN = 3  # a SYN to my mapping of LOCAL_PORT from the other port of the address it talked to
    REACTION = 4  # what came back to you after UNSOLICITED


class Reaction(enum.IntEnum):
    """What the server captured in answer to its unsolicited SYN (RFC 5382 section 4.3, REQ-4)."""

    NONE = 0
    RST = 1
    ICMP = 2


class ResultCode(enum.IntEnum):
    CONNECTED = 0
    FAILED = 1
    TIMEOUT = 2
    ABORTED = 3


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __post_init__(self) -> None:
        # Canonical text (raises ValueError on junk), so equal addresses compare equal.
        address = ipaddress.ip_address(self.host)
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            raise ValueError(f"{self.host}: a scoped IPv6 address cannot travel in a message")
        object.__setattr__(self, "host", str(address))
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port {self.port} out of range")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Endpoint:
        """``HOST:PORT``, ``[V6]:PORT``, or a bare address when ``default_port`` is given."""
        host, sep, port = text.rpartition(":")
        if not sep or (":" in host and not host.startswith("[")):
            host, port = text, ""
        if not port and default_port is None:
            raise ValueError(f"{text!r} lacks a port (HOST:PORT)")
        try:
            return cls(host.strip("[]"), int(port) if port else default_port or 0)
        except ValueError:
            raise ValueError(f"{text!r} is not HOST:PORT with a numeric IP address") from None


@dataclass(frozen=True, slots=True)
class TcpMapping:
    """The public endpoint a NAT gave the TCP flow from ``local_port``, as the server saw it."""

    local_port: int
    public: Endpoint


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class ResultInfo:
    code: ResultCode
    elapsed_ms: int
    detail: str


AttrValue = bytes | int | Endpoint | TcpMapping | ErrorInfo | ResultInfo


# --- value codecs: (value, xor pad) -> bytes and back -------------------------------------------


def _need(data: bytes, n: int, what: str) -> None:
    if len(data) != n:
        raise MalformedMessage(f"{what}: expected {n} bytes, got {len(data)}")


def _uint(width: int) -> tuple[Callable[[Any, bytes], bytes], Callable[[bytes, bytes], int]]:
    fmt = {1: "!B", 2: "!H", 4: "!I"}[width]

    def pack(value: Any, _pad: bytes) -> bytes:
        return struct.pack(fmt, value)

    def unpack(data: bytes, _pad: bytes) -> int:
        _need(data, width, f"{width}-byte integer")
        return int(struct.unpack(fmt, data)[0])

    return pack, unpack


def _bytes(
    min_len: int = 0, max_len: int = MAX_MESSAGE_LEN
) -> tuple[Callable[..., bytes], Callable[..., bytes]]:
    def pack(value: Any, _pad: bytes) -> bytes:
        return bytes(value)

    def unpack(data: bytes, _pad: bytes) -> bytes:
        if not min_len <= len(data) <= max_len:
            raise MalformedMessage(f"byte string of {len(data)} bytes, allowed {min_len}..{max_len}")
        return bytes(data)

    return pack, unpack


def pack_endpoint(ep: Endpoint, pad: bytes) -> bytes:
    raw = ipaddress.ip_address(ep.host).packed
    family = 4 if len(raw) == 4 else 6
    xaddr = bytes(a ^ b for a, b in zip(raw, pad, strict=False))
    return struct.pack("!BBH", family, 0, ep.port ^ MAGIC) + xaddr


def unpack_endpoint(data: bytes, pad: bytes) -> Endpoint:
    if len(data) < 4:
        raise MalformedMessage("endpoint shorter than 4 bytes")
    family, _, xport = struct.unpack_from("!BBH", data)
    size = {4: 4, 6: 16}.get(family)
    if size is None:
        raise MalformedMessage(f"endpoint address family {family} is neither 4 nor 6")
    _need(data, 4 + size, f"IPv{family} endpoint")
    raw = bytes(a ^ b for a, b in zip(data[4:], pad, strict=False))
    return Endpoint(str(ipaddress.ip_address(raw)), xport ^ MAGIC)


def _pack_mapping(value: Any, pad: bytes) -> bytes:
    return struct.pack("!H", value.local_port) + pack_endpoint(value.public, pad)


def _unpack_mapping(data: bytes, pad: bytes) -> TcpMapping:
    if len(data) < 2:
        raise MalformedMessage("TCP mapping shorter than 2 bytes")
    return TcpMapping(struct.unpack_from("!H", data)[0], unpack_endpoint(data[2:], pad))


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage("reason text is not UTF-8") from None


def _utf8(text: str, limit: int = 256) -> bytes:
    """At most ``limit`` bytes of UTF-8, never cutting a character in two."""
    return text.encode()[:limit].decode("utf-8", "ignore").encode()


def _pack_error(value: ErrorInfo, _pad: bytes) -> bytes:
    return struct.pack("!H", value.code) + _utf8(value.reason)


def _unpack_error(data: bytes, _pad: bytes) -> ErrorInfo:
    if len(data) < 2:
        raise MalformedMessage("error attribute shorter than 2 bytes")
    code = struct.unpack_from("!H", data)[0]
    try:
        return ErrorInfo(ErrorCode(code), _text(data[2:]))
    except ValueError:
        raise MalformedMessage(f"unknown error code {code}") from None


def _pack_result(value: ResultInfo, _pad: bytes) -> bytes:
    return struct.pack("!HI", value.code, value.elapsed_ms) + _utf8(value.detail)


def _unpack_result(data: bytes, _pad: bytes) -> ResultInfo:
    if len(data) < 6:
        raise MalformedMessage("result attribute shorter than 6 bytes")
    code, elapsed = struct.unpack_from("!HI", data)
    try:
        return ResultInfo(ResultCode(code), elapsed, _text(data[6:]))
    except ValueError:
        raise MalformedMessage(f"unknown result code {code}") from None


@dataclass(frozen=True)
class AttributeSpec:
    attr: Attr
    pack: Callable[[Any, bytes], bytes]
    unpack: Callable[[bytes, bytes], AttrValue]
    doc: str
    layout: str


COOKIE_LEN = 24
TOKEN_LEN = 16


def _names(values: type[enum.IntEnum]) -> str:
    """``0 NAME, 1 OTHER, ...``: an enum's wire values for the generated docs."""
    return ", ".join(f"{int(v)} {v.name}" for v in values)


_u8, _u16, _u32 = _uint(1), _uint(2), _uint(4)

ATTRIBUTES: dict[Attr, AttributeSpec] = {
    spec.attr: spec
    for spec in (
        AttributeSpec(
            Attr.COOKIE,
            *_bytes(COOKIE_LEN, COOKIE_LEN),
            "address-validation cookie from the server",
            "server time ms (8) | HMAC of source, session and time (16)",
        ),
        AttributeSpec(
            Attr.MAPPED_UDP,
            pack_endpoint,
            unpack_endpoint,
            "the UDP source endpoint the server saw",
            "family (1) | 0 (1) | xport (2) | xaddr (4/16)",
        ),
        AttributeSpec(
            Attr.MAPPED_TCP,
            _pack_mapping,
            _unpack_mapping,
            "the public TCP endpoint the server saw for a local port",
            "local port (2) | endpoint",
        ),
        AttributeSpec(
            Attr.PEER_UDP,
            pack_endpoint,
            unpack_endpoint,
            "the peer's UDP endpoint as the server saw it",
            "endpoint",
        ),
        AttributeSpec(
            Attr.PEER_TCP,
            _pack_mapping,
            _unpack_mapping,
            "one of the peer's TCP mappings as the server saw it (repeatable)",
            "local port (2) | endpoint",
        ),
        AttributeSpec(
            Attr.SEALED,
            *_bytes(28, 512),
            "peer info sealed end to end (ChaCha20-Poly1305)",
            "nonce (12) | ciphertext | tag (16)",
        ),
        AttributeSpec(
            Attr.TOKEN,
            *_bytes(TOKEN_LEN, TOKEN_LEN),
            "names the peer on the TCP discovery port",
            "16 random bytes",
        ),
        AttributeSpec(Attr.TCP_PORT, *_u16, "the server's TCP discovery port", "port (2)"),
        AttributeSpec(Attr.DELAY_MS, *_u32, "fire the punch this many ms after receiving GO", "ms (4)"),
        AttributeSpec(Attr.RTT_MS, *_u32, "round-trip time to the server", "ms (4)"),
        AttributeSpec(
            Attr.ERROR, _pack_error, _unpack_error, "error code and reason", "code (2) | UTF-8 text"
        ),
        AttributeSpec(
            Attr.RESULT,
            _pack_result,
            _unpack_result,
            "outcome of the punch",
            "code (2) | elapsed ms (4) | UTF-8 text",
        ),
        AttributeSpec(Attr.PADDING, *_bytes(), "makes a request at least as large as its answer", "zeros"),
        AttributeSpec(Attr.SLOT, *_u8, "the peer's slot in its session, 0 or 1", "slot (1)"),
        AttributeSpec(Attr.LOCAL_PORT, *_u16, "the client's local TCP port being discovered", "port (2)"),
        AttributeSpec(
            Attr.ATTEMPT,
            *_u8,
            "which attempt of the strategy cascade READY/GO is for (absent: 0); GO echoes it",
            "attempt (1)",
        ),
        AttributeSpec(
            Attr.PAIRED_US,
            *_u32,
            "microseconds since the session's second peer registered, when this PEER left the server",
            "us (4)",
        ),
        # The NAT probe (rawpunch.probe; PROBE / PROBE_ACK).
        AttributeSpec(Attr.PROBE_KIND, *_u8, f"what a PROBE asks for: {_names(ProbeKind)}", "kind (1)"),
        AttributeSpec(
            Attr.TARGET_PORT, *_u16, "port of the client's own address for the unsolicited SYN", "port (2)"
        ),
        AttributeSpec(
            Attr.ALT_ADDRESS,
            pack_endpoint,
            unpack_endpoint,
            "the server's second address, with its TCP discovery port",
            "endpoint",
        ),
        AttributeSpec(
            Attr.PROBE_PORT, *_u16, "the server's second TCP port (both addresses listen on it)", "port (2)"
        ),
        AttributeSpec(
            Attr.MAPPING_PORT,
            *_u16,
            "another TCP discovery port of the main address: the same local port discovered there again "
            "shows whether the NAT maps per remote port",
            "port (2)",
        ),
        AttributeSpec(
            Attr.PROBE_FROM,
            pack_endpoint,
            unpack_endpoint,
            "source of a SYN the server just sent toward the client (repeatable)",
            "endpoint",
        ),
        AttributeSpec(Attr.PROBE_BUDGET, *_u8, "crafted SYNs the client may still ask for", "count (1)"),
        AttributeSpec(
            Attr.REACTION, *_u8, f"what answered the unsolicited SYN: {_names(Reaction)}", "reaction (1)"
        ),
    )
}

REPEATABLE = frozenset({Attr.PEER_TCP, Attr.MAPPED_TCP, Attr.PROBE_FROM})


@dataclass(frozen=True)
class MessageSpec:
    type: MessageType
    from_client: bool
    required: frozenset[Attr]
    optional: frozenset[Attr]
    doc: str


def _spec(t: MessageType, from_client: bool, req: set[Attr], opt: set[Attr], doc: str) -> MessageSpec:
    return MessageSpec(t, from_client, frozenset(req), frozenset(opt | {Attr.PADDING}), doc)


A = Attr
MESSAGES: dict[MessageType, MessageSpec] = {
    s.type: s
    for s in (
        _spec(
            MessageType.REGISTER,
            True,
            set(),
            {A.COOKIE},
            "join a session; without a valid cookie the server answers COOKIE",
        ),
        _spec(
            MessageType.COOKIE, False, {A.COOKIE}, set(), "address validation: repeat the request with this"
        ),
        _spec(
            MessageType.REGISTERED,
            False,
            {A.SLOT, A.MAPPED_UDP, A.TCP_PORT, A.TOKEN},
            {A.RTT_MS, A.MAPPING_PORT},
            "you are in slot N; your UDP endpoint; where to discover TCP endpoints",
        ),
        _spec(
            MessageType.DISCOVER,
            True,
            {A.TOKEN, A.LOCAL_PORT},
            set(),
            "sent over TCP from the local port being discovered",
        ),
        _spec(MessageType.DISCOVERED, False, {A.MAPPED_TCP}, set(), "the public endpoint of that TCP flow"),
        _spec(
            MessageType.INFO, True, {A.COOKIE, A.SEALED}, set(), "my sealed peer info; answer with the peer's"
        ),
        _spec(MessageType.PENDING, False, set(), set(), "the peer is not there yet; keep asking"),
        _spec(
            MessageType.PEER,
            False,
            {A.SLOT, A.PEER_UDP, A.SEALED},
            {A.PEER_TCP, A.PAIRED_US},
            "the peer: server-observed endpoints, its sealed info, and how long ago both had registered",
        ),
        _spec(
            MessageType.READY,
            True,
            {A.COOKIE},
            {A.RTT_MS, A.ATTEMPT},
            "ready to punch (attempt N); answer GO when both are ready for the same attempt",
        ),
        _spec(MessageType.GO, False, {A.DELAY_MS}, {A.ATTEMPT}, "punch DELAY_MS after this arrives"),
        _spec(MessageType.RESULT, True, {A.COOKIE, A.RESULT}, set(), "report the outcome"),
        _spec(MessageType.RESULT_ACK, False, set(), set(), "the report arrived"),
        _spec(MessageType.ERROR, False, {A.ERROR}, {A.COOKIE}, "the request failed; the code says why"),
        _spec(
            MessageType.PROBE,
            True,
            {A.COOKIE, A.PROBE_KIND},
            {A.LOCAL_PORT, A.TARGET_PORT},
            "NAT probe: send crafted SYNs toward my observed endpoints (needs --alt-address)",
        ),
        _spec(
            MessageType.PROBE_ACK,
            False,
            {A.PROBE_KIND, A.PROBE_BUDGET},
            {A.ALT_ADDRESS, A.PROBE_PORT, A.PROBE_FROM, A.REACTION},
            "done: the SYNs left before this answer (their sources), or what came back",
        ),
    )
}


@dataclass(frozen=True)
class Message:
    type: MessageType
    transaction_id: bytes
    session_id: bytes
    attributes: tuple[tuple[Attr, AttrValue], ...] = field(default=())

    def get(self, attr: Attr) -> Any:
        """The first value of ``attr``, or None."""
        return next((v for a, v in self.attributes if a == attr), None)

    def get_all(self, attr: Attr) -> list[Any]:
        return [v for a, v in self.attributes if a == attr]


_TYPE_BY_CODE = {int(t): t for t in MessageType}
_ATTR_BY_CODE = {int(a): a for a in Attr}


def _xor_pad(txid: bytes) -> bytes:
    return struct.pack("!H", MAGIC) + txid + struct.pack("!H", MAGIC)


def iter_tlv(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Type-length-value items, each value padded to a multiple of 4 bytes."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise MalformedMessage(f"attribute header truncated at offset {pos}")
        code, length = struct.unpack_from("!HH", data, pos)
        end = pos + 4 + length
        if end > len(data):
            raise MalformedMessage(f"attribute 0x{code:04x} of {length} bytes runs past the end")
        yield code, data[pos + 4 : end]
        pos = end + (-length % 4)
    if pos != len(data):
        raise MalformedMessage("attribute padding runs past the end")


def pack_tlv(code: int, value: bytes) -> bytes:
    return struct.pack("!HH", code, len(value)) + value + b"\x00" * (-len(value) % 4)


def encode(msg: Message, key: bytes) -> bytes:
    """Serialise and sign ``msg`` with the session's control key."""
    if len(msg.transaction_id) != TXID_LEN or len(msg.session_id) != SESSION_ID_LEN:
        raise ValueError("transaction id must be 12 bytes and session id 16 bytes")
    pad = _xor_pad(msg.transaction_id)
    body = b"".join(pack_tlv(a, ATTRIBUTES[a].pack(v, pad)) for a, v in msg.attributes)
    head = HEADER.pack(MAGIC, VERSION, msg.type, len(body), 0, msg.transaction_id, msg.session_id)
    signed = head + body
    out = signed + hmac.digest(key, signed, "sha256")
    if len(out) > MAX_MESSAGE_LEN:
        raise ValueError(f"message of {len(out)} bytes exceeds {MAX_MESSAGE_LEN}")
    return out


@dataclass(frozen=True, slots=True)
class Header:
    type: MessageType
    transaction_id: bytes
    session_id: bytes
    attr_len: int


def peek_header(data: bytes) -> Header:
    """Parse and check the fixed header only: enough to pick the key for ``decode``."""
    if len(data) < MIN_MESSAGE_LEN:
        raise MalformedMessage(f"{len(data)} bytes is shorter than the {MIN_MESSAGE_LEN}-byte minimum")
    if len(data) > MAX_MESSAGE_LEN:
        raise MalformedMessage(f"{len(data)} bytes exceeds the {MAX_MESSAGE_LEN}-byte maximum")
    magic, version, mtype, attr_len, reserved, txid, sid = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MalformedMessage(f"bad magic 0x{magic:04x}: not a rawpunch message")
    if version != VERSION:
        raise UnsupportedVersion(f"protocol version {version}; this rawpunch speaks version {VERSION}")
    mtype_enum = _TYPE_BY_CODE.get(mtype)
    if mtype_enum is None:
        raise MalformedMessage(f"unknown message type 0x{mtype:02x}")
    if reserved:
        raise MalformedMessage("reserved header bits are set")
    if HEADER_LEN + attr_len + MAC_LEN != len(data):
        raise MalformedMessage(
            f"length field says {attr_len} attribute bytes, datagram has {len(data) - MIN_MESSAGE_LEN}"
        )
    return Header(mtype_enum, txid, sid, attr_len)


def decode(data: bytes, key: bytes, header: Header | None = None) -> Message:
    """Verify the MAC, then parse. Raises a ``RemoteProtocolError`` subclass on any defect."""
    head = header or peek_header(data)
    signed, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if not hmac.compare_digest(hmac.digest(key, signed, "sha256"), mac):
        raise AuthenticationError(
            "message authentication (HMAC-SHA256) failed: forged, corrupted, or from a different session"
        )
    spec = MESSAGES[head.type]
    pad = _xor_pad(head.transaction_id)
    attrs: list[tuple[Attr, AttrValue]] = []
    for code, raw in iter_tlv(signed[HEADER_LEN:]):
        attr = _ATTR_BY_CODE.get(code)
        if attr is None:
            if code < 0x8000:
                raise MalformedMessage(f"unknown comprehension-required attribute 0x{code:04x}")
            continue
        if attr not in spec.required and attr not in spec.optional:
            raise MalformedMessage(f"attribute {attr.name} is not allowed in {head.type.name}")
        if attr not in REPEATABLE and any(a == attr for a, _ in attrs):
            raise MalformedMessage(f"attribute {attr.name} repeated")
        attrs.append((attr, ATTRIBUTES[attr].unpack(raw, pad)))
    missing = spec.required - {a for a, _ in attrs}
    if missing:
        names = ", ".join(sorted(a.name for a in missing))
        raise MalformedMessage(f"{head.type.name} lacks required attribute(s) {names}")
    return Message(head.type, head.transaction_id, head.session_id, tuple(attrs))
