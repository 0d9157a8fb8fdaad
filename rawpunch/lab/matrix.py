"""The NAT x NAT x strategy matrix, pure part: plan the punches, resume a run, aggregate the results.

A matrix run measures, for every ordered pair of NAT profiles (host ``a`` behind the first, ``b`` behind the
second) and every strategy, N punches in one lab per pair, under one set of *conditions* (core impairment,
core hops, per-punch timeout). Each punch becomes one JSON line in ``DIR/results.jsonl``; the file's first
line is a header naming the conditions and their hash. Conditions are what make two punches comparable: a
punch measured over a 30 ms core is not a repetition of one measured over a 0 ms core, so a run refuses to
resume into a file whose header hash differs. The *plan* (which pairs, strategies, repetitions) is not part
of the hash: rerunning with more repetitions or another profile extends the same results.

Resuming: a punch is identified by ``(nat_a, nat_b, strategy, rep)``; a restarted run plans the same cells and
skips the ones already recorded. A line cut short by a crash is not a record (the adapter trims it).

Aggregation: per (pair, strategy) cell, the success rate, the median time to connect of the successful
punches (``connected.elapsed_ms``, which counts from the moment both peers were matched at the rendezvous)
and, when the peers report attempts, the share of punches that succeeded on their first attempt.

Everything here takes and returns data (text, dicts, dataclasses); files, labs and processes live in
``rawpunch.lab.matrix_run``, pictures in ``rawpunch.lab.matrix_render``.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 1
#: The multiplication sign between the two NAT profiles of a pair, as in "eim-apdf \u00d7 apdm-random".
TIMES = "\u00d7"


class MatrixError(Exception):
    """The matrix cannot run or resume as asked; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Conditions:
    """What every punch of a matrix shares; punches under different conditions never share a results file."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    """A share in [0, 1), not a percentage."""
    hops: int = 2
    """Core routers between the two NATs (``two_nats(hops=...)``)."""
    timeout_s: float = 60.0
    """Both peers are killed if the punch has not finished by then; the punch counts as failed."""

    def as_dict(self) -> dict[str, Any]:
        """Canonical types (30 and 30.0 ms are one condition, so they must hash alike)."""
        return {k: int(v) if k == "hops" else float(v) for k, v in asdict(self).items()}

    def digest(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def describe(self) -> str:
        imp = f"delay {self.delay_ms:g} ms +- {self.jitter_ms:g} ms, loss {self.loss * 100:g}%"
        return f"{imp} on the middle core router; {self.hops} core hops; punch timeout {self.timeout_s:g} s"


@dataclass(frozen=True, order=True)
class Cell:
    """One punch to make: the pair of NAT profiles, the strategy, the repetition number (from 0)."""

    nat_a: str
    nat_b: str
    strategy: str
    rep: int

    @property
    def pair(self) -> tuple[str, str]:
        return (self.nat_a, self.nat_b)


@dataclass(frozen=True)
class Plan:
    pairs: tuple[tuple[str, str], ...]
    strategies: tuple[str, ...]
    reps: int

    def cells(self) -> list[Cell]:
        """Pair by pair (one lab each); within a pair repetition-major, so a cut-short run stays balanced."""
        return [
            Cell(a, b, s, rep) for a, b in self.pairs for rep in range(self.reps) for s in self.strategies
        ]


def all_pairs(profiles_a: Sequence[str], profiles_b: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Every ordered (a, b) combination, in the order given, without duplicates."""
    return tuple(dict.fromkeys((a, b) for a in profiles_a for b in profiles_b))


def parse_list(text: str, what: str, known: Iterable[str]) -> tuple[str, ...]:
    """A comma-separated list of names, each one of ``known``."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise MatrixError(f"no {what} given: pass a comma-separated list (known: {', '.join(known)})")
    known = tuple(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MatrixError(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return names


# --- the results file --------------------------------------------------------------------------------------


def header(conditions: Conditions, created: str, kernel: str, commit: str) -> dict[str, Any]:
    return {
        "matrix": FORMAT_VERSION,
        "conditions": conditions.as_dict(),
        "hash": conditions.digest(),
        "created": created,
        "kernel": kernel,
        "commit": commit,
    }


@dataclass
class Results:
    header: dict[str, Any] | None
    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)
    """1-based numbers of lines that are not JSON objects (reported, never silently used)."""


def parse_results(text: str) -> Results:
    """Header and punch records of a results file's text (complete lines only)."""
    lines = text.splitlines()
    results = Results(header=None)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            results.bad_lines.append(number)
            continue
        if not isinstance(item, dict):
            results.bad_lines.append(number)
        elif number == 1 and "matrix" in item:
            results.header = item
        elif "strategy" in item and "rep" in item:
            results.records.append(item)
        else:
            results.bad_lines.append(number)
    return results


def check_header(found: dict[str, Any] | None, conditions: Conditions, where: str) -> None:
    """Refuse to mix conditions: ``found`` (a file's header) must carry the same hash as ``conditions``."""
    if found is None:
        raise MatrixError(f"{where} has no matrix header line: use a fresh --out directory")
    if found.get("matrix") != FORMAT_VERSION:
        raise MatrixError(
            f"{where} is matrix format {found.get('matrix')!r}, this is {FORMAT_VERSION}: use a fresh --out"
        )
    if found.get("hash") != conditions.digest():
        was = found.get("conditions")
        raise MatrixError(
            f"{where} was measured under other conditions ({was}); now {conditions.as_dict()}: "
            "pass the same --delay/--jitter/--loss/--hops/--timeout, or use a fresh --out directory"
        )


def cell_of(record: dict[str, Any]) -> Cell:
    return Cell(str(record["nat_a"]), str(record["nat_b"]), str(record["strategy"]), int(record["rep"]))


def pending(plan: Plan, records: Iterable[dict[str, Any]]) -> list[Cell]:
    """The planned cells not yet recorded, in plan order."""
    done = {cell_of(r) for r in records}
    return [c for c in plan.cells() if c not in done]


def record(cell: Cell, outcome: PunchOutcome, commit: str, at: str, lab: str = "") -> dict[str, Any]:
    """The JSON line of one punch (``lab``: the run id of the lab it ran in, for its logs and clean-up)."""
    return {
        "pair": f"{cell.nat_a} {TIMES} {cell.nat_b}",
        "nat_a": cell.nat_a,
        "nat_b": cell.nat_b,
        "strategy": cell.strategy,
        "rep": cell.rep,
        **asdict(outcome),
        "commit": commit,
        "at": at,
        "lab": lab,
    }


# --- one punch's outcome, from what the two peers reported -------------------------------------------------


@dataclass(frozen=True)
class PeerReport:
    """What one ``rawpunch peer`` left behind: exit code, ``--events`` lines, stderr, what it received."""

    returncode: int
    events: Sequence[dict[str, Any]]
    stderr: str
    received_ok: bool
    timed_out: bool = False


@dataclass(frozen=True)
class PunchOutcome:
    success: bool
    connect_ms: float | None
    """The larger of the two peers' ``connected.elapsed_ms``: when both ends hold a usable socket."""
    reason: str | None
    """Why it failed (None on success): the first failing peer's own one-line error."""
    attempts: int | None
    """Attempts the peers reported (``attempt`` events; the larger count of the two), or None."""
    used: str | None
    """The strategy that connected, as the ``connected`` event names it (``auto`` picks one)."""
    connect_ms_by_peer: dict[str, float] = field(default_factory=dict)


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    flagged = [line for line in lines if line.startswith("rawpunch peer:") or "Error" in line]
    return (flagged or lines or ["no error message"])[-1][:300]


def _attempts(events: Sequence[dict[str, Any]]) -> int | None:
    count = sum(1 for e in events if e.get("event") == "attempt")
    return count or None


def outcome(reports: dict[str, PeerReport]) -> PunchOutcome:
    """Success means both peers exited 0, both logged ``connected``, and each received what the other sent."""
    connected = {n: _event(r.events, "connected") for n, r in reports.items()}
    elapsed = {n: float(e["elapsed_ms"]) for n, e in connected.items() if e and "elapsed_ms" in e}
    counts = [a for a in (_attempts(r.events) for r in reports.values()) if a is not None]
    attempts = max(counts) if counts else None
    used = next((str(e["strategy"]) for e in connected.values() if e and "strategy" in e), None)
    reason = _failure(reports, connected)
    if reason is not None:
        return PunchOutcome(False, None, reason, attempts, used, elapsed)
    return PunchOutcome(True, max(elapsed.values()), None, attempts, used, elapsed)


def _failure(reports: dict[str, PeerReport], connected: dict[str, dict[str, Any] | None]) -> str | None:
    for name, report in sorted(reports.items()):
        if report.timed_out:
            return f"{name}: killed at the punch timeout"
        if report.returncode != 0:
            return f"{name}: exit {report.returncode}: {_last_error_line(report.stderr)}"
    for name, report in sorted(reports.items()):
        if connected[name] is None or "elapsed_ms" not in (connected[name] or {}):
            return f"{name}: exited 0 without a connected event"
        if not report.received_ok:
            return f"{name}: received data differs from what the other peer sent"
    return None


def killed_from_outside(reports: dict[str, PeerReport]) -> str | None:
    """A peer that died from a signal the matrix did not send (it only kills at the punch timeout) was not
    beaten by a NAT: something tore the lab down. Such a punch is no measurement and must not be recorded."""
    for name, report in sorted(reports.items()):
        if report.returncode < 0 and not report.timed_out:
            return f"peer {name} was killed by signal {-report.returncode}"
    return None


def _event(events: Sequence[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((e for e in events if e.get("event") == name), None)


# --- aggregation -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellStats:
    punches: int
    successes: int
    median_ms: float | None
    first_attempt: int | None
    """Punches that succeeded on their first attempt, when attempts were reported; else None."""
    reasons: tuple[tuple[str, int], ...] = ()
    """Failure reasons, most frequent first."""

    @property
    def rate(self) -> float | None:
        return self.successes / self.punches if self.punches else None


@dataclass(frozen=True)
class Table:
    pairs: tuple[tuple[str, str], ...]
    strategies: tuple[str, ...]
    cells: dict[tuple[tuple[str, str], str], CellStats]
    commits: tuple[tuple[str, int], ...]
    """Commits the punches were made from, with counts (more than one after a resume across commits)."""

    def get(self, pair: tuple[str, str], strategy: str) -> CellStats:
        return self.cells.get((pair, strategy), CellStats(0, 0, None, None))


def median(values: Iterable[float]) -> float | None:
    items = sorted(values)
    return statistics.median(items) if items else None


def cell_stats(records: Sequence[dict[str, Any]]) -> CellStats:
    wins = [r for r in records if r.get("success")]
    times = (float(r["connect_ms"]) for r in wins if r.get("connect_ms") is not None)
    reported = [r for r in records if r.get("attempts") is not None]
    first = sum(1 for r in reported if r.get("success") and r["attempts"] == 1) if reported else None
    reasons = Counter(str(r.get("reason")) for r in records if not r.get("success"))
    return CellStats(len(records), len(wins), median(times), first, tuple(reasons.most_common()))


def aggregate(records: Iterable[dict[str, Any]], plan: Plan) -> Table:
    """The plan's cells, each from the records of that pair and strategy (records outside the plan are left
    out, so the table shows what the command asked for)."""
    planned = set(plan.cells())
    groups: dict[tuple[tuple[str, str], str], list[dict[str, Any]]] = {}
    commits: Counter[str] = Counter()
    for r in records:
        cell = cell_of(r)
        if cell not in planned:
            continue
        groups.setdefault((cell.pair, cell.strategy), []).append(r)
        commits[str(r.get("commit", "unknown"))] += 1
    cells = {key: cell_stats(rs) for key, rs in groups.items()}
    return Table(plan.pairs, plan.strategies, cells, tuple(commits.most_common()))
