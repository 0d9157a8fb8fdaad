"""The goals under a matrix table are computed from its records and the profiles' ground truth."""

from __future__ import annotations

from typing import Any

from rawpunch.lab.goals import goals, markdown_section


def punch(a: str, b: str, ms: float | None, attempts: int = 1, strategy: str = "auto") -> dict[str, Any]:
    return {"nat_a": a, "nat_b": b, "strategy": strategy, "success": ms is not None, "connect_ms": ms,
            "attempts": attempts}  # fmt: skip


def test_each_goal_counts_its_own_pairs_and_its_own_threshold() -> None:
    records = [
        punch("eim-apdf", "apdm-random", 900.0),
        punch("apdm-random", "open", 12_000.0),  # connected, but not within 10 s
        punch("apdm-sequential", "eim-apdf", None),  # a miss on a pair with an EIM NAT
        punch("apdm-random", "apdm-random", 15_000.0, attempts=2),
        punch("eim-apdf-random", "double-nat", 800.0),  # random ports both, both EIM
        punch("apdm-random", "apdm-random", 700.0, strategy="birthday"),  # another strategy's column
    ]
    one, two, three, four, five = goals(records)
    assert (one.hits, one.punches, one.met) == (3, 4, False)  # every pair but apdm-random x apdm-random
    assert (two.hits, two.punches, two.met) == (1, 2, False)
    assert (three.hits, three.punches, three.met) == (2, 2, True)
    assert (four.hits, four.punches, four.met) == (1, 1, True)
    assert (five.hits, five.punches, five.met) == (3, 5, False)  # the 2-attempt punch and the miss


def test_a_goal_without_punches_says_so_and_a_run_without_the_strategy_has_no_section() -> None:
    section = markdown_section([punch("eim-apdf", "eim-apdf", 500.0)])
    assert any("random-port x random-port" in line and "no punches in this run" in line for line in section)
    assert any(line.startswith("| 100% on every pair") and line.endswith("| met |") for line in section)
    assert markdown_section([punch("eim-apdf", "eim-apdf", 500.0, strategy="birthday")]) == []
