"""NAT profiles as data: the ground truth a lab NAT reproduces, and the rules that reproduce it.

Theory: what a NAT does to TCP, in RFC 4787 / RFC 5382 terms
-------------------------------------------------------------
A profile states four behaviours, the keys ``rawpunch lab list --json`` prints:

* **mapping** (RFC 4787 section 4.1): which public endpoint a LAN endpoint ``X:x`` gets for a flow to a remote
  ``Y:y``. *Endpoint-independent* (EIM): one public endpoint for every remote, as RFC 4787 REQ-1 and RFC 5382
  REQ-1 demand. *Address-dependent* (ADM): a new one per remote address. *Address-and-port-dependent* (APDM,
  "symmetric"): a new one per remote endpoint.
* **filtering** (RFC 4787 section 5): what may come in through an existing mapping. *Endpoint-independent*
  (EIF, "full cone"): anyone. *Address-dependent* (ADF): any port of an address the LAN endpoint has sent to.
  *Address-and-port-dependent* (APDF): only the remote endpoints it has sent to -- that is exactly what
  conntrack's reply tuple admits. RFC 4787 REQ-8 and RFC 5382 REQ-3 recommend EIF (or ADF for stricter
  security); RFC 6888 REQ-7 recommends EIF for carrier-grade NATs.
* **allocation** (RFC 4787 section 4.2): which public port a new mapping gets. *port-preserving*: the LAN port
  when it is free (Linux since 4.19 keeps it and otherwise searches from a random offset); *sequential*: the
  next port after the last one handed out; *random*: a fresh random port per mapping.
* **unsolicited_syn** (RFC 5382 section 4.3): what the box does with a SYN for which no mapping admits it.
  RFC 5382 REQ-4 says: stay silent for at least 6 s, then answer ICMP port unreachable (type 3, code 3); many
  boxes drop it (``drop``), answer at once with a RST from their own stack (``rst``, a bare Linux router: its
  stack has no socket on that port) or at once with ICMP (``icmp``). ``forward`` is the no-NAT case: the SYN
  is routed to the host, which answers for itself.

And flags: ``hairpin`` (RFC 4787 REQ-9, RFC 5382 REQ-8: a LAN host reaching another LAN endpoint through
its public endpoint, with the "external source IP address and port" of RFC 5382 REQ-8a); ``nat`` (False: no
translation at all, an open router or a stateful firewall); ``port_overloading`` (RFC 4787 section 4.2.2:
two LAN endpoints may hold the same public port towards different remotes; RFC 4787 REQ-3 / RFC 5382 REQ-7
forbid it, Linux does it whenever it preserves a port, since only the reply tuple must be unique);
``backend`` (who implements it, below); ``layers`` (a double NAT: the profiles of the home router and of
the carrier-grade NAT in front of it).

Which box implements a profile: netfilter where it can, a userspace NAT where it cannot
--------------------------------------------------------------------------------------
**netfilter** (``iptables-restore`` text, applied atomically inside the NAT's own namespace: the nf_tables
backend of iptables is per network namespace, so no rule ever touches the host):

* ``FORWARD -m conntrack --ctstate INVALID -j DROP`` comes first. conntrack marks some packets INVALID, e.g.
  an original-direction SYN-ACK while the entry is still SYN_SENT. The NAT hooks only see packets with a
  valid conntrack entry, so an INVALID packet is *not* translated and would be forwarded with its private
  source address. Real routers drop such packets; so must the lab.
* ``ESTABLISHED,RELATED`` is accepted, NEW only from the LAN to the WAN: with MASQUERADE that is EIM with
  APDF (the reply tuple of the conntrack entry is the only thing let back in; ICMP errors about it arrive as
  RELATED).
* Mapping and allocation come from how Linux picks the source (``nf_nat_core.c``, ``get_unique_tuple``):
  plain ``MASQUERADE`` keeps the LAN port when the reply tuple is free: EIM, port-preserving.
  ``MASQUERADE --to-ports 61000-65535`` (a range that holds no LAN port: Linux's ephemeral ports end at
  60999) cannot keep the port, so Linux reuses the NAT source of an existing entry of the same LAN endpoint
  (``find_appropriate_src``): EIM, and a random port for the first flow. ``--random-fully`` skips both: a new
  random port per connection, APDM.
* An unsolicited SYN to the NAT's public address matches no conntrack entry, is not de-NATed and is delivered
  to the router's own stack (INPUT). A bare Linux router answers it with a RST because nothing listens there
  (``rst``); ``drop`` adds ``INPUT -i wan --ctstate NEW,INVALID -j DROP``; ``icmp`` adds a ``REJECT
  --reject-with icmp-port-unreachable`` for TCP (a RST is never answered, so those are dropped).

**userspace** (``rawpunch.lab.usernat``): netfilter cannot express sequential allocation, address-dependent
mapping, or endpoint-independent / address-dependent filtering. For the filtering there is no match for
"some conntrack entry has reply destination port P", so a DNAT rule can only forward *every* port to one host
(a DMZ host, not EIF) or approximate mappings with set elements whose timeouts are not the mapping's
lifetime, and with several LAN hosts sharing a port (Linux's port overloading) there is no single host to
forward to. Those profiles are run by an NFQUEUE program in the NAT's namespace that drives the pure NAT
model (``rawpunch.punch.natmodel``), the same code the unit tests pump segments through: raw-table
``CT --notrack`` keeps the kernel's conntrack and NAT away from TCP, every TCP segment (and every ICMP
error from the WAN) goes to the queue (``--queue-bypass``), and the program rewrites, answers or drops it.
What it accepts carries a firewall mark; FORWARD accepts TCP only with that mark, so if the program dies
untranslated TCP is dropped, never leaked. UDP and ICMP queries still use the kernel's MASQUERADE.

The shape is open: a new ground-truth value goes into the ``*_VALUES`` tuples, the renderer (or the model)
and the self-test's classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

#: RFC 4787's three degrees of dependence on the remote endpoint, for mapping and for filtering alike.
Dependence = Literal["endpoint-independent", "address-dependent", "address-and-port-dependent"]
Mapping = Dependence
Filtering = Dependence
Allocation = Literal["port-preserving", "sequential", "random"]
UnsolicitedSyn = Literal["drop", "rst", "icmp", "forward"]
Backend = Literal["netfilter", "userspace", "layers"]

MAPPING_VALUES: tuple[str, ...] = get_args(Mapping)
FILTERING_VALUES: tuple[str, ...] = get_args(Filtering)
ALLOCATION_VALUES: tuple[str, ...] = get_args(Allocation)
UNSOLICITED_SYN_VALUES: tuple[str, ...] = get_args(UnsolicitedSyn)
BACKEND_VALUES: tuple[str, ...] = get_args(Backend)
#: The ground-truth keys every profile has (``rawpunch lab list --json``), behaviours first, then flags.
GROUND_TRUTH_KEYS = (
    "mapping",
    "filtering",
    "allocation",
    "unsolicited_syn",
    "hairpin",
    "nat",
    "port_overloading",
)

#: Every rule the lab installs carries a comment starting with this tag, so a rule in a listing can be
#: traced back to the lab.
COMMENT_TAG = "rawpunch-lab"
#: The NFQUEUE number the userspace NAT binds in its NAT's namespace (queue numbers are per namespace).
USERNAT_QUEUE = 0x5300
#: The firewall mark the userspace NAT puts on every packet it translated and accepted.
USERNAT_MARK = 0x52504E  # "RPN"
#: ``--to-ports`` for EIM with non-preserving allocation: above Linux's ephemeral range (32768-60999), so
#: no LAN port is ever in it and Linux never keeps one.
NONPRESERVING_PORTS = (61000, 65535)

_TABLE_CHAINS: dict[str, tuple[str, ...]] = {
    "raw": ("PREROUTING", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
}
_DEPENDENCE: tuple[Dependence, ...] = get_args(Dependence)


def iptables_rule(spec: str, comment: str) -> str:
    """One ``-A`` line of iptables-restore input with the lab's comment tag."""
    if '"' in comment:
        raise ValueError(f"iptables comment must not contain a double quote: {comment!r}")
    matches, target = spec.rsplit(" -j ", 1)
    return f'-A {matches} -m comment --comment "{COMMENT_TAG} {comment}" -j {target}'


def iptables_table(name: str, rules: list[str], policies: dict[str, str] | None = None) -> list[str]:
    """A complete table block; iptables-restore (without --noflush) replaces the table's chains atomically."""
    policies = policies or {}
    lines = [f"*{name}"]
    lines += [f":{chain} {policies.get(chain, 'ACCEPT')} [0:0]" for chain in _TABLE_CHAINS[name]]
    return [*lines, *rules, "COMMIT"]


def iptables_empty(*tables: str) -> str:
    """``iptables-restore`` input that empties *tables* (ACCEPT policies): a fresh namespace's state."""
    lines: list[str] = []
    for table in tables:
        lines += iptables_table(table, [])
    return "\n".join(lines) + "\n"


def _check_value(profile: str, key: str, value: object, allowed: tuple[str, ...]) -> None:
    # Literal types are not enforced at run time; a typo here would silently become a different NAT.
    if value not in allowed:
        raise ValueError(f"NAT profile {profile!r}: {key}={value!r} is not one of {allowed}")


@dataclass(frozen=True)
class NatProfile:
    """A NAT's behaviour (ground truth in RFC 4787/5382 terms) and how the lab reproduces it.

    ``port_overloading`` describes Linux's port preservation and is normalised to False for the other
    allocations (the lab's sequential and random allocators give each public port to one LAN endpoint).
    """

    name: str
    description: str
    mapping: Mapping
    filtering: Filtering
    allocation: Allocation
    unsolicited_syn: UnsolicitedSyn
    hairpin: bool = False
    nat: bool = True
    backend: Backend = "netfilter"
    port_overloading: bool = True
    layers: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for key, allowed in (
            ("mapping", MAPPING_VALUES),
            ("filtering", FILTERING_VALUES),
            ("allocation", ALLOCATION_VALUES),
            ("unsolicited_syn", UNSOLICITED_SYN_VALUES),
            ("backend", BACKEND_VALUES),
        ):
            _check_value(self.name, key, getattr(self, key), allowed)
        object.__setattr__(
            self, "port_overloading", self.port_overloading and self.allocation == "port-preserving"
        )
        self._check_consistent()

    def _check_consistent(self) -> None:
        problem = ""
        if not self.nat and (self.mapping, self.allocation) != ("endpoint-independent", "port-preserving"):
            problem = "without NAT the public endpoint is the private one: EIM, port-preserving"
        elif not self.nat and self.hairpin:
            problem = "hairpinning needs a NAT"
        elif (self.unsolicited_syn == "forward") != (
            not self.nat and self.filtering == "endpoint-independent"
        ):
            problem = (
                "unsolicited_syn='forward' is the open router's (no NAT, endpoint-independent filtering)"
            )
        elif (self.backend == "layers") != bool(self.layers):
            problem = "layers and backend='layers' go together"
        if problem:
            raise ValueError(f"NAT profile {self.name!r}: {problem}")

    def ground_truth(self) -> dict[str, Any]:
        """The profile as plain data (what ``rawpunch lab list --json`` prints)."""
        data: dict[str, Any] = {"name": self.name, "description": self.description}
        data.update({key: getattr(self, key) for key in GROUND_TRUTH_KEYS})
        data["backend"] = self.backend
        data["layers"] = list(self.layers)
        return data

    # --- rendering ---------------------------------------------------------------------------------------

    def iptables_restore(self, lan: str = "lan", wan: str = "wan") -> str:
        """The ``iptables-restore`` input that makes a namespace with interfaces *lan*/*wan* this NAT.

        For a userspace profile these are the rules that steer TCP to the userspace NAT (which must be bound
        to ``USERNAT_QUEUE`` first). Raises NotImplementedError for ground truth neither can express.
        """
        if self.backend == "layers":
            raise NotImplementedError(
                f"NAT profile {self.name!r} is a double NAT: each layer ({', '.join(self.layers)}) is a node"
            )
        if self.backend == "userspace":
            lines = _userspace_tables(self.name, lan, wan)
        elif self.nat:
            lines = self._masquerade_tables(lan, wan)
        else:
            lines = self._router_tables(lan, wan)
        return "\n".join(lines) + "\n"

    def iptables_undo(self) -> str:
        """``iptables-restore`` input that removes every rule :meth:`iptables_restore` installed.

        Restoring a table without ``--noflush`` replaces it whole, so empty tables with ACCEPT policies are
        exactly the state of a fresh namespace.
        """
        return iptables_empty("raw", "nat", "filter")

    def _masquerade_tables(self, lan: str, wan: str) -> list[str]:
        tag = self.name
        nat_rules = _masquerade_rules(self, wan)
        if self.filtering != "address-and-port-dependent":
            raise NotImplementedError(f"NAT profile {tag!r}: netfilter filters by conntrack (APDF) only")
        filter_rules = _stateful_forward(tag, lan, wan) + _unsolicited_input(tag, wan, self.unsolicited_syn)
        return iptables_table("nat", nat_rules) + iptables_table("filter", filter_rules, {"FORWARD": "DROP"})

    def _router_tables(self, lan: str, wan: str) -> list[str]:
        """No translation: an open router (no rules at all) or a stateful firewall."""
        tag = self.name
        if self.filtering == "endpoint-independent":
            return iptables_table("filter", [])
        if self.filtering != "address-and-port-dependent":
            raise NotImplementedError(f"NAT profile {tag!r}: a firewall filters by conntrack (APDF) only")
        rules = _stateful_forward(tag, lan, wan)
        if self.unsolicited_syn == "rst":
            rules.append(
                iptables_rule(f"FORWARD -i {wan} -p tcp -j REJECT --reject-with tcp-reset", f"{tag}: RST")
            )
        elif self.unsolicited_syn == "icmp":
            reject = "REJECT --reject-with icmp-port-unreachable"
            rules.append(
                iptables_rule(f"FORWARD -i {wan} -p tcp -j {reject}", f"{tag}: ICMP port unreachable")
            )
        rules += _unsolicited_input(tag, wan, "drop")  # the firewall's own address stays silent
        return iptables_table("filter", rules, {"FORWARD": "DROP"})

    def _mapping_note(self) -> str:
        return f"{_abbrev(self.mapping)}M, {self.allocation} SNAT"


def _abbrev(behaviour: str) -> str:
    return {"endpoint-independent": "EI", "address-dependent": "AD", "address-and-port-dependent": "APD"}[
        behaviour
    ]


def _masquerade_rules(profile: NatProfile, wan: str) -> list[str]:
    """MASQUERADE for the (mapping, allocation) Linux can do; see the module docstring."""
    key, tag = (profile.mapping, profile.allocation), profile.name
    note = f"{tag}: {profile._mapping_note()}"
    if key == ("endpoint-independent", "port-preserving"):
        return [iptables_rule(f"POSTROUTING -o {wan} -j MASQUERADE", note)]
    if key == ("endpoint-independent", "random"):
        # --to-ports needs a protocol with ports; ICMP queries keep plain MASQUERADE.
        ports = f"{NONPRESERVING_PORTS[0]}-{NONPRESERVING_PORTS[1]}"
        with_ports = f"-j MASQUERADE --to-ports {ports}"
        return [
            *(iptables_rule(f"POSTROUTING -o {wan} -p {p} {with_ports}", note) for p in ("tcp", "udp")),
            iptables_rule(f"POSTROUTING -o {wan} -j MASQUERADE", f"{tag}: everything else"),
        ]
    if key == ("address-and-port-dependent", "random"):
        return [iptables_rule(f"POSTROUTING -o {wan} -j MASQUERADE --random-fully", note)]
    raise NotImplementedError(
        f"NAT profile {profile.name!r}: no netfilter rendering for mapping={profile.mapping}, "
        f"allocation={profile.allocation} (use backend='userspace')"
    )


def _stateful_forward(tag: str, lan: str, wan: str, what: str = "(APDF)") -> list[str]:
    return [
        # First: an INVALID packet is not NATed and would leave with its private source (see module doc).
        iptables_rule("FORWARD -m conntrack --ctstate INVALID -j DROP", f"{tag}: INVALID is never NATed"),
        iptables_rule(
            "FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"{tag}: replies and ICMP errors of known flows {what}",
        ),
        iptables_rule(
            f"FORWARD -i {lan} -o {wan} -m conntrack --ctstate NEW -j ACCEPT", f"{tag}: new flows LAN to WAN"
        ),
    ]


def _unsolicited_input(tag: str, wan: str, reaction: str) -> list[str]:
    """INPUT rules for what reaches the box's own public address unsolicited (``rst``: none, the stack)."""
    unsolicited = "-m conntrack --ctstate NEW,INVALID"
    if reaction == "drop":
        return [
            iptables_rule(
                f"INPUT -i {wan} {unsolicited} -j DROP", f"{tag}: silently drop unsolicited inbound"
            )
        ]
    if reaction == "icmp":
        return [
            iptables_rule(
                f"INPUT -i {wan} -p tcp ! --tcp-flags RST RST {unsolicited} "
                "-j REJECT --reject-with icmp-port-unreachable",
                f"{tag}: ICMP port unreachable for unsolicited TCP",
            ),
            iptables_rule(f"INPUT -i {wan} -p tcp {unsolicited} -j DROP", f"{tag}: a RST is never answered"),
        ]
    return []


def _userspace_tables(tag: str, lan: str, wan: str) -> list[str]:
    """Steer TCP (and ICMP errors from the WAN) through the userspace NAT; see the module docstring."""
    queue = f"NFQUEUE --queue-num {USERNAT_QUEUE} --queue-bypass"
    raw = [
        iptables_rule(
            "PREROUTING -p tcp -j CT --notrack", f"{tag}: TCP is the userspace NAT's, not conntrack's"
        ),
        iptables_rule(f"PREROUTING -p tcp -j {queue}", f"{tag}: every TCP segment through the userspace NAT"),
        iptables_rule(
            f"PREROUTING -i {wan} -p icmp --icmp-type destination-unreachable -j {queue}",
            f"{tag}: ICMP errors about its flows",
        ),
        iptables_rule(
            f"PREROUTING -i {wan} -p icmp --icmp-type time-exceeded -j {queue}",
            f"{tag}: ICMP errors about its flows",
        ),
        iptables_rule("OUTPUT -p tcp -j CT --notrack", f"{tag}: the userspace NAT's own answers"),
    ]
    mark = f"-m mark --mark {USERNAT_MARK:#x}"
    forward = [
        iptables_rule(f"FORWARD {mark} -j ACCEPT", f"{tag}: translated by the userspace NAT"),
        iptables_rule("FORWARD -p tcp -j DROP", f"{tag}: untranslated TCP never leaves (userspace NAT down)"),
        *_stateful_forward(tag, lan, wan, "(non-TCP)"),  # UDP and ICMP queries: the kernel's MASQUERADE
    ]
    nat = [iptables_rule(f"POSTROUTING -o {wan} ! -p tcp -j MASQUERADE", f"{tag}: non-TCP by the kernel")]
    return (
        iptables_table("raw", raw)
        + iptables_table("nat", nat)
        + iptables_table("filter", forward, {"FORWARD": "DROP"})
    )


# --- composition: a double NAT ------------------------------------------------------------------------------


def compose(inner: NatProfile, outer: NatProfile, name: str, description: str) -> NatProfile:
    """The ground truth of *inner* (a home router) behind *outer* (e.g. a carrier-grade NAT), as seen from
    the internet by a host behind both.

    Mapping and filtering: the more dependent of the two (a flow needs both mappings, an inbound packet
    must pass both filters; the inner one sees the same remote as the outer one). Allocation: the outer
    one's unless it preserves ports, then the inner one's choice survives. An unsolicited SYN meets the
    outer NAT first. Hairpinning: the outer NAT turns the packet round, and the inner one lets it in only
    if it filters endpoint-independently (the hairpinned source was never contacted through that mapping).
    """
    if not (inner.nat and outer.nat):
        raise ValueError("compose: both layers must translate")
    return NatProfile(
        name=name,
        description=description,
        mapping=_more_dependent(inner.mapping, outer.mapping),
        filtering=_more_dependent(inner.filtering, outer.filtering),
        allocation=inner.allocation if outer.allocation == "port-preserving" else outer.allocation,
        unsolicited_syn=outer.unsolicited_syn,
        hairpin=outer.hairpin and inner.filtering == "endpoint-independent",
        port_overloading=inner.port_overloading or outer.port_overloading,
        backend="layers",
        layers=(inner.name, outer.name),
    )


def compose_chain(chain: list[NatProfile]) -> NatProfile:
    """The profile a host sees through *chain* (innermost first): the one NAT, or their composition."""
    if not chain:
        raise ValueError("compose_chain: no NAT on the path")
    result = chain[0]
    for outer in chain[1:]:
        result = compose(result, outer, f"{result.name}+{outer.name}", f"{result.name} behind {outer.name}")
    return result


def _more_dependent(a: Dependence, b: Dependence) -> Dependence:
    return max(a, b, key=_DEPENDENCE.index)


# --- the registry -------------------------------------------------------------------------------------------


def _registry(*profiles: NatProfile) -> dict[str, NatProfile]:
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate NAT profile names: {names}")
    for p in profiles:
        missing = [layer for layer in p.layers if layer not in names]
        if missing:
            raise ValueError(f"NAT profile {p.name!r}: unknown layers {missing}")
    return {p.name: p for p in profiles}


_EIM: Dependence = "endpoint-independent"
_ADM: Dependence = "address-dependent"
_APDM: Dependence = "address-and-port-dependent"
_LINUX = NatProfile(
    name="eim-apdf",
    description=(
        "Linux MASQUERADE: endpoint-independent mapping, address-and-port-dependent filtering, "
        "port-preserving; unsolicited inbound silently dropped"
    ),
    mapping=_EIM,
    filtering=_APDM,
    allocation="port-preserving",
    unsolicited_syn="drop",
)
_CGN = replace(
    _LINUX,
    name="eim-apdf-random",
    description=(
        "Linux MASQUERADE --to-ports 61000-65535: endpoint-independent mapping (the first flow's source is "
        "reused), a random public port (non-preserving); unsolicited inbound dropped"
    ),
    allocation="random",
)

PROFILES: dict[str, NatProfile] = _registry(
    NatProfile(
        name="open",
        description="no NAT, no firewall: a plain router in front of a publicly addressed host",
        mapping=_EIM,
        filtering=_EIM,
        allocation="port-preserving",
        unsolicited_syn="forward",
        nat=False,
    ),
    NatProfile(
        name="firewall",
        description=(
            "stateful firewall without NAT (publicly addressed host): only replies of flows the host opened "
            "come in; everything else is dropped"
        ),
        mapping=_EIM,
        filtering=_APDM,
        allocation="port-preserving",
        unsolicited_syn="drop",
        nat=False,
    ),
    NatProfile(
        name="eim-eif",
        description=(
            "full cone (userspace NAT): endpoint-independent mapping and filtering, port-preserving, "
            "hairpinning with the external source (RFC 5382 REQ-8a); unsolicited SYNs dropped"
        ),
        mapping=_EIM,
        filtering=_EIM,
        allocation="port-preserving",
        unsolicited_syn="drop",
        hairpin=True,
        backend="userspace",
        port_overloading=False,
    ),
    NatProfile(
        name="eim-adf",
        description=(
            "restricted cone (userspace NAT): endpoint-independent mapping, address-dependent filtering, "
            "port-preserving, no hairpinning; unsolicited SYNs dropped"
        ),
        mapping=_EIM,
        filtering=_ADM,
        allocation="port-preserving",
        unsolicited_syn="drop",
        backend="userspace",
        port_overloading=False,
    ),
    _LINUX,
    replace(
        _LINUX,
        name="eim-apdf-rst",
        description=(
            "bare Linux router with MASQUERADE: like eim-apdf, but its own stack answers an unsolicited SYN "
            "with a RST"
        ),
        unsolicited_syn="rst",
    ),
    replace(
        _LINUX,
        name="eim-apdf-icmp",
        description=(
            "Linux MASQUERADE answering an unsolicited SYN at once with ICMP port unreachable "
            "(RFC 5382 REQ-4 asks for that only after 6 s)"
        ),
        unsolicited_syn="icmp",
    ),
    _CGN,
    NatProfile(
        name="apdm-random",
        description=(
            "symmetric NAT, Linux MASQUERADE --random-fully: a new random public port per connection "
            "(address-and-port-dependent mapping), APDF; unsolicited inbound dropped"
        ),
        mapping=_APDM,
        filtering=_APDM,
        allocation="random",
        unsolicited_syn="drop",
    ),
    NatProfile(
        name="apdm-sequential",
        description=(
            "symmetric NAT with sequential ports (userspace NAT): each new mapping gets the next port; "
            "APDF; unsolicited SYNs answered with RST"
        ),
        mapping=_APDM,
        filtering=_APDM,
        allocation="sequential",
        unsolicited_syn="rst",
        backend="userspace",
    ),
    NatProfile(
        name="adm-adf-sequential",
        description=(
            "address-dependent mapping and filtering with sequential ports (userspace NAT); unsolicited "
            "SYNs answered with ICMP port unreachable"
        ),
        mapping=_ADM,
        filtering=_ADM,
        allocation="sequential",
        unsolicited_syn="icmp",
        backend="userspace",
    ),
    compose(
        _LINUX,
        _CGN,
        name="double-nat",
        description=(
            "double NAT: a Linux home router (10.0.x) behind a carrier-grade NAT in 100.64.0.0/10 "
            "(RFC 6598) that maps endpoint-independently to random ports"
        ),
    ),
)


def get_profile(name: str) -> NatProfile:
    """The profile called *name*, or a ValueError listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown NAT profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
