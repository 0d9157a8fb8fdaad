"""NAT profiles as data: the ground truth a lab NAT reproduces, and the rules that reproduce it.

Each profile states its behaviour in RFC 4787 / RFC 5382 terms (mapping, filtering, port allocation) plus
how the box reacts to an unsolicited inbound SYN, and renders the ``iptables-restore`` text that makes a
Linux namespace behave that way. The text is applied atomically inside the NAT's own namespace (the
nf_tables backend of iptables is per network namespace), so no rule ever touches the host.

Why the filter table looks the way it does:

* ``FORWARD -m conntrack --ctstate INVALID -j DROP`` comes first. conntrack marks some packets INVALID, e.g.
  an original-direction SYN-ACK while the entry is still SYN_SENT (a crafted handshake sent too early). The
  NAT hooks only see packets that have a valid conntrack entry, so an INVALID packet is *not* translated and
  would be forwarded with its private source address. Real routers drop such packets; so must the lab, or a
  punch that only works because a private address leaked into the "internet" would pass the tests.
* ``ESTABLISHED,RELATED`` is accepted, and NEW only from the LAN to the WAN: that, with MASQUERADE, is
  endpoint-independent mapping with address-and-port-dependent filtering (the reply tuple of the conntrack
  entry is the only thing let back in; ICMP errors about it arrive as RELATED).
* An unsolicited SYN to the NAT's public address matches no conntrack entry, is not de-NATed and is
  delivered to the router's own stack (INPUT). A bare Linux router answers it with a RST because nothing
  listens there (``unsolicited_syn="rst"``); a stealthier box drops NEW/INVALID on INPUT from the WAN
  (``"drop"``).

The shape is open for more profiles: new values of the ground-truth fields are added to the ``*_VALUES``
tuples and to the renderer (or, for behaviour netfilter cannot express such as sequential allocation or
address-dependent mapping, to a userspace NAT backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Mapping = Literal["endpoint-independent", "address-dependent", "address-and-port-dependent"]
Filtering = Literal["endpoint-independent", "address-dependent", "address-and-port-dependent"]
Allocation = Literal["port-preserving", "sequential", "random"]
UnsolicitedSyn = Literal["drop", "rst", "icmp"]

MAPPING_VALUES: tuple[str, ...] = get_args(Mapping)
FILTERING_VALUES: tuple[str, ...] = get_args(Filtering)
ALLOCATION_VALUES: tuple[str, ...] = get_args(Allocation)
UNSOLICITED_SYN_VALUES: tuple[str, ...] = get_args(UnsolicitedSyn)

#: Every rule the lab installs carries a comment starting with this tag, so a rule in a listing can be
#: traced back to the lab.
COMMENT_TAG = "rawpunch-lab"

_TABLE_CHAINS: dict[str, tuple[str, ...]] = {
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
}


def _rule(spec: str, comment: str) -> str:
    """One ``-A`` line of iptables-restore input with the lab's comment tag."""
    if '"' in comment:
        raise ValueError(f"iptables comment must not contain a double quote: {comment!r}")
    matches, target = spec.rsplit(" -j ", 1)
    return f'-A {matches} -m comment --comment "{COMMENT_TAG} {comment}" -j {target}'


def _table(name: str, rules: list[str], policies: dict[str, str] | None = None) -> list[str]:
    """A complete table block; iptables-restore (without --noflush) replaces the table's chains atomically."""
    policies = policies or {}
    lines = [f"*{name}"]
    lines += [f":{chain} {policies.get(chain, 'ACCEPT')} [0:0]" for chain in _TABLE_CHAINS[name]]
    return [*lines, *rules, "COMMIT"]


@dataclass(frozen=True)
class NatProfile:
    """A NAT's behaviour (ground truth in RFC 4787/5382 terms) and how the lab reproduces it."""

    name: str
    description: str
    mapping: Mapping
    filtering: Filtering
    allocation: Allocation
    unsolicited_syn: UnsolicitedSyn

    def __post_init__(self) -> None:
        # Literal types are not enforced at run time; a typo here would silently become a different NAT.
        for field, value, allowed in (
            ("mapping", self.mapping, MAPPING_VALUES),
            ("filtering", self.filtering, FILTERING_VALUES),
            ("allocation", self.allocation, ALLOCATION_VALUES),
            ("unsolicited_syn", self.unsolicited_syn, UNSOLICITED_SYN_VALUES),
        ):
            if value not in allowed:
                raise ValueError(f"NAT profile {self.name!r}: {field}={value!r} is not one of {allowed}")

    def ground_truth(self) -> dict[str, str]:
        """The profile as plain data (what ``rawpunch lab list --json`` prints)."""
        return {
            "name": self.name,
            "description": self.description,
            "mapping": self.mapping,
            "filtering": self.filtering,
            "allocation": self.allocation,
            "unsolicited_syn": self.unsolicited_syn,
        }

    def iptables_restore(self, lan: str = "lan", wan: str = "wan") -> str:
        """The ``iptables-restore`` input that makes a namespace with interfaces *lan*/*wan* this NAT.

        Raises NotImplementedError for ground truth netfilter cannot express (a userspace NAT is needed
        there).
        """
        self._check_netfilter_expressible()
        tag = self.name
        nat_rules = [_rule(f"POSTROUTING -o {wan} -j MASQUERADE", f"{tag}: EIM, port-preserving SNAT")]
        filter_rules = [
            # First: an INVALID packet is not NATed and would leave with its private source (see module doc).
            _rule("FORWARD -m conntrack --ctstate INVALID -j DROP", f"{tag}: INVALID is never NATed"),
            _rule(
                "FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                f"{tag}: replies and ICMP errors of known flows (APDF)",
            ),
            _rule(
                f"FORWARD -i {lan} -o {wan} -m conntrack --ctstate NEW -j ACCEPT",
                f"{tag}: new flows only from LAN to WAN",
            ),
        ]
        if self.unsolicited_syn == "drop":
            filter_rules.append(
                _rule(
                    f"INPUT -i {wan} -m conntrack --ctstate NEW,INVALID -j DROP",
                    f"{tag}: silently drop unsolicited inbound",
                )
            )
        # unsolicited_syn == "rst": no INPUT rule; the router's own stack answers a SYN to a closed port
        # with RST.
        lines = _table("nat", nat_rules) + _table("filter", filter_rules, {"FORWARD": "DROP"})
        return "\n".join(lines) + "\n"

    def iptables_undo(self) -> str:
        """``iptables-restore`` input that removes every rule :meth:`iptables_restore` installed.

        Restoring a table without ``--noflush`` replaces it whole, so empty tables with ACCEPT policies are
        exactly the state of a fresh namespace.
        """
        lines: list[str] = []
        for table in ("nat", "filter"):
            lines += _table(table, [])
        return "\n".join(lines) + "\n"

    def _check_netfilter_expressible(self) -> None:
        supported = (
            self.mapping == "endpoint-independent"
            and self.filtering == "address-and-port-dependent"
            and self.allocation == "port-preserving"
            and self.unsolicited_syn in ("drop", "rst")
        )
        if not supported:
            raise NotImplementedError(
                f"NAT profile {self.name!r}: no netfilter rendering for mapping={self.mapping}, "
                f"filtering={self.filtering}, allocation={self.allocation}, "
                f"unsolicited_syn={self.unsolicited_syn}"
            )


def _registry(*profiles: NatProfile) -> dict[str, NatProfile]:
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate NAT profile names: {names}")
    return {p.name: p for p in profiles}


PROFILES: dict[str, NatProfile] = _registry(
    NatProfile(
        name="eim-apdf",
        description=(
            "Linux MASQUERADE: endpoint-independent mapping, address-and-port-dependent filtering, "
            "port-preserving; unsolicited inbound silently dropped"
        ),
        mapping="endpoint-independent",
        filtering="address-and-port-dependent",
        allocation="port-preserving",
        unsolicited_syn="drop",
    ),
    NatProfile(
        name="eim-apdf-rst",
        description=(
            "bare Linux router with MASQUERADE: like eim-apdf, but its own stack answers an unsolicited SYN "
            "with a RST"
        ),
        mapping="endpoint-independent",
        filtering="address-and-port-dependent",
        allocation="port-preserving",
        unsolicited_syn="rst",
    ),
)


def get_profile(name: str) -> NatProfile:
    """The profile called *name*, or a ValueError listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown NAT profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
