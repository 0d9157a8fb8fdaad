"""The userspace NAT: an NFQUEUE program that runs the pure NAT model on every TCP segment a lab NAT forwards.

Netfilter cannot express sequential port allocation, address-dependent mapping, or endpoint-independent /
address-dependent filtering (profiles.py says why). For those profiles the lab starts this program inside
the NAT's namespace (``python -m rawpunch.lab.usernat --profile NAME ...``, started and stopped by ``Lab``)
and installs ``profiles._userspace_tables``:

* raw PREROUTING ``CT --notrack`` for TCP: the kernel's conntrack and NAT never see TCP, so they cannot
  rewrite or drop it behind the model's back (a NAT null binding may even change a source port);
* raw PREROUTING ``NFQUEUE --queue-bypass`` for TCP from either side and for ICMP errors from the WAN;
* FORWARD accepts what carries ``USERNAT_MARK`` (set here on every packet this program translated) and drops
  any other TCP: if the program is gone, ``--queue-bypass`` lets packets through *untranslated*, and they
  must not leak a private address into the core.

For each packet (``UserNat.handle``, pure apart from the clock): TCP from the LAN goes through
``natmodel.outbound`` (or to the box's own stack when it is for the box itself: its LAN address, or its
public address with hairpinning off), TCP from the WAN through ``natmodel.inbound``, an ICMP error quoting
TCP through ``natmodel.inbound_icmp``. The model's verdict becomes the NFQUEUE verdict:

* ``Forward``: addresses and ports rewritten in the original bytes (everything else -- TTL, options,
  payload -- is left as it was; the kernel decrements the TTL when it forwards), IPv4 and TCP checksums
  recomputed in full (NFQUEUE hands userspace complete checksums and marks a mangled packet CHECKSUM_NONE),
  ACCEPT with the mark. The destination was rewritten before routing (raw PREROUTING), so the kernel routes
  the translated packet; hairpinned packets leave through the LAN interface they came in on (the NAT's
  namespace has ``accept_local`` on: their source is its own public address, and ``send_redirects`` off).
* ``Answer``: the original is dropped and the answer (the box's RST, ICMP port unreachable or time exceeded)
  is sent from a raw socket in the NAT's namespace.
* ``Drop``: DROP.

The wire codec below (``parse_tcp``, ``tcp_bytes``, ``rewrite_tcp``, ``icmp_bytes``, ...) is plain ``struct``
code, shared with the self-test's agents, so that neither needs scapy.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from types import FrameType
from typing import Any

from rawpunch.lab.profiles import USERNAT_MARK, USERNAT_QUEUE, NatProfile, get_profile
from rawpunch.proto.codec import Endpoint
from rawpunch.punch import natmodel
from rawpunch.punch.engine import IcmpKind
from rawpunch.punch.natmodel import Answer, Drop, Forward, Icmp, Nat
from rawpunch.punch.segment import Flags, Segment, TcpOptions

log = logging.getLogger(__name__)

READY_LINE = "ready"
PROTO_ICMP, PROTO_TCP = 1, 6
ICMP_UNREACHABLE, ICMP_TIME_EXCEEDED = 3, 11
ICMP_PORT_UNREACHABLE = 3
#: Entries are purged of expired ones at most this often (lookups skip them anyway).
PURGE_INTERVAL_S = 10.0
_FLAG_MASK = int(Flags.FIN | Flags.SYN | Flags.RST | Flags.PSH | Flags.ACK)
_ICMP_CODES = {
    IcmpKind.UNREACHABLE: (ICMP_UNREACHABLE, ICMP_PORT_UNREACHABLE),
    IcmpKind.TIME_EXCEEDED: (11, 0),
}


class PacketError(ValueError):
    """Bytes that are not the IPv4 packet the caller expected."""


# --- checksums and headers ----------------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of *data*."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ip_header(src: str, dst: str, proto: int, payload_len: int, ttl: int = 64) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + payload_len,
        0,
        0x4000,  # DF
        ttl,
        proto,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:]


def _tcp_checksum(src: bytes, dst: bytes, tcp: bytes) -> int:
    pseudo = src + dst + struct.pack("!BBH", 0, PROTO_TCP, len(tcp))
    return checksum(pseudo + tcp)


def _ihl(data: bytes) -> int:
    if len(data) < 20 or data[0] >> 4 != 4:
        raise PacketError("not an IPv4 packet")
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20 or len(data) < ihl:
        raise PacketError("truncated IPv4 header")
    return ihl


def protocol(data: bytes) -> int:
    _ihl(data)
    return data[9]


# --- TCP ----------------------------------------------------------------------------------------------------


def _tcp_options(opts: TcpOptions, syn: bool) -> bytes:
    out = b""
    if syn and opts.mss is not None:
        out += struct.pack("!BBH", 2, 4, opts.mss)
    if syn and opts.sack_permitted:
        out += b"\x04\x02"
    if opts.timestamp is not None:
        out += b"\x01\x01" + struct.pack("!BBII", 8, 10, *opts.timestamp)
    if syn and opts.wscale is not None:
        out += struct.pack("!BBBB", 1, 3, 3, opts.wscale)
    return out + b"\0" * (-len(out) % 4)


def tcp_bytes(seg: Segment) -> bytes:
    """The IPv4/TCP packet of *seg* (DF, IP ID 0), both checksums computed."""
    options = _tcp_options(seg.options, seg.syn)
    offset = (20 + len(options)) // 4
    header = struct.pack(
        "!HHIIBBHHH",
        seg.src.port,
        seg.dst.port,
        seg.seq,
        seg.ack,
        offset << 4,
        int(seg.flags),
        seg.window,
        0,
        0,
    )
    tcp = header + options + seg.payload
    src, dst = IPv4Address(seg.src.host).packed, IPv4Address(seg.dst.host).packed
    tcp = tcp[:16] + struct.pack("!H", _tcp_checksum(src, dst, tcp)) + tcp[18:]
    return _ip_header(seg.src.host, seg.dst.host, PROTO_TCP, len(tcp), seg.ttl) + tcp


def _parse_options(raw: bytes) -> TcpOptions:
    found: dict[int, bytes] = {}
    i = 0
    while i < len(raw):
        kind = raw[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(raw) or raw[i + 1] < 2:
            break  # malformed: stop, as the kernel's parser does
        length = raw[i + 1]
        found[kind] = raw[i + 2 : i + length]
        i += length
    ts = found.get(8)
    return TcpOptions(
        mss=struct.unpack("!H", found[2])[0] if len(found.get(2, b"")) == 2 else None,
        wscale=found[3][0] if len(found.get(3, b"")) == 1 else None,
        sack_permitted=4 in found,
        timestamp=struct.unpack("!II", ts) if ts is not None and len(ts) == 8 else None,
    )


def parse_tcp(data: bytes) -> Segment:
    """The Segment in an IPv4/TCP packet; PacketError if it is not one."""
    ihl = _ihl(data)
    if data[9] != PROTO_TCP:
        raise PacketError(f"IP protocol {data[9]} is not TCP")
    total = min(struct.unpack("!H", data[2:4])[0], len(data))
    tcp = data[ihl:total]
    if len(tcp) < 20:
        raise PacketError("truncated TCP header")
    sport, dport, seq, ack, off, flags, window = struct.unpack("!HHIIBBH", tcp[:16])
    hlen = (off >> 4) * 4
    if hlen < 20 or hlen > len(tcp):
        raise PacketError("bad TCP data offset")
    return Segment(
        src=Endpoint(str(IPv4Address(data[12:16])), sport),
        dst=Endpoint(str(IPv4Address(data[16:20])), dport),
        seq=seq,
        ack=ack,
        flags=Flags(flags & _FLAG_MASK),
        window=window,
        options=_parse_options(tcp[20:hlen]),
        ttl=data[8],
        payload=tcp[hlen:],
    )


def rewrite_tcp(data: bytes, src: Endpoint, dst: Endpoint) -> bytes:
    """*data* with new addresses and ports and both checksums recomputed; nothing else changes."""
    ihl = _ihl(data)
    total = min(struct.unpack("!H", data[2:4])[0], len(data))
    s, d = IPv4Address(src.host).packed, IPv4Address(dst.host).packed
    ip = bytearray(data[:ihl])
    ip[12:16], ip[16:20], ip[10:12] = s, d, b"\0\0"
    ip[10:12] = struct.pack("!H", checksum(bytes(ip)))
    tcp = bytearray(data[ihl:total])
    tcp[0:4] = struct.pack("!HH", src.port, dst.port)
    tcp[16:18] = b"\0\0"
    tcp[16:18] = struct.pack("!H", _tcp_checksum(s, d, bytes(tcp)))
    return bytes(ip) + bytes(tcp)


# --- ICMP errors --------------------------------------------------------------------------------------------


def icmp_bytes(icmp: Icmp) -> bytes:
    """An ICMP error quoting the IP header and first 8 bytes of TCP of ``icmp.quoted`` (RFC 792)."""
    icmp_type, code = _ICMP_CODES[icmp.kind]
    body = struct.pack("!BBHI", icmp_type, code, 0, 0) + tcp_bytes(icmp.quoted)[:28]
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return _ip_header(icmp.src, icmp.dst, PROTO_ICMP, len(body)) + body


def parse_icmp_error(data: bytes) -> Icmp | None:
    """The ICMP unreachable / time exceeded in *data* if it quotes a TCP segment, else None."""
    ihl = _ihl(data)
    if data[9] != PROTO_ICMP or len(data) < ihl + 8:
        return None
    icmp_type = data[ihl]
    kind = {ICMP_UNREACHABLE: IcmpKind.UNREACHABLE, ICMP_TIME_EXCEEDED: IcmpKind.TIME_EXCEEDED}.get(icmp_type)
    inner = data[ihl + 8 :]
    if kind is None or len(inner) < 20 or inner[9] != PROTO_TCP:
        return None
    inner_ihl = (inner[0] & 0x0F) * 4
    if len(inner) < inner_ihl + 8:
        return None
    sport, dport, seq = struct.unpack("!HHI", inner[inner_ihl : inner_ihl + 8])
    quoted = Segment(
        src=Endpoint(str(IPv4Address(inner[12:16])), sport),
        dst=Endpoint(str(IPv4Address(inner[16:20])), dport),
        seq=seq,
        ttl=inner[8],
    )
    return Icmp(kind, str(IPv4Address(data[12:16])), str(IPv4Address(data[16:20])), quoted)


def rewrite_icmp_error(data: bytes, dst: str, quoted_src: Endpoint) -> bytes:
    """An ICMP error re-addressed to *dst*, its quoted packet's source made *quoted_src* (the translation
    ``nf_nat_icmp_reply_translation`` does); the IPv4, quoted IPv4 and ICMP checksums are recomputed (the
    quoted TCP checksum is left alone: nobody checks a truncated segment's)."""
    ihl = _ihl(data)
    total = min(struct.unpack("!H", data[2:4])[0], len(data))
    out = bytearray(data[:total])
    out[16:20] = IPv4Address(dst).packed
    out[10:12] = b"\0\0"
    out[10:12] = struct.pack("!H", checksum(bytes(out[:ihl])))
    inner = ihl + 8
    inner_ihl = (out[inner] & 0x0F) * 4
    out[inner + 12 : inner + 16] = IPv4Address(quoted_src.host).packed
    out[inner + 10 : inner + 12] = b"\0\0"
    out[inner + 10 : inner + 12] = struct.pack("!H", checksum(bytes(out[inner : inner + inner_ihl])))
    out[inner + inner_ihl : inner + inner_ihl + 2] = struct.pack("!H", quoted_src.port)
    out[ihl + 2 : ihl + 4] = b"\0\0"
    out[ihl + 2 : ihl + 4] = struct.pack("!H", checksum(bytes(out[ihl:])))
    return bytes(out)


# --- the adapter core ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What to do with one queued packet: ACCEPT (with ``payload`` if it was rewritten, and the mark if it
    was translated) or DROP; and packets the box sends itself (``answers``)."""

    accept: bool
    payload: bytes | None = None
    mark: bool = False
    answers: tuple[bytes, ...] = ()
    kind: str = "pass"  # forward, answer, drop, local, pass, junk: for counters
    note: str = ""


PASS = Decision(accept=True, note="not the NAT's business: the kernel decides")


@dataclass
class UserNat:
    """The NAT model behind a packet interface: ``handle(packet bytes, came in on the WAN?, now)``."""

    nat: Nat
    own_addresses: frozenset[str] = frozenset()
    counters: dict[str, int] = field(default_factory=dict)
    _last_purge: float = 0.0

    @classmethod
    def for_profile(cls, profile: NatProfile, public_ip: str, lan_ip: str) -> UserNat:
        return cls(Nat(public_ip, lan_ip, profile), frozenset({public_ip, lan_ip}))

    def handle(self, data: bytes, from_wan: bool, now: float) -> Decision:
        if now - self._last_purge > PURGE_INTERVAL_S:
            self.nat, self._last_purge = self.nat.purge(now), now
        try:
            proto = protocol(data)
            if proto == PROTO_TCP:
                decision = self._tcp(parse_tcp(data), data, from_wan, now)
            elif proto == PROTO_ICMP and from_wan:
                decision = self._icmp(data, now)
            else:
                decision = PASS
        except PacketError as e:
            decision = Decision(accept=False, kind="junk", note=f"unparsable: {e}")
        self.counters[decision.kind] = self.counters.get(decision.kind, 0) + 1
        return decision

    def _tcp(self, seg: Segment, data: bytes, from_wan: bool, now: float) -> Decision:
        known = len(self.nat.entries)
        decision = self._translate(seg, data, from_wan, now)
        if len(self.nat.entries) > known:  # like a conntrack NEW event: the flow and its mapping
            entry = self.nat.entries[-1]
            direction = "inbound" if entry.inbound else "outbound"
            log.info("NEW %s %s > %s, reply %s > %s", direction, *entry.original, *entry.reply)
        if decision.kind in ("answer", "drop"):
            log.info("%s", decision.note)
        return decision

    def _translate(self, seg: Segment, data: bytes, from_wan: bool, now: float) -> Decision:
        if from_wan:
            self.nat, verdict = natmodel.inbound(self.nat, seg, now)
        elif seg.dst.host in self.own_addresses and not (
            seg.dst.host == self.nat.public_ip and self.nat.profile.hairpin
        ):
            return Decision(accept=True, kind="local", note=f"for the box itself: {seg}")
        else:
            self.nat, verdict = natmodel.outbound(self.nat, seg, now)
        if isinstance(verdict, Forward) and isinstance(verdict.item, Segment):
            payload = rewrite_tcp(data, verdict.item.src, verdict.item.dst)
            return Decision(
                accept=True, payload=payload, mark=True, kind="forward", note=f"{seg} -> {verdict.item}"
            )
        return _answer_or_drop(verdict)

    def _icmp(self, data: bytes, now: float) -> Decision:
        icmp = parse_icmp_error(data)
        if icmp is None:
            return PASS
        self.nat, verdict = natmodel.inbound_icmp(self.nat, icmp, now)
        if isinstance(verdict, Forward) and isinstance(verdict.item, Icmp):
            payload = rewrite_icmp_error(data, verdict.item.dst, verdict.item.quoted.src)
            note = f"ICMP {icmp.kind.name} -> {verdict.item.dst}"
            return Decision(accept=True, payload=payload, mark=True, kind="forward", note=note)
        return _answer_or_drop(verdict)


def _answer_or_drop(verdict: natmodel.Verdict) -> Decision:
    if isinstance(verdict, Answer):
        item = verdict.item
        wire = tcp_bytes(item) if isinstance(item, Segment) else icmp_bytes(item)
        return Decision(accept=False, answers=(wire,), kind="answer", note=f"answer: {verdict.reason}")
    reason = verdict.reason if isinstance(verdict, Drop) else "unexpected verdict"
    return Decision(accept=False, kind="drop", note=f"drop: {reason}")


# --- the NFQUEUE process ------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the SIGTERM/SIGINT handler to leave the loop."""


def _on_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _apply(pkt: Any, decision: Decision, sender: socket.socket) -> None:
    for wire in decision.answers:
        dst = str(IPv4Address(wire[16:20]))
        try:
            sender.sendto(wire, (dst, 0))
        except OSError as e:
            log.warning("cannot send answer to %s: %s", dst, e)
    if not decision.accept:
        pkt.drop()
        return
    if decision.payload is not None:
        pkt.set_payload(decision.payload)
    if decision.mark:
        pkt.set_mark(USERNAT_MARK)
    pkt.accept()


def serve(usernat: UserNat, wan: str, queue_num: int, trace: bool) -> None:
    """Bind the queue, say ``ready`` on stdout, then translate until SIGTERM."""
    from netfilterqueue import COPY_PACKET, NetfilterQueue  # noqa: PLC0415 - only the process needs it

    wan_index = socket.if_nametoindex(wan)
    sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def on_packet(pkt: Any) -> None:
        try:
            decision = usernat.handle(pkt.get_payload(), pkt.indev == wan_index, time.monotonic())
        except Exception:
            log.exception("userspace NAT failed on a packet; dropped")
            pkt.drop()
            return
        if trace:
            log.info("%s", decision.note)
        _apply(pkt, decision, sender)

    nfq = NetfilterQueue()
    nfq.bind(queue_num, on_packet, max_len=4096, mode=COPY_PACKET, sock_len=8 << 20)
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    print(READY_LINE, flush=True)
    try:
        fd = nfq.get_fd()
        while True:
            select.select([fd], [], [])
            nfq.run(block=False)
    except _Stop:
        pass
    finally:
        nfq.unbind()
        sender.close()
        log.info("userspace NAT %s: %s", usernat.nat.profile.name, usernat.counters)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rawpunch.lab.usernat", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--profile", required=True)
    parser.add_argument("--public-ip", required=True, help="the address of the WAN interface")
    parser.add_argument("--lan-ip", required=True, help="the address of the LAN interface")
    parser.add_argument("--wan", default="wan", help="the WAN interface's name")
    parser.add_argument("--queue", type=int, default=USERNAT_QUEUE)
    parser.add_argument("--trace", action="store_true", help="log every decision on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"usernat[{os.getpid()}] %(message)s", stream=sys.stderr)
    usernat = UserNat.for_profile(get_profile(args.profile), args.public_ip, args.lan_ip)
    serve(usernat, args.wan, args.queue, args.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
