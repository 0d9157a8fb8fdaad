"""What ``rawpunch lab up`` builds and what it reports: a validated request (``LabSpec``) and its description.

Pure data, no I/O: the command line becomes a ``LabSpec`` (errors name the option to fix), the spec becomes a
``two_nats`` topology with an optional impairment of the middle core router, and ``describe`` turns the
topology into the JSON-able summary that the supervisor stores in its registry record (registry.py) and that
``lab up`` / ``lab list --running`` print with ``format_lab``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from rawpunch.lab.impair import MAX_DELAY_MS, Impairment
from rawpunch.lab.profiles import PROFILES
from rawpunch.lab.topology import DEFAULT_HOPS, DEFAULT_PROFILE, MAX_HOPS, Topology, two_nats

#: Lab names become run ids, i.e. part of namespace names ``rp-<name>-<node>`` (netns.Lab's rule).
NAME_RE = re.compile(r"^[0-9a-z]{1,12}$")
#: Marks a registry record as a ``lab up`` lab (the other records belong to tests, demos, self-tests).
KIND = "lab-up"


@dataclass(frozen=True)
class LabSpec:
    """A persistent two-NAT lab as asked for on the command line. Loss is in percent, as typed."""

    name: str
    nat_a: str = DEFAULT_PROFILE
    nat_b: str = DEFAULT_PROFILE
    hops: int = DEFAULT_HOPS
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    server: bool = False

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(
                f"--name {self.name!r}: use 1-12 lowercase letters and digits (they become namespace names)"
            )
        for option, profile in (("--nat-a", self.nat_a), ("--nat-b", self.nat_b)):
            if profile not in PROFILES:
                raise ValueError(f"{option} {profile!r}: unknown NAT profile; `rawpunch lab list` shows them")
        if not 1 <= self.hops <= MAX_HOPS:
            raise ValueError(f"--hops {self.hops}: give 1 to {MAX_HOPS} core routers")
        if not 0 <= self.delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"--delay {self.delay_ms:g}: give 0 to {MAX_DELAY_MS:g} ms")
        if not 0 <= self.jitter_ms <= self.delay_ms:
            raise ValueError(
                f"--jitter {self.jitter_ms:g}: give 0 up to the --delay ({self.delay_ms:g} ms); "
                "the delay varies uniformly in delay +- jitter"
            )
        if not 0 <= self.loss_pct < 100:
            raise ValueError(f"--loss {self.loss_pct:g}: give a percentage from 0 to below 100")

    def impairment(self) -> Impairment | None:
        """What the middle core router does to what it forwards, or None for a clean core."""
        imp = Impairment(delay_ms=self.delay_ms, jitter_ms=self.jitter_ms, loss=self.loss_pct / 100)
        return imp if imp.active else None

    def topology(self) -> Topology:
        return two_nats(self.hops, self.nat_a, self.nat_b, impairment=self.impairment())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LabSpec:
        return cls(**json.loads(text))


def describe(spec: LabSpec, topology: Topology, netns: dict[str, str], server: str | None) -> dict[str, Any]:
    """The summary a running lab publishes: spec, nodes with their addresses and namespaces, server."""
    nodes = []
    for node in topology.nodes:
        interfaces = {i.ifname: str(i.address) for i in topology.interfaces(node.name)}
        nodes.append(
            {
                "name": node.name,
                "role": node.role,
                "profile": node.profile,
                "address": str(topology.address(node.name)),
                "interfaces": interfaces,
                "netns": netns[node.name],
                "impairment": str(node.impairment) if node.impairment is not None else None,
            }
        )
    return {"kind": KIND, "name": spec.name, "spec": asdict(spec), "nodes": nodes, "server": server}


def format_lab(info: dict[str, Any], supervisor: str) -> str:
    """Human-readable lines for one lab: header, one line per node, the rendezvous server."""
    spec = info["spec"]
    routers = " -- ".join(n["name"] for n in info["nodes"] if n["role"] == "router")
    lines = [
        f"lab {info['name']} ({supervisor}): a -- nat-a [{spec['nat_a']}] -- {routers} -- "
        f"nat-b [{spec['nat_b']}] -- b"
    ]
    width = max(len(n["name"]) for n in info["nodes"])
    for node in info["nodes"]:
        role = node["role"] + (f" {node['profile']}" if node["profile"] else "")
        addresses = " ".join(f"{ifname}={addr}" for ifname, addr in node["interfaces"].items())
        extra = f"  (impairs: {node['impairment']})" if node["impairment"] else ""
        lines.append(f"  {node['name'].ljust(width)}  {role:<22}  {addresses}{extra}")
    if info["server"]:
        lines.append(f"  rendezvous server: {info['server']} (node server)")
    return "\n".join(lines)
