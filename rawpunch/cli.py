"""rawpunch: raw-packet TCP NAT traversal.

  rawpunch server --listen HOST:PORT     run the rendezvous server
  rawpunch peer --server HOST:PORT ...   meet a peer at the rendezvous
  rawpunch lab ...                       NAT lab in network namespaces
  rawpunch cleanup                       remove what a killed run left behind

Exit codes: 0 success, 1 the operation failed (the message says why), 2 bad command line,
3 needs root, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from typing import Any

from rawpunch import __version__
from rawpunch.proto.codec import Endpoint, ResultCode, ResultInfo, TcpMapping
from rawpunch.proto.peerinfo import Capability, PeerInfo

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_ROOT, EXIT_INTERRUPTED = 1, 2, 3, 130
DEFAULT_PORT = 3478
MIN_SECRET_LEN = 16


def parse_endpoint(text: str) -> Endpoint:
    """``HOST:PORT`` (port defaults to 3478); a host name is resolved once, here."""
    try:
        return Endpoint.parse(text, DEFAULT_PORT)
    except ValueError as exc:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", str(DEFAULT_PORT))
        if not port.isdigit():
            raise argparse.ArgumentTypeError(str(exc)) from None
        try:
            infos = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as err:
            raise argparse.ArgumentTypeError(f"cannot resolve {host!r}: {err}") from None
        return Endpoint(str(infos[0][4][0]), int(port))


def _add_server(sub: Any) -> None:
    p = sub.add_parser(
        "server",
        help="run the rendezvous server",
        description="Run the rendezvous server: UDP "
        "control protocol plus a TCP port on which it observes peers' public TCP endpoints.",
    )
    p.add_argument(
        "--listen",
        type=parse_endpoint,
        default=Endpoint("0.0.0.0", DEFAULT_PORT),
        metavar="HOST:PORT",
        help=f"UDP address to listen on (default 0.0.0.0:{DEFAULT_PORT})",
    )
    p.add_argument(
        "--tcp-port", type=int, default=None, help="TCP discovery port (default: the UDP port number)"
    )
    p.add_argument("--max-sessions", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=200.0, help="messages per second per source address")
    p.add_argument("-v", "--verbose", action="store_true", help="log every dropped datagram")
    p.set_defaults(func=_run_server)


def _add_peer(sub: Any) -> None:
    p = sub.add_parser(
        "peer",
        help="meet a peer at the rendezvous server",
        description="Register with the "
        "rendezvous server, learn this host's public UDP and TCP endpoints, exchange sealed "
        "information with the peer that uses the same session secret, and wait for the "
        "synchronised go. (The punch itself, crafted SYN/SYN-ACK and TCP_REPAIR splice, comes "
        "with the punch engine; this version stops after the go.) Prints JSON lines on stdout.",
    )
    p.add_argument("--server", type=parse_endpoint, required=True, metavar="HOST:PORT")
    p.add_argument(
        "--session",
        default=os.environ.get("RAWPUNCH_SESSION"),
        metavar="SECRET",
        help="shared secret (default: $RAWPUNCH_SESSION); both peers use the same one",
    )
    p.add_argument(
        "--port", type=int, default=0, help="local TCP port to discover and punch from (default: any)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the peer (default 60)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_run_peer)


def _add_cleanup(sub: Any) -> None:
    p = sub.add_parser(
        "cleanup",
        help="remove leftovers of a killed run",
        description="Remove what a run killed "
        "with SIGKILL left behind: lab network namespaces and their processes, and the punch's "
        "firewall chains (RAWPUNCH-<run>-IN/OUT) in every namespace. Live runs are left alone. Needs root.",
    )
    p.set_defaults(func=_run_cleanup)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rawpunch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"rawpunch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{server,peer,lab,cleanup}")
    _add_server(sub)
    _add_peer(sub)
    from rawpunch.lab.cli import add_lab_parser  # noqa: PLC0415 - keeps pyroute2 out of server start-up

    add_lab_parser(sub)
    _add_cleanup(sub)
    return parser


def _setup_logging(name: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
    )


def _run_server(args: argparse.Namespace) -> int:
    from rawpunch.rendezvous.server import RendezvousServer, ServerStartError  # noqa: PLC0415

    _setup_logging("rawpunch-server", args.verbose)

    async def serve() -> None:
        server = RendezvousServer(
            args.listen.host,
            args.listen.port,
            args.tcp_port,
            max_sessions=args.max_sessions,
            rate_per_source=args.rate,
            burst_per_source=2 * args.rate,
        )
        async with server:
            # SIGTERM and SIGINT end the server cleanly, so it logs its counters on the way out.
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()

    try:
        asyncio.run(serve())
    except ServerStartError as exc:
        print(f"rawpunch server: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _mapping(m: TcpMapping) -> dict[str, Any]:
    return {"local_port": m.local_port, "public": str(m.public)}


async def _peer(args: argparse.Namespace) -> None:
    from rawpunch.rendezvous.client import RendezvousClient  # noqa: PLC0415

    say = logging.getLogger("rawpunch.peer").info
    async with RendezvousClient(args.server, args.session, peer_timeout=args.timeout) as client:
        say("registering with %s", args.server)
        reg = await client.register()
        _emit("registered", slot=reg.slot, udp=str(reg.udp), server_rtt_ms=round(reg.rtt * 1000, 2))
        mapping = await client.discover_tcp(args.port)
        say(
            "public UDP endpoint %s, public TCP endpoint of local port %d: %s",
            reg.udp,
            mapping.local_port,
            mapping.public,
        )
        _emit("tcp_endpoint", **_mapping(mapping))
        info = PeerInfo(capabilities=Capability.CRAFTED_HANDSHAKE, tcp_port=mapping.local_port)
        say("waiting for the peer (up to %.0f s)", args.timeout)
        peer = await client.exchange(info)
        _emit(
            "peer",
            slot=peer.slot,
            udp=str(peer.udp),
            tcp=[_mapping(m) for m in peer.tcp],
            tcp_port=peer.info.tcp_port,
            capabilities=int(peer.info.capabilities),
        )
        say("peer: UDP %s, TCP %s", peer.udp, ", ".join(str(m.public) for m in peer.tcp) or "none")
        go = await client.ready()
        _emit("go", delay_ms=round(go.delay * 1000, 2))
        await client.report(ResultInfo(ResultCode.ABORTED, 0, "rendezvous only: no punch engine yet"))


def _run_peer(args: argparse.Namespace) -> int:
    from rawpunch.rendezvous.client import RendezvousError  # noqa: PLC0415

    _setup_logging("rawpunch-peer", args.verbose)
    if not args.session:
        print(
            "rawpunch peer: no session secret: pass --session SECRET or set RAWPUNCH_SESSION", file=sys.stderr
        )
        return EXIT_USAGE
    if len(args.session) < MIN_SECRET_LEN:
        logging.getLogger("rawpunch.peer").warning(
            "the session secret is short (%d characters): whoever sees the rendezvous traffic can guess it "
            "offline; a random one: python3 -c 'import secrets; print(secrets.token_urlsafe(16))'",
            len(args.session),
        )
    try:
        asyncio.run(_peer(args))
    except RendezvousError as exc:
        print(f"rawpunch peer: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _run_cleanup(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("rawpunch cleanup: needs root (run with sudo)", file=sys.stderr)
        return EXIT_NOT_ROOT
    from rawpunch.lab.clean import clean_labs  # noqa: PLC0415
    from rawpunch.punch.firewall import cleanup_all  # noqa: PLC0415

    # Labs first: removing a dead lab's namespaces takes its rules along; then the host's own chains.
    removed = clean_labs() + cleanup_all()
    for item in removed:
        print(f"removed {item}")
    print(f"rawpunch cleanup: {len(removed)} leftover(s) removed", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
