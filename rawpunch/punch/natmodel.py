"""A pure model of a Linux MASQUERADE NAT with conntrack's TCP state machine, to make the punch honest.

Everything here is data and pure functions: a ``Nat`` is a frozen value, and ``outbound`` / ``inbound`` /
``inbound_icmp`` take one and a packet and return the next ``Nat`` and a verdict (``Forward``, ``Answer``
back out of the interface it came in on, or ``Drop`` with a reason). The punch tests pump segments through
it; the lab's userspace NAT can drive the same functions from NFQUEUE.

What a packet meets, in the order Linux applies it (``net/netfilter/nf_conntrack_core.c``,
``nf_conntrack_proto_tcp.c``, ``nf_nat_core.c``, ``net/ipv4/ip_forward.c``):

1. **conntrack** (PREROUTING). The packet's tuple is looked up in both directions. A new LAN flow gets a
   tentative entry whose reply tuple is the SNAT result (RFC 4787 section 4.1 mapping, here with port
   preservation as Linux >= 4.19 does when the port is free). The segment kind (``CtIndex``: SYN,
   SYN-ACK, FIN, ACK, RST, none) and direction pick the next state from ``TCP_CONNTRACKS``, conntrack's
   ``tcp_conntracks[2][6][10]`` table. Its two pseudo-states: ``INVALID`` (sIV) and ``IGNORE`` (sIG: let
   through without a state change, the tracker may be out of sync). Then ``tcp_in_window`` checks the
   sequence and acknowledgement numbers against what each side has sent (``Seen``: td_end, td_maxend,
   td_maxwin); since Linux 6.1 a stale segment (below the window) is let through untracked, not INVALID.
2. **INVALID is never NATed.** Outbound it would leave with the private source, so the profile's
   ``FORWARD --ctstate INVALID -j DROP`` drops it. Inbound it is not de-NATed: addressed to the NAT's own
   public address, it is delivered to the router's own stack like any unsolicited segment.
3. **TTL** (``ip_forward``): a forwarded packet that arrives with TTL <= 1 is dropped and answered with ICMP
   time exceeded. A tentative entry dies with it (conntrack confirms entries in POSTROUTING only). Packets for
   the router itself are delivered locally and never expire.
4. **Unsolicited inbound** (no entry, or INVALID): RFC 5382 section 4.3 REQ-4 says a NAT must not answer an
   unsolicited SYN for 6 s; the profile decides what the box does: ``drop``, ``rst`` (a bare Linux router's
   stack: RFC 9293 section 3.10.7.1 reset, ``<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`` for a segment
   without ACK, ``<SEQ=SEG.ACK><CTL=RST>`` otherwise), or ``icmp`` (port unreachable).

The conntrack behaviours the punch depends on (see FACTS.md, "What happens to TCP between two Linux NATs"):

* A SYN in the reply direction while the entry is SYN_SENT is a simultaneous open: SYN_SENT2. An
  original-direction SYN-ACK is only valid from SYN_SENT2 or SYN_RECV; **in SYN_SENT it is INVALID**, so a
  host may send its crafted SYN-ACK only after the peer's SYN came in through its NAT.
* A RST that passes an entry which has not seen a reply yet deletes it at once (``nf_ct_kill``: "If only
  reply is a RST ... delete the conntrack immediately"): the NAT's RST to an early SYN kills the sender's
  mapping. With a reply seen, a RST moves the entry to CLOSE for 10 s; a new SYN from the side that sent the
  RST reopens it, one from the other side is ignored, and the peer's SYN is INVALID until the entry expires.
* ``tcp_in_window`` initialises a side's window data from the first segment it sees from that side, even a
  segment that then fails the check; a spoofed segment can poison it. The model keeps that behaviour.
* In SYN_SENT, a RST answering the SYN (seq 0) is checked only by its ACK (``seq = end = td_end``).

* A SYN with a higher sequence number than its side sent before, in SYN_SENT or SYN_RECV, re-initialises
  that side (Linux 6.x ``tcp_in_window``): the priming SYN may use ISN - 1 and the real SYN the ISN.

Beyond Linux: the behaviours of the lab's userspace NAT (``rawpunch.lab.usernat`` drives this model)
--------------------------------------------------------------------------------------------------------
* **Filtering** (RFC 4787 section 5, RFC 5382 REQ-3). A segment from the WAN that matches no entry is let
  in when the profile's filtering admits it through an existing *mapping* (a live entry holding the public
  port): endpoint-independent from anyone, address-dependent from any port of an address that entry talks
  to. It then opens an entry of its own whose original direction is WAN -> LAN (``Conntrack.inbound``), as
  conntrack does for a DNATed flow, and the LAN endpoint's stack answers it. This needs each public port to
  belong to one LAN endpoint (RFC 5382 REQ-7: no port overloading), so profiles with Linux's overloading port
  preservation and such filtering are refused up front.
* **Hairpinning** (RFC 4787 REQ-9, RFC 5382 REQ-8). A LAN segment to the NAT's own public address is
  translated twice: outbound as to any remote (a mapping of its own), then inbound through the filter, so
  the LAN endpoint behind the mapping sees the sender's *public* endpoint (REQ-8a, "external source IP
  address and port"). With hairpinning off such a segment is for the box's own stack, which the model does
  not emulate: ``outbound`` raises ``NotImplementedError``.
* **Allocation and mapping**: sequential and random allocation, address-dependent and address-and-port-
  dependent mapping (the allocator below).

Simplifications: no SACK blocks, timestamps (PAWS), NAT sequence offsets, ``be_liberal``, max-retrans
shortening of timeouts, the CLOSE-state RST sequence checks or the IGNORE resync heuristic; ICMP itself has
no TTL. Endpoint-independent mapping is idealised: a LAN endpoint keeps its public port for every
destination, where Linux merely tries to preserve the source port each time. A hairpinned segment the
filter refuses is dropped (a real box might answer it). Profiles without translation (``nat=False``) and
double NATs (``layers``) are not one NAT box and are refused.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from rawpunch.lab.profiles import PROFILES, NatProfile
from rawpunch.proto.codec import Endpoint
from rawpunch.punch.engine import IcmpKind
from rawpunch.punch.segment import SEQ_MOD, Flags, Segment, seq_add

FlowTuple = tuple[Endpoint, Endpoint]  # (source, destination); the protocol is always TCP here


class CtState(enum.Enum):
    """conntrack TCP states (``enum tcp_conntrack``), plus the table's two pseudo-states."""

    NONE = "NONE"
    SYN_SENT = "SYN_SENT"
    SYN_RECV = "SYN_RECV"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT = "FIN_WAIT"
    CLOSE_WAIT = "CLOSE_WAIT"
    LAST_ACK = "LAST_ACK"
    TIME_WAIT = "TIME_WAIT"
    CLOSE = "CLOSE"
    SYN_SENT2 = "SYN_SENT2"
    INVALID = "INVALID"  # sIV: a table outcome, never an entry's state
    IGNORE = "IGNORE"  # sIG: a table outcome, never an entry's state


class Direction(enum.IntEnum):
    ORIGINAL = 0  # as the flow's first packet went: here always LAN -> WAN
    REPLY = 1


class CtIndex(enum.Enum):
    """conntrack's segment classes (``get_conntrack_index``): RST wins, then SYN, FIN, ACK."""

    SYN = "syn"
    SYNACK = "synack"
    FIN = "fin"
    ACK = "ack"
    RST = "rst"
    NONE = "none"


def conntrack_index(seg: Segment) -> CtIndex:
    if seg.rst:
        return CtIndex.RST
    if seg.syn:
        return CtIndex.SYNACK if seg.is_ack else CtIndex.SYN
    if Flags.FIN in seg.flags:
        return CtIndex.FIN
    return CtIndex.ACK if seg.is_ack else CtIndex.NONE


# tcp_error(): flag combinations that are INVALID whatever the state (PSH is masked out; no URG here).
_VALID_FLAGS = frozenset(
    {Flags.SYN, Flags.SYN | Flags.ACK, Flags.RST, Flags.RST | Flags.ACK, Flags.FIN | Flags.ACK, Flags.ACK}
)

_S = CtState
# conntrack's own abbreviations, so the table below reads like the C one
sNO, sSS, sSR, sES, sFW = _S.NONE, _S.SYN_SENT, _S.SYN_RECV, _S.ESTABLISHED, _S.FIN_WAIT  # noqa: N816
sCW, sLA, sTW, sCL, sS2 = _S.CLOSE_WAIT, _S.LAST_ACK, _S.TIME_WAIT, _S.CLOSE, _S.SYN_SENT2  # noqa: N816
sIV, sIG = _S.INVALID, _S.IGNORE  # noqa: N816
COLUMNS = (sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2)
_O, _R, _I = Direction.ORIGINAL, Direction.REPLY, CtIndex
# fmt: off
_ROWS: dict[tuple[Direction, CtIndex], tuple[CtState, ...]] = {
    #                  sNO  sSS  sSR  sES  sFW  sCW  sLA  sTW  sCL  sS2
    (_O, _I.SYN):    (sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2),
    (_O, _I.SYNACK): (sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR),
    (_O, _I.FIN):    (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),
    (_O, _I.ACK):    (sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV),
    (_O, _I.RST):    (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),
    (_O, _I.NONE):   (sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV),
    (_R, _I.SYN):    (sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2),
    (_R, _I.SYNACK): (sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR),
    (_R, _I.FIN):    (sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV),
    (_R, _I.ACK):    (sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG),
    (_R, _I.RST):    (sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL),
    (_R, _I.NONE):   (sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV),
}
# fmt: on
#: (direction, segment class, old state) -> new state: Linux's ``tcp_conntracks``, read as data.
TCP_CONNTRACKS: dict[tuple[Direction, CtIndex, CtState], CtState] = {
    (d, i, old): new for (d, i), row in _ROWS.items() for old, new in zip(COLUMNS, row, strict=True)
}

#: Seconds an entry lives after its last accepted packet (``nf_conntrack_tcp_timeout_*`` defaults).
TIMEOUTS: dict[CtState, float] = {
    sSS: 120, sSR: 60, sES: 432000, sFW: 120, sCW: 60, sLA: 30, sTW: 120, sCL: 10, sS2: 120,
}  # fmt: skip
TIMEOUT_UNACKNOWLEDGED = 300.0  # caps ESTABLISHED while no reply was seen (loose pickup)
MAXACKWINCONST = 66000
MAX_WSCALE = 14


def before(a: int, b: int) -> bool:
    """``a`` precedes ``b`` in 32-bit sequence space (RFC 9293 section 3.4, Linux's ``before()``)."""
    return ((a - b) % SEQ_MOD) >= SEQ_MOD // 2


def after(a: int, b: int) -> bool:
    return before(b, a)


@dataclass(frozen=True)
class Seen:
    """What conntrack knows of one side's sequence space (``struct ip_ct_tcp_state``)."""

    td_end: int = 0  # highest seq + len sent
    td_maxend: int = 0  # highest ack + window the other side may send up to
    td_maxwin: int = 0  # largest window seen; 0 = nothing seen from this side yet
    td_scale: int = 0
    wscale: bool = False  # IP_CT_TCP_FLAG_WINDOW_SCALE: the side's SYN carried window scale


@dataclass(frozen=True)
class Conntrack:
    """One conntrack entry: the flow as its first packet went, and the way back (after translation).

    Usually the LAN host opened it (``original`` = LAN -> remote, ``reply`` = remote -> public endpoint);
    an ``inbound`` entry was opened from the WAN through a filter that admitted it (``original`` = remote ->
    public endpoint, ``reply`` = LAN -> remote).
    """

    original: FlowTuple
    reply: FlowTuple
    state: CtState
    expires: float
    seen: tuple[Seen, Seen] = (Seen(), Seen())
    seen_reply: bool = False  # IPS_SEEN_REPLY
    simultaneous_open: bool = False  # IP_CT_TCP_SIMULTANEOUS_OPEN
    close_init: bool = False  # IP_CT_TCP_FLAG_CLOSE_INIT
    liberal: bool = False  # IP_CT_TCP_FLAG_BE_LIBERAL, set on mid-stream pickup
    last: tuple[Direction, CtIndex] | None = None  # last_dir, last_index
    inbound: bool = False  # opened from the WAN (endpoint-independent or address-dependent filtering)

    @property
    def wan(self) -> FlowTuple:
        """The flow as it travels on the WAN towards the NAT: (remote, public endpoint)."""
        return self.original if self.inbound else self.reply

    @property
    def public(self) -> Endpoint:
        return self.wan[1]

    @property
    def remote(self) -> Endpoint:
        return self.wan[0]

    @property
    def lan(self) -> Endpoint:
        return self.reply[0] if self.inbound else self.original[0]


@dataclass(frozen=True)
class Icmp:
    """An ICMP error: ``kind`` from router ``src`` to ``dst``, quoting the packet it is about."""

    kind: IcmpKind
    src: str
    dst: str
    quoted: Segment


@dataclass(frozen=True)
class Forward:
    """Passed on, translated and with its TTL decremented."""

    item: Segment | Icmp


@dataclass(frozen=True)
class Answer:
    """The box itself answers: ``item`` goes back out of the interface the packet came in on."""

    item: Segment | Icmp
    reason: str = field(default="", compare=False)


@dataclass(frozen=True)
class Drop:
    reason: str


Verdict = Forward | Answer | Drop


@dataclass(frozen=True)
class Nat:
    """A NAT box: its addresses, behaviour (a lab ``NatProfile``: one source of truth) and conntrack table."""

    public_ip: str
    lan_ip: str
    profile: NatProfile = field(default_factory=lambda: PROFILES["eim-apdf"])
    entries: tuple[Conntrack, ...] = ()
    port_range: tuple[int, int] = (1024, 65535)
    next_port: int = 1024  # for sequential allocation
    seed: int = 0  # for "random" allocation and port-preserving's fallback

    def __post_init__(self) -> None:
        profile = self.profile
        if not profile.nat or profile.layers:
            raise NotImplementedError(f"NAT model: profile {profile.name!r} is not one NAT box")
        if profile.filtering != "address-and-port-dependent" and profile.port_overloading:
            raise NotImplementedError(
                f"NAT model: filtering={profile.filtering} lets a segment in through a mapping, which needs "
                f"each public port to belong to one LAN endpoint (RFC 5382 REQ-7); profile {profile.name!r} "
                "overloads ports like Linux's port preservation (set port_overloading=False)"
            )

    def live(self, now: float) -> Iterator[Conntrack]:
        return (e for e in self.entries if e.expires > now)

    def mapping(self, lan: Endpoint, remote: Endpoint, now: float) -> Endpoint | None:
        """The public endpoint of the live flow ``lan`` -> ``remote``, if any."""
        entry = self.entry(lan, remote, now)
        return entry.public if entry else None

    def entry(self, lan: Endpoint, remote: Endpoint, now: float) -> Conntrack | None:
        found = _lookup(self, (lan, remote), now)
        return found[0] if found else None

    def purge(self, now: float) -> Nat:
        """The same NAT without its expired entries (they are ignored anyway; this keeps lookups short)."""
        return replace(self, entries=tuple(self.live(now)))


# --- the three entry points -------------------------------------------------------------------------------


def outbound(nat: Nat, seg: Segment, now: float) -> tuple[Nat, Verdict]:
    """A segment from the LAN towards the WAN (or, hairpinned, to the NAT's own public address)."""
    if seg.dst.host == nat.public_ip:
        if not nat.profile.hairpin:
            raise NotImplementedError(
                f"NAT model: hairpinning is off in profile {nat.profile.name!r}: a LAN segment to the NAT's "
                "own public address is for the box's own stack, which is not modelled"
            )
        return _hairpin(nat, seg, now)
    return _outbound(nat, seg, now)


def _outbound(nat: Nat, seg: Segment, now: float) -> tuple[Nat, Verdict]:
    found = _lookup(nat, (seg.src, seg.dst), now)
    if found is None:
        return _new_flow(nat, seg, now)
    entry, direction = found
    outcome, tracked, reason = track(entry, direction, seg, now)
    if outcome is Outcome.REOPEN:
        return _new_flow(_without(nat, entry), seg, now)
    if outcome is Outcome.INVALID:
        return _replace(nat, entry, tracked), Drop(f"INVALID ({reason}): not NATed, dropped in FORWARD")
    if seg.ttl <= 1:  # the state change happened in PREROUTING, before ip_forward()
        return _replace(nat, entry, tracked), Answer(_time_exceeded(nat.lan_ip, seg))
    return _replace(nat, entry, tracked), Forward(_hop(seg.with_(src=entry.public)))


def inbound(nat: Nat, seg: Segment, now: float) -> tuple[Nat, Verdict]:
    """A segment from the WAN to the NAT's public address."""
    if seg.dst.host != nat.public_ip:
        return nat, Drop(f"not addressed to this NAT ({nat.public_ip})")
    found = _lookup(nat, (seg.src, seg.dst), now)
    if found is None:
        return _admit(nat, seg, now, "no conntrack entry")
    entry, direction = found
    outcome, tracked, reason = track(entry, direction, seg, now)
    nat = _replace(nat, entry, tracked)
    if outcome is Outcome.INVALID:
        return nat, unsolicited(nat, seg, f"INVALID ({reason}), not de-NATed")
    if outcome is Outcome.REOPEN:  # entry deleted; a new flow from the WAN, if the filter admits one
        return _admit(nat, seg, now, "closed entry reopened from outside")
    if seg.ttl <= 1:
        return nat, Answer(_time_exceeded(nat.public_ip, seg))
    return nat, Forward(_hop(seg.with_(dst=entry.lan)))


def inbound_icmp(nat: Nat, icmp: Icmp, now: float) -> tuple[Nat, Verdict]:
    """An ICMP error from the WAN about a packet this NAT sent: RELATED to its entry, translated back
    (``nf_nat_icmp_reply_translation``). conntrack's TCP state does not change."""
    quoted = icmp.quoted
    found = _lookup(nat, (quoted.dst, quoted.src), now)
    if icmp.dst != nat.public_ip or found is None:
        return nat, Drop("ICMP error about no flow of this NAT")
    lan = found[0].lan
    return nat, Forward(replace(icmp, dst=lan.host, quoted=quoted.with_(src=lan)))


def route(seg: Segment, router_ip: str) -> Verdict:
    """A plain router forwarding ``seg``: decrement the TTL or answer ICMP time exceeded."""
    if seg.ttl <= 1:
        return Answer(_time_exceeded(router_ip, seg))
    return Forward(_hop(seg))


def unsolicited(nat: Nat, seg: Segment, why: str) -> Verdict:
    """What the router's own stack does with a segment for its public address that no flow claims."""
    mode = nat.profile.unsolicited_syn
    if mode == "drop" or seg.rst:
        return Drop(f"{why}: unsolicited, dropped" + ("" if mode == "drop" else " (a RST is never answered)"))
    if mode == "icmp":
        return Answer(
            Icmp(IcmpKind.UNREACHABLE, nat.public_ip, seg.src.host, seg), f"{why}: ICMP unreachable"
        )
    return Answer(reset_for(seg), f"{why}: the router's stack answers with RST")


def reset_for(seg: Segment) -> Segment:
    """A closed port's answer to ``seg`` (RFC 9293 section 3.10.7.1), sent by the box that received it."""
    if seg.is_ack:
        return Segment(seg.dst, seg.src, seq=seg.ack, flags=Flags.RST, window=0)
    length = len(seg.payload) + (1 if seg.syn else 0) + (1 if Flags.FIN in seg.flags else 0)
    return Segment(
        seg.dst, seg.src, seq=0, ack=seq_add(seg.seq, length), flags=Flags.RST | Flags.ACK, window=0
    )


# --- conntrack -------------------------------------------------------------------------------------------


class Outcome(enum.Enum):
    ACCEPT = "accept"  # in window: state and timeout updated, packet NATed
    IGNORE = "ignore"  # NATed, but no state change (table sIG, or NFCT_TCP_IGNORE for stale segments)
    INVALID = "invalid"  # not NATed; state unchanged (window data may have been initialised)
    REOPEN = "reopen"  # delete the entry and treat the packet as the first of a new flow
    KILL = "kill"  # packet NATed, then the entry is deleted (a RST before any reply)


def track(
    entry: Conntrack, direction: Direction, seg: Segment, now: float
) -> tuple[Outcome, Conntrack | None, str]:
    """conntrack's ``nf_conntrack_tcp_packet`` for one segment: (outcome, updated entry or None, reason)."""
    if seg.flags & ~Flags.PSH not in _VALID_FLAGS:
        return Outcome.INVALID, entry, f"flag combination {seg.flags!r}"
    index = conntrack_index(seg)
    old = entry.state
    new = TCP_CONNTRACKS[(direction, index, old)]
    if new is sSS and old in (sTW, sCL):
        if entry.close_init or entry.last == (direction, CtIndex.RST):
            return Outcome.REOPEN, None, ""
        new = sIG  # the other side's RST closed it: ignore, the entry stays closed until it expires
    if new is sIG:
        return Outcome.IGNORE, _mark_seen(replace(entry, last=(direction, index)), direction), "sIG"
    if new is sIV:
        return Outcome.INVALID, entry, f"{index.value} in {direction.name} direction while {old.value}"
    if new is sSR and direction is Direction.REPLY and index is CtIndex.ACK and entry.simultaneous_open:
        new = sES
    verdict, seen, why = in_window(entry, direction, seg)
    if verdict is not Outcome.ACCEPT:
        return verdict, _mark_seen(replace(entry, seen=seen), direction, verdict), why
    updated = replace(
        entry,
        state=new,
        seen=seen,
        last=(direction, index),
        simultaneous_open=entry.simultaneous_open or new is sS2,
        close_init=entry.close_init or (new is sFW and old is not sFW),
    )
    if not entry.seen_reply and seg.rst:
        return Outcome.KILL, None, "RST before any reply"
    timeout = TIMEOUTS[sCL] if seg.rst else TIMEOUTS[new]
    if not entry.seen_reply and new is sES:
        timeout = min(timeout, TIMEOUT_UNACKNOWLEDGED)
    return Outcome.ACCEPT, _mark_seen(replace(updated, expires=now + timeout), direction), ""


def _mark_seen(entry: Conntrack, direction: Direction, outcome: Outcome = Outcome.ACCEPT) -> Conntrack:
    """IPS_SEEN_REPLY: set by any reply-direction packet conntrack lets through."""
    if direction is Direction.REPLY and outcome is not Outcome.INVALID:
        return replace(entry, seen_reply=True)
    return entry


def in_window(entry: Conntrack, direction: Direction, seg: Segment) -> tuple[Outcome, tuple[Seen, Seen], str]:
    """``tcp_in_window`` (Linux 6.x): ACCEPT, IGNORE (stale: let through untracked) or INVALID, with the
    window data afterwards. Initialising a side happens before the checks and stays even when they fail."""
    if entry.liberal:
        return Outcome.ACCEPT, entry.seen, ""
    sender, receiver = entry.seen[direction], entry.seen[1 - direction]
    end = seq_add(seg.seq, len(seg.payload) + int(seg.syn) + int(Flags.FIN in seg.flags))
    sender, receiver, settled = _initialise(entry, direction, seg, sender, receiver, end)
    stored = _pair(direction, sender, receiver)
    if settled:  # a SYN from the reply side (simultaneous open): just recorded
        return Outcome.ACCEPT, stored, ""
    seq, ack = seg.seq, seg.ack
    if not seg.is_ack or (seg.rst and ack == 0):
        ack = receiver.td_end
    if seg.rst and seq == 0 and entry.state is sSS:  # a RST answering the SYN: only its ACK is checked
        seq = end = sender.td_end
    if not before(seq, sender.td_maxend + 1):
        return Outcome.INVALID, stored, "SEQ is over the upper bound (over the window of the receiver)"
    if not before(ack, receiver.td_end + 1):
        return Outcome.INVALID, stored, "ACK is over the upper bound (ACKed data not seen yet)"
    if receiver.td_maxwin != 0 and not after(end, sender.td_end - receiver.td_maxwin - 1):
        return Outcome.IGNORE, stored, "SEQ is under the lower bound (already ACKed data retransmitted)"
    if not after(ack, receiver.td_end - max(sender.td_maxwin, MAXACKWINCONST) - 1):
        return Outcome.IGNORE, stored, "ACK is under the lower bound (possible overly delayed ACK)"
    return Outcome.ACCEPT, _pair(direction, *_advance(seg, sender, receiver, ack, end)), ""


def _initialise(
    entry: Conntrack, direction: Direction, seg: Segment, sender: Seen, receiver: Seen, end: int
) -> tuple[Seen, Seen, bool]:
    """(sender, receiver, settled): ``tcp_init_sender`` for a side's first SYN, or a restarted one in
    SYN_SENT/SYN_RECV (RFC 9293 3.4: it must use higher numbers); mid-stream pickup for a first non-SYN."""
    reply_syn = direction is Direction.REPLY and not seg.is_ack
    if sender.td_maxwin == 0 and seg.syn:
        sender, receiver = _init_sender(direction, seg, receiver, end)
        return sender, receiver, not seg.is_ack
    if sender.td_maxwin == 0:
        window = max(seg.window << sender.td_scale, 1)  # mid-stream: its history is lost to us
        sender = replace(sender, td_end=end, td_maxwin=window, td_maxend=seq_add(end, window))
        if receiver.td_maxwin == 0:
            receiver = replace(receiver, td_end=seg.ack, td_maxend=seg.ack)
        return sender, receiver, False
    if seg.syn and after(end, sender.td_end) and entry.state in (sSS, sSR):
        sender, receiver = _init_sender(direction, seg, receiver, end)
        return sender, receiver, reply_syn
    return sender, receiver, False


def _init_sender(direction: Direction, seg: Segment, receiver: Seen, end: int) -> tuple[Seen, Seen]:
    scale = min(seg.options.wscale, MAX_WSCALE) if seg.options.wscale is not None else 0
    sender = Seen(end, end, max(seg.window, 1), scale, seg.options.wscale is not None)
    if direction is Direction.REPLY and not (sender.wscale and receiver.wscale):
        sender, receiver = replace(sender, td_scale=0), replace(receiver, td_scale=0)  # RFC 7323 2.2
    return sender, receiver


def _advance(seg: Segment, sender: Seen, receiver: Seen, ack: int, end: int) -> tuple[Seen, Seen]:
    window = seg.window if seg.syn else seg.window << sender.td_scale
    if receiver.td_maxwin != 0 and after(end, sender.td_maxend):
        receiver = replace(receiver, td_maxwin=receiver.td_maxwin + ((end - sender.td_maxend) % SEQ_MOD))
    sender = replace(
        sender,
        td_maxwin=max(sender.td_maxwin, window),
        td_end=end if after(end, sender.td_end) else sender.td_end,
    )
    right_edge = seq_add(ack, window)
    if after(right_edge, receiver.td_maxend - 1):
        receiver = replace(receiver, td_maxend=seq_add(right_edge, 1 if window == 0 else 0))
    return sender, receiver


def _pair(direction: Direction, sender: Seen, receiver: Seen) -> tuple[Seen, Seen]:
    return (sender, receiver) if direction is Direction.ORIGINAL else (receiver, sender)


# --- new flows and port allocation -----------------------------------------------------------------------


def _opening_state(seg: Segment) -> CtState:
    """``tcp_new``: the state a flow's first segment opens (sIV: it opens none)."""
    if seg.flags & ~Flags.PSH not in _VALID_FLAGS:
        return sIV
    return TCP_CONNTRACKS[(Direction.ORIGINAL, conntrack_index(seg), sNO)]


def _new_flow(nat: Nat, seg: Segment, now: float) -> tuple[Nat, Verdict]:
    """``tcp_new`` and SNAT for a LAN flow's first packet; the entry is kept only if the packet passes."""
    new = _opening_state(seg)
    if new is sIV:
        index = conntrack_index(seg)
        return nat, Drop(f"INVALID ({index.value} opens no flow): not NATed, dropped in FORWARD")
    if seg.ttl <= 1:
        return nat, Answer(_time_exceeded(nat.lan_ip, seg))
    port, nat = _allocate(nat, seg.src, seg.dst, now)
    public = Endpoint(nat.public_ip, port)
    entry = _open_entry((seg.src, seg.dst), (seg.dst, public), seg, new, now)
    return replace(nat, entries=(*nat.entries, entry)), Forward(_hop(seg.with_(src=public)))


def _admit(nat: Nat, seg: Segment, now: float, why: str) -> tuple[Nat, Verdict]:
    """A WAN segment no entry claims: a new inbound flow if the filter admits it, else unsolicited."""
    owner = _admitted_owner(nat, seg, now)
    if owner is None:
        return nat, unsolicited(nat, seg, why)
    new = _opening_state(seg)
    if new is sIV:
        return nat, unsolicited(nat, seg, f"INVALID ({conntrack_index(seg).value} opens no flow)")
    if seg.ttl <= 1:
        return nat, Answer(_time_exceeded(nat.public_ip, seg))
    entry = _open_entry((seg.src, seg.dst), (owner, seg.src), seg, new, now, inbound=True)
    return replace(nat, entries=(*nat.entries, entry)), Forward(_hop(seg.with_(dst=owner)))


def _admitted_owner(nat: Nat, seg: Segment, now: float) -> Endpoint | None:
    """The LAN endpoint behind ``seg.dst`` if the profile's filtering lets ``seg.src`` reach it through the
    mapping (RFC 4787 section 5); address-and-port-dependent filtering admits nothing without an entry."""
    filtering = nat.profile.filtering
    if filtering == "address-and-port-dependent":
        return None
    for e in nat.live(now):
        if e.public == seg.dst and (filtering == "endpoint-independent" or e.remote.host == seg.src.host):
            return e.lan
    return None


def _open_entry(
    original: FlowTuple, reply: FlowTuple, seg: Segment, new: CtState, now: float, inbound: bool = False
) -> Conntrack:
    """A fresh entry for the flow whose first segment is ``seg`` (``new``: SYN_SENT, or ESTABLISHED for a
    loose pickup of a flow already in progress, ``nf_conntrack_tcp_loose = 1``)."""
    end = seq_add(seg.seq, len(seg.payload) + int(seg.syn))
    if new is sSS:
        first, _ = _init_sender(Direction.ORIGINAL, seg, Seen(), end)
        seen, liberal, timeout = (first, Seen()), False, TIMEOUTS[sSS]
    else:
        window = max(seg.window, 1)
        mid = Seen(end, seq_add(end, window), window)
        seen, liberal, timeout = (mid, Seen(seg.ack, seg.ack)), True, TIMEOUT_UNACKNOWLEDGED
    return Conntrack(
        original, reply, new, now + timeout, seen, liberal=liberal,
        last=(Direction.ORIGINAL, conntrack_index(seg)), inbound=inbound,
    )  # fmt: skip


def _hairpin(nat: Nat, seg: Segment, now: float) -> tuple[Nat, Verdict]:
    """Outbound as to any remote, then back in through the filter (RFC 5382 REQ-8a: the LAN endpoint sees
    the sender's public endpoint). One hop in all: the TTL is decremented once."""
    nat, first = _outbound(nat, seg, now)
    if not isinstance(first, Forward) or not isinstance(first.item, Segment):
        return nat, first
    nat, second = inbound(nat, first.item.with_(ttl=seg.ttl), now)
    if isinstance(second, Forward):
        return nat, second
    why = second.reason if isinstance(second, Drop | Answer) else ""
    return nat, Drop(f"hairpinned segment not let in: {why}")


def _allocate(nat: Nat, lan: Endpoint, remote: Endpoint, now: float) -> tuple[int, Nat]:
    """The public port for a new flow ``lan`` -> ``remote`` (RFC 4787 sections 4.1 and 4.2.1)."""
    live = list(nat.live(now))
    reused = _reusable_mapping(nat, live, lan, remote)
    if reused is not None:
        return reused, nat
    low, high = nat.port_range
    if nat.profile.allocation == "sequential":
        for step in range(high - low + 1):
            port = low + (nat.next_port - low + step) % (high - low + 1)
            if _port_free(nat, live, lan, remote, port):
                return port, replace(nat, next_port=port + 1 if port < high else low)
    else:
        first = [lan.port] if nat.profile.allocation == "port-preserving" else []
        for port in itertools.chain(first, _random_order(nat, lan, remote)):
            if low <= port <= high and _port_free(nat, live, lan, remote, port):
                return port, nat
    raise RuntimeError(f"NAT model: no free public port for {lan} -> {remote}")


def _reusable_mapping(nat: Nat, live: list[Conntrack], lan: Endpoint, remote: Endpoint) -> int | None:
    """The public port of an existing mapping this flow may share, by the profile's mapping behaviour."""
    for e in live:
        if _shares_mapping(nat.profile, e, lan, remote) and _port_free(nat, live, lan, remote, e.public.port):
            return e.public.port
    return None


def _shares_mapping(profile: NatProfile, e: Conntrack, lan: Endpoint, remote: Endpoint) -> bool:
    if e.lan != lan:
        return False
    if profile.mapping == "endpoint-independent":
        return True
    if profile.mapping == "address-dependent":
        return e.remote.host == remote.host
    return False  # address-and-port-dependent: each destination endpoint gets its own mapping


def _port_free(nat: Nat, live: list[Conntrack], lan: Endpoint, remote: Endpoint, port: int) -> bool:
    """Linux's rule (``nf_nat_used_tuple``): the flow's WAN tuple must be unique. Without port overloading
    (RFC 4787 REQ-3, RFC 5382 REQ-7; always for sequential and random allocation) a public port also
    belongs to one LAN endpoint."""
    public = Endpoint(nat.public_ip, port)
    exclusive = not nat.profile.port_overloading
    for e in live:
        if e.wan == (remote, public):
            return False
        if exclusive and e.public == public and e.lan != lan:
            return False
    return True


def _random_order(nat: Nat, lan: Endpoint, remote: Endpoint) -> Iterator[int]:
    """All ports from a pseudo-random offset (Linux >= 4.19 searches from a random offset too)."""
    low, high = nat.port_range
    digest = hashlib.sha256(f"{nat.seed}|{lan}|{remote}".encode()).digest()
    offset = int.from_bytes(digest[:4], "big") % (high - low + 1)
    return (low + (offset + i) % (high - low + 1) for i in range(high - low + 1))


# --- table helpers -----------------------------------------------------------------------------------------


def _lookup(nat: Nat, flow: FlowTuple, now: float) -> tuple[Conntrack, Direction] | None:
    """The live entry ``flow`` (source, destination as the packet travels) belongs to, and its direction."""
    for e in nat.live(now):
        if e.original == flow:
            return e, Direction.ORIGINAL
        if e.reply == flow:
            return e, Direction.REPLY
    return None


def _replace(nat: Nat, old: Conntrack, new: Conntrack | None) -> Nat:
    entries = tuple(e for e in (new if e is old else e for e in nat.entries) if e is not None)
    return replace(nat, entries=entries)


def _without(nat: Nat, old: Conntrack) -> Nat:
    return _replace(nat, old, None)


def _hop(seg: Segment) -> Segment:
    return seg.with_(ttl=seg.ttl - 1)


def _time_exceeded(router_ip: str, seg: Segment) -> Icmp:
    return Icmp(IcmpKind.TIME_EXCEEDED, router_ip, seg.src.host, seg)
