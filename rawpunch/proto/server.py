"""The rendezvous server as a sans-IO core: datagrams and ``now`` in, datagrams out.

Theory of operation
-------------------
A session is two slots keyed by ``session_id`` (a hash of the shared secret, ``keys``). A
client proves it can receive at its source address before the server keeps any state for it or
answers with more bytes than it sent (amplification, RFC 8489 section 16.1.2 and QUIC's Retry,
RFC 9000 section 8.1): its first REGISTER gets a COOKIE, an HMAC of its address, session and the
server's clock, which every later request carries. Anything malformed, unauthenticated or
replayed is dropped without an answer.

Two requests are long polls: INFO (answered PEER once both peers have sent their sealed info)
and READY (answered GO once both are ready). The first peer gets PENDING and keeps polling; when
the second arrives the server answers it and pushes the answer to the first peer's latest
transaction id, so both learn at once. GO carries a per-peer delay, ``max(owd) - owd_i`` with
``owd = rtt / 2``, so both punches leave at the same moment (libp2p DCUtR's RTT/2 trick): no
wall clocks, only measured round trips. READY may be repeated with an ATTEMPT number (a strategy
cascade, ``rawpunch.strategy``): each attempt gets its own GO, decided when both peers are ready for it.
Every GO is sent twice, back to back (``GO_COPIES``): a lost GO makes that peer start a READY poll
later than the other, and the strategies that prime a NAT cannot absorb that skew (a connector
refused by a NAT not yet primed, or a primer's retransmission refused by a NAT not yet opened).
The client accepts the first copy and drops the second as a duplicate of an answered request.

No reflection: the server only ever sends to the source address of an authenticated request,
and the endpoints it tells a peer about are the ones it observed itself for the other peer of
the same session (never addresses a client claims).

State is bounded: caps on sessions, on peers per source address and on TCP mappings per peer,
idle expiry, a token bucket per source, and O(1) anti-replay state per peer (``replay``).

The NAT probe's server part (``PROBE``, enabled by ``probe_addresses``)
------------------------------------------------------------------------
``rawpunch probe`` classifies the client's NAT (RFC 4787 / RFC 5382) with the server's help: the
server listens for TCP on two addresses and two ports (the adapter), and on request sends crafted
SYNs, which ``probes_to_send()`` hands to the adapter *before* the PROBE_ACK it answers with, so the
client knows they left. The server is an amplifier of the most sensitive kind here (unsolicited SYNs
from a well-known address), hence: only a registered peer with a valid cookie (its address is
proven) may ask; FILTER and SIMOPEN SYNs go only to a public endpoint the server itself observed on
its TCP listeners for that peer, UNSOLICITED only to the peer's own validated address; each peer may
cause at most ``probe_budget`` SYNs, and all peers together at most ``probe_rate`` per second.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field

from rawpunch.proto import codec
from rawpunch.proto.codec import (
    Attr,
    Endpoint,
    ErrorCode,
    ErrorInfo,
    Message,
    MessageType,
    ProbeKind,
    Reaction,
    ResultInfo,
    TcpMapping,
)
from rawpunch.proto.errors import (
    AuthenticationError,
    RemoteProtocolError,
    ReplayError,
    StaleCookie,
    UnexpectedMessage,
)
from rawpunch.proto.keys import control_key
from rawpunch.proto.replay import ReplayWindow, split_txid

log = logging.getLogger("rawpunch.server")

Addr = tuple[str, int]
Outgoing = list[tuple[bytes, Addr]]
MAX_RTT = 5.0  # seconds; a reported RTT above this is clamped
GO_COPIES = 2  # see the module doc: a lost GO becomes start skew between the peers
PROBE_SOURCE_RATE, PROBE_SOURCE_BURST = 1.0, 32.0  # probe SYNs per second, and at once, per client address


@dataclass
class ServerConfig:
    tcp_port: int
    """TCP discovery port advertised to clients."""
    mapping_port: int | None = None
    """A second discovery port on the main address, advertised if set (the peers' fast mapping check)."""
    cookie_key: bytes = field(default_factory=lambda: os.urandom(32))
    cookie_lifetime: float = 30.0
    peer_idle_timeout: float = 30.0
    """A peer that sent nothing for this long has vanished; its slot is freed."""
    session_lifetime: float = 600.0
    max_sessions: int = 10_000
    max_peers_per_source: int = 64
    max_tcp_mappings: int = 8
    rate_per_source: float = 200.0
    """Messages per second per source IP (token bucket)."""
    burst_per_source: float = 400.0
    max_rate_sources: int = 16_384
    sweep_interval: float = 1.0
    probe_addresses: tuple[str, str] | None = None
    """(main, alt) addresses of the server: enables the NAT probe's server part."""
    probe_port: int | None = None
    """The second TCP port, listened on at both addresses (probe part only)."""
    probe_budget: int = 16
    """Crafted SYNs one peer may cause, in all."""
    probe_rate: float = 20.0
    """Crafted SYNs per second for all peers together (token bucket, burst twice that)."""


@dataclass(frozen=True)
class CraftedSyn:
    """A SYN the adapter must send (raw socket) before the datagrams of the same call."""

    src: Endpoint
    dst: Endpoint


@dataclass
class ProbeState:
    """One peer's NAT-probe state: which listener saw each mapping, SYNs spent, the unsolicited reaction."""

    via: dict[int, Endpoint] = field(default_factory=dict)
    spent: int = 0
    unsolicited: tuple[Endpoint, Endpoint] | None = None
    reaction: Reaction = Reaction.NONE


class Peer:
    __slots__ = (
        "addr",
        "instance",
        "last_seen",
        "probe",
        "ready",
        "replay",
        "result",
        "rtt",
        "sealed",
        "slot",
        "tcp",
        "token",
        "waiting",
    )

    def __init__(self, slot: int, addr: Addr, instance: bytes, rtt: float, now: float) -> None:
        self.slot = slot
        self.addr = addr
        self.instance = instance
        self.replay = ReplayWindow()
        self.token = os.urandom(codec.TOKEN_LEN)
        self.rtt = rtt
        self.last_seen = now
        self.tcp: dict[int, Endpoint] = {}
        self.sealed: bytes | None = None
        # The latest long poll awaiting a push: its type (INFO or READY) and transaction id.
        self.waiting: tuple[MessageType, bytes] | None = None
        self.ready: int | None = None  # the cascade attempt this peer is ready for
        self.result: ResultInfo | None = None
        self.probe = ProbeState()


class Session:
    __slots__ = ("created", "fire_at", "go_attempt", "key", "paired", "peers", "sid")

    def __init__(self, sid: bytes, now: float) -> None:
        self.sid = sid
        self.key = control_key(sid)
        self.peers: list[Peer | None] = [None, None]
        self.created = now
        self.fire_at: float | None = None  # when both punches should leave, once GO was decided
        self.go_attempt: int | None = None  # the attempt fire_at belongs to
        self.paired: float | None = None  # when the second peer registered: where elapsed_ms starts

    def other(self, peer: Peer) -> Peer | None:
        return self.peers[1 - peer.slot]

    def by_addr(self, addr: Addr) -> Peer | None:
        return next((p for p in self.peers if p is not None and p.addr == addr), None)


class ServerCore:
    def __init__(self, config: ServerConfig, now: float) -> None:
        self.config = config
        self.sessions: dict[bytes, Session] = {}
        self.peers_per_source: Counter[str] = Counter()
        self.buckets: dict[str, list[float]] = {}
        self.stats: Counter[str] = Counter()
        self._tokens: dict[bytes, tuple[Session, Peer]] = {}
        self._next_sweep = now + config.sweep_interval
        self._syns: list[CraftedSyn] = []
        self._syn_bucket = [2 * config.probe_rate, now]
        self._syn_buckets: dict[str, list[float]] = {}  # per source address: re-registering buys nothing
        # (our SYN's source, its destination) -> the peer whose unsolicited SYN it was
        self._unsolicited: dict[tuple[Endpoint, Endpoint], Peer] = {}

    # --- entry points ---------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> Outgoing:
        """Handle one UDP datagram; returns the datagrams to send, each with its destination."""
        self.stats["datagrams"] += 1
        if not self._admit(addr[0], now):
            self.stats["rate_limited"] += 1
            return []
        try:
            return self._handle(data, addr, now)
        except RemoteProtocolError as exc:
            self.stats[f"dropped_{type(exc).__name__}"] += 1
            log.debug("drop %d bytes from %s: %s", len(data), _fmt(addr), exc)
            return []

    def receive_discovery(self, data: bytes, addr: Addr, now: float, via: Addr | None = None) -> bytes:
        """One DISCOVER message that arrived over TCP from ``addr``; returns the DISCOVERED reply.

        The TCP handshake already proved the address, so no cookie is needed. Raises a
        ``RemoteProtocolError`` for anything unacceptable; the adapter then closes the connection.
        ``via`` is the server endpoint the connection reached (the probe's listeners).
        """
        msg, session = self._authenticate(data)
        if msg.type is not MessageType.DISCOVER:
            raise UnexpectedMessage(f"{msg.type.name} on the TCP discovery port")
        found = self._tokens.get(msg.get(Attr.TOKEN))
        if found is None or found[0] is not session:
            raise UnexpectedMessage("discovery token names no registered peer of this session")
        peer = found[1]
        self._check_replay(peer, msg.transaction_id)
        local_port = msg.get(Attr.LOCAL_PORT)
        public = Endpoint(*addr)
        if local_port not in peer.tcp and len(peer.tcp) >= self.config.max_tcp_mappings:
            raise UnexpectedMessage(f"peer already has {self.config.max_tcp_mappings} TCP mappings")
        peer.tcp[local_port] = public
        if via is not None:
            peer.probe.via[local_port] = Endpoint(*via)
        peer.last_seen = now
        log.info(
            "tcp endpoint session=%s slot=%d local port %d -> %s",
            _sid(session),
            peer.slot,
            local_port,
            public,
        )
        return self._reply(
            session, msg, MessageType.DISCOVERED, ((Attr.MAPPED_TCP, TcpMapping(local_port, public)),)
        )

    def probes_to_send(self) -> list[CraftedSyn]:
        """The crafted SYNs decided since the last call; send them before that call's datagrams."""
        out, self._syns = self._syns, []
        return out

    def receive_reaction(self, ours: Addr, theirs: Addr, reaction: Reaction) -> None:
        """A RST from ``theirs`` to ``ours``, or an ICMP error quoting our SYN ``ours`` -> ``theirs``."""
        peer = self._unsolicited.get((Endpoint(*ours), Endpoint(*theirs)))
        if peer is not None and peer.probe.reaction is Reaction.NONE:
            peer.probe.reaction = reaction

    def get_timer(self) -> float:
        return self._next_sweep

    def handle_timer(self, now: float) -> None:
        if now >= self._next_sweep:
            self.expire(now)
            self._next_sweep = now + self.config.sweep_interval

    def expire(self, now: float) -> None:
        """Free the slots of vanished peers and drop empty or over-age sessions."""
        for sid, session in list(self.sessions.items()):
            for peer in session.peers:
                if peer is not None and now - peer.last_seen > self.config.peer_idle_timeout:
                    log.info(
                        "peer gone session=%s slot=%d (silent for %.0f s)",
                        _sid(session),
                        peer.slot,
                        now - peer.last_seen,
                    )
                    self._remove_peer(session, peer)
            if not any(session.peers) or now - session.created > self.config.session_lifetime:
                for peer in filter(None, session.peers):
                    self._remove_peer(session, peer)
                del self.sessions[sid]
                self.stats["sessions_expired"] += 1
        self._trim_buckets(now)

    # --- admission and authentication -----------------------------------------------------------

    def _admit(self, ip: str, now: float) -> bool:
        bucket = self.buckets.get(ip)
        if bucket is None:
            if len(self.buckets) >= self.config.max_rate_sources:
                self._trim_buckets(now)
                if len(self.buckets) >= self.config.max_rate_sources:
                    del self.buckets[next(iter(self.buckets))]  # oldest first
            bucket = self.buckets[ip] = [self.config.burst_per_source, now]
        tokens = min(
            self.config.burst_per_source, bucket[0] + (now - bucket[1]) * self.config.rate_per_source
        )
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _trim_buckets(self, now: float) -> None:
        """Forget sources whose bucket has refilled: they are indistinguishable from new ones."""
        full = self.config.burst_per_source / self.config.rate_per_source
        for ip in [ip for ip, (_, t) in self.buckets.items() if now - t > full]:
            del self.buckets[ip]

    def _authenticate(self, data: bytes) -> tuple[Message, Session | None]:
        head = codec.peek_header(data)
        if not codec.MESSAGES[head.type].from_client:
            raise UnexpectedMessage(f"{head.type.name} is a server message")
        session = self.sessions.get(head.session_id)
        key = session.key if session else control_key(head.session_id)
        return codec.decode(data, key, head), session

    def _cookie(self, addr: Addr, sid: bytes, now: float) -> bytes:
        stamp = struct.pack("!Q", int(now * 1000))
        return stamp + self._cookie_mac(stamp, addr, sid)

    def _cookie_mac(self, stamp: bytes, addr: Addr, sid: bytes) -> bytes:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        source = socket.inet_pton(family, addr[0]) + struct.pack("!H", addr[1])
        return hmac.digest(self.config.cookie_key, stamp + source + sid, "sha256")[:16]

    def _cookie_age(self, cookie: bytes | None, addr: Addr, sid: bytes, now: float) -> float:
        """Seconds since the server minted ``cookie`` for this source; raises StaleCookie."""
        if cookie is None:
            raise StaleCookie("no cookie")
        stamp, mac = cookie[:8], cookie[8:]
        if not hmac.compare_digest(mac, self._cookie_mac(stamp, addr, sid)):
            raise StaleCookie("cookie was minted for another address or session")
        age: float = now - struct.unpack("!Q", stamp)[0] / 1000
        if not -1.0 <= age <= self.config.cookie_lifetime:
            raise StaleCookie(f"cookie is {age:.1f} s old")
        return max(age, 0.0)

    def _check_replay(self, peer: Peer, txid: bytes) -> None:
        instance, seq = split_txid(txid)
        if instance != peer.instance or not peer.replay.check_and_update(seq):
            raise ReplayError("transaction id replayed or from another client run")

    # --- dispatch --------------------------------------------------------------------------------

    def _handle(self, data: bytes, addr: Addr, now: float) -> Outgoing:
        msg, session = self._authenticate(data)
        if msg.type is MessageType.DISCOVER:
            raise UnexpectedMessage("DISCOVER is only valid on the TCP discovery port")
        try:
            age = self._cookie_age(msg.get(Attr.COOKIE), addr, msg.session_id, now)
        except StaleCookie as exc:
            # The source is not validated: answer only if the answer is no larger than the request.
            log.debug("cookie to %s: %s", _fmt(addr), exc)
            reply = self._reply_key(
                control_key(msg.session_id) if session is None else session.key,
                msg,
                MessageType.COOKIE,
                ((Attr.COOKIE, self._cookie(addr, msg.session_id, now)),),
            )
            if len(reply) > len(data):
                self.stats["cookies_withheld"] += 1
                return []
            self.stats["cookies_sent"] += 1
            return [(reply, addr)]
        if msg.type is MessageType.REGISTER:
            return self._register(session, msg, addr, age, now)
        peer = session.by_addr(addr) if session else None
        if session is None or peer is None:
            return [
                (
                    self._error(
                        session, msg, ErrorCode.UNKNOWN_PEER, "not registered (or expired): register again"
                    ),
                    addr,
                )
            ]
        self._check_replay(peer, msg.transaction_id)
        peer.last_seen = now
        handler = _HANDLERS[msg.type]
        return handler(self, session, peer, msg, now)

    def _register(
        self, session: Session | None, msg: Message, addr: Addr, age: float, now: float
    ) -> Outgoing:
        instance, _ = split_txid(msg.transaction_id)
        peer = session.by_addr(addr) if session else None
        if peer is not None and peer.instance != instance:
            peer = self._restart_peer(session, peer, instance, age, now)  # type: ignore[arg-type]
        if peer is None:
            result = self._new_peer(session, msg, addr, instance, age, now)
            if isinstance(result, bytes):
                return [(result, addr)]
            session, peer = result
        assert session is not None
        self._check_replay(peer, msg.transaction_id)
        peer.last_seen = now
        attrs: list[tuple[Attr, codec.AttrValue]] = [
            (Attr.SLOT, peer.slot),
            (Attr.MAPPED_UDP, Endpoint(*addr)),
            (Attr.TCP_PORT, self.config.tcp_port),
            (Attr.TOKEN, peer.token),
            (Attr.RTT_MS, round(peer.rtt * 1000)),
        ]
        if self.config.mapping_port is not None:
            attrs.append((Attr.MAPPING_PORT, self.config.mapping_port))
        return [(self._reply(session, msg, MessageType.REGISTERED, tuple(attrs)), addr)]

    def _restart_peer(self, session: Session, old: Peer, instance: bytes, age: float, now: float) -> Peer:
        """A client restarted from the same address: it takes its slot back as a new instance."""
        log.info("peer restarted session=%s slot=%d from %s", _sid(session), old.slot, _fmt(old.addr))
        self._remove_peer(session, old)
        peer = Peer(old.slot, old.addr, instance, age, now)
        self._add_peer(session, peer)
        return peer

    def _new_peer(
        self, session: Session | None, msg: Message, addr: Addr, instance: bytes, age: float, now: float
    ) -> tuple[Session, Peer] | bytes:
        if self.peers_per_source[addr[0]] >= self.config.max_peers_per_source:
            return self._error(session, msg, ErrorCode.SERVER_FULL, "too many sessions from your address")
        if session is None:
            if len(self.sessions) >= self.config.max_sessions:
                return self._error(
                    session, msg, ErrorCode.SERVER_FULL, "server is at its session limit; try again later"
                )
            session = self.sessions[msg.session_id] = Session(msg.session_id, now)
            self.stats["sessions_created"] += 1
        free = [i for i, p in enumerate(session.peers) if p is None]
        if not free:
            return self._error(session, msg, ErrorCode.SESSION_FULL, "two peers are already in this session")
        peer = Peer(free[0], addr, instance, age, now)
        self._add_peer(session, peer)
        other = session.other(peer)
        session.paired = now if other is not None else None
        log.info(
            "register session=%s slot=%d from %s rtt=%.1f ms%s",
            _sid(session),
            peer.slot,
            _fmt(addr),
            age * 1000,
            " (paired)" if other else "",
        )
        return session, peer

    def _add_peer(self, session: Session, peer: Peer) -> None:
        session.peers[peer.slot] = peer
        self.peers_per_source[peer.addr[0]] += 1
        self._tokens[peer.token] = (session, peer)

    def _remove_peer(self, session: Session, peer: Peer) -> None:
        session.peers[peer.slot] = None
        session.fire_at = session.go_attempt = session.paired = None
        self._tokens.pop(peer.token, None)
        self.peers_per_source[peer.addr[0]] -= 1
        if self.peers_per_source[peer.addr[0]] <= 0:
            del self.peers_per_source[peer.addr[0]]
        self._forget_unsolicited(peer)

    def _forget_unsolicited(self, peer: Peer) -> None:
        """Drop *peer*'s unsolicited-SYN entry (keeps the state bounded by the live peers); another peer's
        entry for the same (source, destination) -- a second client behind the same NAT -- stays."""
        key = peer.probe.unsolicited
        if key is not None and self._unsolicited.get(key) is peer:
            del self._unsolicited[key]

    # --- requests of registered peers ------------------------------------------------------------

    def _info(self, session: Session, peer: Peer, msg: Message, now: float) -> Outgoing:
        peer.sealed = msg.get(Attr.SEALED)
        other = session.other(peer)
        if other is None or other.sealed is None:
            peer.waiting = (MessageType.INFO, msg.transaction_id)
            return [(self._reply(session, msg, MessageType.PENDING, ()), peer.addr)]
        out = [(self._peer_message(session, msg, other, now), peer.addr)]
        if _polls(other, MessageType.INFO):
            log.info("paired session=%s: peer info exchanged", _sid(session))
            attrs = self._peer_attrs(session, peer, now)
            out.append((self._push(session, other, MessageType.PEER, attrs), other.addr))
        return out

    def _ready(self, session: Session, peer: Peer, msg: Message, now: float) -> Outgoing:
        if msg.get(Attr.RTT_MS) is not None:  # bounded: a peer must not stall the other's GO
            peer.rtt = min(msg.get(Attr.RTT_MS) / 1000, MAX_RTT)
        # Each attempt of a strategy cascade is synchronised afresh: GO when both are ready for the same one.
        attempt = msg.get(Attr.ATTEMPT) or 0
        if session.go_attempt == attempt:  # decided already: a repeat whose GO was lost (the other may be on)
            return _copies(
                self._reply(session, msg, MessageType.GO, self._go_attrs(session, peer, now)), peer.addr
            )
        peer.ready = attempt
        other = session.other(peer)
        if other is None or other.ready != attempt:
            peer.waiting = (MessageType.READY, msg.transaction_id)
            return [(self._reply(session, msg, MessageType.PENDING, ()), peer.addr)]
        session.fire_at, session.go_attempt = now + max(peer.rtt, other.rtt) / 2, attempt
        log.info(
            "go session=%s attempt=%d: one-way delays %.1f / %.1f ms",
            _sid(session),
            attempt,
            peer.rtt * 500,
            other.rtt * 500,
        )
        out = _copies(
            self._reply(session, msg, MessageType.GO, self._go_attrs(session, peer, now)), peer.addr
        )
        if _polls(other, MessageType.READY):
            go = self._push(session, other, MessageType.GO, self._go_attrs(session, other, now))
            out += _copies(go, other.addr)
        return out

    def _result(self, session: Session, peer: Peer, msg: Message, now: float) -> Outgoing:
        peer.result = msg.get(Attr.RESULT)
        assert peer.result is not None
        log.info(
            "result session=%s slot=%d: %s after %d ms %s",
            _sid(session),
            peer.slot,
            peer.result.code.name,
            peer.result.elapsed_ms,
            peer.result.detail,
        )
        return [(self._reply(session, msg, MessageType.RESULT_ACK, ()), peer.addr)]

    def _probe(self, session: Session, peer: Peer, msg: Message, now: float) -> Outgoing:
        addresses, port = self.config.probe_addresses, self.config.probe_port
        if addresses is None or port is None:
            reason = "this server has no NAT probe part (start it with --alt-address)"
            return [(self._error(session, msg, ErrorCode.NOT_SUPPORTED, reason), peer.addr)]
        try:
            kind = ProbeKind(msg.get(Attr.PROBE_KIND))
        except ValueError:  # a newer client's: say so rather than leave it to time out
            reason = f"unknown probe kind {msg.get(Attr.PROBE_KIND)}; this server knows {_kinds()}"
            return [(self._error(session, msg, ErrorCode.BAD_REQUEST, reason), peer.addr)]
        try:
            attrs = self._probe_kind(kind, peer, msg, addresses, port, now)
        except _ProbeRefused as exc:
            return [(self._error(session, msg, exc.code, str(exc)), peer.addr)]
        budget = max(0, self.config.probe_budget - peer.probe.spent)
        head = ((Attr.PROBE_KIND, int(kind)), (Attr.PROBE_BUDGET, min(budget, 255)))
        return [(self._reply(session, msg, MessageType.PROBE_ACK, (*head, *attrs)), peer.addr)]

    def _probe_kind(
        self, kind: ProbeKind, peer: Peer, msg: Message, addresses: tuple[str, str], port: int, now: float
    ) -> tuple[tuple[Attr, codec.AttrValue], ...]:
        main, alt = addresses
        if kind is ProbeKind.HELLO:
            return ((Attr.ALT_ADDRESS, Endpoint(alt, self.config.tcp_port)), (Attr.PROBE_PORT, port))
        if kind is ProbeKind.REACTION:
            return ((Attr.REACTION, int(peer.probe.reaction)),)
        if kind is ProbeKind.UNSOLICITED:
            target = msg.get(Attr.TARGET_PORT)
            if not target:
                raise _ProbeRefused(ErrorCode.BAD_REQUEST, "UNSOLICITED needs a TARGET_PORT")
            syn = CraftedSyn(Endpoint(main, port), Endpoint(peer.addr[0], target))
            self._spend(peer, [syn], now)
            self._forget_unsolicited(peer)
            peer.probe.unsolicited, peer.probe.reaction = (syn.src, syn.dst), Reaction.NONE
            self._unsolicited[(syn.src, syn.dst)] = peer
            return ((Attr.PROBE_FROM, syn.src),)
        local_port = msg.get(Attr.LOCAL_PORT)
        public, via = peer.tcp.get(local_port), peer.probe.via.get(local_port)
        if public is None or via is None:
            raise _ProbeRefused(
                ErrorCode.BAD_REQUEST,
                f"no mapping of local port {local_port} seen on a probe listener: discover it there first",
            )
        other_port = Endpoint(via.host, port if via.port != port else self.config.tcp_port)
        sources = [other_port]
        if kind is ProbeKind.FILTER:
            sources.append(Endpoint(alt if via.host == main else main, via.port))
        syns = [CraftedSyn(src, public) for src in sources]
        self._spend(peer, syns, now)
        return tuple((Attr.PROBE_FROM, syn.src) for syn in syns)

    def _spend(self, peer: Peer, syns: list[CraftedSyn], now: float) -> None:
        """Queue *syns* if the peer's budget, its address's SYN rate and the server's all allow them."""
        if peer.probe.spent + len(syns) > self.config.probe_budget:
            raise _ProbeRefused(
                ErrorCode.RATE_LIMITED,
                f"probe budget spent ({self.config.probe_budget} SYNs per client): register anew later",
            )
        rate, source = self.config.probe_rate, peer.addr[0]
        if len(self._syn_buckets) >= self.config.max_rate_sources and source not in self._syn_buckets:
            del self._syn_buckets[next(iter(self._syn_buckets))]  # oldest first
        per_source = self._syn_buckets.setdefault(source, [PROBE_SOURCE_BURST, now])
        if not _fits(per_source, len(syns), PROBE_SOURCE_RATE, PROBE_SOURCE_BURST, now):
            raise _ProbeRefused(ErrorCode.RATE_LIMITED, "too many probe SYNs for your address; retry later")
        if not _fits(self._syn_bucket, len(syns), rate, 2 * rate, now):
            raise _ProbeRefused(ErrorCode.RATE_LIMITED, "server is at its probe SYN rate; retry in a second")
        _fits(per_source, len(syns), PROBE_SOURCE_RATE, PROBE_SOURCE_BURST, now, take=True)
        _fits(self._syn_bucket, len(syns), rate, 2 * rate, now, take=True)
        peer.probe.spent += len(syns)
        self.stats["probe_syns"] += len(syns)
        self._syns += syns

    # --- building replies ------------------------------------------------------------------------

    def _peer_attrs(self, session: Session, of: Peer, now: float) -> tuple[tuple[Attr, codec.AttrValue], ...]:
        assert of.sealed is not None
        tcp = tuple((Attr.PEER_TCP, TcpMapping(port, ep)) for port, ep in of.tcp.items())
        # A duration measured on the server's clock, never a timestamp: the peers' clocks are not compared.
        paired = () if session.paired is None else ((Attr.PAIRED_US, _micros(now - session.paired)),)
        head = ((Attr.SLOT, of.slot), (Attr.PEER_UDP, Endpoint(*of.addr)))
        return (*head, *tcp, (Attr.SEALED, of.sealed), *paired)

    def _peer_message(self, session: Session, msg: Message, of: Peer, now: float) -> bytes:
        return self._reply(session, msg, MessageType.PEER, self._peer_attrs(session, of, now))

    def _go_attrs(self, session: Session, peer: Peer, now: float) -> tuple[tuple[Attr, codec.AttrValue], ...]:
        assert session.fire_at is not None
        delay = max(0.0, session.fire_at - now - peer.rtt / 2)
        attempt = ((Attr.ATTEMPT, session.go_attempt),) if session.go_attempt else ()
        return ((Attr.DELAY_MS, round(delay * 1000)), *attempt)

    def _push(
        self, session: Session, to: Peer, mtype: MessageType, attrs: tuple[tuple[Attr, codec.AttrValue], ...]
    ) -> bytes:
        assert to.waiting is not None
        (_, txid), to.waiting = to.waiting, None
        return codec.encode(Message(mtype, txid, session.sid, attrs), session.key)

    def _reply(
        self,
        session: Session,
        msg: Message,
        mtype: MessageType,
        attrs: tuple[tuple[Attr, codec.AttrValue], ...],
    ) -> bytes:
        return self._reply_key(session.key, msg, mtype, attrs)

    @staticmethod
    def _reply_key(
        key: bytes, msg: Message, mtype: MessageType, attrs: tuple[tuple[Attr, codec.AttrValue], ...]
    ) -> bytes:
        return codec.encode(Message(mtype, msg.transaction_id, msg.session_id, attrs), key)

    def _error(self, session: Session | None, msg: Message, code: ErrorCode, reason: str) -> bytes:
        self.stats[f"error_{code.name}"] += 1
        key = session.key if session else control_key(msg.session_id)
        return self._reply_key(key, msg, MessageType.ERROR, ((Attr.ERROR, ErrorInfo(code, reason)),))


def _kinds() -> str:
    return ", ".join(f"{int(k)} {k.name}" for k in ProbeKind)


def _fits(bucket: list[float], n: int, rate: float, burst: float, now: float, take: bool = False) -> bool:
    """Token bucket ``[tokens, last]``: are *n* tokens there (and, with *take*, take them)?"""
    tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
    if take:
        bucket[0], bucket[1] = tokens - n, now
    return tokens >= n


class _ProbeRefused(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


_HANDLERS = {
    MessageType.INFO: ServerCore._info,
    MessageType.READY: ServerCore._ready,
    MessageType.RESULT: ServerCore._result,
    MessageType.PROBE: ServerCore._probe,
}


def _copies(datagram: bytes, addr: Addr) -> Outgoing:
    return [(datagram, addr)] * GO_COPIES


def _polls(peer: Peer, mtype: MessageType) -> bool:
    """Is ``peer`` waiting in a long poll of this type (a push must answer the right question)?"""
    return peer.waiting is not None and peer.waiting[0] is mtype


def _sid(session: Session) -> str:
    return session.sid[:4].hex()


def _fmt(addr: Addr) -> str:
    return str(Endpoint(*addr))


__all__ = ["AuthenticationError", "CraftedSyn", "ServerConfig", "ServerCore"]


def _micros(seconds: float) -> int:
    return min(max(0, round(seconds * 1_000_000)), 0xFFFFFFFF)
