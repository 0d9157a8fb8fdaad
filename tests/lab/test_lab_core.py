"""The namespace lab with real traffic: NAT profiles, routing, TTL expiry, call(), and teardown on every path.

Needs root (marked ``root``). Each test builds its own lab with a random run id, so ``-n 2`` is safe.
"""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from rawpunch.lab.clean import clean_labs
from rawpunch.lab.echo import READY_PREFIX
from rawpunch.lab.netns import Lab, LabNode, netns_name, new_run_id
from rawpunch.lab.nsproc import NETNS_DIR, list_netns
from rawpunch.lab.profiles import COMMENT_TAG, PROFILES
from rawpunch.lab.registry import record_path
from rawpunch.lab.topology import Topology, two_nats

pytestmark = pytest.mark.root

ECHO_PORT = 7000
#: a port a listens on but that no NAT forwards: inbound SYNs to it are unsolicited
INBOUND_PORT = 4000
#: The plain Linux MASQUERADE profiles (port preserved, conntrack holds the mapping); every profile's own
#: behaviour is checked by the self-test (test_profiles.py).
ALL_PROFILES = sorted(
    name
    for name, p in PROFILES.items()
    if p.backend == "netfilter" and p.nat and p.allocation == "port-preserving"
)
#: what a client sees when its SYN reaches a NAT's public address unsolicited (ICMP port unreachable aborts
#: a connect in SYN_SENT with ECONNREFUSED, like a RST)
UNSOLICITED_OUTCOME = {"drop": "timeout", "rst": "refused", "icmp": "refused"}

LabFactory = Callable[..., Lab]


# --- helpers (module level: call() runs them in a forked child) ---------------------------------------------


def tcp_exchange(host: str, port: int, payload: bytes) -> tuple[str, tuple[str, int], bytes]:
    """Connect, read the echo server's "<seen ip>:<port>" line, send payload, read the echo."""
    with socket.create_connection((host, port), timeout=5.0) as sock:
        local = sock.getsockname()
        stream = sock.makefile("rb")
        seen = stream.readline().decode().strip()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        echoed = stream.read()
    return seen, (local[0], local[1]), echoed


def connect_outcome(host: str, port: int, timeout: float) -> str:
    """ "connected", "refused" (RST), "timeout" (silence) or "error:<ERRNO>" (e.g. an ICMP unreachable)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return f"error:{errno.errorcode.get(e.errno or 0, e.errno)}"
    finally:
        sock.close()
    return "connected"


def netns_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def read_line(stream: Any, timeout: float) -> str:
    """One line from a pipe, waiting at most *timeout* for it to arrive."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no output within {timeout} s")
    line: str = stream.readline()
    return line


def start_echo(node: LabNode, port: int = ECHO_PORT) -> subprocess.Popen[str]:
    """The echo server in *node*, returned once it listens (it says so on stdout)."""
    proc = node.popen(
        [sys.executable, "-m", "rawpunch.lab.echo", "--port", str(port), "--lifetime", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = read_line(proc.stdout, timeout=10.0)
    assert line.startswith(READY_PREFIX), f"echo server in {node.name} did not start: {line!r}"
    return proc


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def process_gone(pid: int) -> bool:
    """No such process, or a zombie (exited; its parent just has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def iface_towards(topo: Topology, node: str, peer: str) -> IPv4Address:
    """The address of *node* on its link to *peer* (the source of ICMP errors it sends back that way)."""
    return next(i.address.ip for i in topo.interfaces(node) if i.peer == peer)


# --- the built lab ------------------------------------------------------------------------------------------


def test_lab_is_configured_as_the_topology_says(two_nat_lab: Lab) -> None:
    topo = two_nat_lab.topology
    for node in two_nat_lab.nodes:
        assert node.run(["ip", "-6", "-o", "addr"]).stdout == "", f"IPv6 left on in {node.name}"
        forward = node.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout.strip()
        assert forward == ("1" if node.role in ("nat", "router") else "0"), node.name
        routes = node.run(["ip", "-4", "route", "show", "proto", "static"]).stdout
        for route in topo.routes(node.name):
            dest = "default" if route.is_default else str(route.dest)
            assert f"{dest} via {route.gateway} " in routes, f"{node.name}: {routes}"
    for router in ("r1", "r2"):
        routes = two_nat_lab.node(router).run(["ip", "-4", "route"]).stdout
        assert "10." not in routes and "default" not in routes, f"core router {router} routes private space"
    for nat in ("nat-a", "nat-b"):
        for table in ("filter", "nat"):
            rules = two_nat_lab.node(nat).run(["iptables", "-t", table, "-S"]).stdout.splitlines()
            appended = [r for r in rules if r.startswith("-A ")]
            assert appended, f"no {table} rules on {nat}"
            assert all(f'"{COMMENT_TAG} ' in r for r in appended), appended


@pytest.mark.parametrize("two_nat_lab", ALL_PROFILES, indirect=True)
def test_hosts_reach_server_through_masquerade(two_nat_lab: Lab) -> None:
    server = two_nat_lab.node("server")
    start_echo(server)
    for host, nat in (("a", "nat-a"), ("b", "nat-b")):
        seen, (local_ip, local_port), echoed = two_nat_lab.node(host).call(
            tcp_exchange, str(server.address), ECHO_PORT, b"hello through the NAT"
        )
        public = two_nat_lab.topology.public_address(nat)
        assert echoed == b"hello through the NAT"
        assert local_ip == str(two_nat_lab.topology.address(host))
        # MASQUERADE: the server sees the NAT's WAN address; port-preserving: with the host's own port.
        assert seen == f"{public}:{local_port}"

        table = two_nat_lab.node(nat).run(["conntrack", "-L", "-p", "tcp", "--dport", str(ECHO_PORT)]).stdout
        mapping = re.compile(
            rf"src={local_ip} dst={server.address} sport={local_port} dport={ECHO_PORT} "
            rf"src={server.address} dst={public} sport={ECHO_PORT} dport={local_port}\b"
        )
        assert mapping.search(table), f"no conntrack mapping on {nat}:\n{table}"


@pytest.mark.parametrize("two_nat_lab", ALL_PROFILES, indirect=True)
def test_server_cannot_open_connections_inward(two_nat_lab: Lab) -> None:
    topo = two_nat_lab.topology
    profile = PROFILES[topo.node("nat-a").profile or ""]
    start_echo(two_nat_lab.node("a"), INBOUND_PORT)  # a listens: only the network can refuse
    server = two_nat_lab.node("server")

    # Private space is not routed in the core: r1 answers "net unreachable".
    private = server.call(connect_outcome, str(topo.address("a")), INBOUND_PORT, 1.0)
    assert private == "error:ENETUNREACH"

    unsolicited = server.call(connect_outcome, str(topo.public_address("nat-a")), INBOUND_PORT, 1.0)
    assert unsolicited == UNSOLICITED_OUTCOME[profile.unsolicited_syn]


def test_low_ttl_expires_in_the_core_before_the_peer_nat(lab_factory: LabFactory) -> None:
    lab = lab_factory(two_nats(hops=3))
    topo = lab.topology
    target = str(topo.public_address("nat-b"))
    path = ["nat-a", "r1", "r2", "r3"]
    for ttl in range(2, len(path) + 1):
        # TTL n: the n-1 hops before path[ttl-1] decrement it, path[ttl-1] would take it to 0.
        expiring, previous = path[ttl - 1], path[ttl - 2]
        out = lab.node("a").run(["ping", "-n", "-c1", "-W1", "-t", str(ttl), target], check=False).stdout
        sender = re.search(r"From (\S+) icmp_seq=1 Time to live exceeded", out)
        assert sender, f"no time exceeded for TTL {ttl}:\n{out}"
        assert IPv4Address(sender.group(1)) == iface_towards(topo, expiring, previous)


# --- call() ------------------------------------------------------------------------------------------------


def test_call_returns_values_and_propagates_exceptions(lab_factory: LabFactory) -> None:
    lab = lab_factory(two_nats(hops=1))
    a = lab.node("a")
    assert a.call(netns_inode) == os.stat(NETNS_DIR / a.netns).st_ino
    assert a.call(netns_inode) != netns_inode()
    with pytest.raises(ValueError, match="boom") as info:
        a.call(raise_value_error, "boom")
    assert any(a.netns in note for note in getattr(info.value, "__notes__", []))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        a.call(time.sleep, 30, timeout=0.3)
    assert time.monotonic() - started < 5


# --- teardown on every path ---------------------------------------------------------------------------------


def test_teardown_runs_when_the_body_raises() -> None:
    lab = Lab(two_nats(hops=1))
    sleeper: subprocess.Popen[bytes] | None = None
    with pytest.raises(RuntimeError, match="body failed"), lab:
        assert set(lab.namespaces.values()) <= set(list_netns())
        assert record_path(lab.run_id).exists()
        sleeper = lab.node("server").popen(["sleep", "60"])
        raise RuntimeError("body failed")
    assert sleeper is not None and sleeper.poll() is not None
    assert not set(lab.namespaces.values()) & set(list_netns())
    assert not record_path(lab.run_id).exists()


_CHILD_LAB = """
import sys
from rawpunch.lab.netns import Lab
from rawpunch.lab.topology import two_nats

lab = Lab(two_nats(hops=1), run_id=sys.argv[1])
lab.build()
sleeper = lab.node("server").popen(["sleep", "120"])
print(sleeper.pid, flush=True)
sys.stdin.read()  # until killed
"""


def _spawn_lab_owner(run_id: str) -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD_LAB, run_id], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        sleeper = int(read_line(child.stdout, timeout=20.0))
    except BaseException:
        child.kill()
        child.wait()
        raise
    return child, sleeper


def _namespaces_of(run_id: str) -> set[str]:
    return {netns_name(run_id, n.name) for n in two_nats(hops=1).nodes}


@pytest.mark.usefixtures("exclusive_cleanup")
def test_clean_labs_removes_the_run_of_a_killed_owner(lab_factory: LabFactory) -> None:
    live = lab_factory(two_nats(hops=1))  # a live run that clean_labs must leave alone
    run_id = new_run_id()
    child, sleeper = _spawn_lab_owner(run_id)
    try:
        child.kill()  # SIGKILL: no teardown can run
        child.wait()
        assert _namespaces_of(run_id) <= set(list_netns())
        assert record_path(run_id).exists()

        removed = clean_labs()
        assert _namespaces_of(run_id) <= set(removed)
        assert str(record_path(run_id)) in removed
        assert not _namespaces_of(run_id) & set(list_netns())
        assert not record_path(run_id).exists()
        wait_until(lambda: process_gone(sleeper), 5.0, f"sleep {sleeper} in the dead lab to be killed")

        assert set(live.namespaces.values()) <= set(list_netns()), "clean_labs removed a live lab"
        assert record_path(live.run_id).exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if record_path(run_id).exists() or _namespaces_of(run_id) & set(list_netns()):
            clean_labs()


@pytest.mark.usefixtures("exclusive_cleanup")
def test_sigterm_tears_the_lab_down() -> None:
    run_id = new_run_id()
    child, sleeper = _spawn_lab_owner(run_id)
    try:
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=15) == -signal.SIGTERM  # died of the signal, as without the guard
        assert not _namespaces_of(run_id) & set(list_netns())
        assert not record_path(run_id).exists()
        wait_until(lambda: process_gone(sleeper), 5.0, f"sleep {sleeper} to be stopped")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if record_path(run_id).exists() or _namespaces_of(run_id) & set(list_netns()):
            clean_labs()
