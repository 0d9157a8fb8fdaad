"""Splice a handshake done with crafted segments into an ordinary kernel TCP socket (TCP_REPAIR).

Theory of operation
-------------------
The punch completes the three-way handshake (RFC 9293 section 3.5, simultaneous open included) with crafted
segments: the kernel never saw any of it and has no socket for the 4-tuple. Linux's TCP repair mode, made
for checkpoint/restore (CRIU), lets a privileged process (CAP_NET_ADMIN in the socket's network namespace)
create a socket and *declare* the state of a connection instead of negotiating it. In repair mode
``connect()`` sends nothing and moves the socket straight to ESTABLISHED; the sequence numbers, the options
both SYNs negotiated and the windows are then written in. Turning repair off hands the socket to the normal
stack: from then on it is an ordinary connected, blocking ``socket.socket``.

The order is CRIU libsoccr's (``libsoccr_set_sk_data_noq`` / ``libsoccr_restore``), and each step has a
reason:

1. ``TCP_REPAIR = 1`` first: everything below is refused or behaves differently without it. Repair mode also
   makes ``bind`` force-reuse the port (``SK_FORCE_REUSE``): the punch port may still be held by another
   socket (the connection that showed the rendezvous server our mapping, a listener, one in TIME_WAIT).
   ``SO_REUSEADDR`` is set just *before* this step, because setting it afterwards overwrites the
   force-reuse flag with the ordinary one and ``bind`` then fails with EADDRINUSE against such a socket.
2. ``bind(local)``: the local endpoint is the one the crafted SYN used, the one the NAT mapped.
3. ``TCP_REPAIR_QUEUE`` + ``TCP_QUEUE_SEQ`` for the send queue (``snd_nxt`` = our ISN + 1) and the receive
   queue (``rcv_nxt`` = the peer's ISN + 1). The kernel accepts these only while the socket is CLOSE.
4. ``connect(remote)``: in repair mode it hashes the 4-tuple and finishes the connect without a SYN. An
   existing socket with the same 4-tuple makes it fail with EADDRNOTAVAIL.
5. ``TCP_REPAIR_OPTIONS`` (only on an ESTABLISHED socket): the MSS the peer announced, window scaling
   (``snd_wscale`` = the shift the *peer* announced, applied to windows we receive; ``rcv_wscale`` = the
   shift *we* announced), SACK-permitted and timestamps -- only those both SYNs carried (RFC 7323 section
   2.2/3.2, RFC 2018 section 2: an option is in use only if both ends sent it). Restoring one the peer did
   not agree to would make this side send options or scaled windows the peer does not expect.
6. ``TCP_TIMESTAMP`` when timestamps were negotiated: sets the socket's TSval clock offset so that its next
   TSval continues the sequence our crafted segments started (RFC 7323 section 5.3: TSvals must not go
   backwards, or the peer's PAWS check drops the segments). Since Linux 6.7 bit 0 of the value selects
   *microsecond* TSvals (``tcp_usec_ts``, ``TCPI_OPT_USEC_TS``): an odd value would make the clock run a
   thousand times too fast, so the value is rounded up to even (one millisecond ahead at most, never
   back). There is no socket option for ``ts_recent``: the kernel starts with 0, which the PAWS check
   ignores, and learns it from the peer's first segment.
7. ``TCP_REPAIR_WINDOW`` (5 x u32: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup), after the options: the
   peer's last advertised window (in bytes, already scaled) and the window we advertised, so neither side
   sends beyond what the other offered.
8. ``TCP_REPAIR = 0``: the socket goes live. The kernel immediately sends a window probe (an ACK with
   SEG.SEQ = SND.UNA - 1). If the peer's kernel has no socket for the 4-tuple yet, it answers with a RST that
   kills this new socket: the firewall guard's RST-drop on the peer and its NFQUEUE capture must stay until
   both ends are spliced (see firewall.py).

Two things ``connect()`` fixes that repair does not rewrite, found the hard way:

* Without window scaling the kernel keeps the receive-window shift it computed at ``connect()`` (it only
  zeroes it while processing a SYN-ACK, which never happens here) and would advertise windows shifted
  right by it to a peer that reads them unscaled: the transfer crawls at a few hundred bytes per RTT.
  ``TCP_WINDOW_CLAMP`` = 65535 before ``connect()`` makes that shift 0.
* ``connect()`` computes the cached send MSS from a clamp of 536 (RFC 9293's default); ``TCP_REPAIR_OPTIONS``
  changes the clamp but does not recompute the cache, so ``tcpi_snd_mss`` would read 524 until the next
  path-MTU event. ``TCP_MAXSEG`` = the peer's MSS before ``connect()`` makes the cache right at once. (Side
  effect: the MSS this socket would advertise, used only to estimate the peer's segment size for delayed
  ACKs, is also capped at the peer's MSS.)
* ``connect()`` also reserves 12 bytes of header for timestamps whenever net.ipv4.tcp_timestamps is on, and
  repair does not drop the reserve when timestamps were not negotiated: ``tcpi_snd_mss`` then reads 12 less
  than the MSS although the segments sent carry the full MSS (the kernel corrects per segment).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address

from rawpunch.proto.codec import Endpoint

# <linux/tcp.h>: Python's socket module has none of these.
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2
# TCP option kinds (RFC 9293, RFC 7323, RFC 2018) as TCP_REPAIR_OPTIONS codes.
TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8
#: RFC 7323 section 2.3: a shift above 14 is treated as 14; the kernel refuses it with EFBIG.
MAX_WSCALE = 14
#: The largest window an unscaled 16-bit window field can carry (RFC 9293).
MAX_UNSCALED_WINDOW = 65535

_REPAIR_OPT = struct.Struct("=II")  # struct tcp_repair_opt {u32 opt_code; u32 opt_val}
_REPAIR_WINDOW = struct.Struct("=5I")  # struct tcp_repair_window
#: Sequence numbers and TSvals are u32: setsockopt(int) would take only a signed C int, so pack them.
_U32 = struct.Struct("=I")
_SEQ_MASK = 0xFFFFFFFF


class SpliceError(OSError):
    """The socket could not be put into the handshake's state; the message says which step failed."""


@dataclass(frozen=True)
class _Options:
    mss: int
    wscale: tuple[int, int] | None  # (snd_wscale, rcv_wscale)
    sack: bool
    timestamps: bool

    def repair_blob(self) -> bytes:
        opts = [(TCPOPT_MSS, self.mss)]
        if self.wscale is not None:
            snd, rcv = self.wscale
            opts.append((TCPOPT_WINDOW, snd | rcv << 16))
        if self.sack:
            opts.append((TCPOPT_SACK_PERM, 0))
        if self.timestamps:
            opts.append((TCPOPT_TIMESTAMP, 0))
        return b"".join(_REPAIR_OPT.pack(code, val) for code, val in opts)


def splice(
    local: Endpoint,
    remote: Endpoint,
    snd_nxt: int,
    rcv_nxt: int,
    *,
    mss: int,
    snd_wscale: int | None,
    rcv_wscale: int | None,
    sack: bool,
    timestamps: tuple[int, int] | None,
    snd_wnd: int,
    rcv_wnd: int,
    snd_wl1: int | None = None,
    max_window: int | None = None,
    rcv_wup: int | None = None,
) -> socket.socket:
    """A blocking, ESTABLISHED kernel socket continuing the handshake the punch made with crafted segments.

    *snd_nxt*: our ISN + 1; *rcv_nxt*: the peer's ISN + 1 (plus any data already consumed either way).
    *mss*: the MSS to send with (at most what the peer announced). *snd_wscale*: the window-scale shift the
    peer announced; *rcv_wscale*: the one we announced; both None when either SYN lacked the option.
    *sack*: both SYNs carried SACK-permitted. *timestamps*: None unless both SYNs carried timestamps; else
    (TSval, ts_recent): the TSval this socket's clock should read now, continuing our crafted segments', and
    the peer's last TSval -- which no socket option can set (the kernel learns it from the peer's next
    segment; see the module docstring), so it is only checked. *snd_wnd*: the peer's last advertised window
    in bytes (scaled); *rcv_wnd*: the window we advertised, in bytes. TCP_REPAIR_WINDOW's other fields
    default to what a just-finished handshake has: *snd_wl1* = *rcv_wup* = *rcv_nxt*, *max_window* =
    *snd_wnd*.

    Raises SpliceError (an OSError with the errno) naming the failed step: EPERM without CAP_NET_ADMIN,
    EADDRNOTAVAIL when the local address is not ours or the 4-tuple is taken by another socket, EINVAL for
    windows the kernel rejects. Raises ValueError for arguments out of range, before touching the kernel.
    """
    options = _validate(local, remote, mss, snd_wscale, rcv_wscale, sack, timestamps, snd_wnd, rcv_wnd)
    window = _REPAIR_WINDOW.pack(
        (rcv_nxt if snd_wl1 is None else snd_wl1) & _SEQ_MASK,
        snd_wnd,
        snd_wnd if max_window is None else max_window,
        rcv_wnd,
        (rcv_nxt if rcv_wup is None else rcv_wup) & _SEQ_MASK,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # before repair: see the docstring
        _step("turn TCP_REPAIR on", lambda: sock.setsockopt(socket.SOL_TCP, TCP_REPAIR, 1))
        _step(f"bind {local}", lambda: sock.bind((local.host, local.port)))
        _set_queue_seq(sock, TCP_SEND_QUEUE, snd_nxt)
        _set_queue_seq(sock, TCP_RECV_QUEUE, rcv_nxt)
        _prepare_connect(sock, options)
        _step(f"connect to {remote} in repair mode", lambda: sock.connect((remote.host, remote.port)))
        blob = options.repair_blob()
        _step("TCP_REPAIR_OPTIONS", lambda: sock.setsockopt(socket.SOL_TCP, TCP_REPAIR_OPTIONS, blob))
        if timestamps is not None:
            tsval = _U32.pack(_ms_tsval(timestamps[0]))
            _step("TCP_TIMESTAMP", lambda: sock.setsockopt(socket.SOL_TCP, TCP_TIMESTAMP, tsval))
        _step("TCP_REPAIR_WINDOW", lambda: sock.setsockopt(socket.SOL_TCP, TCP_REPAIR_WINDOW, window))
        _step("turn TCP_REPAIR off", lambda: sock.setsockopt(socket.SOL_TCP, TCP_REPAIR, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _ms_tsval(tsval: int) -> int:
    """TCP_TIMESTAMP value for millisecond TSvals: *tsval* rounded up to even (bit 0: usec, Linux 6.7+)."""
    return (tsval + (tsval & 1)) & _SEQ_MASK


def _validate(
    local: Endpoint,
    remote: Endpoint,
    mss: int,
    snd_wscale: int | None,
    rcv_wscale: int | None,
    sack: bool,
    timestamps: tuple[int, int] | None,
    snd_wnd: int,
    rcv_wnd: int,
) -> _Options:
    for what, ep in (("local", local), ("remote", remote)):
        if not isinstance(ip_address(ep.host), IPv4Address):
            raise ValueError(f"splice: {what} endpoint {ep} is not IPv4 (only IPv4 is supported)")
        if ep.port == 0:
            raise ValueError(f"splice: {what} endpoint {ep} has port 0")
    if not 1 <= mss <= 0xFFFF:
        raise ValueError(f"splice: mss {mss} is not a 16-bit MSS")
    if (snd_wscale is None) != (rcv_wscale is None):
        raise ValueError(
            "splice: window scaling is negotiated by both SYNs or not at all: pass both shifts or none"
        )
    wscale = None
    if snd_wscale is not None and rcv_wscale is not None:
        for name, shift in (("snd_wscale", snd_wscale), ("rcv_wscale", rcv_wscale)):
            if not 0 <= shift <= MAX_WSCALE:
                raise ValueError(f"splice: {name} {shift} is outside 0..{MAX_WSCALE} (RFC 7323 section 2.3)")
        wscale = (snd_wscale, rcv_wscale)
    snd_shift, rcv_shift = wscale or (0, 0)
    for name, wnd, shift in (("snd_wnd", snd_wnd, snd_shift), ("rcv_wnd", rcv_wnd, rcv_shift)):
        limit = MAX_UNSCALED_WINDOW << shift
        if not 0 <= wnd <= limit:
            raise ValueError(f"splice: {name} {wnd} is outside 0..{limit} (65535 << its window-scale shift)")
    if timestamps is not None and not all(0 <= t <= _SEQ_MASK for t in timestamps):
        raise ValueError(f"splice: timestamps {timestamps} are not 32-bit values (TSval, ts_recent)")
    return _Options(mss=mss, wscale=wscale, sack=sack, timestamps=timestamps is not None)


def _prepare_connect(sock: socket.socket, options: _Options) -> None:
    """Socket options that ``connect()`` reads when it sizes the segment and the window (module docstring)."""
    sock.setsockopt(socket.SOL_TCP, socket.TCP_MAXSEG, options.mss)
    if options.wscale is None:
        sock.setsockopt(socket.SOL_TCP, socket.TCP_WINDOW_CLAMP, MAX_UNSCALED_WINDOW)


def _set_queue_seq(sock: socket.socket, queue: int, seq: int) -> None:
    name = "send" if queue == TCP_SEND_QUEUE else "receive"

    def set_seq() -> None:
        sock.setsockopt(socket.SOL_TCP, TCP_REPAIR_QUEUE, queue)
        sock.setsockopt(socket.SOL_TCP, TCP_QUEUE_SEQ, _U32.pack(seq & _SEQ_MASK))

    _step(f"set the {name} queue sequence number", set_seq)


_HINTS = {
    errno.EPERM: "TCP_REPAIR needs root (CAP_NET_ADMIN in the socket's network namespace)",
    errno.EACCES: "TCP_REPAIR needs root (CAP_NET_ADMIN in the socket's network namespace)",
    errno.EADDRINUSE: "the local port is in use",
    errno.EADDRNOTAVAIL: "the local address is not on this host, or another socket already has this 4-tuple",
}


def _step(what: str, action: Callable[[], object]) -> None:
    try:
        action()
    except OSError as e:
        hint = _HINTS.get(e.errno or 0, "")
        message = f"splice: {what} failed: {e.strerror or e}" + (f" ({hint})" if hint else "")
        raise SpliceError(e.errno or 0, message) from e


def kernel_wscale(rmem_max: int | None = None, tcp_rmem_max: int | None = None) -> int:
    """The window scale this host's kernel would offer in a SYN (``tcp_select_initial_window``).

    RFC 7323 section 2.3: the shift must let the largest receive buffer be advertised. Linux takes the
    larger of ``net.core.rmem_max`` and ``net.ipv4.tcp_rmem``'s maximum, and the smallest shift that
    fits it into 16 bits, at most 14. Offering the same shift as a kernel-made connection keeps the
    spliced socket's receive window (and so its throughput) the same as plain TCP's.
    """
    if rmem_max is None:
        rmem_max = _sysctl_int("/proc/sys/net/core/rmem_max", 212992)
    if tcp_rmem_max is None:
        tcp_rmem_max = _sysctl_int("/proc/sys/net/ipv4/tcp_rmem", 6291456, field=2)
    space = max(rmem_max, tcp_rmem_max)
    wscale = 0
    while space > 0xFFFF and wscale < 14:
        space >>= 1
        wscale += 1
    return wscale


def _sysctl_int(path: str, default: int, field: int = 0) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[field])
    except (OSError, ValueError, IndexError):
        return default
