"""The rendezvous client as a sans-IO core (the aioquic shape).

The caller feeds ``receive_datagram(data, now)`` and ``handle_timer(now)``, sends what
``datagrams_to_send(now)`` returns, sleeps until ``get_timer()``, and reads ``next_event()``.
User actions (``register``, ``exchange``, ``ready``, ``report``) start one request at a time.

Retransmission (RFC 8489 section 6.2.1 style): the request is re-sent with a doubling timeout,
each time under a fresh transaction id, so every reply names the transmission it answers: RTT
samples are exact (no Karn ambiguity) and a replayed reply matches nothing. After PENDING the
client is in a long poll: it re-asks every ``poll_interval``, which also keeps its NAT mapping
alive, until the server pushes the answer or ``peer_timeout`` passes.

READY polls faster, every two round trips to the server (``ready_poll``). The other peer is
usually ready within moments, and a pushed GO that is lost reaches this peer only as the answer
to its next poll: the poll interval is then how much later than the other peer it starts. With
the 1 s interval, a peer starting 0.25 or 1 s late caused 7 of the 9 misses of a 480-punch
port-prediction run over a lossy (1%) core: the connector was refused by a NAT not yet primed,
or the primer's retransmitted SYNs by a NAT not yet opened. The server also sends every GO
twice (``rawpunch.proto.server``).

Which reply is acceptable in which state is the table ``TRANSITIONS``; any other reply raises
``UnexpectedMessage`` and changes nothing.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rawpunch.proto import codec
from rawpunch.proto.codec import (
    Attr,
    Endpoint,
    ErrorCode,
    Message,
    MessageType,
    ProbeKind,
    Reaction,
    ResultInfo,
    TcpMapping,
)
from rawpunch.proto.errors import (
    AuthenticationError,
    LocalProtocolError,
    MalformedMessage,
    ReplayError,
    UnexpectedMessage,
)
from rawpunch.proto.keys import SealError, SessionKeys
from rawpunch.proto.peerinfo import PeerInfo, decode_peer_info, encode_peer_info
from rawpunch.proto.replay import TxidSource

REGISTER_SIZE = 128  # pad REGISTER so the server's COOKIE answer (96 bytes) is never larger


class ClientState(enum.Enum):
    IDLE = "idle"
    REGISTERING = "registering"
    REGISTERED = "registered"
    PROBING = "probing"
    EXCHANGING = "exchanging"
    PAIRED = "paired"
    READYING = "readying"
    GO = "go"
    REPORTING = "reporting"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Registered:
    slot: int
    udp: Endpoint
    tcp_port: int
    rtt: float
    mapping_port: int | None = None
    """The server's second discovery port (``MAPPING_PORT``), if it has one."""


@dataclass(frozen=True)
class PeerFound:
    slot: int
    udp: Endpoint
    tcp: tuple[TcpMapping, ...]
    info: PeerInfo
    paired_age: float | None = None
    """Seconds between the second peer's registration and this PEER leaving the server (server clock)."""


@dataclass(frozen=True)
class Go:
    delay: float
    """Seconds to wait after receiving GO so that both peers fire together."""
    attempt: int = 0
    """The attempt of the strategy cascade this GO is for."""


@dataclass(frozen=True)
class ResultAcknowledged:
    pass


@dataclass(frozen=True)
class ProbeAnswer:
    """PROBE_ACK: the server did what a PROBE asked (its SYNs left before this answer)."""

    kind: ProbeKind
    budget: int
    alt_address: Endpoint | None = None
    probe_port: int | None = None
    sources: tuple[Endpoint, ...] = ()
    reaction: Reaction | None = None


@dataclass(frozen=True)
class Failed:
    reason: str
    code: ErrorCode | None = None


Event = Registered | PeerFound | Go | ResultAcknowledged | ProbeAnswer | Failed


def ready_poll(rtt: float | None, floor: float, ceiling: float) -> float:
    """Seconds between READY polls: two round trips to the server, within ``floor .. ceiling``."""
    return ceiling if rtt is None else min(ceiling, max(floor, 2 * rtt))


@dataclass
class ClientConfig:
    keys: SessionKeys
    server: str = "the rendezvous server"
    """How to name the server in error messages."""
    initial_rto: float = 0.25
    max_rto: float = 2.0
    request_timeout: float = 10.0
    """Fail when the server has not answered anything for this long."""
    poll_interval: float = 1.0
    ready_poll_floor: float = 0.05
    """READY polls every two round trips to the server, at least this often apart (``ready_poll``)."""
    peer_timeout: float = 60.0
    """Fail when the peer has not come (INFO or READY still pending) after this long."""


@dataclass
class _Request:
    type: MessageType
    attrs: tuple[tuple[Attr, codec.AttrValue], ...]
    started: float
    next_send: float
    rto: float
    last_heard: float
    sent: dict[bytes, float] = field(default_factory=dict)  # txid -> time sent, not yet answered
    parked: set[bytes] = field(default_factory=set)  # answered PENDING: only a pushed final answer may follow
    polling: bool = False


class ClientCore:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.keys = config.keys
        self.state = ClientState.IDLE
        self.slot: int | None = None
        self.rtt: float | None = None  # smallest sample: the path's floor, not its queueing
        self._txids = TxidSource()
        self._cookie: bytes | None = None
        self._token: bytes | None = None
        self._request: _Request | None = None
        self._outbox: list[bytes] = []
        self._events: deque[Event] = deque()
        self._discovery: dict[bytes, int] = {}
        self._attempt = 0

    # --- user actions ---------------------------------------------------------------------------

    def register(self, now: float) -> None:
        self._start(ClientState.IDLE, ClientState.REGISTERING, MessageType.REGISTER, (), now)

    def exchange(self, info: PeerInfo, now: float) -> None:
        """Send this peer's info sealed end to end; PeerFound follows once the peer did the same."""
        if self.state not in (ClientState.REGISTERED, ClientState.PAIRED):
            raise LocalProtocolError(f"exchange() needs a registered client, state is {self.state.value}")
        assert self.slot is not None
        sealed = self.keys.seal(encode_peer_info(info), self.slot)
        self._start(self.state, ClientState.EXCHANGING, MessageType.INFO, ((Attr.SEALED, sealed),), now)

    def ready(self, now: float, attempt: int = 0) -> None:
        """Ready for ``attempt`` (0, 1, ... of a strategy cascade); again after each GO for the next one."""
        if self.state not in (ClientState.PAIRED, ClientState.GO):
            raise LocalProtocolError(f"ready() needs a paired client, state is {self.state.value}")
        if not 0 <= attempt <= 0xFF:
            raise LocalProtocolError(f"attempt {attempt} is not in 0..255")
        rtt = ((Attr.RTT_MS, round(self.rtt * 1000)),) if self.rtt is not None else ()
        attrs = (*rtt, (Attr.ATTEMPT, attempt)) if attempt else rtt
        self._attempt = attempt
        self._start(self.state, ClientState.READYING, MessageType.READY, attrs, now)

    def report(self, result: ResultInfo, now: float) -> None:
        if self.state not in (ClientState.PAIRED, ClientState.GO):
            raise LocalProtocolError(f"report() needs a paired client, state is {self.state.value}")
        self._start(self.state, ClientState.REPORTING, MessageType.RESULT, ((Attr.RESULT, result),), now)

    def probe(
        self, kind: ProbeKind, now: float, local_port: int | None = None, target_port: int | None = None
    ) -> None:
        """Ask the server's NAT probe part for ``kind``; ProbeAnswer (or Failed, still registered) follows."""
        attrs: list[tuple[Attr, codec.AttrValue]] = [(Attr.PROBE_KIND, int(kind))]
        if local_port is not None:
            attrs.append((Attr.LOCAL_PORT, local_port))
        if target_port is not None:
            attrs.append((Attr.TARGET_PORT, target_port))
        self._start(ClientState.REGISTERED, ClientState.PROBING, MessageType.PROBE, tuple(attrs), now)

    def discovery_request(self, local_port: int) -> bytes:
        """A DISCOVER message to send over TCP from ``local_port`` to the server's TCP port."""
        if self._token is None:
            raise LocalProtocolError("discovery_request() needs a registered client")
        txid = self._txids.next()
        self._discovery[txid] = local_port
        msg = Message(
            MessageType.DISCOVER,
            txid,
            self.keys.session_id,
            ((Attr.TOKEN, self._token), (Attr.LOCAL_PORT, local_port)),
        )
        return codec.encode(msg, self.keys.control_key)

    def discovery_response(self, data: bytes) -> TcpMapping:
        """Check the server's DISCOVERED answer; returns the public endpoint it saw."""
        msg = self._decode(data)
        local_port = self._discovery.pop(msg.transaction_id, None)
        if local_port is None:
            raise ReplayError("DISCOVERED answers no outstanding discovery request")
        if msg.type is MessageType.ERROR:
            raise UnexpectedMessage(f"server refused discovery: {msg.get(Attr.ERROR).reason}")
        if msg.type is not MessageType.DISCOVERED:
            raise UnexpectedMessage(f"{msg.type.name} on the TCP discovery port")
        mapping: TcpMapping = msg.get(Attr.MAPPED_TCP)
        if mapping.local_port != local_port:
            raise UnexpectedMessage(
                f"server answered for local port {mapping.local_port}, asked {local_port}"
            )
        return mapping

    # --- I/O entry points -----------------------------------------------------------------------

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Take one datagram from the server. Raises ``RemoteProtocolError`` (state untouched)."""
        msg = self._decode(data)
        req = self._request
        txid = msg.transaction_id
        parked = req is not None and txid in req.parked and msg.type in _PUSHED_ANSWERS
        if req is None or not (txid in req.sent or parked):
            raise ReplayError(f"{msg.type.name} answers no outstanding request (late, duplicate or replayed)")
        handler = TRANSITIONS.get((self.state, msg.type))
        if handler is None:
            raise UnexpectedMessage(f"{msg.type.name} is not expected while {self.state.value}")
        rtt, sent = self.rtt, req.sent.pop(txid, None)  # each transmission is answered once ...
        if msg.type is MessageType.PENDING:
            req.parked.add(txid)  # ... except that a PENDING one may later get the pushed answer
        if sent is not None and msg.type in _DIRECT_ANSWERS:
            self.rtt = now - sent if rtt is None else min(rtt, now - sent)
        try:
            handler(self, msg, now)
        except UnexpectedMessage:  # rejected: leave everything as it was
            self.rtt = rtt
            if sent is not None:
                req.sent[txid] = sent
            raise
        req.last_heard = now

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        return self._request.next_send if self._request else None

    def handle_timer(self, now: float) -> None:
        req = self._request
        if req is None or now < req.next_send:
            return
        if now - req.last_heard >= self.config.request_timeout:
            self._fail(
                f"no answer from {self.config.server} for {self.config.request_timeout:.0f} s: is it "
                "running, and is UDP to it allowed?"
            )
        elif req.polling and now - req.started >= self.config.peer_timeout:
            self._fail(
                f"the peer never came: no peer joined this session within {self.config.peer_timeout:.0f} s "
                "(same --session secret and --server on both sides?)"
            )
        else:
            self._transmit(now)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # --- internals ------------------------------------------------------------------------------

    def _decode(self, data: bytes) -> Message:
        head = codec.peek_header(data)
        if head.session_id != self.keys.session_id:
            raise AuthenticationError("message for another session")
        if codec.MESSAGES[head.type].from_client:
            raise UnexpectedMessage(f"{head.type.name} is a client message")
        return codec.decode(data, self.keys.control_key, head)

    def _start(
        self,
        expect: ClientState,
        to: ClientState,
        mtype: MessageType,
        attrs: tuple[tuple[Attr, codec.AttrValue], ...],
        now: float,
    ) -> None:
        if self.state is not expect:
            raise LocalProtocolError(f"{mtype.name} needs state {expect.value}, state is {self.state.value}")
        self.state = to
        self._request = _Request(mtype, attrs, now, now, self.config.initial_rto, now)
        self._transmit(now)

    def _transmit(self, now: float, backoff: bool = True) -> None:
        req = self._request
        assert req is not None
        txid = self._txids.next()
        attrs = req.attrs if self._cookie is None else ((Attr.COOKIE, self._cookie), *req.attrs)
        if req.type is MessageType.REGISTER:
            attrs = self._padded(txid, attrs)
        self._outbox.append(
            codec.encode(Message(req.type, txid, self.keys.session_id, attrs), self.keys.control_key)
        )
        req.sent[txid] = now
        if req.polling:
            req.next_send = now + self._poll_interval(req.type)
        else:
            req.next_send = now + req.rto
            if backoff:
                req.rto = min(req.rto * 2, self.config.max_rto)

    def _padded(
        self, txid: bytes, attrs: tuple[tuple[Attr, codec.AttrValue], ...]
    ) -> tuple[tuple[Attr, codec.AttrValue], ...]:
        size = len(
            codec.encode(
                Message(MessageType.REGISTER, txid, self.keys.session_id, attrs), self.keys.control_key
            )
        )
        if size + 4 > REGISTER_SIZE:
            return attrs
        return (*attrs, (Attr.PADDING, bytes(REGISTER_SIZE - size - 4)))

    def _finish(self, to: ClientState, event: Event | None) -> None:
        self._request = None
        self.state = to
        if event is not None:
            self._events.append(event)

    def _fail(self, reason: str, code: ErrorCode | None = None) -> None:
        self._finish(ClientState.FAILED, Failed(reason, code))

    # --- handlers, one per cell of TRANSITIONS ---------------------------------------------------

    def _on_cookie(self, msg: Message, now: float) -> None:
        self._cookie = msg.get(Attr.COOKIE)
        self._transmit(now, backoff=False)  # the server did answer: no reason to back off

    def _on_pending(self, msg: Message, now: float) -> None:
        req = self._request
        assert req is not None
        if not req.polling:
            req.polling = True
            req.next_send = now + self._poll_interval(req.type)

    def _poll_interval(self, mtype: MessageType) -> float:
        if mtype is not MessageType.READY:
            return self.config.poll_interval
        return ready_poll(self.rtt, self.config.ready_poll_floor, self.config.poll_interval)

    def _on_registered(self, msg: Message, now: float) -> None:
        if msg.get(Attr.SLOT) not in (0, 1):
            raise UnexpectedMessage(
                f"REGISTERED names slot {msg.get(Attr.SLOT)}; a session has slots 0 and 1"
            )
        self.slot = msg.get(Attr.SLOT)
        self._token = msg.get(Attr.TOKEN)
        self._finish(
            ClientState.REGISTERED,
            Registered(
                msg.get(Attr.SLOT),
                msg.get(Attr.MAPPED_UDP),
                msg.get(Attr.TCP_PORT),
                self.rtt or 0.0,
                msg.get(Attr.MAPPING_PORT),
            ),
        )

    def _on_peer(self, msg: Message, now: float) -> None:
        slot = msg.get(Attr.SLOT)
        if slot == self.slot or slot not in (0, 1):
            raise UnexpectedMessage(f"PEER names slot {slot}, which is not the other slot")
        try:
            info = decode_peer_info(self.keys.open(msg.get(Attr.SEALED), slot))
        except (SealError, MalformedMessage) as exc:
            self._fail(f"could not read the peer's info: {exc}")
            return
        age = msg.get(Attr.PAIRED_US)
        found = PeerFound(
            slot,
            msg.get(Attr.PEER_UDP),
            tuple(msg.get_all(Attr.PEER_TCP)),
            info,
            None if age is None else age / 1_000_000,
        )
        self._finish(ClientState.PAIRED, found)

    def _on_go(self, msg: Message, now: float) -> None:
        attempt = msg.get(Attr.ATTEMPT) or 0
        if attempt != self._attempt:
            raise UnexpectedMessage(f"GO for attempt {attempt}, ready for attempt {self._attempt}")
        self._finish(ClientState.GO, Go(msg.get(Attr.DELAY_MS) / 1000, attempt))

    def _on_probe_ack(self, msg: Message, now: float) -> None:
        reaction = msg.get(Attr.REACTION)
        try:
            answer = ProbeAnswer(
                ProbeKind(msg.get(Attr.PROBE_KIND)),
                msg.get(Attr.PROBE_BUDGET),
                msg.get(Attr.ALT_ADDRESS),
                msg.get(Attr.PROBE_PORT),
                tuple(msg.get_all(Attr.PROBE_FROM)),
                None if reaction is None else Reaction(reaction),
            )
        except ValueError as exc:
            raise UnexpectedMessage(f"PROBE_ACK: {exc}") from None
        self._finish(ClientState.REGISTERED, answer)

    def _on_probe_error(self, msg: Message, now: float) -> None:
        """A refused probe leaves the registration intact: the probe goes on with what it can."""
        err: codec.ErrorInfo = msg.get(Attr.ERROR)
        reason = f"{self.config.server} refused PROBE: {err.reason} (error {err.code.value} {err.code.name})"
        self._finish(ClientState.REGISTERED, Failed(reason, err.code))

    def _on_result_ack(self, msg: Message, now: float) -> None:
        self._finish(ClientState.DONE, ResultAcknowledged())

    def _on_error(self, msg: Message, now: float) -> None:
        err: codec.ErrorInfo = msg.get(Attr.ERROR)
        self._fail(
            f"{self.config.server} refused {self._request.type.name if self._request else 'request'}: "
            f"{err.reason} (error {err.code.value} {err.code.name})",
            err.code,
        )


_PUSHED_ANSWERS = frozenset({MessageType.PEER, MessageType.GO, MessageType.ERROR})
_DIRECT_ANSWERS = frozenset(
    {
        MessageType.COOKIE,
        MessageType.REGISTERED,
        MessageType.PENDING,
        MessageType.RESULT_ACK,
        MessageType.PROBE_ACK,
        MessageType.ERROR,
    }
)

_Handler = Callable[[ClientCore, Message, float], None]
S, M = ClientState, MessageType
TRANSITIONS: dict[tuple[ClientState, MessageType], _Handler] = {
    (S.REGISTERING, M.COOKIE): ClientCore._on_cookie,
    (S.REGISTERING, M.REGISTERED): ClientCore._on_registered,
    (S.REGISTERING, M.ERROR): ClientCore._on_error,
    (S.EXCHANGING, M.COOKIE): ClientCore._on_cookie,
    (S.EXCHANGING, M.PENDING): ClientCore._on_pending,
    (S.EXCHANGING, M.PEER): ClientCore._on_peer,
    (S.EXCHANGING, M.ERROR): ClientCore._on_error,
    (S.READYING, M.COOKIE): ClientCore._on_cookie,
    (S.READYING, M.PENDING): ClientCore._on_pending,
    (S.READYING, M.GO): ClientCore._on_go,
    (S.READYING, M.ERROR): ClientCore._on_error,
    (S.REPORTING, M.COOKIE): ClientCore._on_cookie,
    (S.REPORTING, M.RESULT_ACK): ClientCore._on_result_ack,
    (S.REPORTING, M.ERROR): ClientCore._on_error,
    (S.PROBING, M.COOKIE): ClientCore._on_cookie,
    (S.PROBING, M.PROBE_ACK): ClientCore._on_probe_ack,
    (S.PROBING, M.ERROR): ClientCore._on_probe_error,
}


def frame(message: bytes) -> bytes:
    """TCP framing of a control message: a 2-byte big-endian length, then the message."""
    return struct.pack("!H", len(message)) + message
