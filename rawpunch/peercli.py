"""``rawpunch peer``: punch a direct TCP connection to the peer that uses the same session secret.

Modes (like netcat): by default stdin goes to the connection and the connection to stdout; EOF on
stdin half-closes; the command exits once both directions are done. ``--listen HOST:PORT`` carries
the first local TCP client's connection over the punched one; ``--connect HOST:PORT`` carries the
punched connection to a local service (ssh, say); ``--exec CMD`` hands the punched socket itself to
CMD as its stdin and stdout. ``--rendezvous-only`` stops after the synchronised go (no root needed).
``--strategy`` picks how to punch (``rawpunch.strategy``); the default ``auto`` tries a cascade chosen from
what both peers know of their NATs, under one ``--deadline``.

Exit codes: 0 done; 1 the punch or rendezvous failed (stderr says why); 2 bad command line;
3 needs root; 4 missing system support (iptables, NFQUEUE); 130 interrupted; with ``--exec``, the
command's own exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from typing import IO, Any

from rawpunch.proto.codec import Endpoint, ResultCode, ResultInfo, TcpMapping
from rawpunch.proto.peerinfo import Capability, PeerInfo
from rawpunch.strategy import STRATEGY_NAMES
from rawpunch.strategy.plan import BIRTHDAY_SYN_BUDGET

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_ROOT, EXIT_NO_SUPPORT = 1, 2, 3, 4
MIN_SECRET_LEN = 16
MAX_SYN_BUDGET = 8000  # a socket each, and a burst a NAT's conntrack table must hold
CHUNK = 256 * 1024
log = logging.getLogger("rawpunch.peer")


def add_peer_parser(sub: Any, endpoint: Any) -> None:
    p = sub.add_parser(
        "peer",
        help="punch a direct TCP connection to a peer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--server", type=endpoint, required=True, metavar="HOST:PORT", help="the rendezvous server"
    )
    p.add_argument(
        "--session",
        default=os.environ.get("RAWPUNCH_SESSION"),
        metavar="SECRET",
        help="shared secret (default: $RAWPUNCH_SESSION); both peers use the same one",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--listen",
        type=endpoint,
        metavar="HOST:PORT",
        help="accept one local TCP client here and carry it over the punched connection",
    )
    mode.add_argument(
        "--connect",
        type=endpoint,
        metavar="HOST:PORT",
        help="carry the punched connection to this local TCP service",
    )
    mode.add_argument(
        "--exec", metavar="CMD", help="run CMD (via /bin/sh) with the socket as stdin and stdout"
    )
    mode.add_argument(
        "--rendezvous-only",
        action="store_true",
        help="only meet the peer: print endpoints and the go as JSON lines, no punch",
    )
    p.add_argument(
        "--strategy",
        type=_strategy,
        default="auto",
        metavar="NAME[,NAME...]",
        help=(
            f"how to punch: {', '.join(STRATEGY_NAMES)}, or a comma-separated cascade; both peers must "
            "agree (default auto: a cascade chosen from what both peers know of their NATs)"
        ),
    )
    p.add_argument(
        "--syn-budget",
        type=_syn_budget,
        default=BIRTHDAY_SYN_BUDGET,
        metavar="N",
        help=(
            f"SYNs of a birthday attempt, both sides together (default {BIRTHDAY_SYN_BUDGET}: about 99.98%% "
            "success); when both "
            "NATs may be stable, one attempt guesses both ways, each way with this budget"
        ),
    )
    p.add_argument("--port", type=int, default=0, help="local TCP port to punch from (default: any free)")
    p.add_argument(
        "--ttl", type=int, default=None, help="TTL of the priming SYN (default: chosen from the path)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the peer (default 60)")
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help=(
            "seconds for the punch once the peer is found, all strategy attempts together (default 10, or "
            "60 when the cascade includes port-exhaustion)"
        ),
    )
    p.add_argument("--events", metavar="FILE", help="write one JSON line per step to FILE")
    p.add_argument("--pcap", metavar="FILE", help="record the handshake (tcpdump) to FILE")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run_peer)


def _syn_budget(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 2 <= value <= MAX_SYN_BUDGET:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of SYNs from 2 to {MAX_SYN_BUDGET}")
    return value


def _strategy(text: str) -> str:
    from rawpunch.strategy.runner import check_strategy  # noqa: PLC0415

    try:
        return check_strategy(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Events:
    """JSON lines to ``--events`` and a readable progress line per step on stderr."""

    def __init__(self, path: str | None) -> None:
        self.file: IO[str] | None = open(path, "a", buffering=1) if path else None  # noqa: SIM115

    def __call__(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
        fields = " ".join(f"{k}={v}" for k, v in record.items() if k != "event")
        log.info("%s %s", record["event"], fields)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def run_peer(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s rawpunch-peer %(message)s",
    )
    if not args.session:
        print(
            "rawpunch peer: no session secret: pass --session SECRET or set RAWPUNCH_SESSION", file=sys.stderr
        )
        return EXIT_USAGE
    if len(args.session) < MIN_SECRET_LEN:
        log.warning(
            "the session secret is short (%d characters): whoever sees the rendezvous traffic can guess "
            "it offline; a random one: python3 -c 'import secrets; print(secrets.token_urlsafe(16))'",
            len(args.session),
        )
    if args.rendezvous_only:
        return _guard_errors(lambda: asyncio.run(_rendezvous_only(args)))
    if os.geteuid() != 0:
        print(
            "rawpunch peer: needs root (raw sockets, NFQUEUE, iptables, TCP_REPAIR): run with sudo",
            file=sys.stderr,
        )
        return EXIT_NOT_ROOT
    if shutil.which("iptables-restore") is None:
        print(
            "rawpunch peer: iptables-restore is missing: install iptables (sudo scripts/setup)",
            file=sys.stderr,
        )
        return EXIT_NO_SUPPORT
    events = _Events(args.events)
    try:
        return _guard_errors(lambda: _punch_and_run(args, events))
    finally:
        events.close()


def _guard_errors(body: Any) -> int:
    from rawpunch.punch.firewall import FirewallError  # noqa: PLC0415
    from rawpunch.punch.rawio import RawIOError  # noqa: PLC0415
    from rawpunch.punch.session import PunchError  # noqa: PLC0415
    from rawpunch.punch.splice import SpliceError  # noqa: PLC0415
    from rawpunch.rendezvous.client import RendezvousError  # noqa: PLC0415

    try:
        return int(body() or 0)
    except (RendezvousError, PunchError, SpliceError) as exc:
        print(f"rawpunch peer: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (FirewallError, RawIOError) as exc:
        print(f"rawpunch peer: {exc} (is this kernel missing NFQUEUE or TCP_REPAIR?)", file=sys.stderr)
        return EXIT_NO_SUPPORT


def _punch_and_run(args: argparse.Namespace, events: _Events) -> int:
    from rawpunch.punch.session import PunchSettings, punch  # noqa: PLC0415

    if args.listen:  # bind first: an occupied port must fail before the peer is kept waiting
        listener = _listener(args.listen)
    settings = PunchSettings(
        args.server,
        args.session,
        local_port=args.port,
        priming_ttl=args.ttl,
        deadline=args.deadline,
        strategy=args.strategy,
        syn_budget=args.syn_budget,
        peer_timeout=args.timeout,
        pcap=args.pcap,
        on_event=events,
    )
    result = asyncio.run(punch(settings))
    sock = result.sock
    log.info(
        "connected to %s with %s; phases (ms): %s",
        result.peer,
        result.strategy,
        ", ".join(f"{k} {v}" for k, v in result.timings.items()),
    )
    if args.exec:
        return _exec(args.exec, sock)
    if args.listen:
        conn, addr = listener.accept()
        listener.close()
        log.info("local client %s:%d carried over the punched connection", *addr[:2])
        _relay(sock, conn)
    elif args.connect:
        _relay(sock, _connect_local(args.connect))
    else:
        _stdio(sock)
    return 0


def _listener(ep: Endpoint) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in ep.host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((ep.host, ep.port))
    except OSError as exc:
        s.close()
        raise SystemExit(
            f"rawpunch peer: cannot listen on {ep}: {exc.strerror} (choose another --listen port)"
        ) from None
    s.listen(1)
    return s


def _connect_local(ep: Endpoint) -> socket.socket:
    try:
        return socket.create_connection((ep.host, ep.port), timeout=10)
    except OSError as exc:
        raise SystemExit(
            f"rawpunch peer: cannot connect to the local service {ep}: {exc.strerror or exc}"
        ) from None


def _exec(cmd: str, sock: socket.socket) -> int:
    """The child reads and writes the punched socket itself: no copying in between."""
    with sock:
        child = subprocess.Popen(cmd, shell=True, stdin=sock.fileno(), stdout=sock.fileno())
    return child.wait()


def _pump(read: Any, write: Any, done: Any) -> None:
    try:
        while chunk := read(CHUNK):
            write(chunk)
    except OSError as exc:
        log.debug("copy stopped: %s", exc)
    finally:
        done()


def _half_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def _stdio(sock: socket.socket) -> None:
    """netcat: stdin -> socket (EOF half-closes), socket -> stdout, until both are done."""
    stdout = sys.stdout.buffer

    def write_out(data: bytes) -> None:
        stdout.write(data)
        stdout.flush()

    sender = threading.Thread(
        target=_pump,
        args=(
            functools.partial(os.read, sys.stdin.fileno()),  # returns what is there, not a full chunk
            sock.sendall,
            lambda: _half_close(sock),
        ),
        daemon=True,
    )
    sender.start()
    _pump(sock.recv, write_out, lambda: None)
    sender.join()
    sock.close()


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways between two sockets, passing half-closes along, until both directions end."""
    there = threading.Thread(target=_pump, args=(a.recv, b.sendall, lambda: _half_close(b)), daemon=True)
    there.start()
    _pump(b.recv, a.sendall, lambda: _half_close(a))
    there.join()
    a.close()
    b.close()


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _mapping(m: TcpMapping) -> dict[str, Any]:
    return {"local_port": m.local_port, "public": str(m.public)}


async def _rendezvous_only(args: argparse.Namespace) -> None:
    from rawpunch.rendezvous.client import RendezvousClient  # noqa: PLC0415

    async with RendezvousClient(args.server, args.session, peer_timeout=args.timeout) as client:
        reg = await client.register()
        _emit("registered", slot=reg.slot, udp=str(reg.udp), server_rtt_ms=round(reg.rtt * 1000, 2))
        mapping = await client.discover_tcp(args.port)
        _emit("tcp_endpoint", **_mapping(mapping))
        peer = await client.exchange(
            PeerInfo(capabilities=Capability.CRAFTED_HANDSHAKE, tcp_port=mapping.local_port)
        )
        _emit(
            "peer",
            slot=peer.slot,
            udp=str(peer.udp),
            tcp=[_mapping(m) for m in peer.tcp],
            tcp_port=peer.info.tcp_port,
            capabilities=int(peer.info.capabilities),
        )
        go = await client.ready()
        _emit("go", delay_ms=round(go.delay * 1000, 2))
        await client.report(ResultInfo(ResultCode.ABORTED, 0, "rendezvous only"))
