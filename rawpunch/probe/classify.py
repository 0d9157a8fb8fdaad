"""The probe's classifier: observations in, ``NatBehaviour`` out. Pure; no sockets, no clock.

What each observation is, and why it decides the axis (RFC 4787 sections 4-5, RFC 5382)
--------------------------------------------------------------------------------------
The host behind the NAT talks to a server with two addresses (main, alt) and two TCP ports (P, P2):

* **mapping** (RFC 4787 section 4.1, RFC 5382 REQ-1): one local port connects to main:P, main:P2 and
  alt:P; the server reports the public endpoint of each. All equal: endpoint-independent. Equal for the
  same address only: address-dependent. All different: address-and-port-dependent.
* **allocation** (RFC 4787 section 4.2.1): new mappings from local ports given in a non-monotonic order;
  public = local: port-preserving; a constant step between consecutive public ports, whatever the local
  ones: sequential (with that delta); anything else: random.
* **filtering** (RFC 4787 section 5, RFC 5382 REQ-3): through a mapping that only talked to main:P2 the
  server sends SYNs from main:P (same address, other port) and alt:P2 (other address). Both reach the host:
  endpoint-independent; main:P only: address-dependent; neither: address-and-port-dependent.
* **unsolicited_syn** (RFC 5382 REQ-4): a SYN from the server to a port of the host's
  public address that no mapping holds. It reaches the host: ``forward`` (no NAT); the server got a RST:
  ``rst``; an ICMP destination unreachable: ``icmp``; nothing: ``drop``. Only the immediate answer is
  seen: RFC 5382 REQ-4 allows ICMP after 6 s, which a probe that finishes in 5 s cannot wait for.
* **simultaneous_open** (RFC 5382 REQ-2, RFC 9293 section 3.5): the host sends a SYN whose TTL dies one
  hop past its NAT (it opens the mapping but never reaches the server), then the server sends a SYN from
  that very endpoint to the mapping. It must reach the host. Meaningful only when the new flow reuses a
  known mapping, i.e. for endpoint-independent and address-dependent mapping.
* **hops_to_nat / priming_ttl**: the UDP traceroute of ``rawpunch.punch.pathprobe``.
* **hairpin** (RFC 4787 REQ-9, RFC 5382 REQ-8): a SYN from the host to its own public endpoint comes back
  to it; with the public address as source (REQ-8a, "external source") it counts.

"Did not arrive" is decided by a barrier, never by waiting: after the probe SYNs the client sends a byte
over a held connection through the same NAT and reads the echo; a NAT handles a path's packets in order,
so whatever the probe SYNs caused has happened when the echo is back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from rawpunch.probe.result import UNKNOWN, NatBehaviour
from rawpunch.proto.codec import Endpoint, Reaction
from rawpunch.punch.pathprobe import nat_hop

EIM, ADM, APDM = "endpoint-independent", "address-dependent", "address-and-port-dependent"
PASS, FAIL = "pass", "fail"


@dataclass(frozen=True)
class Observations:
    """Everything the probe adapter saw; None wherever a step could not run."""

    local_address: str
    public_address: str | None = None
    mapping_seen: tuple[Endpoint, Endpoint, Endpoint] | None = None
    """Public endpoints of one local port seen by main:P, main:P2 and alt:P."""
    allocation_local: tuple[int, ...] = ()
    allocation_public: tuple[int, ...] = ()
    filter_same_address: bool | None = None
    filter_other_address: bool | None = None
    unsolicited_reached_host: bool | None = None
    reaction: Reaction | None = None
    simultaneous_open: bool | None = None
    offenders: dict[int, str] = field(default_factory=dict)
    hairpin_sources: tuple[str, ...] | None = None
    """Source addresses of the SYNs that came back from our own public endpoint."""
    timers: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def classify_mapping(seen: tuple[Endpoint, Endpoint, Endpoint] | None) -> str:
    if seen is None:
        return UNKNOWN
    same_port, other_port, other_address = seen
    if same_port == other_port == other_address:
        return EIM
    if same_port == other_port:
        return ADM
    if other_address not in (same_port, other_port):
        return APDM
    return UNKNOWN  # alt equal to one of two different main-address mappings: no RFC 4787 behaviour


def classify_allocation(local: tuple[int, ...], public: tuple[int, ...]) -> tuple[str, int | None]:
    """(allocation, delta for sequential) from the public ports of new mappings, in creation order."""
    if len(public) < 3 or len(public) != len(local):
        return UNKNOWN, None
    if public == local:
        return "port-preserving", None
    deltas = {b - a for a, b in itertools.pairwise(public)}
    if len(deltas) == 1 and 0 < abs(delta := deltas.pop()) <= 64:
        return "sequential", delta
    return "random", None


def classify_filtering(same_address: bool | None, other_address: bool | None) -> str:
    if same_address is None or other_address is None:
        return UNKNOWN
    if same_address and other_address:
        return EIM
    if same_address:
        return ADM
    if not other_address:
        return APDM
    return UNKNOWN  # another address passes but another port of the same one does not: inconsistent


def classify_unsolicited(reached_host: bool | None, reaction: Reaction | None) -> str:
    if reached_host:
        return "forward"
    if reached_host is None or reaction is None:
        return UNKNOWN
    return {Reaction.NONE: "drop", Reaction.RST: "rst", Reaction.ICMP: "icmp"}[reaction]


def classify_hairpin(sources: tuple[str, ...] | None, public_ip: str | None, nat: bool | None) -> bool | None:
    if not nat or sources is None or public_ip is None:
        return None  # without a NAT there is nothing to hairpin
    return public_ip in sources


def priming(offenders: dict[int, str]) -> tuple[int | None, int]:
    """(hops to the outermost NAT or None, the priming TTL: one past it, 2 without a NAT)."""
    hop = nat_hop(offenders)
    return hop, (hop + 1 if hop is not None else 2)


def classify(obs: Observations) -> NatBehaviour:
    nat = None if obs.public_address is None else obs.public_address != obs.local_address
    mapping = classify_mapping(obs.mapping_seen)
    allocation, delta = classify_allocation(obs.allocation_local, obs.allocation_public)
    if nat is False:
        allocation, delta = "port-preserving", None  # the public endpoint is the host's own
    hops, ttl = priming(obs.offenders)
    simultaneous = obs.simultaneous_open if mapping in (EIM, ADM) else None
    hairpin = classify_hairpin(obs.hairpin_sources, obs.public_address, nat)
    behaviour = NatBehaviour(
        mapping=mapping,
        filtering=classify_filtering(obs.filter_same_address, obs.filter_other_address),
        allocation=allocation,
        allocation_delta=delta,
        unsolicited_syn=classify_unsolicited(obs.unsolicited_reached_host, obs.reaction),
        simultaneous_open=simultaneous,
        hops_to_nat=hops,
        priming_ttl=ttl,
        hairpin=hairpin,
        nat=nat,
    )
    extra: dict[str, Any] = {
        "rfc5382": rfc5382_checklist(behaviour, obs),
        "observations": _evidence(obs),
    }
    if obs.timers:
        extra["timers"] = dict(obs.timers)
    if obs.notes:
        extra["notes"] = list(obs.notes)
    return replace(behaviour, extra=extra)


# --- RFC 5382 section 8: the requirements, and what the probe can say about each --------------------------

REQUIREMENTS: tuple[tuple[str, str], ...] = (
    ("REQ-1", "endpoint-independent mapping"),
    ("REQ-2", "simultaneous open (SYN out, SYN in) accepted"),
    ("REQ-3", "endpoint-independent filtering recommended, address-dependent if stricter (SHOULD)"),
    ("REQ-4", "no answer to an unsolicited SYN for at least 6 s"),
    ("REQ-5", "idle timeouts of at least 2 h 4 min established, 4 min transitory (SYN_SENT, closing)"),
    ("REQ-6", "ALGs that affect TCP (except FTP's) disabled by default (SHOULD)"),
    ("REQ-7", "no port overloading"),
    ("REQ-8", "hairpinning, with the external source address and port (REQ-8a)"),
    ("REQ-9", "ICMP destination unreachable translated for TCP (SHOULD)"),
    ("REQ-10", "no ICMP message terminates a mapping"),
)


def _status(ok: bool | None) -> str:
    return UNKNOWN if ok is None else (PASS if ok else FAIL)


#: RFC 5382 REQ-5: the least idle timeout of each timer the probe measures (transitory: SYN_SENT).
IDLE_TIMEOUTS_S = {"established": 2 * 3600 + 4 * 60, "syn_sent": 4 * 60}


def _timers_status(timers: dict[str, Any]) -> str:
    """A bounded timer test can only ever fail REQ-5: it never waits the hours the requirement needs."""
    for key, required_s in IDLE_TIMEOUTS_S.items():
        lifetime = timers.get(key, {}).get("expired_within_s")
        if lifetime is not None and lifetime < required_s:
            return FAIL
    return UNKNOWN


def rfc5382_checklist(b: NatBehaviour, obs: Observations) -> list[dict[str, str]]:
    """Each requirement with pass / fail / unknown (and unknown where there is no NAT to judge)."""
    if b.nat is False:
        return [{"req": req, "text": text, "status": UNKNOWN} for req, text in REQUIREMENTS]
    status = {
        "REQ-1": _status(None if b.mapping == UNKNOWN else b.mapping == EIM),
        "REQ-2": _status(b.simultaneous_open),
        "REQ-3": _status(None if b.filtering == UNKNOWN else b.filtering in (EIM, ADM)),
        # An immediate RST or ICMP breaks REQ-4; silence passes as far as 5 s of probing can tell.
        "REQ-4": _status(None if b.unsolicited_syn in (UNKNOWN, "forward") else b.unsolicited_syn == "drop"),
        "REQ-5": _timers_status(obs.timers),
        "REQ-6": UNKNOWN,  # ALGs: nothing the probe exercises
        "REQ-7": UNKNOWN,  # needs a second host behind the same NAT
        "REQ-8": _status(b.hairpin),
        "REQ-9": UNKNOWN,
        "REQ-10": UNKNOWN,
    }
    return [{"req": req, "text": text, "status": status[req]} for req, text in REQUIREMENTS]


def _evidence(obs: Observations) -> dict[str, Any]:
    return {
        "local_address": obs.local_address,
        "public_address": obs.public_address,
        "mapping_seen_by_main_p_main_p2_alt_p": [str(e) for e in obs.mapping_seen or ()],
        "allocation_local_ports": list(obs.allocation_local),
        "allocation_public_ports": list(obs.allocation_public),
        "filter_syn_from_same_address_passed": obs.filter_same_address,
        "filter_syn_from_other_address_passed": obs.filter_other_address,
        "unsolicited_reached_host": obs.unsolicited_reached_host,
        "unsolicited_reaction": None if obs.reaction is None else obs.reaction.name.lower(),
        "traceroute": {str(k): v for k, v in sorted(obs.offenders.items())},
        "hairpin_sources": None if obs.hairpin_sources is None else list(obs.hairpin_sources),
    }


def table(b: NatBehaviour) -> str:
    """The readable summary ``rawpunch probe`` prints on stderr."""
    alloc = b.allocation + (f" (delta {b.allocation_delta:+d})" if b.allocation_delta else "")
    rows = [
        ("NAT", _word(b.nat)),
        ("mapping", b.mapping),
        ("filtering", b.filtering),
        ("allocation", alloc),
        ("unsolicited SYN", b.unsolicited_syn),
        ("simultaneous open", _word(b.simultaneous_open, "accepted", "refused")),
        ("hops to NAT", "-" if b.hops_to_nat is None else str(b.hops_to_nat)),
        ("priming TTL", str(b.priming_ttl)),
        ("hairpin", "n/a (no NAT)" if b.nat is False else _word(b.hairpin)),
    ]
    for name, timer in b.extra.get("timers", {}).items():
        rows.append((f"{name} lifetime", timer.get("summary", "?")))
    lines = [f"  {name:21} {value}" for name, value in rows]
    lines.append("  RFC 5382:")
    lines += [f"    {c['req']:7} {c['status']:8} {c['text']}" for c in b.extra.get("rfc5382", [])]
    return "\n".join(lines)


def _word(value: bool | None, yes: str = "yes", no: str = "no") -> str:
    return UNKNOWN if value is None else (yes if value else no)
