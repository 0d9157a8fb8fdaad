"""The matrix without root: planning, the results file and resuming, one punch's outcome from the peers'
reports, aggregation and medians, the command line's validation, and the Markdown and PNG renderings."""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from rawpunch.cli import build_parser
from rawpunch.lab import matrix_run
from rawpunch.lab.matrix import (
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
    median,
    outcome,
    parse_list,
    parse_results,
    pending,
    record,
)
from rawpunch.lab.matrix_render import Meta, cell_text, figure_size, heatmap, markdown

PLAN = Plan(pairs=(("open", "eim-apdf"), ("eim-apdf", "eim-apdf")), strategies=("s1", "s2"), reps=2)
WIN = PunchOutcome(True, 40.0, None, 1, "s1", {"a": 30.0, "b": 40.0})


def _rec(
    a: str, b: str, strategy: str, rep: int, ok: bool = True, ms: float = 10.0, **kw: Any
) -> dict[str, Any]:
    base = PunchOutcome(
        ok, ms if ok else None, None if ok else "b: exit 1: boom", kw.pop("attempts", None), None
    )
    return {**record(Cell(a, b, strategy, rep), base, kw.pop("commit", "abc"), "2026-01-01T00:00:00Z"), **kw}


# --- planning ----------------------------------------------------------------------------------------------


def test_plan_is_pair_major_then_repetition_major() -> None:
    cells = PLAN.cells()
    assert len(cells) == 8
    assert [c.pair for c in cells[:4]] == [("open", "eim-apdf")] * 4
    assert [(c.rep, c.strategy) for c in cells[:4]] == [(0, "s1"), (0, "s2"), (1, "s1"), (1, "s2")]


def test_all_pairs_are_ordered_and_deduplicated() -> None:
    assert all_pairs(["x", "y"], ["x", "y"]) == (("x", "x"), ("x", "y"), ("y", "x"), ("y", "y"))
    assert all_pairs(["x", "x"], ["y"]) == (("x", "y"),)


@pytest.mark.parametrize(
    ("text", "message"), [("", "no NAT profile given"), ("open,nope,zz", "unknown NAT profile nope, zz")]
)
def test_bad_lists_are_refused(text: str, message: str) -> None:
    with pytest.raises(MatrixError, match=message):
        parse_list(text, "NAT profile", ["open", "eim-apdf"])


def test_lists_keep_order_and_drop_blanks() -> None:
    assert parse_list(" eim-apdf, open,,open ", "p", ["open", "eim-apdf"]) == ("eim-apdf", "open")


# --- conditions, header and resume -------------------------------------------------------------------------


def test_the_conditions_hash_changes_with_every_condition() -> None:
    base = Conditions(30, 10, 0.02, 2, 60)
    variants = [
        Conditions(31, 10, 0.02, 2, 60),
        Conditions(30, 9, 0.02, 2, 60),
        Conditions(30, 10, 0.03, 2, 60),
        Conditions(30, 10, 0.02, 3, 60),
        Conditions(30, 10, 0.02, 2, 30),
    ]
    assert base.digest() == Conditions(30.0, 10.0, 0.02, 2, 60.0).digest()
    assert len({base.digest(), *(v.digest() for v in variants)}) == 6


def test_results_text_round_trip_with_bad_lines() -> None:
    head = header(Conditions(), "now", "6.18", "abc")
    lines = [json.dumps(head), json.dumps(_rec("open", "eim-apdf", "s1", 0)), "{not json", "[1]", '{"x": 1}']
    results = parse_results("\n".join(lines) + "\n")
    assert results.header == head
    assert [r["rep"] for r in results.records] == [0]
    assert results.bad_lines == [3, 4, 5]


def test_check_header_refuses_other_conditions_and_missing_headers() -> None:
    cond = Conditions(delay_ms=30)
    check_header(header(cond, "now", "k", "c"), cond, "f")  # same conditions: accepted
    with pytest.raises(MatrixError, match="other conditions"):
        check_header(header(Conditions(), "now", "k", "c"), cond, "f")
    with pytest.raises(MatrixError, match="no matrix header"):
        check_header(None, cond, "f")
    with pytest.raises(MatrixError, match="format 99"):
        check_header({**header(cond, "now", "k", "c"), "matrix": 99}, cond, "f")


def test_pending_skips_recorded_cells_only() -> None:
    done = [
        _rec("open", "eim-apdf", "s1", 0),
        _rec("open", "eim-apdf", "s2", 1, ok=False),
        _rec("x", "y", "s1", 0),
    ]
    left = pending(PLAN, done)
    assert len(left) == 6
    assert Cell("open", "eim-apdf", "s1", 0) not in left
    assert Cell("open", "eim-apdf", "s2", 1) not in left  # a failure is a result too: not retried
    assert left[0] == Cell("open", "eim-apdf", "s2", 0)


# --- one punch's outcome ------------------------------------------------------------------------------------


def _peer(code: int = 0, ms: float | None = 20.0, ok: bool = True, stderr: str = "", **kw: Any) -> PeerReport:
    events: list[dict[str, Any]] = [{"event": "registered"}]
    events += [{"event": "attempt", "n": i} for i in range(kw.pop("attempts", 0))]
    if ms is not None:
        events.append({"event": "connected", "elapsed_ms": ms, "strategy": "crafted-handshake"})
    return PeerReport(code, events, stderr, ok, **kw)


@pytest.mark.parametrize(
    ("a", "b", "reason"),
    [
        (_peer(), _peer(code=1, ms=None, stderr="log\nrawpunch peer: the handshake timed out\n"),
         "b: exit 1: rawpunch peer: the handshake timed out"),
        (_peer(code=-9, ms=None, timed_out=True), _peer(), "a: killed at the punch timeout"),
        (_peer(ms=None), _peer(), "a: exited 0 without a connected event"),
        (_peer(), _peer(ok=False), "b: received data differs"),
        (_peer(code=4, ms=None, stderr=""), _peer(), "a: exit 4: no error message"),
    ],
)  # fmt: skip
def test_failures_name_the_peer_and_its_reason(a: PeerReport, b: PeerReport, reason: str) -> None:
    result = outcome({"a": a, "b": b})
    assert not result.success
    assert result.connect_ms is None
    assert result.reason is not None and result.reason.startswith(reason)


def test_success_takes_the_later_peer_and_counts_attempts() -> None:
    result = outcome({"a": _peer(ms=12.5, attempts=1), "b": _peer(ms=17.0, attempts=2)})
    assert result == PunchOutcome(True, 17.0, None, 2, "crafted-handshake", {"a": 12.5, "b": 17.0})
    assert outcome({"a": _peer(), "b": _peer()}).attempts is None  # peers that report no attempts


def test_a_peer_killed_by_a_signal_the_matrix_did_not_send_is_no_measurement() -> None:
    assert (
        killed_from_outside({"a": _peer(), "b": _peer(code=-9, ms=None)}) == "peer b was killed by signal 9"
    )
    assert killed_from_outside({"a": _peer(code=-9, ms=None, timed_out=True), "b": _peer()}) is None
    assert killed_from_outside({"a": _peer(code=1, ms=None), "b": _peer()}) is None


def test_a_record_carries_the_cell_and_the_outcome() -> None:
    line = record(Cell("open", "eim-apdf", "s1", 3), WIN, "abc", "t")
    assert line["pair"] == "open \u00d7 eim-apdf"
    assert (line["strategy"], line["rep"], line["success"], line["connect_ms"]) == ("s1", 3, True, 40.0)
    assert json.loads(json.dumps(line)) == line


# --- aggregation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"), [([], None), ([3.0], 3.0), ([5, 1, 3], 3), ([4, 1, 2, 3], 2.5)]
)
def test_median(values: list[float], expected: float | None) -> None:
    assert median(values) == expected


def test_aggregate_rates_medians_first_attempts_and_commits() -> None:
    records = [
        _rec("open", "eim-apdf", "s1", 0, ms=10, attempts=1),
        _rec("open", "eim-apdf", "s1", 1, ms=30, attempts=2),
        _rec("open", "eim-apdf", "s2", 0, ok=False, commit="def"),
        _rec("open", "eim-apdf", "s2", 1, ms=50),
        _rec("open", "eim-apdf", "s1", 7, ms=999),  # rep outside the plan: left out
        _rec("eim-eif", "open", "s1", 0, ms=999),  # pair outside the plan: left out
    ]
    table = aggregate(records, PLAN)
    s1, s2 = table.get(("open", "eim-apdf"), "s1"), table.get(("open", "eim-apdf"), "s2")
    assert (s1.punches, s1.successes, s1.rate, s1.median_ms, s1.first_attempt) == (2, 2, 1.0, 20.0, 1)
    assert (s2.punches, s2.successes, s2.rate, s2.median_ms, s2.first_attempt) == (2, 1, 0.5, 50.0, None)
    assert s2.reasons == (("b: exit 1: boom", 1),)
    empty = table.get(("eim-apdf", "eim-apdf"), "s1")
    assert empty.rate is None and cell_text(empty) == "not run"
    assert table.commits == (("abc", 3), ("def", 1))


# --- rendering ----------------------------------------------------------------------------------------------


def _meta(note: str = "") -> Meta:
    return Meta("2026-01-01 00:00 UTC", "6.18.0-test", Conditions(30, 10, 0.02), PLAN.reps, note)


def test_markdown_has_a_row_per_pair_and_a_cell_per_strategy() -> None:
    records = [_rec("open", "eim-apdf", "s1", 0, ms=12), _rec("open", "eim-apdf", "s1", 1, ok=False)]
    text = markdown(aggregate(records, PLAN), _meta("reduced: 2 reps"))
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == "| NAT a \u00d7 NAT b | s1 | s2 |"
    assert rows[1] == "| open \u00d7 eim-apdf | 50% (1/2), 12 ms | not run |"
    assert rows[2] == "| eim-apdf \u00d7 eim-apdf | not run | not run |"
    assert rows[3] == "| **all pairs** | 50% (1/2) | not run |"
    for fact in ("6.18.0-test", "abc (2 punches)", "delay 30 ms +- 10 ms, loss 2%", "reduced: 2 reps"):
        assert fact in text
    assert "| open \u00d7 eim-apdf | s1 | 1 | b: exit 1: boom |" in text  # failure reasons section


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND", "truncated PNG"
    return width, height


@pytest.mark.parametrize("strategies", [("s1",), ("s1", "s2", "s3", "s4", "s5", "s6")])
def test_heatmap_is_a_png_of_the_expected_size(tmp_path: Path, strategies: tuple[str, ...]) -> None:
    plan = Plan(PLAN.pairs, strategies, 2)
    path = tmp_path / "m.png"
    heatmap(aggregate([_rec("open", "eim-apdf", "s1", 0)], plan), _meta(), path)
    assert _png_size(path) == figure_size(2, 1, len(strategies))  # rows open, eim-apdf; one column eim-apdf
    assert figure_size(2, 9, 1)[0] > figure_size(2, 1, 1)[0]  # more columns: wider (past the minimum)
    assert figure_size(9, 1, 1)[1] > figure_size(2, 1, 1)[1]
    assert figure_size(2, 2, 4)[1] > figure_size(2, 2, 3)[1]  # a second row of panels


# --- the command line and the results file (no lab: nothing pending) --------------------------------------


def _args(**kw: Any) -> argparse.Namespace:
    """The real parser's namespace for a small matrix; ``kw`` (options by dest name) overrides."""
    args = build_parser().parse_args(
        ["lab", "matrix", "--nat-a", "open,eim-apdf", "--reps", "2", "--out", "o"]
    )
    assert args.lab_command == "matrix"
    for name, value in kw.items():
        assert hasattr(args, name), f"no option with dest {name}"
        setattr(args, name, value)
    return args


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"reps": 0}, "--reps must be in 1..10000"),
        ({"jobs": 9}, "--jobs must be in 1..8"),
        ({"limit": 0}, "--limit must be at least 1"),
        ({"loss": 100.0}, "loss must be a share"),
        ({"delay": 5.0, "jitter": 6.0}, "jitter_ms"),
        ({"strategies": "warp-drive"}, "unknown strategy warp-drive"),
        ({"nat_b": "carrier-pigeon"}, "unknown NAT profile carrier-pigeon"),
        ({"timeout": 0.0}, "--timeout must be in"),
    ],
)
def test_bad_command_lines_are_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(MatrixError, match=message):
        matrix_run.request_from_args(_args(**kw))


def test_a_command_line_becomes_a_plan_and_conditions() -> None:
    req = matrix_run.request_from_args(_args(nat_b="eim-eif", delay=30.0, jitter=10.0, loss=2.0, limit=3))
    assert req.plan.pairs == (("open", "eim-eif"), ("eim-apdf", "eim-eif"))
    assert req.plan.strategies == matrix_run.runnable_strategies()
    assert req.conditions == Conditions(30.0, 10.0, 0.02, 2, 60.0)
    assert req.limit == 3


def test_strategies_fall_back_to_the_baseline_without_the_strategy_package(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(name: str) -> None:
        raise ImportError(name)

    monkeypatch.setattr(matrix_run.importlib, "import_module", missing)
    assert matrix_run.strategy_names() == ("crafted-handshake",)


def test_a_peer_without_the_strategy_option_runs_the_baseline_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matrix_run, "peer_takes_strategy", lambda: False)
    assert matrix_run.request_from_args(_args()).plan.strategies == ("crafted-handshake",)
    with pytest.raises(MatrixError, match="unknown strategy auto"):
        matrix_run.request_from_args(_args(strategies="auto"))


def test_a_finished_run_only_renders_and_a_cut_line_is_trimmed(tmp_path: Path) -> None:
    req = matrix_run.request_from_args(_args(nat_a="open", strategies=None, reps=1, out=str(tmp_path)))
    results = matrix_run.ResultsFile(tmp_path / matrix_run.RESULTS, req.conditions, "abc")
    for strategy in req.plan.strategies:
        results.append(Cell("open", "open", strategy, 0), WIN)
    with open(tmp_path / matrix_run.RESULTS, "a") as f:
        f.write('{"pair": "open')  # a crash mid-write
    assert matrix_run.run_matrix(req) == 0  # nothing pending: no lab, no root needed
    lines = (tmp_path / matrix_run.RESULTS).read_text().splitlines()
    assert len(lines) == 1 + len(req.plan.strategies)
    assert all(json.loads(line) for line in lines)
    text = (tmp_path / matrix_run.MARKDOWN).read_text()
    assert "| open \u00d7 open | 100% (1/1), 40 ms, 1st try 1/1 |" in text
    assert _png_size(tmp_path / matrix_run.PICTURE) == figure_size(1, 1, len(req.plan.strategies))


def test_resuming_under_other_conditions_is_refused(tmp_path: Path) -> None:
    matrix_run.ResultsFile(tmp_path / "r.jsonl", Conditions(delay_ms=30), "abc")
    with pytest.raises(MatrixError, match="other conditions"):
        matrix_run.ResultsFile(tmp_path / "r.jsonl", Conditions(delay_ms=0), "abc")


def test_a_failed_punch_leaves_both_peers_reports(tmp_path: Path) -> None:
    cell = Cell("eim-eif", "apdm-random", "birthday", 3)
    reports = {
        "a": PeerReport(
            1, [{"event": "attempt", "outcome": "failed"}], "rawpunch peer: no strategy connected\n", False
        ),
        "b": PeerReport(0, [{"event": "connected"}], "", True),
    }
    path = matrix_run.write_failure(tmp_path / matrix_run.FAILURES, cell, reports, "lab1")
    assert path.name == "eim-eif_x_apdm-random-birthday-3.json"
    saved = json.loads(path.read_text())
    assert saved["cell"] == {"nat_a": "eim-eif", "nat_b": "apdm-random", "strategy": "birthday", "rep": 3}
    assert saved["lab"] == "lab1"
    assert saved["peers"]["a"]["events"] == [{"event": "attempt", "outcome": "failed"}]
    assert saved["peers"]["a"]["stderr"].startswith("rawpunch peer: no strategy")
    assert saved["peers"]["b"]["returncode"] == 0
