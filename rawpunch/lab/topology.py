"""Lab topologies as pure data (mininet style): nodes, point-to-point links, addresses and routes. No I/O.

Addressing follows two rules that make the lab honest:

* The lab's "internet" uses only the RFC 5737 documentation ranges (TEST-NET-1/2/3); LANs use 10.0.0.0/8 and
  100.64.0.0/10 (RFC 6598, for carrier-grade NAT). Nothing else can be expressed, so a lab can never address a
  real host.
* Core routers get static routes to every public (TEST-NET) subnet, computed by BFS over the router graph, and
  *no* route to private space, as on the internet. A packet that escapes a NAT untranslated (e.g. a conntrack
  INVALID one) is therefore dropped in the core instead of quietly reaching the peer. A public subnet behind a
  NAT node (the LAN of a profile without translation: an open router or a stateful firewall) is routed via
  that node's WAN address.

Hosts and NATs have a single default route: a host's via the peer of its first interface, a NAT's via the
peer of its ``wan`` interface. A NAT has exactly the interfaces ``lan`` and ``wan`` (the profile's rules
name them). A double NAT (a profile with ``layers``) is two NAT nodes in a row: ``cpe-x`` (the home router,
LAN 10.0.x.0/24) behind ``nat-x`` (the carrier-grade NAT, LAN in 100.64.0.0/10, RFC 6598).

Address plan of ``two_nats``: core links are /29s of 198.51.100.0/25; the vantage hosts ``probe1`` and
``probe2`` and the public LANs of NAT-less profiles use 198.51.100.128/25; the server is 203.0.113.10.
192.0.2.0/24 is left to tests that add hosts of their own. Every subnet keeps its last usable address free:
the docker-compose backend (compose.py) must give that one to docker's bridge gateway, so a /30 (two
usable addresses, both taken by the link's ends) would not do.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TYPE_CHECKING, Literal

from rawpunch.lab.profiles import PROFILES, get_profile

if TYPE_CHECKING:  # only passed through here; importing it would shadow ``python -m rawpunch.lab.impair``
    from rawpunch.lab.impair import Impairment

Role = Literal["host", "nat", "router"]
ROLES: tuple[str, ...] = ("host", "nat", "router")

#: RFC 5737 documentation ranges: the only "public" space the lab uses.
PUBLIC_RANGES: tuple[IPv4Network, ...] = (
    IPv4Network("192.0.2.0/24"),
    IPv4Network("198.51.100.0/24"),
    IPv4Network("203.0.113.0/24"),
)
#: LAN space: RFC 1918 10/8 and RFC 6598 shared address space (CGNAT).
PRIVATE_RANGES: tuple[IPv4Network, ...] = (IPv4Network("10.0.0.0/8"), IPv4Network("100.64.0.0/10"))

DEFAULT_ROUTE = IPv4Network("0.0.0.0/0")
CORE_NET = IPv4Network("198.51.100.0/25")
CORE_LINK_PREFIX = 29
SERVER_NET = IPv4Network("203.0.113.0/24")
SERVER_ADDR = IPv4Address("203.0.113.10")
#: The server's second address (``two_nats(server_alt=True)``, for ``rawpunch server --alt-address``): its
#: own link to the middle router, so no node needs two addresses on one interface.
SERVER_ALT_NET = IPv4Network("198.51.100.192/29")
SERVER_ALT_ADDR = IPv4Address("198.51.100.194")
#: The core links of two_nats are /29s carved from 198.51.100.0/25: hops + 1 of them must fit.
MAX_HOPS = 2 ** (CORE_LINK_PREFIX - CORE_NET.prefixlen) - 1
#: two_nats' defaults, the lab of scripts/demo and ``rawpunch lab up``: a Linux MASQUERADE NAT on each side
#: and two core routers, so that a TTL-2 priming SYN passes its NAT and dies before the other one.
DEFAULT_PROFILE = "eim-apdf"
DEFAULT_HOPS = 2
#: The vantage hosts of the NAT self-test, on the middle router (two different public addresses).
PROBES: tuple[str, ...] = ("probe1", "probe2")
PROBE_NETS: tuple[IPv4Network, ...] = (IPv4Network("198.51.100.128/29"), IPv4Network("198.51.100.136/29"))
#: The LAN of a side whose profile does not translate: the host is publicly addressed.
PUBLIC_LANS = {"a": IPv4Network("198.51.100.160/28"), "b": IPv4Network("198.51.100.176/28")}
PRIVATE_LANS = {"a": IPv4Network("10.0.1.0/24"), "b": IPv4Network("10.0.2.0/24")}
#: The link between a double NAT's home router and its carrier-grade NAT (RFC 6598 shared space).
CGNAT_LINKS = {"a": IPv4Network("100.64.1.0/24"), "b": IPv4Network("100.64.2.0/24")}

# Node names become part of namespace names (rp-<run>-<node>) and of files: keep them boring.
_NODE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
# Linux interface names: at most 15 bytes, no '/', no whitespace; keep to a safe alphabet.
_IFNAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,14}$")


def is_public(net: IPv4Network | IPv4Address) -> bool:
    """True when *net* lies inside one of the TEST-NET ranges."""
    if isinstance(net, IPv4Address):
        net = IPv4Network(net)
    return any(net.subnet_of(r) for r in PUBLIC_RANGES)


def is_private(net: IPv4Network | IPv4Address) -> bool:
    """True when *net* lies inside 10/8 or 100.64/10."""
    if isinstance(net, IPv4Address):
        net = IPv4Network(net)
    return any(net.subnet_of(r) for r in PRIVATE_RANGES)


@dataclass(frozen=True)
class Node:
    """A namespace of the lab. NATs carry the name of their profile (see profiles.PROFILES); a core router
    may impair what it forwards (latency, jitter, loss: see impair.py)."""

    name: str
    role: Role
    profile: str | None = None
    impairment: Impairment | None = None

    def __post_init__(self) -> None:
        if self.impairment is not None and self.role != "router":
            raise ValueError(f"node {self.name!r}: only core routers impair traffic (role is {self.role!r})")
        if not _NODE_NAME.match(self.name):
            raise ValueError(f"node name {self.name!r}: use 1-32 of [a-z0-9-], starting with a letter")
        if self.role not in ROLES:
            raise ValueError(f"node {self.name!r}: role {self.role!r} is not one of {ROLES}")
        if self.role == "nat":
            if self.profile is None:
                raise ValueError(
                    f"NAT node {self.name!r} needs a profile; known: {', '.join(sorted(PROFILES))}"
                )
            if get_profile(self.profile).layers:
                raise ValueError(
                    f"NAT node {self.name!r}: {self.profile!r} is a double NAT; give each layer its own node "
                    "(two_nats does)"
                )
        elif self.profile is not None:
            raise ValueError(f"node {self.name!r}: only NAT nodes have a profile (role is {self.role!r})")


@dataclass(frozen=True)
class Link:
    """A point-to-point link (a veth pair) between nodes *a* and *b*."""

    a: str
    b: str
    subnet: IPv4Network
    a_addr: IPv4Address
    b_addr: IPv4Address
    a_ifname: str
    b_ifname: str

    def __post_init__(self) -> None:
        where = f"link {self.a}:{self.a_ifname} -- {self.b}:{self.b_ifname}"
        if self.a == self.b:
            raise ValueError(f"{where}: a link needs two different nodes")
        if not (is_public(self.subnet) or is_private(self.subnet)):
            raise ValueError(
                f"{where}: subnet {self.subnet} is outside the allowed ranges "
                f"(TEST-NET {', '.join(map(str, PUBLIC_RANGES))}; LAN {', '.join(map(str, PRIVATE_RANGES))})"
            )
        usable = set(self.subnet.hosts())
        for addr in (self.a_addr, self.b_addr):
            if addr not in usable:
                raise ValueError(f"{where}: address {addr} is not a usable host address of {self.subnet}")
        if self.a_addr == self.b_addr:
            raise ValueError(f"{where}: both ends have address {self.a_addr}")
        for ifname in (self.a_ifname, self.b_ifname):
            if not _IFNAME.match(ifname):
                raise ValueError(f"{where}: interface name {ifname!r} is invalid (1-15 of [a-zA-Z0-9_.-])")

    @property
    def public(self) -> bool:
        return is_public(self.subnet)

    def end(self, node: str) -> tuple[str, IPv4Address, str, IPv4Address]:
        """(ifname, address, peer node, peer address) seen from *node*."""
        if node == self.a:
            return self.a_ifname, self.a_addr, self.b, self.b_addr
        if node == self.b:
            return self.b_ifname, self.b_addr, self.a, self.a_addr
        raise ValueError(f"node {node!r} is not an end of link {self.a} -- {self.b}")


@dataclass(frozen=True)
class Interface:
    """One end of a link, seen from its node."""

    node: str
    ifname: str
    address: IPv4Interface
    peer: str
    peer_address: IPv4Address


@dataclass(frozen=True)
class Route:
    """A static route; the default route has ``dest == 0.0.0.0/0``."""

    dest: IPv4Network
    gateway: IPv4Address

    @property
    def is_default(self) -> bool:
        return self.dest == DEFAULT_ROUTE


@dataclass(frozen=True)
class Topology:
    """Nodes and links; validated on construction, routes derived from them."""

    nodes: tuple[Node, ...]
    links: tuple[Link, ...]
    _routes: dict[str, tuple[Route, ...]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        self._validate()
        object.__setattr__(self, "_routes", _compute_routes(self))

    # --- queries -------------------------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in topology (nodes: {', '.join(n.name for n in self.nodes)})")

    def interfaces(self, name: str) -> tuple[Interface, ...]:
        """The node's interfaces, in link order."""
        self.node(name)
        result = []
        for link in self.links:
            if name in (link.a, link.b):
                ifname, addr, peer, peer_addr = link.end(name)
                iface = IPv4Interface(f"{addr}/{link.subnet.prefixlen}")
                result.append(Interface(name, ifname, iface, peer, peer_addr))
        return tuple(result)

    def interface(self, name: str, ifname: str) -> Interface:
        for iface in self.interfaces(name):
            if iface.ifname == ifname:
                return iface
        raise KeyError(f"node {name!r} has no interface {ifname!r}")

    def address(self, name: str) -> IPv4Address:
        """The primary address: a NAT's LAN address (its hosts' gateway), else that of the first interface."""
        if self.node(name).role == "nat":
            return self.interface(name, "lan").address.ip
        return self.interfaces(name)[0].address.ip

    def public_address(self, nat_name: str) -> IPv4Address:
        """A NAT's WAN address: the source its LAN hosts appear to have."""
        if self.node(nat_name).role != "nat":
            raise ValueError(f"node {nat_name!r} is not a NAT")
        return self.interface(nat_name, "wan").address.ip

    def routes(self, name: str) -> tuple[Route, ...]:
        """Static routes beyond the connected ones (the kernel adds those)."""
        self.node(name)
        return self._routes[name]

    def neighbours(self, name: str) -> Iterator[str]:
        for iface in self.interfaces(name):
            yield iface.peer

    def nat_chain(self, host: str) -> tuple[str, ...]:
        """The NAT nodes between *host* and the core, innermost first (empty for a host in the core)."""
        chain: list[str] = []
        gateway = self.interfaces(host)[0].peer
        while self.node(gateway).role == "nat" and gateway not in chain:
            chain.append(gateway)
            gateway = self.interface(gateway, "wan").peer
        return tuple(chain)

    def seen_address(self, host: str) -> IPv4Address:
        """The address the internet sees *host* at: its outermost translating NAT's, else its own."""
        for nat in reversed(self.nat_chain(host)):
            if get_profile(self.node(nat).profile or "").nat:
                return self.public_address(nat)
        return self.address(host)

    # --- validation ----------------------------------------------------------------------------------------

    def _validate(self) -> None:
        names = [n.name for n in self.nodes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate node names: {', '.join(duplicates)}")
        known = set(names)
        for link in self.links:
            for end in (link.a, link.b):
                if end not in known:
                    raise ValueError(f"link {link.a} -- {link.b}: unknown node {end!r}")
        self._validate_addressing()
        for n in self.nodes:
            self._validate_node(n)

    def _validate_addressing(self) -> None:
        seen: dict[IPv4Address, str] = {}
        for link in self.links:
            for node, addr in ((link.a, link.a_addr), (link.b, link.b_addr)):
                if addr in seen:
                    raise ValueError(f"address {addr} used twice ({seen[addr]} and {node})")
                seen[addr] = node
        subnets = [link.subnet for link in self.links]
        for i, s in enumerate(subnets):
            for t in subnets[i + 1 :]:
                if s.overlaps(t):
                    raise ValueError(f"link subnets {s} and {t} overlap")

    def _validate_node(self, node: Node) -> None:
        ifaces = self.interfaces(node.name)
        if not ifaces:
            raise ValueError(f"node {node.name!r} has no links")
        ifnames = [i.ifname for i in ifaces]
        if len(set(ifnames)) != len(ifnames):
            raise ValueError(f"node {node.name!r} has duplicate interface names: {ifnames}")
        if node.role == "nat" and sorted(ifnames) != ["lan", "wan"]:
            raise ValueError(
                f"NAT {node.name!r} must have exactly the interfaces 'lan' and 'wan', has {ifnames}"
            )
        if node.role == "router":
            private = [str(i.address.network) for i in ifaces if not is_public(i.address.network)]
            if private:
                # The core must not know private space; a router on a LAN would route it.
                raise ValueError(f"core router {node.name!r} is on non-TEST-NET subnets {private}")


def _compute_routes(topo: Topology) -> dict[str, tuple[Route, ...]]:
    routes: dict[str, tuple[Route, ...]] = {}
    for node in topo.nodes:
        if node.role == "router":
            routes[node.name] = _router_routes(topo, node.name)
        else:
            gw_iface = (
                topo.interface(node.name, "wan") if node.role == "nat" else topo.interfaces(node.name)[0]
            )
            routes[node.name] = (Route(DEFAULT_ROUTE, gw_iface.peer_address),)
    return routes


def _router_routes(topo: Topology, router: str) -> tuple[Route, ...]:
    """Routes to every public subnet not directly attached, via the first hop of a BFS over core routers."""
    first_hop = _bfs_first_hops(topo, router)  # router -> (distance, gateway address)
    attached = {i.address.network for i in topo.interfaces(router)}
    result = []
    for subnet in dict.fromkeys(link.subnet for link in topo.links if link.public):
        if subnet in attached:
            continue
        candidates = [first_hop[r] for r in _routers_on(topo, subnet) if r in first_hop]
        candidates += _entries_behind(topo, router, subnet, first_hop)
        if not candidates:
            raise ValueError(
                f"core router {router!r} cannot reach public subnet {subnet}: the core is disconnected"
            )
        _distance, gateway = min(candidates, key=lambda c: c[0])
        result.append(Route(subnet, gateway))
    return tuple(result)


def _entries_behind(
    topo: Topology, router: str, subnet: IPv4Network, first_hop: dict[str, tuple[int, IPv4Address]]
) -> list[tuple[int, IPv4Address]]:
    """(distance, gateway) for a public subnet on the LAN side of a NAT node: via the NAT's WAN address from
    the router it hangs off, via the first hop towards that router from the others."""
    result = []
    for link in topo.links:
        if link.subnet != subnet:
            continue
        for end in (link.a, link.b):
            if topo.node(end).role != "nat" or link.end(end)[0] != "lan":
                continue
            wan = topo.interface(end, "wan")
            if wan.peer == router:
                result.append((0, wan.address.ip))
            elif wan.peer in first_hop:
                result.append(first_hop[wan.peer])
    return result


def _routers_on(topo: Topology, subnet: IPv4Network) -> list[str]:
    routers = {n.name for n in topo.nodes if n.role == "router"}
    return [end for link in topo.links if link.subnet == subnet for end in (link.a, link.b) if end in routers]


def _bfs_first_hops(topo: Topology, start: str) -> dict[str, tuple[int, IPv4Address]]:
    """Each other router reachable over router-router links: (hops, address of the first-hop neighbour)."""
    routers = {n.name for n in topo.nodes if n.role == "router"}
    result: dict[str, tuple[int, IPv4Address]] = {}
    queue: deque[tuple[str, int, IPv4Address | None]] = deque([(start, 0, None)])
    visited = {start}
    while queue:
        current, distance, gateway = queue.popleft()
        for iface in topo.interfaces(current):
            if iface.peer not in routers or iface.peer in visited:
                continue
            visited.add(iface.peer)
            hop = gateway if gateway is not None else iface.peer_address
            result[iface.peer] = (distance + 1, hop)
            queue.append((iface.peer, distance + 1, hop))
    return result


# --- builders -----------------------------------------------------------------------------------------------


def _core_subnets(count: int) -> list[IPv4Network]:
    subnets = list(CORE_NET.subnets(new_prefix=CORE_LINK_PREFIX))
    if count > len(subnets):
        raise ValueError(f"{count} core links do not fit in {CORE_NET} as /{CORE_LINK_PREFIX}s")
    return subnets[:count]


def _p2p(a: str, a_if: str, b: str, b_if: str, subnet: IPv4Network) -> Link:
    """A link whose *a* end gets the first usable address of *subnet* and *b* the second."""
    hosts = subnet.hosts()
    return Link(a, b, subnet, next(hosts), next(hosts), a_if, b_if)


def _side(side: str, profile_name: str) -> tuple[list[Node], list[Link]]:
    """Host *side* and its NAT(s), innermost link first; the outermost NAT is ``nat-<side>``."""
    profile = get_profile(profile_name)
    host, nat = side, f"nat-{side}"
    if not profile.layers:
        lan = PRIVATE_LANS[side] if profile.nat else PUBLIC_LANS[side]
        return [Node(host, "host"), Node(nat, "nat", profile_name)], [_p2p(nat, "lan", host, "eth0", lan)]
    if len(profile.layers) != 2:
        raise ValueError(f"NAT profile {profile_name!r}: two_nats builds double NATs (two layers) only")
    inner, outer = profile.layers
    cpe = f"cpe-{side}"
    nodes = [Node(host, "host"), Node(cpe, "nat", inner), Node(nat, "nat", outer)]
    links = [
        _p2p(cpe, "lan", host, "eth0", PRIVATE_LANS[side]),
        _p2p(nat, "lan", cpe, "wan", CGNAT_LINKS[side]),
    ]
    return nodes, links


def two_nats(
    hops: int = DEFAULT_HOPS,
    profile_a: str = DEFAULT_PROFILE,
    profile_b: str = DEFAULT_PROFILE,
    *,
    probes: bool = False,
    impairment: Impairment | None = None,
    server_alt: bool = False,
) -> Topology:
    """Two hosts behind two NATs, *hops* core routers between the NATs, a server on the middle router::

        a -- nat-a [lan | wan] -- r1 -- ... -- rN -- [wan | lan] nat-b -- b
                                       |
                     server (203.0.113.10) on r((N+1)//2)     (+ probe1, probe2 there with probes=True)

    a is 10.0.1.2 behind nat-a's 10.0.1.1, b is 10.0.2.2 behind nat-b's 10.0.2.1; the WAN and core links are
    /29s of 198.51.100.0/25. With hops >= 2, a packet from a with TTL 2 passes nat-a and expires at r1, before
    it could reach nat-b: the low-TTL priming of a NAT mapping is possible.

    A profile without translation puts its host in 198.51.100.160/28 (a) or .176/28 (b); a double NAT adds
    ``cpe-a`` (home router, 10.0.1.1) in front of nat-a (carrier-grade NAT, LAN 100.64.1.0/24). *probes*
    adds the self-test's vantage hosts; *server_alt* gives the server a second address,
    SERVER_ALT_ADDR (198.51.100.194, on its own link ``eth1`` to the middle router: the NAT probe's server
    part, ``rawpunch server --alt-address``); *impairment* makes the middle router, which every path between
    a, b, the server and the probes crosses once, delay and drop what it forwards.
    """
    if isinstance(hops, bool) or not isinstance(hops, int):
        raise ValueError(f"hops must be an int, got {hops!r}")
    if not 1 <= hops <= MAX_HOPS:
        raise ValueError(f"hops must be between 1 and {MAX_HOPS} (core routers between the NATs), got {hops}")
    nodes_a, links_a = _side("a", profile_a)
    nodes_b, links_b = _side("b", profile_b)

    routers = [f"r{i}" for i in range(1, hops + 1)]
    middle = routers[(hops + 1) // 2 - 1]
    router_nodes = [Node(r, "router", impairment=impairment if r == middle else None) for r in routers]
    extra = [Node(p, "host") for p in PROBES] if probes else []
    nodes = (*nodes_a, *router_nodes, *nodes_b, Node("server", "host"), *extra)
    chain = ["nat-a", *routers, "nat-b"]
    next_if = {r: 0 for r in routers}

    def ifname(node: str, nat_side: str) -> str:
        if node in next_if:
            name = f"eth{next_if[node]}"
            next_if[node] += 1
            return name
        return nat_side

    links = list(links_a)
    for (left, right), subnet in zip(itertools.pairwise(chain), _core_subnets(hops + 1), strict=True):
        links.append(_p2p(left, ifname(left, "wan"), right, ifname(right, "wan"), subnet))
    links += links_b
    router_addr = next(SERVER_NET.hosts())
    links.append(Link(middle, "server", SERVER_NET, router_addr, SERVER_ADDR, ifname(middle, ""), "eth0"))
    if probes:
        for probe, subnet in zip(PROBES, PROBE_NETS, strict=True):
            links.append(_p2p(middle, ifname(middle, ""), probe, "eth0", subnet))
    if server_alt:
        links.append(_p2p(middle, ifname(middle, ""), "server", "eth1", SERVER_ALT_NET))
    return Topology(nodes, tuple(links))


def two_hosts() -> Topology:
    """Hosts ``a`` (10.0.9.1) and ``b`` (10.0.9.2) on one link, no router: for adapter tests that need two
    kernels and nothing in between."""
    subnet = IPv4Network("10.0.9.0/30")
    return Topology((Node("a", "host"), Node("b", "host")), (_p2p("a", "eth0", "b", "eth0", subnet),))
