"""Shared pieces of the control-protocol unit tests.

* Keys, derived once per test process (scrypt costs ~50 ms a derivation).
* Raw message builders that do not go through ``codec.encode``, to make defective messages that still
  carry a valid MAC.
* A hypothesis strategy for every valid message, built from ``codec.MESSAGES`` and ``codec.ATTRIBUTES``.
* A scripted server for the client tests (``reply_to``) and ``client_in(state)``, which drives a
  ``ClientCore`` into any ``ClientState``.
* ``Rendezvous``: two ``ClientCore`` and one ``ServerCore`` pumped into each other through an in-memory
  network with per-link delay and seeded random loss, driven by a fake clock (h11's connection pair).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from rawpunch.proto import codec
from rawpunch.proto.client import (
    ClientConfig,
    ClientCore,
    ClientState,
    Event,
    Go,
    PeerFound,
    Registered,
)
from rawpunch.proto.codec import (
    Attr,
    Endpoint,
    ErrorCode,
    ErrorInfo,
    Message,
    MessageType,
    ResultCode,
    ResultInfo,
    TcpMapping,
)
from rawpunch.proto.errors import RemoteProtocolError
from rawpunch.proto.keys import SessionKeys
from rawpunch.proto.peerinfo import PeerInfo, encode_peer_info
from rawpunch.proto.server import ServerConfig, ServerCore

DATA = Path(__file__).resolve().parent.parent / "data"

SECRET = "correct horse battery staple"
KEYS = SessionKeys.derive(SECRET)
OTHER_KEYS = SessionKeys.derive("a different secret")

TXID = bytes.fromhex("0102030405060708090a0b0c")
SESSION_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
KEY = bytes(range(32))  # a fixed HMAC key for codec-only tests
HEADER_FORMAT = "!HBBHH12s16s"  # written out here, not taken from the codec


def load_hex(name: str) -> bytes:
    """The bytes of ``tests/data/<name>.hex``: hex digits; whitespace and ``#`` comments are ignored."""
    text = (DATA / f"{name}.hex").read_text()
    return bytes.fromhex("".join(line.split("#", 1)[0] for line in text.splitlines()))


# --- raw messages, signed by hand -----------------------------------------------------------------


def tlv(code: int, value: bytes, *, length: int | None = None, pad: bool = True) -> bytes:
    """One attribute; ``length`` overrides the length field, ``pad=False`` leaves the padding out."""
    n = len(value) if length is None else length
    return struct.pack("!HH", code, n) + value + (b"\x00" * (-len(value) % 4) if pad else b"")


def sign(unsigned: bytes, key: bytes = KEY) -> bytes:
    return unsigned + hmac.new(key, unsigned, hashlib.sha256).digest()


def raw_message(
    mtype: int,
    body: bytes = b"",
    *,
    key: bytes = KEY,
    txid: bytes = TXID,
    sid: bytes = SESSION_ID,
    magic: int = 0x5250,
    version: int = 1,
    reserved: int = 0,
    attr_len: int | None = None,
) -> bytes:
    """A message assembled byte by byte and signed with ``key``, whatever its defects."""
    length = len(body) if attr_len is None else attr_len
    head = struct.pack(HEADER_FORMAT, magic, version, mtype, length, reserved, txid, sid)
    return sign(head + body, key)


# --- every valid message, as a hypothesis strategy --------------------------------------------------

endpoints = st.builds(
    Endpoint,
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str),
    st.integers(0, 0xFFFF),
)
tcp_mappings = st.builds(TcpMapping, st.integers(0, 0xFFFF), endpoints)
# At most 64 characters, so never more than the 256 UTF-8 bytes the encoder keeps.
texts = st.text(st.characters(codec="utf-8"), max_size=64)

ATTRIBUTE_VALUES: dict[Attr, st.SearchStrategy[Any]] = {
    Attr.COOKIE: st.binary(min_size=codec.COOKIE_LEN, max_size=codec.COOKIE_LEN),
    Attr.MAPPED_UDP: endpoints,
    Attr.MAPPED_TCP: tcp_mappings,
    Attr.PEER_UDP: endpoints,
    Attr.PEER_TCP: tcp_mappings,
    Attr.SEALED: st.binary(min_size=28, max_size=512),
    Attr.TOKEN: st.binary(min_size=codec.TOKEN_LEN, max_size=codec.TOKEN_LEN),
    Attr.TCP_PORT: st.integers(0, 0xFFFF),
    Attr.DELAY_MS: st.integers(0, 0xFFFFFFFF),
    Attr.RTT_MS: st.integers(0, 0xFFFFFFFF),
    Attr.ERROR: st.builds(ErrorInfo, st.sampled_from(ErrorCode), texts),
    Attr.RESULT: st.builds(ResultInfo, st.sampled_from(ResultCode), st.integers(0, 0xFFFFFFFF), texts),
    Attr.PADDING: st.binary(max_size=64),
    Attr.SLOT: st.integers(0, 0xFF),
    Attr.LOCAL_PORT: st.integers(0, 0xFFFF),
    Attr.PROBE_KIND: st.integers(0, 0xFF),
    Attr.TARGET_PORT: st.integers(0, 0xFFFF),
    Attr.ALT_ADDRESS: endpoints,
    Attr.PROBE_PORT: st.integers(0, 0xFFFF),
    Attr.PROBE_FROM: endpoints,
    Attr.PROBE_BUDGET: st.integers(0, 0xFF),
    Attr.REACTION: st.integers(0, 0xFF),
    Attr.ATTEMPT: st.integers(0, 0xFF),
    Attr.PAIRED_US: st.integers(0, 0xFFFFFFFF),
    Attr.MAPPING_PORT: st.integers(0, 0xFFFF),
}


@st.composite
def messages(draw: st.DrawFn, types: st.SearchStrategy[MessageType] | None = None) -> Message:
    """A valid message: required attributes always, optional ones sometimes, repeatable ones 1-3 times,
    in any order."""
    mtype = draw(types if types is not None else st.sampled_from(MessageType))
    spec = codec.MESSAGES[mtype]
    present = sorted(spec.required) + [a for a in sorted(spec.optional) if draw(st.booleans())]
    attrs: list[tuple[Attr, Any]] = []
    for attr in present:
        count = draw(st.integers(1, 3)) if attr in codec.REPEATABLE else 1
        attrs += [(attr, draw(ATTRIBUTE_VALUES[attr])) for _ in range(count)]
    return Message(
        mtype,
        draw(st.binary(min_size=12, max_size=12)),
        draw(st.binary(min_size=16, max_size=16)),
        tuple(draw(st.permutations(attrs))),
    )


# --- a scripted server, for the client tests ---------------------------------------------------------

A_PUBLIC = Endpoint("203.0.113.7", 40000)
B_PUBLIC = Endpoint("2001:db8::b", 50000)
TOKEN = bytes(range(100, 116))
COOKIE = bytes(range(24))
TCP_PORT = 3478
PEER_INFO = PeerInfo(nonce=b"peer-nnc", capabilities=3, isn=123456, ttl=3, tcp_port=40001)
MY_INFO = PeerInfo(nonce=b"mine-nnc", tcp_port=40000)
SERVER = "rv.example:3478"


def reply_attrs(mtype: MessageType, *, my_slot: int = 0) -> tuple[tuple[Attr, Any], ...]:
    """Typical valid attributes of each server message, for a client in slot ``my_slot``."""
    peer_slot = 1 - my_slot
    return {
        MessageType.COOKIE: ((Attr.COOKIE, COOKIE),),
        MessageType.REGISTERED: (
            (Attr.SLOT, my_slot),
            (Attr.MAPPED_UDP, A_PUBLIC),
            (Attr.TCP_PORT, TCP_PORT),
            (Attr.TOKEN, TOKEN),
            (Attr.RTT_MS, 50),
        ),
        MessageType.DISCOVERED: ((Attr.MAPPED_TCP, TcpMapping(40000, Endpoint("203.0.113.7", 41000))),),
        MessageType.PENDING: (),
        MessageType.PEER: (
            (Attr.SLOT, peer_slot),
            (Attr.PEER_UDP, B_PUBLIC),
            (Attr.PEER_TCP, TcpMapping(40001, Endpoint("2001:db8::b", 51000))),
            (Attr.SEALED, KEYS.seal(encode_peer_info(PEER_INFO), peer_slot)),
        ),
        MessageType.GO: ((Attr.DELAY_MS, 120),),
        MessageType.RESULT_ACK: (),
        MessageType.PROBE_ACK: (
            (Attr.PROBE_KIND, 0),
            (Attr.PROBE_BUDGET, 16),
            (Attr.ALT_ADDRESS, Endpoint("198.51.100.194", TCP_PORT)),
            (Attr.PROBE_PORT, TCP_PORT + 1),
        ),
        MessageType.ERROR: ((Attr.ERROR, ErrorInfo(ErrorCode.SESSION_FULL, "two peers already")),),
    }[mtype]


def server_message(
    mtype: MessageType,
    txid: bytes,
    attrs: tuple[tuple[Attr, Any], ...] | None = None,
    keys: SessionKeys = KEYS,
) -> bytes:
    """A server message of type ``mtype`` for transaction ``txid``, with typical attributes by default."""
    msg = Message(mtype, txid, keys.session_id, reply_attrs(mtype) if attrs is None else attrs)
    return codec.encode(msg, keys.control_key)


def reply_to(
    request: bytes,
    mtype: MessageType,
    attrs: tuple[tuple[Attr, Any], ...] | None = None,
    keys: SessionKeys = KEYS,
) -> bytes:
    """The server's answer of type ``mtype`` to ``request``."""
    return server_message(mtype, codec.peek_header(request).transaction_id, attrs, keys)


def txid_of(data: bytes) -> bytes:
    return codec.peek_header(data).transaction_id


def decode_sent(data: bytes, keys: SessionKeys = KEYS) -> Message:
    return codec.decode(data, keys.control_key)


def client_config(**overrides: Any) -> ClientConfig:
    return ClientConfig(keys=KEYS, server=SERVER, **overrides)


@dataclass
class Driven:
    """A client driven into a state; ``request`` is the last datagram it sent (answered or not)."""

    client: ClientCore
    request: bytes | None
    now: float
    events: list[Event] = field(default_factory=list)

    def send(self) -> bytes:
        out = self.client.datagrams_to_send(self.now)
        assert len(out) == 1, f"expected one datagram, got {len(out)}"
        self.request = out[0]
        return out[0]

    def answer(self, mtype: MessageType, delay: float = 0.125) -> None:
        assert self.request is not None
        self.now += delay
        self.client.receive_datagram(reply_to(self.request, mtype), self.now)
        while (event := self.client.next_event()) is not None:
            self.events.append(event)
        out = self.client.datagrams_to_send(self.now)
        if out:
            self.request = out[-1]


S, M = ClientState, MessageType
Step = Callable[[Driven], None]


def _register(d: Driven) -> None:
    d.client.register(d.now)
    d.send()


def _exchange(d: Driven) -> None:
    d.client.exchange(MY_INFO, d.now)
    d.send()


def _ready(d: Driven) -> None:
    d.client.ready(d.now)
    d.send()


def _report(d: Driven) -> None:
    d.client.report(ResultInfo(ResultCode.CONNECTED, 80, "ok"), d.now)
    d.send()


def _probe(d: Driven) -> None:
    d.client.probe(codec.ProbeKind.HELLO, d.now)
    d.send()


def _answer(mtype: MessageType) -> Step:
    return lambda d: d.answer(mtype)


_PATHS: dict[ClientState, list[Step]] = {S.IDLE: []}
_PATHS[S.REGISTERING] = [_register]
_PATHS[S.REGISTERED] = [*_PATHS[S.REGISTERING], _answer(M.COOKIE), _answer(M.REGISTERED)]
_PATHS[S.PROBING] = [*_PATHS[S.REGISTERED], _probe]
_PATHS[S.EXCHANGING] = [*_PATHS[S.REGISTERED], _exchange]
_PATHS[S.PAIRED] = [*_PATHS[S.EXCHANGING], _answer(M.PEER)]
_PATHS[S.READYING] = [*_PATHS[S.PAIRED], _ready]
_PATHS[S.GO] = [*_PATHS[S.READYING], _answer(M.GO)]
_PATHS[S.REPORTING] = [*_PATHS[S.GO], _report]
_PATHS[S.DONE] = [*_PATHS[S.REPORTING], _answer(M.RESULT_ACK)]
_PATHS[S.FAILED] = [*_PATHS[S.REGISTERING], _answer(M.ERROR)]
assert set(_PATHS) == set(ClientState)


def client_in(state: ClientState, now: float = 100.0, **config: Any) -> Driven:
    """A client brought into ``state`` the shortest way (with a cookie from REGISTERED on, as from a
    real server), by a scripted server that answers every request ``Driven.answer`` delay later."""
    driven = Driven(ClientCore(client_config(**config)), None, now)
    for step in _PATHS[state]:
        step(driven)
    assert driven.client.state is state
    return driven


# --- an in-memory network and a pump ------------------------------------------------------------------

Addr = tuple[str, int]
SERVER_ADDR: Addr = ("192.0.2.1", 3478)


class Network:
    """Datagrams between the server and its clients, a star: each client's link has its own one-way
    delay; each datagram is lost with probability ``loss`` (seeded, so runs are reproducible)."""

    def __init__(self, owd: dict[Addr, float], loss: float = 0.0, seed: int = 0) -> None:
        self.owd = owd
        self.loss = loss
        self.rng = random.Random(seed)
        self.queue: list[tuple[float, int, Addr, Addr, bytes]] = []
        self.sent = 0
        self.lost = 0

    def send(self, src: Addr, dst: Addr, data: bytes, now: float) -> None:
        self.sent += 1
        if self.rng.random() < self.loss:
            self.lost += 1
            return
        link = src if src in self.owd else dst
        heapq.heappush(self.queue, (now + self.owd[link], self.sent, src, dst, data))

    def next_time(self) -> float | None:
        return self.queue[0][0] if self.queue else None

    def due(self, now: float) -> list[tuple[Addr, Addr, bytes]]:
        out = []
        while self.queue and self.queue[0][0] <= now:
            _, _, src, dst, data = heapq.heappop(self.queue)
            out.append((src, dst, data))
        return out


@dataclass
class App:
    """What ``rawpunch peer`` does with a ClientCore: register, discover its TCP port, exchange, ready,
    punch after the GO delay, report. ``addr`` is its public UDP endpoint (after its NAT)."""

    name: str
    addr: Addr
    core: ClientCore
    info: PeerInfo
    local_port: int
    tcp_public: Addr
    events: list[tuple[float, Event]] = field(default_factory=list)
    rejected: list[RemoteProtocolError] = field(default_factory=list)
    mapping: TcpMapping | None = None
    punch_at: float | None = None
    fired_at: float | None = None

    def finished(self) -> bool:
        return self.core.state in (ClientState.DONE, ClientState.FAILED)


class Rendezvous:
    """Two peers and a server, pumped through a ``Network`` by a fake clock until both are done."""

    def __init__(
        self,
        *,
        loss: float = 0.0,
        seed: int = 0,
        owd: tuple[float, float] = (0.010, 0.040),
        server_config: ServerConfig | None = None,
        **client_config: Any,
    ) -> None:
        self.now = 0.0
        self.server = ServerCore(server_config or ServerConfig(tcp_port=TCP_PORT, cookie_key=bytes(32)), 0.0)
        self.apps = [
            App(
                "A",
                ("203.0.113.10", 40000),
                ClientCore(ClientConfig(keys=KEYS, **client_config)),
                PeerInfo(nonce=b"nonce--A", capabilities=1, isn=1000, tcp_port=5000),
                5000,
                ("203.0.113.10", 45000),
            ),
            App(
                "B",
                ("2001:db8::20", 50000),
                ClientCore(ClientConfig(keys=KEYS, **client_config)),
                PeerInfo(nonce=b"nonce--B", capabilities=2, isn=2000, tcp_port=6000, local=(B_PUBLIC,)),
                6000,
                ("2001:db8::20", 56000),
            ),
        ]
        self.net = Network({a.addr: d for a, d in zip(self.apps, owd, strict=True)}, loss, seed)
        # (source of the datagram the server handled, destination, type of what it sent)
        self.server_sent: list[tuple[Addr, Addr, MessageType]] = []

    def run(self, until: float = 300.0) -> None:
        for app in self.apps:
            app.core.register(self.now)
            self._flush(app)
        for _ in range(100_000):
            if all(app.finished() for app in self.apps):
                return
            candidates = [
                t
                for t in (
                    self.net.next_time(),
                    self.server.get_timer(),
                    *(app.core.get_timer() for app in self.apps),
                    *(app.punch_at for app in self.apps),
                )
                if t is not None
            ]
            self.now = min(candidates)
            assert self.now <= until, f"not done after {until} s of simulated time"
            for src, dst, data in self.net.due(self.now):
                if dst == SERVER_ADDR:
                    self._server_receives(src, data)
                else:
                    self._client_receives(next(a for a in self.apps if a.addr == dst), data)
            for app in self.apps:
                if app.punch_at is not None and app.punch_at <= self.now:
                    app.punch_at, app.fired_at = None, self.now
                    app.core.report(ResultInfo(ResultCode.CONNECTED, 80, "punched"), self.now)
                app.core.handle_timer(self.now)
                self._drain(app)
            self.server.handle_timer(self.now)
        raise AssertionError(f"no end after 100000 steps, at {self.now} s")

    def _server_receives(self, src: Addr, data: bytes) -> None:
        for out, dst in self.server.receive_datagram(data, src, self.now):
            self.server_sent.append((src, dst, codec.peek_header(out).type))
            self.net.send(SERVER_ADDR, dst, out, self.now)

    def _client_receives(self, app: App, data: bytes) -> None:
        try:
            app.core.receive_datagram(data, self.now)
        except RemoteProtocolError as exc:
            app.rejected.append(exc)
        self._drain(app)

    def _drain(self, app: App) -> None:
        while (event := app.core.next_event()) is not None:
            app.events.append((self.now, event))
            if isinstance(event, Registered):
                # TCP is reliable: the DISCOVER exchange is a direct call, from the NAT's TCP mapping.
                request = app.core.discovery_request(app.local_port)
                reply = self.server.receive_discovery(request, app.tcp_public, self.now)
                app.mapping = app.core.discovery_response(reply)
                app.core.exchange(app.info, self.now)
            elif isinstance(event, PeerFound):
                app.core.ready(self.now)
            elif isinstance(event, Go):
                app.punch_at = self.now + event.delay
        self._flush(app)

    def _flush(self, app: App) -> None:
        for data in app.core.datagrams_to_send(self.now):
            self.net.send(app.addr, SERVER_ADDR, data, self.now)
