"""The strategy goals (issue 6), computed from a matrix's records and the NAT profiles' ground truth.

``matrix.md`` states them under its table, so a run says itself which goals it meets; nothing is typed in
by hand. The pairs each goal covers come from the profiles (``rawpunch.lab.profiles``): *endpoint-
independent* is the mapping (a NAT-less router counts: it maps nothing); *random-port* and *sequential* are
the allocation (RFC 4787 sections 4.1 and 4.2.1). Times are ``connect_ms``: from the moment the rendezvous
had both peers registered until both hold the authenticated socket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rawpunch.lab.profiles import NatProfile, get_profile

EIM = "endpoint-independent"


@dataclass(frozen=True)
class Goal:
    text: str
    need: float
    """The fraction of ``punches`` that must be ``hits``."""
    hits: int
    punches: int

    @property
    def met(self) -> bool:
        return self.punches > 0 and self.hits >= self.need * self.punches

    def row(self) -> str:
        if not self.punches:
            return f"| {self.text} | no punches in this run | - |"
        verdict = "met" if self.met else "**not met**"
        return f"| {self.text} | {self.hits / self.punches:.1%} ({self.hits}/{self.punches}) | {verdict} |"


def _eim(p: NatProfile) -> bool:
    return p.mapping == EIM or not p.nat


def _random(p: NatProfile) -> bool:
    return p.allocation == "random"


def _pair(record: dict[str, Any]) -> tuple[NatProfile, NatProfile]:
    return get_profile(str(record["nat_a"])), get_profile(str(record["nat_b"]))


def _within(record: dict[str, Any], seconds: float) -> bool:
    ms = record.get("connect_ms")
    return bool(record.get("success")) and ms is not None and float(ms) <= seconds * 1000


def _goal(
    text: str,
    need: float,
    records: list[dict[str, Any]],
    covers: Callable[[NatProfile, NatProfile], bool],
    hit: Callable[[dict[str, Any]], bool],
) -> Goal:
    mine = [r for r in records if covers(*_pair(r))]
    return Goal(text, need, sum(1 for r in mine if hit(r)), len(mine))


def goals(records: Iterable[dict[str, Any]], strategy: str = "auto") -> list[Goal]:
    """The four goals over the punches of ``strategy``; a goal whose pairs the run did not cover has none."""
    rows = [r for r in records if r.get("strategy") == strategy and "nat_a" in r]

    def eim_or_sequential(a: NatProfile, b: NatProfile) -> bool:
        return any(_eim(p) or p.allocation == "sequential" for p in (a, b))

    def eim_random(a: NatProfile, b: NatProfile) -> bool:
        return (_eim(a) and _random(b) and not _eim(b)) or (_eim(b) and _random(a) and not _eim(a))

    def first(r: dict[str, Any]) -> bool:
        return bool(r.get("success")) and r.get("attempts") == 1

    return [
        _goal(
            "100% on every pair with an endpoint-independent or sequential NAT",
            1.0,
            rows,
            eim_or_sequential,
            lambda r: bool(r.get("success")),
        ),
        _goal(
            "endpoint-independent x random-port (per-destination) NAT: >= 95% within 10 s",
            0.95,
            rows,
            eim_random,
            lambda r: _within(r, 10),
        ),
        _goal(
            "random-port x random-port: >= 50% within 60 s",
            0.5,
            rows,
            lambda a, b: _random(a) and _random(b),
            lambda r: _within(r, 60),
        ),
        _goal(
            "... of which both map per destination: >= 50% within 60 s",
            0.5,
            rows,
            lambda a, b: _random(a) and _random(b) and not _eim(a) and not _eim(b),
            lambda r: _within(r, 60),
        ),
        _goal(
            "first-attempt success >= 99% on every pair (port exhaustion traverses them all)",
            0.99,
            rows,
            lambda a, b: True,
            first,
        ),
    ]


def markdown_section(records: Iterable[dict[str, Any]], strategy: str = "auto") -> list[str]:
    """The "Goals" section of ``matrix.md``, or nothing if the run has no punches of ``strategy``."""
    found = goals(records, strategy)
    if not any(g.punches for g in found):
        return []
    return [
        "",
        f"## Goals ({strategy}; computed from the records and the profiles' ground truth)",
        "",
        "| goal | measured | |",
        "|---|---|---|",
        *(g.row() for g in found),
    ]
