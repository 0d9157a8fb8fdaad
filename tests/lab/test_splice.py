"""A crafted handshake, spliced into kernel sockets with TCP_REPAIR, behaves like any connected socket.

The lab tests (marked ``root``) run a small inline driver on both hosts at once -- the real punch engine is
written elsewhere -- using only the adapters: ``SegmentQueue`` + ``FirewallGuard`` to take the peer's
segments away from the kernel, ``RawSender`` to send SYN, SYN-ACK and ACK with known ISNs (a simultaneous
open, RFC 9293 figure 8), then ``splice`` on both ends. The sockets must then do everything a connected
socket does: getpeername, both directions, several MiB each way with the sequence numbers wrapping past
2**32, half-close, close; and TCP_INFO must show exactly the options both SYNs negotiated.

Both sides run in one forked child: the main thread in a's namespace, a second thread moved into b's
(setns is per thread), so they can share a barrier and every socket stays in the process that made it.

The codec and argument checks at the end need no root.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, IPerror, TCPerror
from twosided import run_two_sided

from rawpunch.lab.netns import Lab
from rawpunch.lab.topology import two_hosts, two_nats
from rawpunch.proto.codec import Endpoint
from rawpunch.punch import rawio
from rawpunch.punch.firewall import FirewallGuard, PunchFlow
from rawpunch.punch.rawio import RawSender, SegmentQueue
from rawpunch.punch.segment import SEQ_MOD, Flags, Segment, TcpOptions, seq_add
from rawpunch.punch.splice import SpliceError, splice

LabFactory = Callable[..., Lab]

PAIR = two_hosts()
A = Endpoint("10.0.9.1", 40000)
B = Endpoint("10.0.9.2", 50000)
#: a's ISN sits just below 2**32: the bulk transfer wraps its sequence numbers.
ISN_A, ISN_B = SEQ_MOD - 1000, 123_456
WINDOW = 64240  # what Linux puts in a SYN
BULK = 4 * 1024 * 1024
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_ESTABLISHED = 1
TS_OPTION_BYTES = 12  # the timestamp option with its two NOPs
DEADLINE_S = 5.0

ALL = TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(1_000_000, 0))


# --- the inline driver (module level: call() runs it in a forked child) -------------------------------------


@dataclass(frozen=True)
class Side:
    local: Endpoint
    remote: Endpoint
    isn: int
    peer_isn: int
    options: TcpOptions  # what our SYN offers; timestamp = (first TSval, 0)


@dataclass
class Handshake:
    """One side's crafted handshake: SYN, SYN-ACK on the peer's SYN, ACK on the peer's SYN-ACK."""

    side: Side
    tx: RawSender
    started: float
    peer_syn: Segment | None = None
    peer_synack: Segment | None = None
    sent_synack: bool = False

    def tsval(self) -> int:
        assert self.side.options.timestamp is not None
        return (self.side.options.timestamp[0] + int((time.monotonic() - self.started) * 1000)) % SEQ_MOD

    def peer_tsval(self) -> int:
        last = self.peer_synack or self.peer_syn
        return last.options.timestamp[0] if last and last.options.timestamp else 0

    def negotiated(self) -> dict[str, Any]:
        own, peer = self.side.options, self.peer_options
        ts = own.timestamp is not None and peer.timestamp is not None
        ws = own.wscale is not None and peer.wscale is not None
        return {
            "mss": min(own.mss or 536, peer.mss or 536),
            "snd_wscale": peer.wscale if ws else None,
            "rcv_wscale": own.wscale if ws else None,
            "sack": own.sack_permitted and peer.sack_permitted,
            "timestamps": (self.tsval(), self.peer_tsval()) if ts else None,
        }

    @property
    def peer_options(self) -> TcpOptions:
        assert self.peer_syn is not None
        return self.peer_syn.options

    def segment(self, flags: Flags, syn_options: bool) -> Segment:
        s = self.side
        ts = (self.tsval(), self.peer_tsval()) if s.options.timestamp is not None else None
        if syn_options:
            options, window = replace(s.options, timestamp=ts), WINDOW
        else:
            n = self.negotiated()
            options = TcpOptions(timestamp=ts if n["timestamps"] else None)
            window = WINDOW >> (n["rcv_wscale"] or 0)
        seq = s.isn if flags & Flags.SYN else seq_add(s.isn, 1)
        ack = seq_add(s.peer_isn, 1) if flags & Flags.ACK else 0
        return Segment(s.local, s.remote, seq=seq, ack=ack, flags=flags, window=window, options=options)

    def receive(self, seg: Segment) -> None:
        s = self.side
        if (seg.src, seg.dst) != (s.remote, s.local) or seg.seq != s.peer_isn or not seg.syn:
            return  # e.g. the peer's window probe after its splice, or its ACK
        if seg.is_ack:
            if seg.ack != seq_add(s.isn, 1):
                return
            self.peer_synack = seg
        self.peer_syn = self.peer_syn or seg
        if not self.sent_synack:
            self.tx.send(self.segment(Flags.SYN | Flags.ACK, syn_options=True))
            self.sent_synack = True

    def run(self, queue: SegmentQueue, inbox: list[Segment]) -> None:
        self.tx.send(self.segment(Flags.SYN, syn_options=True))
        deadline = time.monotonic() + DEADLINE_S
        retransmit = time.monotonic() + 0.2
        while self.peer_synack is None:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"handshake of {self.side.local} did not complete: {self}")
            if now >= retransmit:  # RFC 9293: retransmit what is outstanding
                flags = Flags.SYN | (Flags.ACK if self.peer_syn else Flags.NONE)
                self.tx.send(self.segment(flags, syn_options=True))
                retransmit = now + 0.2
            queue.wait(min(retransmit, deadline) - now)
            while inbox:
                self.receive(inbox.pop(0))
        self.tx.send(self.segment(Flags.ACK, syn_options=False))


def handshake_and_splice(side: Side, sync: threading.Barrier) -> tuple[socket.socket, dict[str, Any]]:
    inbox: list[Segment] = []
    with SegmentQueue(inbox.append) as queue, RawSender() as tx:
        flow = PunchFlow(side.local.port, side.remote, queue.queue_num, local_host=side.local.host)
        with FirewallGuard(flow) as guard:
            sync.wait()  # both guards up before any SYN: nothing is answered by a kernel
            hs = Handshake(side, tx, time.monotonic())
            hs.run(queue, inbox)
            n = hs.negotiated()
            assert hs.peer_synack is not None
            sock = splice(
                side.local,
                side.remote,
                seq_add(side.isn, 1),
                seq_add(side.peer_isn, 1),
                snd_wnd=hs.peer_synack.window,  # a SYN's window is never scaled (RFC 7323 2.2)
                rcv_wnd=WINDOW,
                **n,
            )
            # The splice's window probe went to the peer, whose queue is still up: keep ours up until both
            # are spliced, then let segments reach the new socket, and drop the RST guard last.
            sync.wait()
            guard.stop_capture()
            sync.wait()
    sync.wait()  # both guards gone
    return sock, n


def tcp_info(sock: socket.socket) -> dict[str, int]:
    raw = sock.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 104)
    state, _ca, _retrans, _probes, _backoff, options, wscale = struct.unpack_from("7B", raw)
    _rto, _ato, snd_mss, _rcv_mss = struct.unpack_from("4I", raw, 8)
    return {
        "state": state,
        "options": options,
        "snd_wscale": wscale & 0x0F,
        "rcv_wscale": wscale >> 4,
        "snd_mss": snd_mss,
    }


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def bulk(sock: socket.socket, seed: int) -> tuple[str, str]:
    """Send BULK seeded random bytes while receiving BULK from the peer; the sha256 of each."""
    data = random.Random(seed).randbytes(BULK)
    sender = threading.Thread(target=sock.sendall, args=(data,))
    sender.start()
    received = recv_exactly(sock, BULK)
    sender.join(DEADLINE_S)
    assert not sender.is_alive(), "sendall did not finish"
    return hashlib.sha256(data).hexdigest(), hashlib.sha256(received).hexdigest()


def use_socket(sock: socket.socket, first: bool, seed: int, sync: threading.Barrier) -> dict[str, Any]:
    """Everything a connected socket does; *first* is the side that half-closes first."""
    sock.settimeout(DEADLINE_S)
    result: dict[str, Any] = {
        "info": tcp_info(sock),
        "name": sock.getsockname(),
        "peer": sock.getpeername(),
        "reserve": 0 if Path("/proc/sys/net/ipv4/tcp_timestamps").read_text().strip() == "0" else 12,
    }
    mine = f"hello from {sock.getsockname()}".encode()
    sock.sendall(mine)
    result["hello"] = recv_exactly(sock, len(mine))
    result["sent"], result["received"] = bulk(sock, seed)
    sync.wait()
    if first:
        sock.shutdown(socket.SHUT_WR)
        result["after_half_close"] = recv_exactly(sock, len(b"still talking"))
        result["eof"] = sock.recv(1)
    else:
        result["eof"] = sock.recv(1)  # the peer's FIN
        sock.sendall(b"still talking")  # our half is still open
        sock.shutdown(socket.SHUT_WR)
    sync.wait()
    result["info_end"] = tcp_info(sock)
    sock.close()
    return result


def side_main(side: Side, first: bool, seed: int, sync: threading.Barrier) -> dict[str, Any]:
    sock, negotiated = handshake_and_splice(side, sync)
    try:
        return {"negotiated": negotiated, **use_socket(sock, first, seed, sync)}
    finally:
        sock.close()


def both_sides(ns_b: str, side_a: Side, side_b: Side) -> tuple[dict[str, Any], dict[str, Any]]:
    return run_two_sided(
        ns_b, lambda sync: side_main(side_a, True, 1, sync), lambda sync: side_main(side_b, False, 2, sync)
    )


# --- the lab tests ---------------------------------------------------------------------------------------

CASES = {
    # Everything both ways (different MSS and shifts, so a mix-up would show).
    "all-options": (ALL, replace(ALL, mss=1400, wscale=6, timestamp=(7_000_000, 0))),
    # b offers neither timestamps nor SACK: a must not restore them although it offered them.
    "no-timestamps-no-sack": (ALL, TcpOptions(mss=1460, wscale=5)),
    # a offers only an MSS: no window scaling either (the window clamp at connect() matters here).
    "mss-only": (TcpOptions(mss=1460), ALL),
}


def expected_options(n: dict[str, Any]) -> int:
    return (
        (TCPI_OPT_TIMESTAMPS if n["timestamps"] else 0)
        | (TCPI_OPT_SACK if n["sack"] else 0)
        | (TCPI_OPT_WSCALE if n["snd_wscale"] is not None else 0)
    )


def check_pair(a: dict[str, Any], b: dict[str, Any], side_a: Side, side_b: Side, case: str) -> None:
    """What both ends of a spliced pair must show (see the module docstring)."""
    assert (a["name"], a["peer"]) == (
        (side_a.local.host, side_a.local.port),
        (side_a.remote.host, side_a.remote.port),
    )
    assert (b["name"], b["peer"]) == (
        (side_b.local.host, side_b.local.port),
        (side_b.remote.host, side_b.remote.port),
    )
    assert (
        a["hello"] == f"hello from {b['name']}".encode() and b["hello"] == f"hello from {a['name']}".encode()
    )
    assert a["received"] == b["sent"] and b["received"] == a["sent"]
    assert a["sent"] != b["sent"]
    assert (a["after_half_close"], a["eof"], b["eof"]) == (b"still talking", b"", b"")

    for me, peer in ((a, b), (b, a)):
        n, info = me["negotiated"], me["info"]
        assert n["mss"] == min(side_a.options.mss or 536, side_b.options.mss or 536)
        assert info["state"] == TCP_ESTABLISHED
        assert info["options"] == expected_options(n), f"{case}: {info} vs {n}"
        if n["snd_wscale"] is not None:
            assert (info["snd_wscale"], info["rcv_wscale"]) == (n["snd_wscale"], n["rcv_wscale"])
            assert (n["snd_wscale"], n["rcv_wscale"]) == (
                peer["negotiated"]["rcv_wscale"],
                peer["negotiated"]["snd_wscale"],
            )
        # The kernel's cached MSS leaves room for timestamps when negotiated, and (a kernel quirk, see
        # splice.py) also when not, as long as net.ipv4.tcp_timestamps is on.
        reserve = TS_OPTION_BYTES if n["timestamps"] else me["reserve"]
        assert info["snd_mss"] == n["mss"] - reserve
        assert me["info_end"]["options"] == info["options"]


@pytest.mark.root
@pytest.mark.parametrize("case", list(CASES))
def test_spliced_sockets_behave_like_connected_sockets(lab_factory: LabFactory, case: str) -> None:
    lab = lab_factory(PAIR)
    opts_a, opts_b = CASES[case]
    side_a = Side(A, B, ISN_A, ISN_B, opts_a)
    side_b = Side(B, A, ISN_B, ISN_A, opts_b)
    a, b = lab.node("a").call(both_sides, lab.netns_name("b"), side_a, side_b, timeout=40.0)
    check_pair(a, b, side_a, side_b, case)


@pytest.mark.root
def test_splice_through_two_nats(lab_factory: LabFactory) -> None:
    # The crafted segments pass both hosts' own netfilter and both NATs' conntrack like kernel-sent ones,
    # and the spliced sockets then talk through MASQUERADE (port-preserving: the public port is the
    # private one). The first SYN that reaches the other NAT before that NAT's own host sent its SYN is
    # dropped (profile eim-apdf); the driver's retransmission gets through once the mapping exists.
    lab = lab_factory(two_nats(hops=2, profile_a="eim-apdf", profile_b="eim-apdf"))
    topo = lab.topology
    a_private = Endpoint(str(topo.address("a")), 40000)
    b_private = Endpoint(str(topo.address("b")), 50000)
    a_public = Endpoint(str(topo.public_address("nat-a")), a_private.port)
    b_public = Endpoint(str(topo.public_address("nat-b")), b_private.port)
    side_a = Side(a_private, b_public, ISN_A, ISN_B, ALL)
    side_b = Side(
        b_private, a_public, ISN_B, ISN_A, replace(ALL, mss=1400, wscale=6, timestamp=(7_000_000, 0))
    )
    a, b = lab.node("a").call(both_sides, lab.netns_name("b"), side_a, side_b, timeout=40.0)
    check_pair(a, b, side_a, side_b, "through-nats")


def taken_tuple() -> tuple[int, str]:
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as c,
    ):
        local, remote = c.getsockname(), server.getsockname()
        try:
            splice(
                Endpoint(*local),
                Endpoint(*remote),
                1,
                1,
                mss=1460,
                snd_wscale=None,
                rcv_wscale=None,
                sack=False,
                timestamps=None,
                snd_wnd=WINDOW,
                rcv_wnd=WINDOW,
            )
        except SpliceError as e:
            return e.errno or 0, str(e)
    raise AssertionError("splice took a 4-tuple that a connected socket holds")


@pytest.mark.root
def test_splice_refuses_a_4_tuple_in_use(lab_factory: LabFactory) -> None:
    lab = lab_factory(PAIR)
    code, message = lab.node("a").call(taken_tuple)
    assert code == errno.EADDRNOTAVAIL
    assert "connect" in message and "another socket already has this 4-tuple" in message


def probe_without_peer_socket() -> str:
    """Splice from a port another connection holds to a listener that has no socket for the 4-tuple."""
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as other,
        socket.create_server(("127.0.0.1", 0)) as peer,
    ):
        local, remote = other.getsockname(), peer.getsockname()
        sock = splice(Endpoint(*local), Endpoint(*remote), 1, 1, **{**NO_OPTIONS, "mss": 1460})
        sock.settimeout(DEADLINE_S)
        try:
            sock.recv(1)
        except ConnectionResetError:
            return "reset"
        finally:
            sock.close()
    return "not reset"


@pytest.mark.root
def test_splice_shares_the_port_but_its_window_probe_needs_the_peer_spliced(lab_factory: LabFactory) -> None:
    # Repair mode's force-reuse lets the splice bind a port another connection holds; turning repair off
    # sends a window probe, and a kernel without a socket for the 4-tuple answers it with RST: the reason
    # the guard's queue and RST-drop must stay on both sides until both are spliced.
    lab = lab_factory(PAIR)
    assert lab.node("a").call(probe_without_peer_socket) == "reset"


def splice_unprivileged() -> tuple[int, str]:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)  # nobody: no CAP_NET_ADMIN left
    try:
        splice(A, B, 1, 1, **{**NO_OPTIONS, "mss": 1460})
    except SpliceError as e:
        return e.errno or 0, str(e)
    raise AssertionError("splice worked without CAP_NET_ADMIN")


NO_OPTIONS: dict[str, Any] = {
    "snd_wscale": None,
    "rcv_wscale": None,
    "sack": False,
    "timestamps": None,
    "snd_wnd": WINDOW,
    "rcv_wnd": WINDOW,
}


@pytest.mark.root
def test_splice_without_cap_net_admin_says_so(lab_factory: LabFactory) -> None:
    lab = lab_factory(PAIR)
    code, message = lab.node("a").call(splice_unprivileged)
    assert code == errno.EPERM
    assert "TCP_REPAIR" in message and "needs root" in message


# --- no root: argument checks and the segment codec ------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"snd_wscale": 7}, "both shifts or none"),
        ({"snd_wscale": 15, "rcv_wscale": 7}, "snd_wscale 15"),
        ({"mss": 0}, "mss 0"),
        ({"snd_wnd": 65536}, "snd_wnd 65536"),
        ({"rcv_wnd": -1}, "rcv_wnd -1"),
        ({"timestamps": (1 << 32, 0)}, "32-bit"),
    ],
)
def test_splice_checks_its_arguments_before_touching_the_kernel(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        splice(A, B, 1, 1, **{**NO_OPTIONS, "mss": 1460, **changes})
    with pytest.raises(ValueError, match="not IPv4"):
        splice(Endpoint("::1", 1), B, 1, 1, **{**NO_OPTIONS, "mss": 1460})


def test_scaled_windows_may_exceed_64k() -> None:
    # 65535 << 7 is the limit with a shift of 7; checked only, since this test has no root.
    with pytest.raises(ValueError, match="rcv_wnd"):
        splice(
            A, B, 1, 1, **{**NO_OPTIONS, "mss": 1460, "snd_wscale": 7, "rcv_wscale": 7, "rcv_wnd": 65535 << 8}
        )


def test_segment_codec_round_trips_a_linux_syn() -> None:
    seg = Segment(A, B, seq=ISN_A, flags=Flags.SYN, window=WINDOW, options=ALL, ttl=2)
    data = rawio.to_bytes(seg)
    assert len(data) == 20 + 20 + 20  # IP, TCP, MSS + SACK-permitted + timestamps + NOP + window scale
    assert data[40:44] == b"\x02\x04\x05\xb4"  # MSS 1460 first, as Linux sends it
    assert rawio.parse_ip(data) == seg
    assert rawio.from_scapy(rawio.to_scapy(seg)) == seg


def test_segment_codec_data_segment_carries_only_timestamps() -> None:
    seg = Segment(
        B,
        A,
        seq=5,
        ack=7,
        flags=Flags.ACK | Flags.PSH,
        window=501,
        options=TcpOptions(timestamp=(9, 8)),
        payload=b"x",
    )
    data = rawio.to_bytes(seg)
    assert len(data) == 20 + 20 + 12 + 1
    assert rawio.parse_ip(data) == seg
    bare = rawio.parse_ip(rawio.to_bytes(replace(seg, options=TcpOptions())))
    assert bare.options == TcpOptions()


def test_parse_icmp_gives_router_and_quoted_segment() -> None:
    quoted = IPerror(src=A.host, dst=B.host, ttl=1) / TCPerror(
        sport=A.port, dport=B.port, seq=ISN_A - 1, flags="S"
    )
    data = bytes(IP(src="198.51.100.2", dst=A.host) / ICMP(type=11, code=0) / quoted)
    err = rawio.parse_icmp(data)
    assert (err.type, err.code, err.router) == (11, 0, "198.51.100.2")
    assert (err.quoted.src, err.quoted.dst, err.quoted.seq, err.quoted.flags) == (A, B, ISN_A - 1, Flags.SYN)
    with pytest.raises(ValueError):
        rawio.parse_icmp(bytes(IP(dst=A.host) / ICMP(type=8)))
    with pytest.raises(ValueError):
        rawio.parse_ip(bytes(IP(dst=A.host) / ICMP(type=8)))
