"""rawpunch: raw-packet TCP NAT traversal.

  rawpunch server --listen HOST:PORT     run the rendezvous server
  rawpunch peer --server HOST:PORT ...   punch a direct TCP connection to a peer
  rawpunch probe --server HOST:PORT      classify how the NAT in front of this host treats TCP
  rawpunch lab ...                       NAT lab in network namespaces
  rawpunch cleanup                       remove what a killed run left behind

Exit codes: 0 success, 1 the operation failed (the message says why), 2 bad command line,
3 needs root, 4 missing system support (iptables, NFQUEUE), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
from typing import Any

from rawpunch import __version__
from rawpunch.peercli import add_peer_parser
from rawpunch.proto.codec import Endpoint

EXIT_FAILED, EXIT_NOT_ROOT, EXIT_INTERRUPTED = 1, 3, 130
DEFAULT_PORT = 3478


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


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a numeric IPv4 address") from None


def _port(text: str) -> int:
    """A fixed TCP port: 0 (any) would give the two probe listeners two different ports."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 1 to 65535")
    return int(text)


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
    p.add_argument(
        "--alt-address",
        type=_ipv4,
        metavar="IP",
        help="a second address of this machine: enables the NAT probe's server part (rawpunch probe). "
        "ROOT ONLY: it sends crafted SYNs and captures answers on raw sockets. Needs --listen with the "
        "main address (not 0.0.0.0)",
    )
    p.add_argument(
        "--probe-port",
        type=_port,
        default=None,
        help="the probe's second TCP port, on both addresses (default: the TCP port + 1)",
    )
    p.add_argument(
        "--mapping-port",
        type=_port,
        default=None,
        help=(
            "a second TCP discovery port: peers discover one local port there again to see whether their "
            "NAT maps per remote port (default: the TCP port + 2)"
        ),
    )
    p.add_argument(
        "--no-mapping-port",
        action="store_true",
        help="run without the second discovery port (peers then skip that check)",
    )
    p.add_argument("--max-sessions", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=200.0, help="messages per second per source address")
    p.add_argument("-v", "--verbose", action="store_true", help="log every dropped datagram")
    p.set_defaults(func=_run_server)


def _add_probe(sub: Any) -> None:
    p = sub.add_parser(
        "probe",
        help="classify how the NAT in front of this host treats TCP (root)",
        description="Classify the NAT in front of this host for TCP (RFC 4787 / RFC 5382 terms): mapping, "
        "filtering, port allocation, reaction to an unsolicited SYN, simultaneous open, hops to the NAT and "
        "a priming TTL, hairpinning, and an RFC 5382 checklist. Needs root (raw sockets) and a server "
        "started with --alt-address (without, only allocation and hops are measured). The result is cached "
        "for 10 minutes per network for `rawpunch peer --strategy auto`.",
    )
    p.add_argument("--server", type=parse_endpoint, required=True, metavar="HOST:PORT")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--timers",
        action="store_true",
        help="also measure SYN_SENT and ESTABLISHED mapping lifetimes (bounded by --timer-limit)",
    )
    p.add_argument(
        "--timer-limit",
        type=float,
        default=16.0,
        metavar="S",
        help="--timers tries idle times of 1, 4 and 16 s, those up to S (default 16)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not store the result in the cache")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_run_probe)


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{server,peer,probe,lab,cleanup}")
    _add_server(sub)
    add_peer_parser(sub, parse_endpoint)
    _add_probe(sub)
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
            alt_address=args.alt_address,
            probe_port=args.probe_port,
            mapping_port=args.mapping_port,
            mapping_check=not args.no_mapping_port,
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


def _run_probe(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415

    from rawpunch.probe import cache  # noqa: PLC0415
    from rawpunch.probe.classify import table  # noqa: PLC0415
    from rawpunch.probe.run import ProbeError, probe  # noqa: PLC0415
    from rawpunch.rendezvous.client import RendezvousError  # noqa: PLC0415

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)
    if os.geteuid() != 0:
        print(
            "rawpunch probe: needs root: it captures SYNs and sends crafted ones (run with sudo)",
            file=sys.stderr,
        )
        return EXIT_NOT_ROOT
    if not 1 <= args.timer_limit <= 16:
        print("rawpunch probe: --timer-limit must be between 1 and 16 seconds", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(probe(args.server, timers=args.timers, timer_limit=args.timer_limit))
    except (ProbeError, RendezvousError) as exc:
        print(f"rawpunch probe: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"rawpunch probe via {args.server}:\n{table(result)}", file=sys.stderr)
    for note in result.extra.get("notes", []):
        print(f"  note: {note}", file=sys.stderr)
    if not args.no_cache:
        cache.store(result)
    if args.json:
        data = result.to_json()
        data["rfc5382"] = data["extra"].pop("rfc5382", [])
        print(json.dumps(data))
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
    except BrokenPipeError:  # e.g. `rawpunch lab list | head`: the reader is gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
