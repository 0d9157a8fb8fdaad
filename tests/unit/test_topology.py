"""Pure tests of the lab's topology and profile data (no root, no namespaces)."""

from __future__ import annotations

import argparse
from collections import deque
from ipaddress import IPv4Address, IPv4Network

import pytest

from rawpunch.lab import cli as lab_cli
from rawpunch.lab.impair import Impairment
from rawpunch.lab.profiles import PROFILES
from rawpunch.lab.topology import (
    CORE_NET,
    DEFAULT_ROUTE,
    MAX_HOPS,
    PRIVATE_RANGES,
    PROBES,
    PUBLIC_RANGES,
    Link,
    Node,
    Topology,
    is_public,
    two_nats,
)

HOPS = [1, 2, 3, 5]


def all_addresses(topo: Topology) -> list[IPv4Address]:
    return [addr for link in topo.links for addr in (link.a_addr, link.b_addr)]


def forward(topo: Topology, node: str, dst: IPv4Address) -> tuple[str, IPv4Address] | None:
    """Next hop (node, address) for *dst* from *node* by connected subnets and routes; None: no route."""
    for iface in topo.interfaces(node):
        if dst in iface.address.network:
            return (iface.peer, dst) if dst == iface.peer_address else None
    routes = sorted(topo.routes(node), key=lambda r: r.dest.prefixlen, reverse=True)
    for route in routes:
        if dst in route.dest:
            peer = next(i.peer for i in topo.interfaces(node) if route.gateway in i.address.network)
            return peer, route.gateway
    return None


def path(topo: Topology, src: str, dst: IPv4Address) -> list[str] | None:
    """Nodes a packet visits from *src* to the owner of *dst* (NAT translation ignored), None if dropped."""
    visited = [src]
    node = src
    while dst not in {i.address.ip for i in topo.interfaces(node)}:
        step = forward(topo, node, dst)
        if step is None or len(visited) > 64:
            return None
        node = step[0]
        visited.append(node)
    return visited


# --- two_nats -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", HOPS)
def test_two_nats_addresses_are_unique_and_in_allowed_ranges(hops: int) -> None:
    topo = two_nats(hops)
    addresses = all_addresses(topo)
    assert len(addresses) == len(set(addresses))
    allowed = PUBLIC_RANGES + PRIVATE_RANGES
    assert all(any(a in r for r in allowed) for a in addresses)
    for link in topo.links:
        assert any(link.subnet.subnet_of(r) for r in allowed)


def test_two_nats_well_known_addresses() -> None:
    topo = two_nats()
    assert topo.address("a") == IPv4Address("10.0.1.2")
    assert topo.address("b") == IPv4Address("10.0.2.2")
    assert topo.address("nat-a") == IPv4Address("10.0.1.1")
    assert topo.address("nat-b") == IPv4Address("10.0.2.1")
    assert topo.address("server") == IPv4Address("203.0.113.10")
    for nat in ("nat-a", "nat-b"):
        assert topo.public_address(nat) in IPv4Network("198.51.100.0/24")
    assert topo.interface("r1", "eth2").address.ip == IPv4Address("203.0.113.1")


@pytest.mark.parametrize("hops", HOPS)
def test_two_nats_has_hops_core_routers_between_the_nats(hops: int) -> None:
    topo = two_nats(hops)
    routers = [n.name for n in topo.nodes if n.role == "router"]
    assert routers == [f"r{i}" for i in range(1, hops + 1)]
    route = path(topo, "nat-a", topo.public_address("nat-b"))
    assert route == ["nat-a", *routers, "nat-b"]
    # The server hangs off the middle router.
    server_gw = topo.routes("server")[0].gateway
    middle = next(i.peer for i in topo.interfaces("server") if i.peer_address == server_gw)
    assert middle == f"r{(hops + 1) // 2}"


@pytest.mark.parametrize("hops", HOPS)
def test_routes(hops: int) -> None:
    topo = two_nats(hops)
    for node in topo.nodes:
        routes = topo.routes(node.name)
        if node.role == "router":
            assert all(not r.is_default and is_public(r.dest) for r in routes), node.name
            # Every public subnet is reachable: connected or routed.
            connected = {i.address.network for i in topo.interfaces(node.name)}
            public = {link.subnet for link in topo.links if link.public}
            assert public == connected | {r.dest for r in routes}
        else:
            assert [r.dest for r in routes] == [DEFAULT_ROUTE]
    assert topo.routes("a")[0].gateway == topo.address("nat-a")
    assert topo.routes("nat-a")[0].gateway == topo.interface("r1", "eth0").address.ip
    # Everything public reaches everything public; private space stays private.
    for src in ("server", "nat-a", "nat-b"):
        for dst in ("server",):
            assert path(topo, src, topo.address(dst)) is not None
        assert path(topo, src, topo.public_address("nat-a")) is not None
        assert path(topo, src, topo.address("a")) in (None, ["nat-a", "a"])
    assert path(topo, "server", topo.address("b")) is None


def test_router_routes_use_shortest_paths() -> None:
    topo = two_nats(5)
    # r1 reaches nat-b's WAN subnet via r2; r5 reaches the server LAN (on r3) via r4.
    nat_b_wan = topo.interface("nat-b", "wan").address.network
    assert {r.dest: r.gateway for r in topo.routes("r1")}[nat_b_wan] == topo.interface(
        "r2", "eth0"
    ).address.ip
    server_net = topo.interface("server", "eth0").address.network
    assert {r.dest: r.gateway for r in topo.routes("r5")}[server_net] == topo.interface(
        "r4", "eth1"
    ).address.ip
    hops_to_server = {}
    for router in ("r1", "r5"):
        trail = path(topo, router, topo.address("server"))
        assert trail is not None
        hops_to_server[router] = len(trail) - 1
    assert hops_to_server == {"r1": 3, "r5": 3}


def test_interface_names_fit_linux() -> None:
    topo = two_nats(MAX_HOPS)
    for node in topo.nodes:
        names = [i.ifname for i in topo.interfaces(node.name)]
        assert len(names) == len(set(names))
        assert all(0 < len(n) <= 15 for n in names)
    assert {i.ifname for i in topo.interfaces("nat-a")} == {"lan", "wan"}


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", [0, -1, MAX_HOPS + 1, True, 2.0, "2"])
def test_two_nats_rejects_bad_hops(hops: object) -> None:
    with pytest.raises(ValueError, match="hops"):
        two_nats(hops)  # type: ignore[arg-type]


def test_two_nats_rejects_unknown_profile() -> None:
    with pytest.raises(ValueError, match=r"unknown NAT profile 'full-cone'.*eim-apdf"):
        two_nats(profile_b="full-cone")


def _lan_link(a: str = "nat", b: str = "h", subnet: str = "10.9.0.0/24") -> Link:
    net = IPv4Network(subnet)
    hosts = net.hosts()
    return Link(a, b, net, next(hosts), next(hosts), "lan", "eth0")


def test_duplicate_node_names() -> None:
    with pytest.raises(ValueError, match="duplicate node names: h"):
        Topology((Node("h", "host"), Node("h", "host")), ())


def test_addresses_outside_allowed_ranges() -> None:
    for bad in ("192.168.1.0/24", "8.8.8.0/24", "172.16.0.0/30"):
        with pytest.raises(ValueError, match="outside the allowed ranges"):
            _lan_link(subnet=bad)
    with pytest.raises(ValueError, match="not a usable host address"):
        Link(
            "x", "y", IPv4Network("10.0.0.0/30"), IPv4Address("10.0.0.1"), IPv4Address("10.0.0.3"), "e0", "e1"
        )


def test_duplicate_addresses_and_overlapping_subnets() -> None:
    nodes = (Node("r", "router"), Node("s", "host"), Node("t", "host"))
    net = IPv4Network("203.0.113.0/24")
    one, two = IPv4Address("203.0.113.1"), IPv4Address("203.0.113.2")
    with pytest.raises(ValueError, match="used twice"):
        Topology(
            nodes, (Link("r", "s", net, one, two, "e0", "e0"), Link("r", "t", net, one, two, "e1", "e0"))
        )
    other = IPv4Network("203.0.113.0/25")
    three = IPv4Address("203.0.113.3")
    four = IPv4Address("203.0.113.4")
    with pytest.raises(ValueError, match="overlap"):
        Topology(
            nodes, (Link("r", "s", net, one, two, "e0", "e0"), Link("r", "t", other, three, four, "e1", "e0"))
        )


def test_node_validation() -> None:
    with pytest.raises(ValueError, match="needs a profile"):
        Node("n", "nat")
    with pytest.raises(ValueError, match="unknown NAT profile"):
        Node("n", "nat", "nope")
    with pytest.raises(ValueError, match="only NAT nodes"):
        Node("h", "host", "eim-apdf")
    with pytest.raises(ValueError, match="role"):
        Node("h", "switch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="node name"):
        Node("Bad Name", "host")


def test_structure_validation() -> None:
    with pytest.raises(ValueError, match="unknown node 'ghost'"):
        Topology((Node("h", "host"),), (_lan_link("h", "ghost"),))
    with pytest.raises(ValueError, match="has no links"):
        Topology((Node("h", "host"), Node("lonely", "host"), Node("g", "host")), (_lan_link("h", "g"),))
    with pytest.raises(ValueError, match="exactly the interfaces 'lan' and 'wan'"):
        Topology((Node("nat", "nat", "eim-apdf"), Node("h", "host")), (_lan_link(),))
    with pytest.raises(ValueError, match="core router 'r' is on non-TEST-NET"):
        Topology((Node("r", "router"), Node("h", "host")), (_lan_link("r", "h"),))
    with pytest.raises(ValueError, match="interface name"):
        Link(
            "x",
            "y",
            IPv4Network("10.0.0.0/30"),
            IPv4Address("10.0.0.1"),
            IPv4Address("10.0.0.2"),
            "e" * 16,
            "e",
        )


def test_disconnected_core_is_rejected() -> None:
    nodes = (Node("r1", "router"), Node("r2", "router"), Node("s1", "host"), Node("s2", "host"))
    net1, net2 = IPv4Network("203.0.113.0/25"), IPv4Network("203.0.113.128/25")
    links = (
        Link("r1", "s1", net1, IPv4Address("203.0.113.1"), IPv4Address("203.0.113.2"), "eth0", "eth0"),
        Link("r2", "s2", net2, IPv4Address("203.0.113.129"), IPv4Address("203.0.113.130"), "eth0", "eth0"),
    )
    with pytest.raises(ValueError, match="disconnected"):
        Topology(nodes, links)


def test_queries_name_unknown_nodes() -> None:
    topo = two_nats()
    with pytest.raises(KeyError, match="no node 'zz'"):
        topo.node("zz")
    with pytest.raises(ValueError, match="not a NAT"):
        topo.public_address("a")


def test_topology_is_frozen_and_hashable() -> None:
    topo = two_nats()
    with pytest.raises(AttributeError):
        topo.nodes = ()  # type: ignore[misc]
    assert hash(topo) == hash(two_nats())
    assert topo == two_nats()


# --- BFS sanity against an independent walk -----------------------------------------------------------------


def test_static_routes_follow_breadth_first_distances() -> None:
    topo = two_nats(7)
    routers = sorted(n.name for n in topo.nodes if n.role == "router")
    for start in routers:
        distance = {start: 0}
        queue = deque([start])
        while queue:
            current = queue.popleft()
            for peer in topo.neighbours(current):
                if peer in routers and peer not in distance:
                    distance[peer] = distance[current] + 1
                    queue.append(peer)
        for other in routers:
            trail = path(topo, start, topo.interfaces(other)[-1].address.ip)
            assert trail is not None and len(trail) - 1 == distance[other], (start, other, trail)


# --- probes, NAT-less sides, double NAT, impairment ---------------------------------------------------------


def test_probes_hang_off_the_middle_router_at_two_public_addresses() -> None:
    topo = two_nats(hops=3, probes=True)
    addresses = {p: topo.address(p) for p in PROBES}
    assert len(set(addresses.values())) == 2 and all(is_public(a) for a in addresses.values())
    for probe in PROBES:
        assert topo.routes(probe)[0].gateway in {i.address.ip for i in topo.interfaces("r2")}
        assert path(topo, probe, topo.public_address("nat-a")) is not None
        assert path(topo, "nat-b", topo.address(probe)) is not None
    assert not any(n.name in PROBES for n in two_nats().nodes)


@pytest.mark.parametrize("profile", ["open", "firewall"])
def test_a_side_without_nat_is_publicly_addressed_and_routed(profile: str) -> None:
    topo = two_nats(hops=2, profile_a=profile, probes=True)
    host = topo.address("a")
    assert is_public(host) and host not in CORE_NET
    assert topo.nat_chain("a") == ("nat-a",) and topo.seen_address("a") == host
    # The core routes the LAN via the firewall's WAN address; the firewall itself has a default route only.
    assert path(topo, "server", host) == ["server", "r1", "nat-a", "a"]
    assert path(topo, "probe1", host) is not None and path(topo, "b", host) is not None
    assert [r.dest for r in topo.routes("nat-a")] == [DEFAULT_ROUTE]


def test_double_nat_puts_a_home_router_behind_a_carrier_grade_nat() -> None:
    topo = two_nats(profile_a="double-nat")
    assert topo.nat_chain("a") == ("cpe-a", "nat-a")
    assert [topo.node(n).profile for n in ("cpe-a", "nat-a")] == list(PROFILES["double-nat"].layers)
    assert topo.address("cpe-a") == IPv4Address("10.0.1.1")
    cgn_link = topo.interface("cpe-a", "wan").address.network
    assert cgn_link.subnet_of(IPv4Network("100.64.0.0/10"))
    assert topo.seen_address("a") == topo.public_address("nat-a")
    # Shared address space (RFC 6598) is private: the core has no route to it.
    assert path(topo, "server", topo.interface("cpe-a", "wan").address.ip) is None
    with pytest.raises(ValueError, match="double NAT"):
        Node("n", "nat", "double-nat")


def test_impairment_sits_on_the_middle_router_only() -> None:
    imp = Impairment(delay_ms=20, jitter_ms=5, loss=0.02)
    topo = two_nats(hops=3, impairment=imp)
    assert {n.name: n.impairment for n in topo.nodes if n.impairment} == {"r2": imp}
    with pytest.raises(ValueError, match="only core routers"):
        Node("h", "host", impairment=imp)


def test_lab_clean_needs_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert lab_cli.run_lab(lab_cli_args("clean", all_runs=False)) == 1
    assert capsys.readouterr().err.strip() == "rawpunch lab clean: needs root (run with sudo)"


def test_add_lab_parser_sets_func() -> None:
    parser = argparse.ArgumentParser(prog="rawpunch")
    lab_cli.add_lab_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", "clean", "--all"])
    assert args.func is lab_cli.run_lab and args.all_runs is True
    args = parser.parse_args(["lab", "list", "--json"])
    assert args.lab_command == "list" and args.json is True


def lab_cli_args(command: str, **kwargs: object) -> argparse.Namespace:
    return argparse.Namespace(lab_command=command, **kwargs)


@pytest.mark.parametrize(
    ("returncode", "stderr", "said"),
    [
        (-2, "", "killed by SIGINT (the namespace goes with the lab anyway)"),
        (1, "", "exit status 1"),
        (1, "iptables-restore: line 2 failed\n", "iptables-restore: line 2 failed"),
    ],
)
def test_a_failed_undo_says_how_it_ended(returncode: int, stderr: str, said: str) -> None:
    import subprocess  # noqa: PLC0415

    from rawpunch.lab.netns import _why  # noqa: PLC0415

    assert _why(subprocess.CompletedProcess(["iptables-restore"], returncode, "", stderr)) == said
