"""The compose generator (pure): checked-in files match it, and the files say what the topology says."""

from __future__ import annotations

import argparse
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
import yaml

from rawpunch.lab import compose
from rawpunch.lab.profiles import get_profile
from rawpunch.lab.router import RouterConfig, node_sysctls, parse_iface, parse_route, plan_renames
from rawpunch.lab.topology import two_nats


def test_checked_in_compose_files_match_the_generator() -> None:
    assert compose.drifted_families() == [], "lab/compose is out of date: run scripts/gen-compose"


def test_drift_is_detected(tmp_path: Path) -> None:
    written = compose.write_families(tmp_path)
    assert compose.drifted_families(tmp_path) == []
    written[0].write_text(written[0].read_text().replace("internal: true", "internal: false", 1))
    assert compose.drifted_families(tmp_path) == [next(iter(compose.FAMILIES))]


@pytest.mark.parametrize("family", list(compose.FAMILIES))
def test_file_is_the_topology(family: str) -> None:
    topo = compose.family_topology(family)
    data = yaml.safe_load(compose.render_family(family))
    assert data["version"] == "2.4"
    assert set(data["services"]) == {n.name for n in topo.nodes}
    assert len(data["networks"]) == len(topo.links)
    for link in topo.links:
        net = data["networks"][compose.network_name(link.a, link.b)]
        assert net["internal"] is True
        (ipam,) = net["ipam"]["config"]
        assert IPv4Network(ipam["subnet"]) == link.subnet
        gateway = IPv4Address(ipam["gateway"])
        assert gateway in link.subnet and gateway not in (link.a_addr, link.b_addr)
        for end, addr in ((link.a, link.a_addr), (link.b, link.b_addr)):
            service_net = data["services"][end]["networks"][compose.network_name(link.a, link.b)]
            assert IPv4Address(service_net["ipv4_address"]) == addr


@pytest.mark.parametrize("family", list(compose.FAMILIES))
def test_commands_carry_interfaces_routes_profile_and_sysctls(family: str) -> None:
    topo = compose.family_topology(family)
    services = yaml.safe_load(compose.render_family(family))["services"]
    for node in topo.nodes:
        service = services[node.name]
        argv = service["command"]
        assert argv[:3] == ["${RAWPUNCH_ROOT}/.venv/bin/python", "-m", "rawpunch.lab.router"]
        pairs = list(zip(argv[3::2], argv[4::2], strict=True))
        ifaces = [v for k, v in pairs if k == "--iface"]
        assert ifaces == [f"{i.ifname}={i.address}" for i in topo.interfaces(node.name)]
        routes = [v for k, v in pairs if k == "--route"]
        assert len(routes) == len(topo.routes(node.name))
        assert [v for k, v in pairs if k == "--profile"] == ([node.profile] if node.profile else [])
        profile = get_profile(node.profile) if node.profile else None
        want = {k.replace("/", "."): v for k, v in node_sysctls(node.role, profile).items()}
        assert service["sysctls"] == want
        assert service["cap_add"] == ["NET_ADMIN", "NET_RAW"]


def test_a_userspace_nat_gets_accept_local() -> None:
    services = yaml.safe_load(compose.render_family("eim-eif"))["services"]
    assert services["nat-a"]["sysctls"]["net.ipv4.conf.all.accept_local"] == "1"
    assert "net.ipv4.conf.all.accept_local" not in services["r1"]["sysctls"]


def test_docker_gateway_needs_a_free_last_address() -> None:
    subnet = IPv4Network("198.51.100.0/29")
    assert compose.docker_gateway(subnet, {IPv4Address("198.51.100.1")}) == IPv4Address("198.51.100.6")
    with pytest.raises(ValueError, match="taken"):
        compose.docker_gateway(subnet, {IPv4Address("198.51.100.6")})
    with pytest.raises(ValueError, match="needs a /29 or larger"):
        compose.docker_gateway(IPv4Network("198.51.100.0/30"), set())


def test_every_two_nats_topology_leaves_room_for_docker() -> None:
    for hops in (1, 2, 5):
        for profile in ("eim-apdf", "open", "double-nat"):
            compose.compose_data(two_nats(hops, profile, profile, probes=True))  # raises if not


def test_unknown_family() -> None:
    with pytest.raises(ValueError, match="known: eim-apdf"):
        compose.family_topology("nope")


def test_compose_command_falls_back_to_v1() -> None:
    assert compose.compose_command(lambda name: "/usr/bin/x" if name == "docker-compose" else None) == [
        "docker-compose"
    ]
    with pytest.raises(RuntimeError, match="apt-get install docker-compose"):
        compose.compose_command(lambda name: None)


def test_plan_renames_swaps_through_temporary_names() -> None:
    a, b, c = IPv4Interface("10.0.1.1/24"), IPv4Interface("198.51.100.1/29"), IPv4Interface("10.0.3.1/24")
    current = {a: "eth1", b: "eth0", c: "eth2"}
    plan = plan_renames(current, [("eth0", a), ("eth1", b), ("eth2", c)])
    assert plan == [("eth1", "rptmp0"), ("eth0", "rptmp1"), ("rptmp0", "eth0"), ("rptmp1", "eth1")]
    names = dict((v, v) for v in current.values())
    for old, new in plan:  # never two interfaces with one name
        assert new not in names
        names[new] = names.pop(old)
    assert plan_renames({a: "lan"}, [("lan", a)]) == []


def test_router_arguments() -> None:
    assert parse_iface("wan=198.51.100.1/29") == ("wan", IPv4Interface("198.51.100.1/29"))
    assert parse_route("default=10.0.1.1") == (IPv4Network("0.0.0.0/0"), IPv4Address("10.0.1.1"))
    assert parse_route("203.0.113.0/24=198.51.100.2")[0] == IPv4Network("203.0.113.0/24")
    for bad in ("wan", "=1.2.3.4/24", "wan=1.2.3"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=ADDRESS/PREFIX"):
            parse_iface(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="default=GATEWAY"):
        parse_route("default")
    with pytest.raises(ValueError, match="a NAT needs --iface lan"):
        RouterConfig((("eth0", IPv4Interface("10.0.1.1/24")),), (), get_profile("eim-apdf"))
