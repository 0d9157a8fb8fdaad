"""``rawpunch lab matrix``: run the NAT x NAT x strategy matrix in labs and write its results.

The adapter around ``rawpunch.lab.matrix``: one lab per NAT pair (built once, reused for every strategy and
repetition, with a rendezvous server on the middle core router), each punch two real ``rawpunch peer``
processes with a fresh session secret, bounded by the punch timeout. Every punch is appended to
``DIR/results.jsonl`` (flushed and fsynced) as soon as it is done, so an interrupted run loses at most the
punch in flight; ``DIR/matrix.md`` and ``DIR/matrix.png`` are regenerated from that file at the end of every
run, interrupted or not. Independent pairs may run in parallel (``--jobs``): each has its own lab.

A failed punch also leaves ``DIR/failures/<nat a>_x_<nat b>-<strategy>-<rep>.json``: both peers' exit codes,
``--events`` lines and stderr, so a miss can be explained after the run (the one-line reason in the results
is only the first failing peer's last error).

Ctrl-C (or SIGTERM) tears the labs down at once; a punch cut short that way is not recorded, since it did
not fail on its own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import secrets
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rawpunch.lab.matrix import (
    TIMES,
    Cell,
    Conditions,
    MatrixError,
    PeerReport,
    Plan,
    PunchOutcome,
    aggregate,
    all_pairs,
    check_header,
    header,
    killed_from_outside,
    outcome,
    parse_list,
    parse_results,
    pending,
    record,
)
from rawpunch.lab.profiles import PROFILES

if TYPE_CHECKING:
    from rawpunch.lab.netns import Lab
    from rawpunch.proto.codec import Endpoint

EXIT_FAILED, EXIT_USAGE, EXIT_NOT_ROOT, EXIT_INTERRUPTED = 1, 2, 3, 130
RESULTS, MARKDOWN, PICTURE, FAILURES = "results.jsonl", "matrix.md", "matrix.png", "failures"
#: The strategy the punch had before there was a choice; what the peer runs when it takes no --strategy.
BASELINE_STRATEGY = "crafted-handshake"
MAX_JOBS = 8
KILLED_MARKER = "(killed at the deadline)"  # what scenario.punch_peers appends to a killed peer's stderr


def strategy_names() -> tuple[str, ...]:
    """The strategies the peer knows (``rawpunch.strategy.STRATEGY_NAMES``), or the baseline alone."""
    try:
        module = importlib.import_module("rawpunch.strategy")
    except ImportError:
        return (BASELINE_STRATEGY,)
    names = getattr(module, "STRATEGY_NAMES", None)
    if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
        return (BASELINE_STRATEGY,)
    return names


def peer_takes_strategy() -> bool:
    """Whether ``rawpunch peer`` has a ``--strategy`` option (older peers run the baseline only)."""
    from rawpunch.peercli import add_peer_parser  # noqa: PLC0415

    sub = argparse.ArgumentParser(add_help=False).add_subparsers()
    add_peer_parser(sub, str)
    peer: argparse.ArgumentParser = sub.choices["peer"]
    return any("--strategy" in action.option_strings for action in peer._actions)


def runnable_strategies() -> tuple[str, ...]:
    """What the matrix can ask the peer for: a peer without ``--strategy`` runs the baseline only."""
    return strategy_names() if peer_takes_strategy() else (BASELINE_STRATEGY,)


def add_matrix_parser(sub: Any) -> None:
    """``rawpunch lab matrix`` on the ``lab`` subparsers object."""
    p = sub.add_parser(
        "matrix",
        help="punch through every NAT pair with every strategy, N times; tables and a heatmap (needs root)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nat-a", required=True, metavar="P[,P..]", help="NAT profiles in front of host a")
    p.add_argument("--nat-b", metavar="P[,P..]", help="NAT profiles in front of host b (default: --nat-a)")
    p.add_argument("--strategies", metavar="S[,S..]", help="strategies (default: every one the peer knows)")
    p.add_argument("--reps", type=int, default=5, help="punches per pair and strategy (default 5)")
    p.add_argument("--delay", type=float, default=0.0, metavar="MS", help="core latency, ms (default 0)")
    p.add_argument(
        "--jitter", type=float, default=0.0, metavar="MS", help="+- uniform jitter, ms (default 0)"
    )
    p.add_argument("--loss", type=float, default=0.0, metavar="PCT", help="core packet loss, %% (default 0)")
    p.add_argument("--hops", type=int, default=2, help="core routers between the NATs (default 2)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per punch, s (default 60)")
    p.add_argument("--out", required=True, metavar="DIR", help="results directory; rerun to resume")
    p.add_argument(
        "--jobs", type=int, default=1, help=f"NAT pairs run in parallel, 1..{MAX_JOBS} (default 1)"
    )
    p.add_argument("--limit", type=int, metavar="N", help="stop after N punches in this run (resume later)")
    p.add_argument("--note", default="", help="a line for the Markdown header, e.g. how a run was reduced")


@dataclass(frozen=True)
class Request:
    plan: Plan
    conditions: Conditions
    out: Path
    jobs: int
    limit: int | None
    note: str


def request_from_args(args: argparse.Namespace) -> Request:
    """Validate the command line; MatrixError says what is wrong."""
    from rawpunch.lab.impair import Impairment  # noqa: PLC0415

    profiles_a = parse_list(args.nat_a, "NAT profile", PROFILES)
    profiles_b = parse_list(args.nat_b, "NAT profile", PROFILES) if args.nat_b else profiles_a
    known = runnable_strategies()
    strategies = parse_list(args.strategies, "strategy", known) if args.strategies else known
    for name, value, low, high in (("--reps", args.reps, 1, 10_000), ("--jobs", args.jobs, 1, MAX_JOBS)):
        if not low <= value <= high:
            raise MatrixError(f"{name} must be in {low}..{high}, got {value}")
    if args.limit is not None and args.limit < 1:
        raise MatrixError(f"--limit must be at least 1, got {args.limit}")
    if not 1 <= args.timeout <= 3600:
        raise MatrixError(f"--timeout must be in 1..3600 s, got {args.timeout:g}")
    try:
        Impairment(delay_ms=args.delay, jitter_ms=args.jitter, loss=args.loss / 100)
    except ValueError as exc:
        raise MatrixError(f"{exc} (--delay/--jitter in ms, --loss in percent)") from None
    conditions = Conditions(args.delay, args.jitter, args.loss / 100, args.hops, args.timeout)
    plan = Plan(all_pairs(profiles_a, profiles_b), strategies, args.reps)
    return Request(plan, conditions, Path(args.out), args.jobs, args.limit, args.note)


def run_matrix_command(args: argparse.Namespace) -> int:
    try:
        request = request_from_args(args)
        return run_matrix(request)
    except MatrixError as exc:
        print(f"rawpunch lab matrix: {exc}", file=sys.stderr)
        return EXIT_USAGE


# --- the results file --------------------------------------------------------------------------------------


class ResultsFile:
    """``DIR/results.jsonl``: created with its header, or opened for resuming after checking the header."""

    def __init__(self, path: Path, conditions: Conditions, commit: str) -> None:
        self.path = path
        self.commit = commit
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size == 0:
            now = _now()
            path.write_text(_json(header(conditions, now, platform.release(), commit)) + "\n")
        _trim_partial_line(path)
        results = parse_results(path.read_text())
        check_header(results.header, conditions, str(path))
        assert results.header is not None
        if results.bad_lines:
            print(
                f"rawpunch lab matrix: {path}: ignoring unreadable lines {results.bad_lines}", file=sys.stderr
            )
        self.header = results.header
        self.records = results.records

    def append(self, cell: Cell, result: PunchOutcome, lab: str = "") -> None:
        item = record(cell, result, self.commit, _now(), lab)
        with self._lock, open(self.path, "a") as f:
            f.write(_json(item) + "\n")
            f.flush()
            os.fsync(f.fileno())
            self.records.append(item)


def _trim_partial_line(path: Path) -> None:
    """A crash mid-write leaves a line without its newline: drop it, or the next record would extend it."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        print(f"rawpunch lab matrix: {path}: dropping an incomplete last line", file=sys.stderr)
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _json(item: dict[str, Any]) -> str:
    return json.dumps(item, ensure_ascii=False)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- running -----------------------------------------------------------------------------------------------


@dataclass
class Run:
    results: ResultsFile
    conditions: Conditions
    stop: threading.Event
    progress: Callable[[bool], None]
    strategy_flag: bool


def run_matrix(request: Request) -> int:
    from rawpunch.bench.record import machine  # noqa: PLC0415

    results = ResultsFile(request.out / RESULTS, request.conditions, machine().commit)
    missing = pending(request.plan, results.records)
    todo = missing[: request.limit] if request.limit is not None else missing
    errors: list[str] = []
    interrupted = False
    if todo and os.geteuid() != 0:
        print(
            "rawpunch lab matrix: needs root (network namespaces, iptables): run with sudo", file=sys.stderr
        )
        return EXIT_NOT_ROOT
    kernel = results.header.get("kernel")
    if todo and kernel != platform.release():  # rendering elsewhere is fine; measuring is not
        raise MatrixError(
            f"{results.path} was measured on kernel {kernel}, this is {platform.release()}: "
            "use a fresh --out directory"
        )
    before = len(results.records)
    if todo:
        interrupted = _run_pairs(request, results, todo, errors)
    write_outputs(request, results.records, results.header)
    left = len(pending(request.plan, results.records))
    print(
        f"rawpunch lab matrix: {len(results.records) - before} punch(es) run, "
        f"{len(request.plan.cells()) - len(missing)} were already recorded, {left} still to do; "
        f"{request.out / MARKDOWN}",
        file=sys.stderr,
    )
    for error in errors:
        print(f"rawpunch lab matrix: {error}", file=sys.stderr)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if errors else 0


def _run_pairs(request: Request, results: ResultsFile, todo: list[Cell], errors: list[str]) -> bool:
    """Run the pending cells pair by pair (``--jobs`` pairs at once); True if interrupted."""
    from tqdm import tqdm  # noqa: PLC0415

    from rawpunch.exitguard import SignalGuard  # noqa: PLC0415
    from rawpunch.lab.netns import teardown_all  # noqa: PLC0415

    by_pair: dict[tuple[str, str], list[Cell]] = {}
    for cell in todo:
        by_pair.setdefault(cell.pair, []).append(cell)
    stop = threading.Event()

    def stop_everything() -> None:
        stop.set()
        teardown_all()  # ends the peers in flight at once; their punches are then not recorded

    bar = tqdm(total=len(todo), unit="punch", desc="matrix", file=sys.stderr, disable=not sys.stderr.isatty())
    tally = {"ok": 0, "failed": 0}

    def progress(success: bool) -> None:
        tally["ok" if success else "failed"] += 1
        bar.set_postfix(tally, refresh=False)
        bar.update(1)

    run = Run(results, request.conditions, stop, progress, peer_takes_strategy())
    # Worker threads cannot install signal handlers: the main thread turns SIGTERM/SIGHUP into a teardown.
    guard = SignalGuard((signal.SIGTERM, signal.SIGHUP), stop_everything)
    guard.install()
    try:
        with ThreadPoolExecutor(max_workers=request.jobs, thread_name_prefix="matrix") as pool:
            futures: dict[Future[None], tuple[str, str]] = {
                pool.submit(_run_pair, run, pair, cells): pair for pair, cells in by_pair.items()
            }
            try:
                _wait_all(futures, errors)
            except KeyboardInterrupt:
                stop_everything()
                wait(futures)
                return True
    finally:
        guard.remove()
        bar.close()
    return False


def _wait_all(futures: dict[Future[None], tuple[str, str]], errors: list[str]) -> None:
    pending_futures = set(futures)
    while pending_futures:
        # A timeout keeps the main thread responsive to Ctrl-C (a bare wait() would hold it).
        done, pending_futures = wait(pending_futures, timeout=0.5)
        for fut in done:
            exc = fut.exception()
            if exc is not None:
                a, b = futures[fut]
                errors.append(
                    f"pair {a} {TIMES} {b}: {exc}; its missing punches stay unrecorded (rerun to retry)"
                )


class LabBrokenError(Exception):
    """The lab stopped working under a punch (its server or a peer killed from outside)."""


#: Labs built per pair: one more after a lab broke under a punch (e.g. another user's ``lab clean --all``).
LAB_TRIES = 2


def _run_pair(run: Run, pair: tuple[str, str], cells: list[Cell]) -> None:
    """One lab and one rendezvous server for the pair (a fresh one if it breaks); each cell one punch."""
    left = list(cells)
    for attempt in range(1, LAB_TRIES + 1):
        try:
            _run_in_lab(run, pair, left)
            return
        except LabBrokenError as exc:
            if attempt == LAB_TRIES:
                raise
            print(
                f"rawpunch lab matrix: {pair[0]} {TIMES} {pair[1]}: {exc}; building a new lab",
                file=sys.stderr,
            )


def _run_in_lab(run: Run, pair: tuple[str, str], left: list[Cell]) -> None:
    """Punch the cells of ``left`` in one lab, removing each from ``left`` once it is recorded."""
    from rawpunch.lab.impair import Impairment  # noqa: PLC0415
    from rawpunch.lab.netns import Lab  # noqa: PLC0415
    from rawpunch.lab.scenario import start_server  # noqa: PLC0415
    from rawpunch.lab.topology import two_nats  # noqa: PLC0415

    c = run.conditions
    impairment = Impairment(c.delay_ms, c.jitter_ms, c.loss)
    if run.stop.is_set():
        return
    with Lab(two_nats(c.hops, pair[0], pair[1], impairment=impairment if impairment.active else None)) as lab:
        server = start_server(lab)
        while left and not run.stop.is_set():
            cell = left[0]
            reports = punch_once(lab, server.endpoint, cell, run)
            if run.stop.is_set():
                return  # torn down under the punch by our own Ctrl-C: not a measurement
            broken = killed_from_outside(reports)
            if server.proc.poll() is not None:
                broken = "the rendezvous server died: " + " / ".join(server.log[-2:])
            if broken:
                raise LabBrokenError(
                    f"lab {lab.run_id} broke during {cell.strategy} rep {cell.rep}: {broken}"
                )
            result = outcome(reports)
            run.results.append(cell, result, lab.run_id)
            if not result.success:
                write_failure(run.results.path.parent / FAILURES, cell, reports, lab.run_id)
            left.pop(0)
            run.progress(result.success)


def punch_once(lab: Lab, server: Endpoint, cell: Cell, run: Run) -> dict[str, PeerReport]:
    """Two peers, a fresh secret, a few KB each way; what each one reported."""
    from rawpunch.lab.scenario import punch_peers  # noqa: PLC0415

    send = {n: f"{n} {cell.strategy} {cell.rep}\n".encode() * 64 for n in ("a", "b")}
    args = ("--strategy", cell.strategy) if run.strategy_flag else ()
    runs = punch_peers(lab, server, secrets.token_hex(16), send, args=args, timeout=run.conditions.timeout_s)
    other = {"a": "b", "b": "a"}
    return {
        n: PeerReport(
            r.returncode, r.events, r.stderr, r.received == send[other[n]], KILLED_MARKER in r.stderr
        )
        for n, r in runs.items()
    }


def failure_path(directory: Path, cell: Cell) -> Path:
    return directory / f"{cell.nat_a}_x_{cell.nat_b}-{cell.strategy}-{cell.rep}.json"


def write_failure(directory: Path, cell: Cell, reports: dict[str, PeerReport], lab: str) -> Path:
    """Both peers' reports of a failed punch (a rerun of the same cell overwrites it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = failure_path(directory, cell)
    peers = {
        n: {"returncode": r.returncode, "events": list(r.events), "stderr": r.stderr}
        for n, r in reports.items()
    }
    path.write_text(json.dumps({"cell": asdict(cell), "lab": lab, "peers": peers}, indent=1) + "\n")
    return path


def write_outputs(request: Request, records: list[dict[str, Any]], head: dict[str, Any]) -> None:
    """DIR/matrix.md and DIR/matrix.png from the records (the whole file, not just this run's)."""
    from rawpunch.lab.goals import markdown_section  # noqa: PLC0415
    from rawpunch.lab.matrix_render import Meta, heatmap, markdown  # noqa: PLC0415

    table = aggregate(records, request.plan)
    meta = Meta(_now().replace("T", " ").replace("Z", " UTC"), str(head.get("kernel")), request.conditions,
                request.plan.reps, request.note)  # fmt: skip
    (request.out / MARKDOWN).write_text(markdown(table, meta) + "\n".join(markdown_section(records)) + "\n")
    heatmap(table, meta, request.out / PICTURE)
