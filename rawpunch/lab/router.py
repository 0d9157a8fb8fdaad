"""A lab node that configures itself: ``rawpunch lab router``, the entry point of every compose container.

The netns backend (netns.py) configures each node from outside, through ``ip netns exec``. In a
docker-compose topology (compose.py) there is no outside: every container configures its own network
namespace at start and undoes it when docker stops it. This module is that side, and the pieces both
backends share, so that each NAT profile has exactly one implementation:

* the sysctls of a node (``node_sysctls``): netns writes them into /proc/sys of each namespace, compose
  puts them under ``sysctls:`` of each service;
* a NAT is made by ``profile.iptables_restore(lan, wan)`` and undone by ``profile.iptables_undo()``
  (profiles.py), plus, for a ``backend="userspace"`` profile, the userspace NAT daemon started with
  ``usernat_args`` and awaited until it says ``ready``, before the rules that feed its queue exist.

What the container does at start, in order: wait until docker has attached every interface it expects
(found by address: docker names them eth0, eth1, ... in an order of its own), rename them to the
topology's names (``lan``/``wan`` for a NAT: the profiles' rules name them), replace docker's default
route with the topology's static routes, apply the NAT profile, print ``ready``; then it stays in the
foreground until SIGTERM/SIGINT (``docker stop``) and undoes the profile's rules before it exits. A host
uses the same command without ``--profile``: interfaces and default route, then it waits (the lab runs
its programs with ``docker exec``).
"""

from __future__ import annotations

import argparse
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from rawpunch.lab.profiles import PROFILES, NatProfile, get_profile

READY_LINE = "ready"
#: How long docker may take to attach the container's networks, and the userspace NAT to bind its queue.
SETTLE_TIMEOUT_S = 30.0
_POLL_S = 0.05


def node_sysctls(role: str, profile: NatProfile | None = None) -> dict[str, str]:
    """The sysctls of a lab node (``/proc/sys`` paths): the same for the netns and the compose backends."""
    forwarding = role in ("nat", "router")
    settings = {
        # IPv6 off before any interface exists: no link-local addresses, router solicitations or MLD noise.
        "net/ipv6/conf/all/disable_ipv6": "1",
        "net/ipv6/conf/default/disable_ipv6": "1",
        "net/ipv6/conf/lo/disable_ipv6": "1",
        # Reverse-path filtering would drop legitimately asymmetric or spoofed-source lab traffic (crafted
        # packets).
        "net/ipv4/conf/all/rp_filter": "0",
        "net/ipv4/conf/default/rp_filter": "0",
        "net/ipv4/ip_forward": "1" if forwarding else "0",
    }
    if forwarding:
        # ICMP errors (time exceeded, unreachable) are rate limited per destination by default; tests that
        # count on an ICMP answer to each low-TTL probe must not depend on timing.
        settings["net/ipv4/icmp_ratelimit"] = "0"
    if profile is not None and profile.backend == "userspace":
        # Hairpinned segments come back in on the LAN with the NAT's own public address as their source:
        # without accept_local routing drops them as martians; and no ICMP redirect for in == out.
        settings["net/ipv4/conf/all/accept_local"] = "1"
        settings["net/ipv4/conf/all/send_redirects"] = "0"
        settings["net/ipv4/conf/default/send_redirects"] = "0"
    return settings


def usernat_args(profile: NatProfile, public_ip: IPv4Address, lan_ip: IPv4Address) -> list[str]:
    """Arguments of ``python -m rawpunch.lab.usernat`` for a NAT whose interfaces are ``lan``/``wan``."""
    return ["--profile", profile.name, "--public-ip", str(public_ip), "--lan-ip", str(lan_ip), "--wan", "wan"]


# --- the container side -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    """What one container sets up: its interfaces (topology name -> address), routes, and NAT profile."""

    interfaces: tuple[tuple[str, IPv4Interface], ...]
    routes: tuple[tuple[IPv4Network, IPv4Address], ...]
    profile: NatProfile | None = None

    def __post_init__(self) -> None:
        names = [name for name, _ in self.interfaces]
        if self.profile is not None and sorted(names) != ["lan", "wan"]:
            raise ValueError(f"a NAT needs --iface lan=... and --iface wan=..., got {names}")

    def address(self, name: str) -> IPv4Address:
        return next(addr.ip for n, addr in self.interfaces if n == name)


def parse_iface(text: str) -> tuple[str, IPv4Interface]:
    name, sep, addr = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, IPv4Interface(addr)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--iface {text!r}: use NAME=ADDRESS/PREFIX, e.g. wan=198.51.100.1/29"
        ) from None


def parse_route(text: str) -> tuple[IPv4Network, IPv4Address]:
    dest, sep, gateway = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return IPv4Network("0.0.0.0/0" if dest == "default" else dest), IPv4Address(gateway)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--route {text!r}: use DEST/PREFIX=GATEWAY or default=GATEWAY"
        ) from None


def plan_renames(
    current: dict[IPv4Interface, str], wanted: Sequence[tuple[str, IPv4Interface]]
) -> list[tuple[str, str]]:
    """(old, new) interface renames that give each address its wanted name, via temporary names so that a
    swap (docker's eth0 must become eth1 and the other way round) never collides. Pure."""
    moves = [(current[addr], name) for name, addr in wanted if current[addr] != name]
    temporary = [(old, f"rptmp{i}") for i, (old, _) in enumerate(moves)]
    final = [(f"rptmp{i}", new) for i, (_, new) in enumerate(moves)]
    return temporary + final


def _ip(*argv: str, input: str | None = None) -> None:
    try:
        subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, input=input, timeout=10)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"ip {' '.join(argv)}: {e.stderr.strip()}") from None


def _addresses() -> dict[IPv4Interface, str]:
    """Every IPv4 address of this namespace and the interface that holds it (``ip -o -4 addr``)."""
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], check=True, capture_output=True, text=True, timeout=10
    ).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        found[IPv4Interface(fields[3])] = fields[1].split("@")[0]
    return found


def _await_interfaces(config: RouterConfig, timeout: float) -> dict[IPv4Interface, str]:
    wanted = {addr for _, addr in config.interfaces}
    deadline = time.monotonic() + timeout
    while True:
        present = _addresses()
        missing = wanted - present.keys()
        if not missing:
            return present
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"interfaces with {', '.join(map(str, sorted(missing)))} did not appear within {timeout:g} s "
                f"(have {', '.join(f'{v}={k}' for k, v in present.items())}): is the container on every "
                "network of its compose service?"
            )
        time.sleep(_POLL_S)  # docker attaches networks from outside; nothing to wait on in here


def configure_network(config: RouterConfig, timeout: float = SETTLE_TIMEOUT_S) -> None:
    """Rename the interfaces to the topology's names and add the static routes."""
    present = _await_interfaces(config, timeout)
    for old, new in plan_renames(present, config.interfaces):
        _ip("link", "set", "dev", old, "down")
        _ip("link", "set", "dev", old, "name", new)
    for name, _ in config.interfaces:
        _ip("link", "set", "dev", name, "up")
    # Docker adds a default route via its (address-less) bridge gateway; the topology's routes are all
    # there is to be, e.g. a core router must have no route to private space. Connected routes are
    # scope link and stay.
    _ip("-4", "route", "flush", "scope", "global")
    for dest, gateway in config.routes:
        _ip("route", "replace", str(dest), "via", str(gateway))


class NatRunner:
    """Apply a profile in this namespace (the daemon first, for a userspace one) and undo it."""

    def __init__(self, config: RouterConfig) -> None:
        assert config.profile is not None
        self.config = config
        self.profile: NatProfile = config.profile
        self.daemon: subprocess.Popen[str] | None = None

    def start(self, timeout: float = SETTLE_TIMEOUT_S) -> None:
        if self.profile.backend == "userspace":
            args = usernat_args(self.profile, self.config.address("wan"), self.config.address("lan"))
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "rawpunch.lab.usernat", *args], stdout=subprocess.PIPE, text=True
            )
            self._await_ready(self.daemon, timeout)
        _iptables_restore(self.profile.iptables_restore(lan="lan", wan="wan"))

    @staticmethod
    def _await_ready(proc: subprocess.Popen[str], timeout: float) -> None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().strip() if ready else ""
        if line != READY_LINE:
            proc.kill()
            raise RuntimeError(f"the userspace NAT did not say {READY_LINE!r} within {timeout:g} s")

    def stop(self) -> None:
        try:
            _iptables_restore(self.profile.iptables_undo())
        finally:
            if self.daemon is not None and self.daemon.poll() is None:
                self.daemon.terminate()
                try:
                    self.daemon.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.daemon.kill()
                    self.daemon.wait()


def _iptables_restore(text: str) -> None:
    result = subprocess.run(
        ["iptables-restore", "-w"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"iptables-restore failed: {result.stderr.strip()}")


def run_router(config: RouterConfig, stop: threading.Event | None = None) -> int:
    """Configure, say ``ready``, wait for SIGTERM/SIGINT (or *stop*), undo. The container's main program."""
    stop = stop or threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    configure_network(config)
    nat = NatRunner(config) if config.profile is not None else None
    try:
        if nat is not None:
            nat.start()
        print(READY_LINE, flush=True)
        while not stop.wait(3600):
            pass
    finally:
        if nat is not None:
            nat.stop()
    return 0


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--iface",
        action="append",
        type=parse_iface,
        default=[],
        metavar="NAME=ADDR/PREFIX",
        help="an interface to find by its address and rename to NAME (repeat)",
    )
    parser.add_argument(
        "--route",
        action="append",
        type=parse_route,
        default=[],
        metavar="DEST=GATEWAY",
        help="a static route, DEST/PREFIX or 'default' (repeat)",
    )
    parser.add_argument(
        "--profile", help=f"NAT profile to apply ({', '.join(PROFILES)}); none: a host or router"
    )


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """Raises ValueError (one line) for a bad combination."""
    if not args.iface:
        raise ValueError("give at least one --iface NAME=ADDR/PREFIX")
    profile = get_profile(args.profile) if args.profile else None
    return RouterConfig(tuple(args.iface), tuple(args.route), profile)


def add_router_parser(subparsers: Any) -> None:
    """``rawpunch lab router``: wired into the lab CLI by cli.py."""
    router = subparsers.add_parser(
        "router",
        help="configure this container as a lab node and stay in the foreground (compose labs; root)",
        description="Find each interface by its address and rename it, add the routes, apply the NAT profile "
        "(its iptables rules, and the userspace NAT for a userspace profile), print 'ready', and undo the "
        "profile on SIGTERM. The command of every service in lab/compose/*/docker-compose.yml.",
    )
    add_router_arguments(router)


def run_router_command(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"rawpunch lab router: {e}", file=sys.stderr)
        return 2
    try:
        return run_router(config)
    except RuntimeError as e:
        print(f"rawpunch lab router: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rawpunch.lab.router", description=__doc__.split("\n")[0])
    add_router_arguments(parser)
    return run_router_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
