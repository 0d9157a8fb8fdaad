"""The punch: a TCP simultaneous open through two NATs, as a sans-IO state machine (the aioquic shape).

The caller calls ``start(now)`` at the rendezvous' GO, feeds every inbound TCP segment of the flow to
``receive_segment(seg, now)`` and ICMP errors about it to ``receive_icmp(...)``, sends what
``segments_to_send(now)`` returns (raw, with the TTL each ``Segment`` carries), calls ``handle_timer(now)`` at
``get_timer()``, and reads ``next_event()``. Time is always an argument; nothing here touches a socket.

Theory of operation
-------------------
Both peers run the same handshake, RFC 9293 section 3.5 figure 8 (simultaneous initiation): each sends a
SYN; on the peer's SYN it answers SYN-ACK (SYN-SENT -> SYN-RECEIVED); on the peer's SYN-ACK, or an ACK of its
own SYN, it is ESTABLISHED (and answers a SYN-ACK with the final ACK). Between two Linux NATs
(``natmodel``; FACTS.md, "What happens to TCP between two Linux NATs") the order of packets matters:

1. **Priming SYN** (TTL ``priming_ttl``, ``ttl.priming_ttl`` chooses it): passes our NAT, which creates the
   mapping and a conntrack entry in SYN_SENT, and expires in the core before the peer's NAT. Reaching the
   peer's NAT early would get it dropped or, worse, answered with a RST from the NAT's own stack that deletes
   our fresh entry on its way back (conntrack kills an entry whose only reply is a RST).
2. **Real SYN** (``seq = ISN``, options, TTL ``ttl``) ``syn_delay`` after the priming SYN. Both peers prime at
   GO, so each real SYN finds the other's mapping open as long as the GO skew between the peers is below
   ``syn_delay`` plus the one-way delay. The priming SYN carries ``ISN - 1``: conntrack's ``tcp_in_window``
   takes the real SYN in SYN_SENT as the sender restarting with a higher sequence number (RFC 9293 section
   3.4) and re-reads its window and options, and a RST answering the priming SYN (``ack = ISN``) can be told
   from one answering the real SYN (``ack = ISN + 1``): the former says the priming TTL is too high.
3. **SYN-ACK** (``seq = ISN, ack = peer ISN + 1``) only once the peer's SYN came in *through our NAT*: that
   moved our entry to SYN_SENT2, the only state (with SYN_RECV) where conntrack accepts an original-direction
   SYN-ACK; in SYN_SENT it is INVALID, not NATed and dropped. At the peer's NAT it arrives in the reply
   direction, valid from SYN_SENT (standard open) or SYN_SENT2.
4. **ACK** on the peer's SYN-ACK. It also moves our NAT's entry to ESTABLISHED, so the spliced socket's
   data is tracked normally.

Retransmission: whatever is outstanding (the SYN in SYN-SENT, the SYN-ACK in SYN-RECEIVED) is sent again after
``initial_rto``, multiplied by ``backoff`` up to ``max_rto``; at ``deadline`` after GO the punch ends with
``Failed`` and a reason naming the likely cause. Each retransmitted SYN goes over a clean conntrack entry: it
follows a low-TTL RST and a low-TTL SYN ("reopen", below). conntrack may hold a stale entry that no longer
lets the peer in -- CLOSE after a RST we never saw, or window data poisoned by a spoofed segment
(``tcp_in_window`` initialises the peer's side from the first segment claiming to come from it, valid or not)
-- and nothing else would clear it before it times out. The final ACK is sent ``ack_repeats`` more times, an
RTO apart: once it has passed the peer's NAT, that entry is ESTABLISHED and refuses the peer's retransmitted
SYN-ACKs (an original-direction SYN-ACK is INVALID there), so an ACK lost between the peer's NAT and the peer
would never be asked for again. For the same reason a peer in SYN-RECEIVED takes as the handshake's ACK both
``seq = peer ISN + 1`` and ``seq = peer ISN`` (the window probe the peer's kernel sends when its TCP_REPAIR
splice goes live).

Numbers are verified exactly: both ISNs travelled in the sealed peer info, so a segment is accepted only if
it comes from the peer's public endpoint to our local one and carries exactly the expected numbers (SYN:
``seq == peer ISN``; SYN-ACK: also ``ack == ISN + 1``; ACK: ``seq == peer ISN + 1, ack == ISN + 1``). Anything
else is counted in ``ignored`` and changes nothing, so a blind attacker cannot complete or derail the punch.
The peer's options on the wire are not checked: the negotiation uses the sealed advertisements, which both
sides know, so both compute the same result.

Resets (RFC 5961 section 3): a RST counts only if it matches exactly. In SYN-SENT that is RFC 9293 section
3.10.7.3's rule, the ACK bit set and ``ack == ISN + 1`` (the peer's NAT answering our SYN from its own stack,
``seq = 0``), or ``ack == ISN`` (it answered the priming SYN). In SYN-RECEIVED it is ``seq == peer ISN + 1``
(RCV.NXT, RFC 5961 section 3.2; the answer to our SYN-ACK, whose ACK field it echoes). An exact RST is
reported (``ResetReceived``) but **does not end the punch**. It says that our segment met no mapping at the
peer's NAT (a GO skew larger than ``syn_delay``, or a mapping that an earlier RST closed), and on its way in
it deleted our NAT's entry (no reply seen yet) or left it in CLOSE (which ignores our SYNs and refuses the
peer's for 10 s). Both are repairable at once: we *reopen* -- a RST and a SYN, both with the priming TTL and
``seq = ISN``: conntrack takes a SYN after a RST from the same side as a new connection and starts the entry
afresh in SYN_SENT -- go back to SYN-SENT, and hold our real SYN for one RTO, by which time the peer has
primed too. A stale RST thus costs an RTO, never the punch; the deadline bounds it all, and the failure reason
names the RSTs. (Without priming there is nothing to reopen the mapping ahead of the peer's SYN: the two
sides' retransmissions keep their skew and every SYN meets a closed NAT, the plain simultaneous open that
fails between Linux NATs.)

Poisoned entries. conntrack initialises the peer's side of our entry from the first segment that claims to
come from the peer (``tcp_in_window``), valid or not, and since Linux 6.1 lets a segment "below the window"
through untracked instead of marking it INVALID. So one blind forgery (SYN, SYN-ACK or RST spoofed from the
peer's endpoint, seq ahead of the peer's ISN) that reaches our NAT after our priming SYN and before the
peer's SYN makes the genuine SYN pass without moving the entry to SYN_SENT2: we answer it, but our SYN-ACK,
ACK and data are INVALID there (SYN_SENT), or everything after our SYN-ACK is (SYN_SENT2 after a forged SYN,
whose window data then refuses our numbers). The engine repairs its own entry with the same reopen (low-TTL
RST and SYN, ``seq = ISN``), in the two situations where it can tell:

* *A forgery reached us* in PRIMED or SYN-SENT: a SYN, SYN-ACK or RST from the peer's endpoint whose numbers
  do not fit (other than the peer's priming SYN, ``peer ISN - 1``, which initialises that side *below* the
  real SYN and harms nothing). It passed our NAT, so it initialised the peer's side (a forged SYN always
  does, and is always let through) or closed the entry (a RST). It is ignored as before and the entry is
  reopened at once, before the peer's genuine SYN comes (``poison_reopens`` counts these). An ACK is let
  through untracked in SYN_SENT (``sIG``, no window check) and poisons nothing: no reopen for it. A reopen
  costs nothing here: before the peer's SYN our entry holds only our own side.
* *The peer keeps resending its SYN-ACK after we ACKed it* (ESTABLISHED): our ACK did not reach it. The
  forgery was refused (INVALID, so it never reached us) but poisoned the entry all the same; the peer's SYN
  and SYN-ACK passed untracked, ours do not. A duplicate SYN-ACK that arrives within two round trips of our
  ACK may merely have crossed it and gets an ACK as before (reopening then would wipe an ESTABLISHED
  entry the peer's NAT already matches). The round trip is bounded from above by our first real SYN to
  ``Connected`` (the peer answers our SYN, so that is at least one RTT). A later one means the ACK is lost
  or refused: we reopen our entry and send no ACK (it would be INVALID in the fresh SYN_SENT). The peer's
  next SYN-ACK then moves the fresh entry to SYN_RECV (a reply SYN-ACK in SYN_SENT, the ordinary open), and
  our ACK answering it to ESTABLISHED, and at the peer's NAT (SYN_RECV after its own SYN-ACK, simultaneous
  open) to ESTABLISHED too; that ACK gets its ``ack_repeats`` again. The timer stays armed meanwhile, so
  the caller keeps feeding us. If that ACK is lost as well, the next late SYN-ACK reopens again.

* *The peer keeps resending its SYN while we are in SYN-RECEIVED*: our SYN-ACK does not reach it. The peer's
  SYN passed our poisoned entry untracked, and our SYN-ACK in the original direction is INVALID there
  (SYN_SENT, or SYN_SENT2 with window data that refuses our numbers), so every retransmission dies at our
  own NAT. A retransmitted SYN within ``max(initial_rto, 2 * rtt)`` of our first SYN-ACK may merely have
  crossed it and is answered as before; a later one proves the peer is still in SYN-SENT (an ESTABLISHED
  peer never sends a SYN). We reopen our entry and go back to SYN-SENT with our real SYN: it reaches the
  peer's NAT in the reply direction (SYN_SENT2 there) and the peer, which answers SYN-ACK; that SYN-ACK
  moves our fresh entry to SYN_RECV (the ordinary open) and we finish as the active opener. The same happens
  when a RST with wrong numbers came through our NAT while we were in SYN-RECEIVED and nothing from the peer
  follows within that crossing time: conntrack took the RST and closed our entry (CLOSE refuses our SYN-ACK
  and the peer's SYN retransmissions alike, so we would hear nothing more). We never go back on silence
  alone: a peer that is ESTABLISHED with its ACKs lost would then answer our SYN with a bare ACK, and an ACK
  cannot complete our fresh entry (an original-direction ACK in SYN_SENT is INVALID), so SYN-SENT ignores
  it.

None of these paths accepts anything new: the numbers are checked exactly as before, a misfit still changes no
state, and the duplicate SYN-ACK must carry exactly the peer's ISN and ``ack = ISN + 1`` to trigger a
reopen; a blind attacker can at most make us reopen our entry before the peer's SYN, which is harmless.
A forgery after the peer's genuine SYN has passed our NAT cannot poison it (that side is initialised;
a reply SYN in SYN_SENT2/SYN_RECV is not re-read, and a reply SYN after SYN_RECV is INVALID).

What the engine cannot repair: a flood. In the lab (tests/lab/test_punch.py, conntrack -E and tcpdump at
the NATs) a forged RST-ACK or SYN-ACK with a random ACK reaches a NAT while its entry is SYN_SENT; conntrack
refuses it (ACK above the window) but has already initialised the peer's side from its seq, so the genuine
SYN-ACK passes untracked (no SYN_RECV), the engine connects, and its ACK and data are INVALID at that NAT.
Forgeries a few milliseconds apart poison each reopened entry again, and nothing on our side tells an
entry that passes our ACKs from one that drops them. The session does: peer authentication on the
spliced socket then gets nothing through, and the cascade retries on a fresh port
(``session._authenticate``, ``runner.with_retry``).

The engine never sends data or FIN and does not consume payload: a data segment that completes the
handshake counts as its ACK, and the peer retransmits the data to the spliced socket.

No role is needed: the handshake is symmetric, and both sides negotiate the same options from the same two
sealed advertisements. ``slot`` is validated and kept for strategies that are asymmetric (listen-only
priming); the symmetric punch does not use it.

Options (what the TCP_REPAIR splice restores, FACTS.md "TCP_REPAIR"): MSS is the smaller of the two (RFC
9293 section 3.7.1, 536 when a side sent none); window scaling only if both sent it (RFC 7323 section 2.2);
SACK only if both (RFC 2018); timestamps only if both (RFC 7323 section 3.2).
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from rawpunch.proto.codec import Endpoint
from rawpunch.proto.errors import LocalProtocolError
from rawpunch.proto.peerinfo import PeerInfo
from rawpunch.punch.segment import SEQ_MOD, Flags, Segment, TcpOptions, seq_add

DEFAULT_MSS_IPV4 = 536  # RFC 9293 section 3.7.1 / RFC 1122 4.2.2.6
DEFAULT_MSS_IPV6 = 1220  # RFC 8200 minimum MTU 1280 - 60
MAX_WSCALE = 14  # RFC 7323 section 2.3


class IcmpKind(enum.Enum):
    TIME_EXCEEDED = "time-exceeded"  # type 11: our priming SYN expired where it should
    UNREACHABLE = "unreachable"  # type 3: the peer's NAT refused our SYN with ICMP

    @classmethod
    def from_type(cls, icmp_type: int) -> IcmpKind | None:
        """The kind of an ICMP error by its RFC 792 type (11, 3); None for any other type."""
        return {11: cls.TIME_EXCEEDED, 3: cls.UNREACHABLE}.get(icmp_type)


class PunchState(enum.Enum):
    IDLE = "idle"
    PRIMED = "primed"  # priming SYN sent, real SYN not yet
    SYN_SENT = "syn-sent"
    SYN_RECEIVED = "syn-received"
    ESTABLISHED = "established"
    FAILED = "failed"


class SegmentKind(enum.Enum):
    SYN = "syn"
    SYN_ACK = "syn-ack"
    ACK = "ack"  # ACK without SYN/RST/FIN, with or without payload
    RST = "rst"  # with or without ACK
    OTHER = "other"  # FIN, no flags, nonsense combinations


def segment_kind(seg: Segment) -> SegmentKind:
    flags = seg.flags & ~Flags.PSH
    return _KINDS.get(flags, SegmentKind.OTHER)


_KINDS = {
    Flags.SYN: SegmentKind.SYN,
    Flags.SYN | Flags.ACK: SegmentKind.SYN_ACK,
    Flags.ACK: SegmentKind.ACK,
    Flags.RST: SegmentKind.RST,
    Flags.RST | Flags.ACK: SegmentKind.RST,
}


# --- configuration ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PunchConfig:
    local: Endpoint
    """Our private endpoint: the address and port the spliced kernel socket will have."""
    peer: Endpoint
    """The peer's public endpoint (its NAT's mapping, as the rendezvous saw it)."""
    isn: int
    """Our initial sequence number, as sent in our sealed peer info."""
    peer_isn: int
    """The peer's ISN from its sealed peer info: its SYN must carry exactly this."""
    options: TcpOptions = field(default_factory=lambda: TcpOptions(1460, 7, True, None))
    """Our SYN options; ``timestamp[0]`` is our TSval at ``start`` (the clock then ticks in ms)."""
    peer_options: TcpOptions = field(default_factory=TcpOptions)
    """The peer's advertised options (``options_from_peer_info``); only presence counts for timestamps."""
    priming_ttl: int | None = 2
    """TTL of the priming SYN (``ttl.priming_ttl``); None sends no priming SYN (plain simultaneous open)."""
    ttl: int = 64
    """TTL of every other segment."""
    slot: int = 0
    """Our rendezvous slot (0 or 1); the symmetric punch does not need a role."""
    window: int = 65535
    """Receive window we advertise in the SYN (bytes, unscaled)."""
    syn_delay: float = 0.05
    """Seconds between the priming SYN and the real SYN: the GO skew the punch tolerates (minus the one-way
    delay). Ignored without priming."""
    initial_rto: float = 0.25
    backoff: float = 2.0
    max_rto: float = 2.0
    deadline: float = 10.0
    """Seconds after ``start`` at which an unfinished punch fails."""
    rtt: float | None = None
    """Round-trip estimate to the peer in seconds (e.g. the rendezvous RTT), if known. A SYN of the peer
    arriving in SYN-RECEIVED more than ``max(initial_rto, 2 * rtt)`` after our first SYN-ACK means our
    SYN-ACK is not getting out."""
    ack_repeats: int = 3
    """Copies of the final ACK sent after it, one RTO apart (``initial_rto``, then backed off). Needed because
    once our ACK has passed the peer's NAT, that NAT is ESTABLISHED and drops the peer's retransmitted
    SYN-ACKs as INVALID: an ACK lost between the peer's NAT and the peer is never asked for again."""

    def __post_init__(self) -> None:
        for name in ("isn", "peer_isn"):
            if not 0 <= getattr(self, name) < SEQ_MOD:
                raise ValueError(f"{name} must be a 32-bit sequence number, got {getattr(self, name)}")
        if not 1 <= self.ttl <= 255:
            raise ValueError(f"ttl must be 1..255, got {self.ttl}")
        if self.priming_ttl is not None and not 1 <= self.priming_ttl < self.ttl:
            raise ValueError(f"priming_ttl must be 1..{self.ttl - 1} (below ttl), got {self.priming_ttl}")
        if self.slot not in (0, 1):
            raise ValueError(f"slot must be 0 or 1, got {self.slot}")
        if not 1 <= self.window <= 0xFFFF:
            raise ValueError(f"window must be 1..65535 (a SYN's window is never scaled), got {self.window}")
        if self.local == self.peer:
            raise ValueError("local and peer endpoints are the same")
        for opts in (self.options, self.peer_options):
            if opts.wscale is not None and not 0 <= opts.wscale <= MAX_WSCALE:
                raise ValueError(f"window scale must be 0..{MAX_WSCALE}, got {opts.wscale}")
            if opts.mss is not None and not 1 <= opts.mss <= 0xFFFF:
                raise ValueError(f"MSS must be 1..65535, got {opts.mss}")
        if not (0 < self.initial_rto <= self.max_rto and self.backoff >= 1):
            raise ValueError("need 0 < initial_rto <= max_rto and backoff >= 1")
        if self.rtt is not None and self.rtt <= 0:
            raise ValueError(f"rtt must be positive when given, got {self.rtt}")
        if self.syn_delay < 0 or self.deadline <= 0 or self.ack_repeats < 0:
            raise ValueError("need syn_delay >= 0, deadline > 0 and ack_repeats >= 0")


def options_from_peer_info(info: PeerInfo) -> TcpOptions:
    """The options a peer advertised in its sealed info, as ``PunchConfig.peer_options``."""
    return TcpOptions(info.mss, info.wscale, info.sack, (0, 0) if info.timestamps else None)


@dataclass(frozen=True)
class Negotiated:
    """The options both sides use, computed identically on both from the two advertisements."""

    mss: int
    snd_wscale: int | None  # the peer's shift: applies to windows it sends us
    rcv_wscale: int | None  # our shift: applies to windows we send
    sack: bool
    timestamps: bool


def negotiate(own: TcpOptions, peer: TcpOptions, ipv6: bool = False) -> Negotiated:
    default = DEFAULT_MSS_IPV6 if ipv6 else DEFAULT_MSS_IPV4
    both_scale = own.wscale is not None and peer.wscale is not None
    return Negotiated(
        mss=min(own.mss or default, peer.mss or default),
        snd_wscale=peer.wscale if both_scale else None,
        rcv_wscale=own.wscale if both_scale else None,
        sack=own.sack_permitted and peer.sack_permitted,
        timestamps=own.timestamp is not None and peer.timestamp is not None,
    )


# --- events ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Primed:
    """A priming SYN went out; ``reopened``: after a low-TTL RST that closes a stale NAT entry first."""

    ttl: int
    reopened: bool
    elapsed: float


@dataclass(frozen=True)
class SynSent:
    transmission: int  # 1 for the first, 2 for the first retransmission, ...
    elapsed: float


@dataclass(frozen=True)
class PeerSynReceived:
    elapsed: float


@dataclass(frozen=True)
class SynAckSent:
    transmission: int
    elapsed: float


@dataclass(frozen=True)
class PeerSynAckReceived:
    elapsed: float


@dataclass(frozen=True)
class PeerAckReceived:
    elapsed: float


@dataclass(frozen=True)
class AckSent:
    elapsed: float


@dataclass(frozen=True)
class ResetReceived:
    """An exactly matching RST. ``origin``: "syn-answer" (``ack = ISN + 1``: the peer's NAT refused our real
    SYN), "priming-answer" (``ack = ISN``: the priming SYN reached the peer's NAT, its TTL is too high) or
    "synack-answer" (``seq = peer ISN + 1``: our SYN-ACK met no mapping at the peer's NAT, or the peer's host
    reset it). The punch goes on."""

    origin: str
    count: int
    elapsed: float


@dataclass(frozen=True)
class IcmpReceived:
    kind: IcmpKind
    router: str
    elapsed: float


@dataclass(frozen=True)
class Connected:
    """Everything the TCP_REPAIR splice needs (FACTS.md): queue sequences, options, TCP_TIMESTAMP and
    TCP_REPAIR_WINDOW (snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup)."""

    local: Endpoint
    remote: Endpoint
    snd_nxt: int  # TCP_QUEUE_SEQ of the send queue: ISN + 1
    rcv_nxt: int  # TCP_QUEUE_SEQ of the receive queue: peer ISN + 1
    snd_wl1: int
    snd_wnd: int  # bytes, the peer's window scaled
    max_window: int
    rcv_wnd: int  # bytes, what we advertised
    rcv_wup: int
    mss: int
    snd_wscale: int | None  # None: window scaling not negotiated (set no TCPOPT_WINDOW)
    rcv_wscale: int | None
    sack: bool
    timestamps: tuple[int, int] | None  # (our TSval now, ts_recent) when negotiated
    elapsed: float


@dataclass(frozen=True)
class Failed:
    reason: str
    elapsed: float


Event = (
    Primed
    | SynSent
    | PeerSynReceived
    | SynAckSent
    | PeerSynAckReceived
    | PeerAckReceived
    | AckSent
    | ResetReceived
    | IcmpReceived
    | Connected
    | Failed
)


def event_record(event: Event) -> dict[str, object]:
    """A JSON-ready dict for one event: ``{"event": "SynSent", ...fields}``, endpoints and enums as text."""
    record: dict[str, object] = {"event": type(event).__name__}
    for key, value in asdict(event).items():
        if isinstance(value, dict):  # an Endpoint, flattened by asdict
            record[key] = str(Endpoint(**value))
        else:
            record[key] = value.value if isinstance(value, enum.Enum) else value
    return record


# --- the engine ------------------------------------------------------------------------------------------


class PunchEngine:
    def __init__(self, config: PunchConfig) -> None:
        self.config = config
        self.state = PunchState.IDLE
        self.negotiated = negotiate(
            config.options, config.peer_options, ipaddress.ip_address(config.local.host).version == 6
        )
        self.ignored: Counter[str] = Counter()
        self.resets: Counter[str] = Counter()  # origin -> count
        self.icmp: Counter[IcmpKind] = Counter()
        self.poison_reopens = 0  # entries reopened because a forgery may have poisoned them
        self._started = 0.0
        self._next_send: float | None = None
        self._rto = config.initial_rto
        self._transmissions = 0
        self._snd_wnd = 0
        self._snd_wl1 = config.peer_isn
        self._max_window = 0
        self._ts_recent: int | None = None
        self._first_syn_at: float | None = None  # our first real SYN
        self._rtt_bound = 0.0  # first real SYN -> Connected: at least one round trip
        self._acked_at = 0.0  # our ACK that should have ended the peer's SYN-ACK retransmissions
        self._reopened_since_ack = False
        self._synack_since = 0.0  # when we entered SYN-RECEIVED
        self._suspect_closed_at: float | None = None  # a misfit RST passed our NAT in SYN-RECEIVED
        self._outbox: list[Segment] = []
        self._events: deque[Event] = deque()

    @property
    def _crossing_time(self) -> float:
        """How long after our first SYN-ACK a retransmitted SYN of the peer may merely have crossed it."""
        return (
            max(self.config.initial_rto, 2 * self.config.rtt) if self.config.rtt else self.config.initial_rto
        )

    @property
    def priming_seq(self) -> int:
        """The priming SYN's sequence number, ISN - 1 (see the module docstring)."""
        return seq_add(self.config.isn, -1)

    # --- I/O entry points -----------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin at the rendezvous' GO: the priming SYN now, the real SYN ``syn_delay`` later."""
        if self.state is not PunchState.IDLE:
            raise LocalProtocolError(f"start() needs an idle punch, state is {self.state.value}")
        self._started = now
        if self.config.priming_ttl is None:
            self._send_syn(now)
            return
        self._prime(now)
        self.state = PunchState.PRIMED
        self._next_send = now + self.config.syn_delay
        if self.config.syn_delay == 0:
            self.handle_timer(now)

    def receive_segment(self, seg: Segment, now: float) -> None:
        """Take one inbound segment. Anything that does not fit is counted in ``ignored``, never raised."""
        if (seg.src, seg.dst) != (self.config.peer, self.config.local):
            self._ignore("wrong 4-tuple")
            return
        TRANSITIONS[(self.state, segment_kind(seg))](self, seg, now)

    def receive_icmp(self, kind: IcmpKind, router: str, quoted: Segment, now: float) -> None:
        """An ICMP error from ``router`` quoting one of our segments (translated back by our NAT)."""
        ours = (quoted.src, quoted.dst) == (self.config.local, self.config.peer)
        if not ours or quoted.seq not in (self.config.isn, self.priming_seq):
            self._ignore("ICMP about another flow")
            return
        if self.state not in _ACTIVE:
            self._ignore(f"ICMP while {self.state.value}")
            return
        self.icmp[kind] += 1
        self._events.append(IcmpReceived(kind, router, self._elapsed(now)))

    def segments_to_send(self, now: float) -> list[Segment]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        if self.state is PunchState.ESTABLISHED:
            return self._next_send  # the final ACK's copies, if any are left
        if self.state not in _ACTIVE:
            return None
        deadline = self._started + self.config.deadline
        return deadline if self._next_send is None else min(self._next_send, deadline)

    def handle_timer(self, now: float) -> None:
        if self.state is PunchState.ESTABLISHED:
            self._repeat_ack(now)
        if self.state not in _ACTIVE:
            return
        if now >= self._started + self.config.deadline:
            self._fail(self._deadline_reason(), now)
        elif self._next_send is not None and now >= self._next_send:
            if self.state is PunchState.SYN_RECEIVED and self._entry_closed(now):
                self._back_to_syn_sent(now)
            elif self.state is PunchState.SYN_RECEIVED:
                self._send_synack(now)
            else:
                self._send_syn(now)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # --- sending ----------------------------------------------------------------------------------------

    def _prime(self, now: float, reopen: bool = False) -> None:
        """The priming SYN. At GO it has ``priming_seq``; when it ``reopen``s after a RST it has the ISN (the
        peer may already be answering our SYN: its SYN-ACK acks ISN + 1, which conntrack refuses as "ACK
        over the upper bound" while our side's highest sequence seen is the ISN) and follows a RST of the
        same TTL. conntrack takes a SYN after a RST from the same side as a new connection ("Attempt to
        reopen a closed/aborted connection"), so an entry that a RST left in CLOSE -- ignoring our SYNs
        and refusing the peer's for 10 s -- starts afresh in SYN_SENT. Without an entry the RST is INVALID
        and our own NAT drops it."""
        ttl = self.config.priming_ttl
        assert ttl is not None
        if reopen:
            # seq = ISN: inside conntrack's window for our side even when the peer has acked nothing yet
            rst = self._segment(Flags.RST, self.config.isn, 0, TcpOptions())
            self._outbox.append(rst.with_(ttl=ttl))
        seq = self.config.isn if reopen else self.priming_seq
        self._outbox.append(self._syn(now).with_(seq=seq, ttl=ttl))
        self._events.append(Primed(ttl, reopen, self._elapsed(now)))

    def _send_syn(self, now: float) -> None:
        if self.state is not PunchState.SYN_SENT:
            self.state = PunchState.SYN_SENT
            self._transmissions, self._rto = 0, self.config.initial_rto
        if self._first_syn_at is None:
            self._first_syn_at = now
        if self._transmissions and self.config.priming_ttl is not None:
            self._prime(now, reopen=True)  # retransmit over a clean entry (see "Retransmission" above)
        self._outbox.append(self._syn(now))
        self._transmissions += 1
        self._events.append(SynSent(self._transmissions, self._elapsed(now)))
        self._arm(now)

    def _send_synack(self, now: float) -> None:
        if self.state is not PunchState.SYN_RECEIVED:
            self.state = PunchState.SYN_RECEIVED
            self._transmissions, self._rto = 0, self.config.initial_rto
            self._synack_since = now
        self._outbox.append(self._synack(now))
        self._transmissions += 1
        self._events.append(SynAckSent(self._transmissions, self._elapsed(now)))
        self._arm(now)

    def _send_ack(self, now: float) -> None:
        n = self.negotiated
        opts = TcpOptions(timestamp=self._timestamp(now)) if n.timestamps else TcpOptions()
        window = self.config.window >> (n.rcv_wscale or 0)  # RFC 7323 2.2: scaled after the SYN
        self._outbox.append(self._segment(Flags.ACK, seq_add(self.config.isn, 1), window, opts))
        self._events.append(AckSent(self._elapsed(now)))

    def _repeat_ack(self, now: float) -> None:
        if self._next_send is None or now < self._next_send:
            return
        self._send_ack(now)
        self._transmissions += 1
        if self._transmissions > self.config.ack_repeats:
            self._next_send = None
        else:
            self._arm(now)

    def _arm(self, now: float) -> None:
        """Schedule the next retransmission one RTO from now and back off (RFC 6298 section 5.5)."""
        self._next_send = now + self._rto
        self._rto = min(self._rto * self.config.backoff, self.config.max_rto)

    def _syn(self, now: float) -> Segment:
        return self._segment(Flags.SYN, self.config.isn, self.config.window, self._syn_options(now))

    def _synack(self, now: float) -> Segment:
        return self._segment(
            Flags.SYN | Flags.ACK, self.config.isn, self.config.window, self._syn_options(now)
        )

    def _syn_options(self, now: float) -> TcpOptions:
        own = self.config.options
        ts = None if own.timestamp is None else self._timestamp(now)
        return TcpOptions(own.mss, own.wscale, own.sack_permitted, ts)

    def _segment(self, flags: Flags, seq: int, window: int, options: TcpOptions) -> Segment:
        ack = seq_add(self.config.peer_isn, 1) if flags & Flags.ACK else 0
        c = self.config
        return Segment(c.local, c.peer, seq, ack, flags, window, options, c.ttl)

    def _timestamp(self, now: float) -> tuple[int, int]:
        """(TSval, TSecr): our clock ticks in ms from ``options.timestamp[0]`` at start (RFC 7323 5.4)."""
        base = self.config.options.timestamp[0] if self.config.options.timestamp else 0
        return (base + round((now - self._started) * 1000)) % SEQ_MOD, self._ts_recent or 0

    # --- handlers, one per cell of TRANSITIONS ---------------------------------------------------------

    def _on_peer_syn(self, seg: Segment, now: float) -> None:
        if not self._fits(seg, seq=self.config.peer_isn):
            if seg.seq != seq_add(self.config.peer_isn, -1):  # not the peer's priming SYN
                self._suspect_poison(now)
            return
        self._learn(seg)
        self._events.append(PeerSynReceived(self._elapsed(now)))
        self._send_synack(now)

    def _on_peer_synack(self, seg: Segment, now: float) -> None:
        if not self._fits(seg, seq=self.config.peer_isn, ack=seq_add(self.config.isn, 1)):
            self._suspect_poison(now)
            return
        self._learn(seg)
        self._events.append(PeerSynAckReceived(self._elapsed(now)))
        self._send_ack(now)
        self._connect(now)
        self._repeat_ack_later(now)

    def _repeat_ack_later(self, now: float) -> None:
        """After the final ACK: its ``ack_repeats`` copies on the timer."""
        self._acked_at, self._reopened_since_ack = now, False
        if self.config.ack_repeats:
            self._transmissions, self._rto = 1, self.config.initial_rto
            self._arm(now)

    def _on_peer_ack(self, seg: Segment, now: float) -> None:
        """SYN-RECEIVED: an ACK of our SYN-ACK. ``seq`` is RCV.NXT, or RCV.NXT - 1 for the window probe the
        peer's kernel sends when its splice leaves repair mode: both prove the peer is ESTABLISHED."""
        probe = seg.seq == self.config.peer_isn and not seg.payload
        expected = self.config.peer_isn if probe else seq_add(self.config.peer_isn, 1)
        if not self._fits(seg, seq=expected, ack=seq_add(self.config.isn, 1)):
            return
        self._learn(seg)
        self._events.append(PeerAckReceived(self._elapsed(now)))
        self._connect(now)

    def _on_duplicate_syn(self, seg: Segment, now: float) -> None:
        """SYN-RECEIVED: the peer resent its SYN, so our SYN-ACK has not reached it. Soon after our first
        SYN-ACK the two may have crossed: answer again now. Later, our own NAT is refusing the SYN-ACK (an
        entry poisoned before the peer's SYN, which passed untracked): reopen the entry and start over from
        SYN-SENT (see "Poisoned entries" in the module docstring)."""
        if not self._fits(seg, seq=self.config.peer_isn):
            return
        self._learn(seg)
        if self.config.priming_ttl is not None and now - self._synack_since > self._crossing_time:
            self._back_to_syn_sent(now)
            return
        self._outbox.append(self._synack(now))
        self._events.append(SynAckSent(self._transmissions, self._elapsed(now)))

    def _back_to_syn_sent(self, now: float) -> None:
        """Our SYN-ACK cannot leave our NAT: reopen the entry (low-TTL RST and SYN) and send our real SYN."""
        self.poison_reopens += 1
        self._suspect_closed_at = None
        self.state = PunchState.SYN_SENT
        self._transmissions, self._rto = 1, self.config.initial_rto  # a retransmission: _send_syn reopens
        self._send_syn(now)

    def _on_late_handshake(self, seg: Segment, now: float) -> None:
        """ESTABLISHED: the peer resent its SYN, so our ACK was lost (RFC 5961 4.2: ACK it)."""
        if self._fits(seg, seq=self.config.peer_isn):
            self._send_ack(now)

    def _on_duplicate_synack(self, seg: Segment, now: float) -> None:
        """ESTABLISHED: the peer resent its SYN-ACK, so it has not got our ACK. Within two round trips
        (``_rtt_bound``) of that ACK it may just have crossed it: ACK again. Later, our ACK is lost or our
        NAT refuses it (an entry poisoned before the peer's SYN, which passed it untracked): reopen our
        entry and send nothing, so that the peer's next SYN-ACK moves the fresh entry to SYN_RECV and the
        ACK that answers it to ESTABLISHED (see "Poisoned entries" in the module docstring)."""
        if not self._fits(seg, seq=self.config.peer_isn, ack=seq_add(self.config.isn, 1)):
            return
        late = now - self._acked_at > 2 * self._rtt_bound
        if self.config.priming_ttl is None or self._reopened_since_ack or not late:
            self._send_ack(now)
            if self._reopened_since_ack:  # the first SYN-ACK over the reopened entry: the real answer
                self._repeat_ack_later(now)
            return
        self._reopened_since_ack = True
        self._prime(now, reopen=True)
        self._transmissions, self._rto = 1, self.config.initial_rto  # the timer keeps the caller listening
        self._arm(now)

    def _on_rst(self, seg: Segment, now: float) -> None:
        origin = self._reset_origin(seg)
        if origin is None:
            self._ignore(f"RST not exactly matching while {self.state.value} (RFC 5961 section 3)")
            self._suspect_poison(now)
            if self.state is PunchState.SYN_RECEIVED and self._suspect_closed_at is None:
                self._suspect_closed_at = now
            return
        self.resets[origin] += 1
        self._events.append(ResetReceived(origin, self.resets[origin], self._elapsed(now)))
        if origin == "priming-answer":
            return  # priming TTL too high: priming again would be refused again; the real SYN reopens
        if self.config.priming_ttl is not None:
            self._prime(now, reopen=True)  # the RST killed or closed our NAT's entry: open it afresh
        if self.state is PunchState.SYN_RECEIVED:
            self._transmissions = 0
        if self.state is not PunchState.PRIMED:
            self.state = PunchState.SYN_SENT  # hold the real SYN one RTO: the peer primes meanwhile
            self._next_send = now + self._rto

    def _ignore_segment(self, seg: Segment, now: float) -> None:
        self._ignore(f"{segment_kind(seg).value} while {self.state.value}")

    # --- helpers -----------------------------------------------------------------------------------------

    def _entry_closed(self, now: float) -> bool:
        """A misfit RST from the peer's endpoint passed our NAT in SYN-RECEIVED, and nothing from the peer
        has come since for a crossing time: conntrack took the RST and closed our entry (CLOSE refuses our
        SYN-ACK and the peer's SYN alike). An ESTABLISHED peer would have ACKed within that time."""
        since = self._suspect_closed_at
        return since is not None and now - since >= self._crossing_time

    def _suspect_poison(self, now: float) -> None:
        """Before the peer's SYN came in, a SYN, SYN-ACK or RST from the peer's endpoint with wrong
        numbers passed our NAT: it initialised (poisoned) the peer's side of our entry, or closed it.
        Reopen the entry now, before the peer's genuine SYN arrives (see "Poisoned entries")."""
        if self.state in (PunchState.PRIMED, PunchState.SYN_SENT) and self.config.priming_ttl is not None:
            self.poison_reopens += 1
            self._prime(now, reopen=True)

    def _fits(self, seg: Segment, *, seq: int, ack: int | None = None) -> bool:
        kind = segment_kind(seg).value
        if seg.seq != seq:
            self._ignore(f"{kind} with seq != expected")
            return False
        if ack is not None and seg.ack != ack:
            self._ignore(f"{kind} with ack != ISN + 1")
            return False
        return True

    def _reset_origin(self, seg: Segment) -> str | None:
        if self.state in (PunchState.PRIMED, PunchState.SYN_SENT):
            # RFC 9293 3.10.7.3: in SYN-SENT a RST is acceptable only if it ACKs our SYN. The priming SYN
            # has seq ISN - 1, so a RST for it (ack = ISN) says the priming TTL reaches the peer's NAT.
            if seg.is_ack and seg.ack == seq_add(self.config.isn, 1):
                return "syn-answer"
            if seg.is_ack and seg.ack == self.config.isn and self.config.priming_ttl is not None:
                return "priming-answer"
            return None
        if self.state is PunchState.SYN_RECEIVED and seg.seq == seq_add(self.config.peer_isn, 1):
            return "synack-answer"  # RFC 5961 3.2: exactly RCV.NXT (= SEG.ACK of our SYN-ACK)
        return None

    def _learn(self, seg: Segment) -> None:
        """Remember the peer's window (RFC 7323 2.2: unscaled in a SYN) and its TSval (ts_recent)."""
        self._suspect_closed_at = None  # the peer got through: our entry is not closed
        shift = 0 if seg.syn else (self.negotiated.snd_wscale or 0)
        self._snd_wnd, self._snd_wl1 = seg.window << shift, seg.seq
        self._max_window = max(self._max_window, self._snd_wnd)
        if seg.options.timestamp is not None:
            self._ts_recent = seg.options.timestamp[0]

    def _connect(self, now: float) -> None:
        self.state, self._next_send = PunchState.ESTABLISHED, None
        self._rtt_bound = now - (self._started if self._first_syn_at is None else self._first_syn_at)
        c, n = self.config, self.negotiated
        rcv_nxt = seq_add(c.peer_isn, 1)
        self._events.append(
            Connected(
                local=c.local,
                remote=c.peer,
                snd_nxt=seq_add(c.isn, 1),
                rcv_nxt=rcv_nxt,
                snd_wl1=self._snd_wl1,
                snd_wnd=self._snd_wnd,
                max_window=self._max_window,
                rcv_wnd=c.window,
                rcv_wup=rcv_nxt,
                mss=n.mss,
                snd_wscale=n.snd_wscale,
                rcv_wscale=n.rcv_wscale,
                sack=n.sack,
                timestamps=self._timestamp(now) if n.timestamps else None,
                elapsed=self._elapsed(now),
            )
        )

    def _fail(self, reason: str, now: float) -> None:
        self.state, self._next_send = PunchState.FAILED, None
        self._events.append(Failed(reason, self._elapsed(now)))

    def _ignore(self, reason: str) -> None:
        self.ignored[reason] += 1

    def _elapsed(self, now: float) -> float:
        return now - self._started

    def _deadline_reason(self) -> str:
        c, within = self.config, f"within {self.config.deadline:g} s"
        if self.resets["priming-answer"]:
            return (
                f"the priming SYN (TTL {c.priming_ttl}) reached the peer's NAT, which answered with RST: "
                "lower the priming TTL so that it expires between the two NATs (rawpunch.punch.ttl)"
            )
        if self.resets["synack-answer"]:
            return (
                f"our SYN-ACK was answered with RST {_times(self.resets['synack-answer'])} and the punch did "
                f"not complete {within}: the peer's NAT had no mapping left for it (an earlier RST closed "
                "it), or the peer's kernel answers our segments (is its RST-drop rule in place?)"
            )
        if self.state is PunchState.SYN_RECEIVED:
            return (
                f"the peer's SYN came through, but our SYN-ACK (sent {_times(self._transmissions)}) was not "
                f"answered {within}: the peer's NAT may have dropped it (its mapping closed or reset), or "
                "the peer stopped"
            )
        if self.resets["syn-answer"]:
            return (
                f"the peer's NAT answered our SYN with RST {_times(self.resets['syn-answer'])} and no SYN "
                f"from the peer came through {within}: its mapping did not exist when our SYN arrived. Did "
                "the peer start at GO? A larger syn_delay tolerates more skew"
            )
        if self.icmp[IcmpKind.UNREACHABLE]:
            return (
                f"the peer's NAT refused our SYN with ICMP unreachable and no SYN from the peer came through "
                f"{within}: its mapping did not exist when our SYN arrived"
            )
        ours = (
            f"the priming SYN, TTL {c.priming_ttl}, must pass our NAT"
            if c.priming_ttl is not None
            else "no priming SYN opened it before the peer's SYN arrived"
        )
        return (
            f"no SYN from the peer {within}: its NAT may filter inbound SYNs or map the peer to another port "
            f"than the rendezvous saw, the peer may not have started, or our own NAT dropped its SYN ({ours})"
        )


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


_ACTIVE = frozenset({PunchState.PRIMED, PunchState.SYN_SENT, PunchState.SYN_RECEIVED})

_Handler = Callable[[PunchEngine, Segment, float], None]
_E, _K = PunchState, SegmentKind
_IGNORE = PunchEngine._ignore_segment
TRANSITIONS: dict[tuple[PunchState, SegmentKind], _Handler] = {
    (_E.IDLE, _K.SYN): _IGNORE,
    (_E.IDLE, _K.SYN_ACK): _IGNORE,
    (_E.IDLE, _K.ACK): _IGNORE,
    (_E.IDLE, _K.RST): _IGNORE,
    (_E.IDLE, _K.OTHER): _IGNORE,
    (_E.PRIMED, _K.SYN): PunchEngine._on_peer_syn,
    (_E.PRIMED, _K.SYN_ACK): PunchEngine._on_peer_synack,  # the priming SYN got through: fine
    (_E.PRIMED, _K.ACK): _IGNORE,
    (_E.PRIMED, _K.RST): PunchEngine._on_rst,
    (_E.PRIMED, _K.OTHER): _IGNORE,
    (_E.SYN_SENT, _K.SYN): PunchEngine._on_peer_syn,
    (_E.SYN_SENT, _K.SYN_ACK): PunchEngine._on_peer_synack,
    (_E.SYN_SENT, _K.ACK): _IGNORE,  # nothing of ours to acknowledge but the SYN, which needs a SYN-ACK
    (_E.SYN_SENT, _K.RST): PunchEngine._on_rst,
    (_E.SYN_SENT, _K.OTHER): _IGNORE,
    (_E.SYN_RECEIVED, _K.SYN): PunchEngine._on_duplicate_syn,
    (_E.SYN_RECEIVED, _K.SYN_ACK): PunchEngine._on_peer_synack,
    (_E.SYN_RECEIVED, _K.ACK): PunchEngine._on_peer_ack,
    (_E.SYN_RECEIVED, _K.RST): PunchEngine._on_rst,
    (_E.SYN_RECEIVED, _K.OTHER): _IGNORE,
    (_E.ESTABLISHED, _K.SYN): PunchEngine._on_late_handshake,
    (_E.ESTABLISHED, _K.SYN_ACK): PunchEngine._on_duplicate_synack,
    (_E.ESTABLISHED, _K.ACK): _IGNORE,  # duplicates and data: the spliced socket's business
    (_E.ESTABLISHED, _K.RST): _IGNORE,  # after Connected the kernel socket owns the flow
    (_E.ESTABLISHED, _K.OTHER): _IGNORE,
    (_E.FAILED, _K.SYN): _IGNORE,
    (_E.FAILED, _K.SYN_ACK): _IGNORE,
    (_E.FAILED, _K.ACK): _IGNORE,
    (_E.FAILED, _K.RST): _IGNORE,
    (_E.FAILED, _K.OTHER): _IGNORE,
}
