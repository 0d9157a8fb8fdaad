"""``two_nats(server_alt=True)``: the server's second address for the probe, an additive option."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

from rawpunch.lab.topology import SERVER_ADDR, SERVER_ALT_ADDR, is_public, two_nats


def test_the_server_gets_a_second_public_address_on_its_own_link() -> None:
    topo = two_nats(hops=3, server_alt=True)
    ifaces = {i.ifname: i.address for i in topo.interfaces("server")}
    assert ifaces == {
        "eth0": IPv4Interface(f"{SERVER_ADDR}/24"),
        "eth1": IPv4Interface(f"{SERVER_ALT_ADDR}/29"),
    }
    assert is_public(SERVER_ALT_ADDR)
    # The server still leaves by its first interface; every other core router can route to the alt address.
    assert [r.gateway for r in topo.routes("server")] == [IPv4Address("203.0.113.1")]
    for router in ("r1", "r3"):
        assert any(SERVER_ALT_ADDR in r.dest for r in topo.routes(router)), router


def test_without_the_option_the_topology_is_unchanged() -> None:
    assert two_nats(hops=2) == two_nats(hops=2, server_alt=False)
    assert len(two_nats(hops=2, server_alt=True).links) == len(two_nats(hops=2).links) + 1
