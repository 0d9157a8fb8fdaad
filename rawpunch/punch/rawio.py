"""Raw I/O adapter: ``Segment`` <-> scapy, one raw IP socket to send crafted segments, and an NFQUEUE reader.

The punch core speaks ``Segment`` (segment.py); this module is the only place that touches scapy and
NetfilterQueue on the data path.

Sending: one raw IP socket, through the host's own netfilter
-------------------------------------------------------------
Crafted segments leave through a single ``socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`` (IP_HDRINCL implied),
opened once and reused: scapy's ``send()`` would open and close a socket per packet. This is the output
half of scapy's ``L3RawSocket``, and the deliberate choice over scapy's default ``conf.L3socket``: the
default Linux L3 socket writes through AF_PACKET, below IP, so a crafted SYN would bypass the sending host's
OUTPUT and POSTROUTING hooks and its conntrack. A raw IP socket goes through them like a kernel-sent SYN:

* the host's own conntrack (if anything on it loads conntrack: a stateful firewall, Docker, a VPN) creates
  or refreshes the entry for the punch 4-tuple, so the peer's segments later match ESTABLISHED/RELATED in
  its INPUT rules, as they would for a connect();
* the host's own rules see the segment -- including the firewall guard's RST-drop in OUTPUT, which never
  matters because the punch never crafts a RST;
* routing, the source address and the outgoing interface are chosen by the kernel.

The NAT is another box: what it sees is the same either way. ``L3RawSocket`` itself is not used because it
also opens an AF_PACKET receive socket that nobody would read (every IP packet of the host copied into its
buffer) and because it logs and swallows send errors; the bare socket raises them. With IP_HDRINCL the
kernel fills in the IP checksum and total length, and an IP ID left 0.

Receiving: NFQUEUE, drop after parsing
--------------------------------------
The guard's NFQUEUE rules (firewall.py) divert the punch 4-tuple's inbound segments, and ICMP errors about
it, to a queue in INPUT, before the TCP stack could answer them with a RST. ``SegmentQueue`` reads the
queue without blocking, parses each packet into a ``Segment`` (or an ``IcmpError``), hands it to the
callback and gives the verdict DROP: the engine has consumed it and the kernel must never see it. Bind the
queue *before* applying the guard: with ``--queue-bypass`` and nobody bound, the segments go to the kernel
and get answered with RST. The kernel queue is bounded (``max_len``; beyond it the kernel drops, which TCP
treats as loss). The payload copy is limited to NetfilterQueue's buffer (about 4 kB), plenty for
handshake segments.

Checksums are not verified: over veth and with offloads, a received skb can carry a partial checksum (only
the pseudo-header sum) that the kernel never completes for local delivery.

asyncio: ``queue.attach(loop)`` registers the queue's file descriptor with ``loop.add_reader`` and drains it
on readiness; ``queue.wait(timeout)`` does the same for a synchronous driver.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import select
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from types import TracebackType
from typing import Any

from netfilterqueue import COPY_PACKET, NetfilterQueue
from scapy.layers.inet import ICMP, IP, TCP, IPerror, TCPerror
from scapy.packet import Packet

from rawpunch.proto.codec import Endpoint
from rawpunch.punch.segment import Flags, Segment, TcpOptions

log = logging.getLogger(__name__)

#: The range from which a free queue number is picked ("RP" = 0x5250). Queue numbers are per netns.
QUEUE_BASE = 0x5250
QUEUE_SPAN = 4096
#: Default bound of the kernel queue: the handshake needs a handful of segments.
DEFAULT_MAX_LEN = 64
_FLAG_MASK = int(Flags.FIN | Flags.SYN | Flags.RST | Flags.PSH | Flags.ACK)
#: Linux's SYN option layout: MSS, SACK-permitted, timestamps, NOP, window scale (20 bytes with all four).
_TSTAMP_PAD = [("NOP", None), ("NOP", None)]

#: ICMP types the guard queues: destination unreachable and time exceeded (RFC 792).
ICMP_UNREACHABLE = 3
ICMP_TIME_EXCEEDED = 11

SegmentCallback = Callable[[Segment], None]


@dataclass(frozen=True)
class IcmpError:
    """An ICMP error about one of our segments: who sent it, and the segment it quotes (RFC 792).

    Our NAT has already translated the quoted header back to our private endpoint. A router may quote only
    the first 8 bytes of TCP (ports and sequence number): the rest of ``quoted`` is then zero.
    """

    type: int
    code: int
    router: str
    quoted: Segment


IcmpCallback = Callable[[IcmpError], None]


class RawIOError(OSError):
    """A raw socket or NFQUEUE operation failed; the message says which and why."""


# --- Segment <-> scapy ------------------------------------------------------------------------------------


def to_scapy(seg: Segment) -> Packet:
    """The IPv4/TCP packet for *seg* (IP ID 0: the kernel fills it in when sending with IP_HDRINCL)."""
    _require_ipv4(seg.src, seg.dst)
    tcp = TCP(
        sport=seg.src.port,
        dport=seg.dst.port,
        seq=seg.seq,
        ack=seg.ack,
        flags=int(seg.flags),
        window=seg.window,
        options=_options_to_scapy(seg.options, syn=seg.syn),
    )
    packet: Packet = IP(src=seg.src.host, dst=seg.dst.host, ttl=seg.ttl, id=0, flags="DF") / tcp
    if seg.payload:
        packet = packet / seg.payload
    return packet


def to_bytes(seg: Segment) -> bytes:
    """The wire bytes of *seg*, TCP checksum included."""
    return bytes(to_scapy(seg))


def from_scapy(packet: Packet) -> Segment:
    """The Segment of an IPv4/TCP packet; ValueError if it is not one."""
    if IP not in packet or TCP not in packet:
        raise ValueError(f"not an IPv4/TCP packet: {packet.summary()}")
    ip, tcp = packet[IP], packet[TCP]
    return Segment(
        src=Endpoint(str(ip.src), int(tcp.sport)),
        dst=Endpoint(str(ip.dst), int(tcp.dport)),
        seq=int(tcp.seq),
        ack=int(tcp.ack),
        flags=Flags(int(tcp.flags) & _FLAG_MASK),
        window=int(tcp.window),
        options=_options_from_scapy(tcp.options),
        ttl=int(ip.ttl),
        payload=bytes(tcp.payload),
    )


def parse_ip(data: bytes) -> Segment:
    """The Segment in a raw IPv4 datagram (as NFQUEUE delivers it); ValueError if it is not TCP."""
    return from_scapy(IP(data))


def parse_icmp(data: bytes) -> IcmpError:
    """The ICMP error (unreachable or time exceeded) quoting a TCP segment in a raw IPv4 datagram."""
    packet = IP(data)
    if ICMP not in packet or IPerror not in packet or TCPerror not in packet:
        raise ValueError(f"not an ICMP error quoting TCP: {packet.summary()}")
    icmp, inner, tcp = packet[ICMP], packet[IPerror], packet[TCPerror]
    if int(icmp.type) not in (ICMP_UNREACHABLE, ICMP_TIME_EXCEEDED):
        raise ValueError(f"ICMP type {icmp.type} is not an error the punch handles")
    quoted = Segment(
        src=Endpoint(str(inner.src), int(tcp.sport)),
        dst=Endpoint(str(inner.dst), int(tcp.dport)),
        seq=int(tcp.seq or 0),
        ack=int(tcp.ack or 0),
        flags=Flags(int(tcp.flags or 0) & _FLAG_MASK),
        window=int(tcp.window or 0),
        ttl=int(inner.ttl),
    )
    return IcmpError(int(icmp.type), int(icmp.code), str(packet[IP].src), quoted)


def _options_to_scapy(opts: TcpOptions, *, syn: bool) -> list[tuple[str, Any]]:
    if not syn:
        return [*_TSTAMP_PAD, ("Timestamp", opts.timestamp)] if opts.timestamp is not None else []
    out: list[tuple[str, Any]] = []
    if opts.mss is not None:
        out.append(("MSS", opts.mss))
    if opts.sack_permitted:
        out.append(("SAckOK", b""))
    if opts.timestamp is not None:
        out.append(("Timestamp", opts.timestamp))
    if opts.wscale is not None:
        out += [("NOP", None), ("WScale", opts.wscale)]
    return out  # scapy pads to a multiple of 4 bytes with EOL


def _options_from_scapy(options: list[tuple[str, Any]]) -> TcpOptions:
    found = {name: value for name, value in options if isinstance(name, str)}
    timestamp = found.get("Timestamp")
    return TcpOptions(
        mss=int(found["MSS"]) if "MSS" in found else None,
        wscale=int(found["WScale"]) if "WScale" in found else None,
        sack_permitted="SAckOK" in found,
        timestamp=(int(timestamp[0]), int(timestamp[1])) if timestamp is not None else None,
    )


def _require_ipv4(*endpoints: Endpoint) -> None:
    for ep in endpoints:
        if not isinstance(ip_address(ep.host), IPv4Address):
            raise ValueError(f"{ep}: only IPv4 segments are supported")


# --- sending ----------------------------------------------------------------------------------------------

#: Segment shapes ``RawSender.send_batch`` keeps built (a sweep has two or three: open, knock, release).
_MAX_SHAPES = 8


def with_source_port(packet: bytes, port: int) -> bytes:
    """An IPv4/TCP packet built with source port 0, given source port ``port``: the two bytes written and the
    TCP checksum updated incrementally (RFC 1624 eqn. 3, ``HC' = ~(~HC + ~m + m')`` with ``m = 0``, whose
    ``~m`` adds nothing in one's complement). The IP header checksum does not cover TCP (and the kernel
    fills it in for IP_HDRINCL anyway)."""
    ihl = (packet[0] & 0x0F) * 4
    (old,) = struct.unpack_from("!H", packet, ihl + 16)
    total = (~old & 0xFFFF) + port
    total = (total & 0xFFFF) + (total >> 16)
    out = bytearray(packet)
    struct.pack_into("!H", out, ihl, port)
    struct.pack_into("!H", out, ihl + 16, ~total & 0xFFFF)
    return bytes(out)


class RawSender:
    """One raw IPv4 socket (IPPROTO_RAW, IP_HDRINCL) for every crafted segment; see the module docstring."""

    def __init__(self) -> None:
        self._shapes: dict[Segment, bytes] = {}
        try:
            self._sock: socket.socket | None = socket.socket(
                socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW
            )
        except PermissionError as e:
            raise RawIOError(e.errno, "raw IP socket: needs root (CAP_NET_RAW)") from e

    def send(self, seg: Segment) -> None:
        """Send *seg* now; OSError (e.g. EPERM from an OUTPUT rule, ENETUNREACH) is raised, not logged."""
        if self._sock is None:
            raise RawIOError(0, "RawSender is closed")
        data = to_bytes(seg)
        try:
            self._sock.sendto(data, (seg.dst.host, 0))
        except OSError as e:
            raise RawIOError(e.errno or 0, f"sending {seg}: {e.strerror or e}") from e

    def send_batch(self, seg: Segment, ports: Iterable[int]) -> int:
        """Send ``seg`` (built with source port 0) once from each of ``ports`` (a port sweep): scapy builds
        it once, each copy is patched (``with_source_port``). Returns how many were sent; a send error is
        raised like ``send``'s."""
        if self._sock is None:
            raise RawIOError(0, "RawSender is closed")
        template = self._shapes.get(seg)
        if template is None:
            if len(self._shapes) >= _MAX_SHAPES:
                self._shapes.clear()
            template = self._shapes[seg] = to_bytes(seg)
        sent, where = 0, (seg.dst.host, 0)
        for port in ports:
            try:
                self._sock.sendto(with_source_port(template, port), where)
            except OSError as e:
                raise RawIOError(e.errno or 0, f"sending {seg} from port {port}: {e.strerror or e}") from e
            sent += 1
        return sent

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> RawSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- receiving --------------------------------------------------------------------------------------------


class SegmentQueue:
    """An NFQUEUE bound in this network namespace: parse, hand to *on_segment* (or *on_icmp*), DROP.

    With *queue_num* None a free number is picked from ``QUEUE_BASE .. QUEUE_BASE + QUEUE_SPAN``
    (binding fails for a number another process holds). Callbacks must not block; their exceptions are
    logged and the packet is dropped all the same. ICMP errors are dropped unseen without *on_icmp*.
    """

    def __init__(
        self,
        on_segment: SegmentCallback,
        queue_num: int | None = None,
        *,
        on_icmp: IcmpCallback | None = None,
        max_len: int = DEFAULT_MAX_LEN,
    ) -> None:
        if max_len < 1:
            raise ValueError("max_len must be at least 1")
        self._on_segment = on_segment
        self._on_icmp = on_icmp
        self._loop: asyncio.AbstractEventLoop | None = None
        self.pass_through = False
        """Set once the spliced socket exists: packets are still shown to the callbacks, then go on to the
        kernel (a verdict, where removing the rule would take an iptables call)."""
        self.hold: Callable[[Segment], bool] | None = None
        """Segments it returns True for are kept without a verdict until ``pass_to_kernel``: the peer's first
        data, sent as soon as its socket existed, reaches ours once it exists instead of being dropped here
        and retransmitted a retransmission timeout (>= 200 ms) later."""
        self._held: list[Any] = []
        self.claim: Callable[[bytes], bool] | None = None
        """Behind a port-scoped rule (the early guard): only IP packets it returns True for are the punch's
        (``from_peer``); the others go on to the kernel unseen and unparsed. None: every packet is."""
        self.received = 0  # segments and ICMP errors handed to the callbacks
        self.rejected = 0  # packets that were neither (dropped unparsed)
        self._nfq: NetfilterQueue | None = None
        self.queue_num = self._bind(queue_num, max_len)

    def _bind(self, queue_num: int | None, max_len: int) -> int:
        if os.geteuid() != 0:
            raise RawIOError(1, "NFQUEUE: needs root (CAP_NET_ADMIN)")
        if queue_num is not None:
            candidates = [queue_num]
        else:
            start = random.randrange(QUEUE_SPAN)
            candidates = [QUEUE_BASE + (start + i) % QUEUE_SPAN for i in range(QUEUE_SPAN)]
        last: OSError | None = None
        for num in candidates:
            nfq = NetfilterQueue()
            try:
                # sock_len: room for max_len full copies in the netlink socket (the rest waits in the kernel).
                nfq.bind(num, self._on_packet, max_len=max_len, mode=COPY_PACKET, sock_len=max_len * 8192)
            except OSError as e:  # taken by another process, or no nfnetlink_queue
                last = e
                del nfq
                continue
            self._nfq = nfq
            return num
        raise RawIOError(
            0, f"NFQUEUE: cannot bind queue {candidates[0] if queue_num is not None else 'in range'}: {last}"
        )

    def fileno(self) -> int:
        if self._nfq is None:
            raise RawIOError(0, "SegmentQueue is closed")
        return int(self._nfq.get_fd())

    def process(self) -> int:
        """Handle every packet already queued (never blocks); return how many segments were delivered."""
        if self._nfq is None:
            return 0
        before = self.received
        self._nfq.run(block=False)
        return self.received - before

    def wait(self, timeout: float) -> int:
        """Wait up to *timeout* seconds for packets, then handle them; return how many were delivered."""
        ready, _, _ = select.select([self.fileno()], [], [], max(timeout, 0.0))
        return self.process() if ready else 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drain the queue from *loop* whenever its descriptor is readable."""
        if self._loop is not None:
            raise RuntimeError("SegmentQueue is already attached to an event loop")
        loop.add_reader(self.fileno(), self.process)
        self._loop = loop

    def detach(self) -> None:
        if self._loop is not None and self._nfq is not None:
            self._loop.remove_reader(self.fileno())
        self._loop = None

    def close(self) -> None:
        """Detach and unbind: packets still matching a ``--queue-bypass`` rule then go to the kernel."""
        held, self._held = self._held, []
        for pkt in held:
            pkt.drop()  # the punch failed: nobody takes them
        self.detach()
        nfq, self._nfq = self._nfq, None
        if nfq is not None:
            nfq.unbind()
            del nfq  # the netlink socket closes when the object goes

    def __enter__(self) -> SegmentQueue:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def handlers(
        self,
        on_segment: SegmentCallback,
        on_icmp: IcmpCallback | None,
        claim: Callable[[bytes], bool] | None,
    ) -> None:
        """Hand the queue to a new owner (the engine takes over the early guard's queue)."""
        self._on_segment, self._on_icmp, self.claim = on_segment, on_icmp, claim

    def pass_to_kernel(self) -> None:
        """The flow's kernel socket exists: from now on packets go on to it, the held ones first."""
        self.pass_through = True
        held, self._held = self._held, []
        for pkt in held:
            pkt.accept()

    def _on_packet(self, pkt: Any) -> None:
        # Whatever happens below, the packet gets one verdict: the kernel's if its socket exists, else
        # consumed (the kernel must never see it); None once it is held for ``pass_to_kernel``.
        verdict = pkt.accept if self.pass_through else pkt.drop
        try:
            data = pkt.get_payload()
            if self.claim is not None and not self.claim(data):
                verdict = pkt.accept  # not the punch's: the kernel's business
                return
            item = self._deliver(data)
            if not self.pass_through and self._holds(item):
                pkt.retain()
                self._held.append(pkt)
                verdict = None
        finally:
            if verdict is not None:
                verdict()

    def _holds(self, item: Segment | IcmpError | None) -> bool:
        return isinstance(item, Segment) and self.hold is not None and self.hold(item)

    def _deliver(self, data: bytes) -> Segment | IcmpError | None:
        try:
            item: Segment | IcmpError = parse_icmp(data) if data[9:10] == b"\x01" else parse_ip(data)
        except Exception:  # scapy raises anything on junk
            self.rejected += 1
            return None
        self.received += 1
        try:
            if isinstance(item, Segment):
                self._on_segment(item)
            elif self._on_icmp is not None:
                self._on_icmp(item)
        except Exception:
            log.exception("NFQUEUE %d: callback failed on %s", self.queue_num, item)
        return item


def from_peer(data: bytes, peer: Endpoint) -> bool:
    """Whether an IPv4 packet is the punch's: a TCP segment from *peer*, or an ICMP error quoting one of
    ours to *peer* (RFC 792: the quoted IP header and at least 8 bytes of TCP). Read straight from the
    bytes, without scapy: behind the early guard's port-scoped rule this runs for every packet."""
    try:
        ihl = (data[0] & 0x0F) * 4
        if data[9] == socket.IPPROTO_TCP:
            host, port = data[12:16], struct.unpack_from("!H", data, ihl)[0]
        elif data[9] == socket.IPPROTO_ICMP:
            inner = ihl + 8
            inner_ihl = (data[inner] & 0x0F) * 4
            host, port = (
                data[inner + 16 : inner + 20],
                struct.unpack_from("!H", data, inner + inner_ihl + 2)[0],
            )
        else:
            return False
    except (IndexError, struct.error):
        return False  # too short to be either: the kernel's business
    return bool(host == packed_address(peer.host) and port == peer.port)


@functools.lru_cache(maxsize=16)
def packed_address(host: str) -> bytes:
    """The address's four bytes, parsed once per peer rather than once per packet."""
    return IPv4Address(host).packed
