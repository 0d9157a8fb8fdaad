"""Impairment without root: the request's validation and renderings (netem, NFQUEUE rule, process
arguments), the pure schedule (seeded: loss share, delay distribution) and the holding queue."""

from __future__ import annotations

import random
import statistics

import pytest

from rawpunch.lab import impair
from rawpunch.lab.impair import Held, Impairment, PingResult, Schedule, parse_impairment
from rawpunch.lab.profiles import COMMENT_TAG


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delay_ms": -1}, "delay_ms"),
        ({"delay_ms": 1e9}, "delay_ms"),
        ({"delay_ms": float("nan")}, "finite"),
        ({"delay_ms": 5, "jitter_ms": 6}, "jitter_ms"),
        ({"loss": 1.0}, "loss"),
        ({"loss": -0.1}, "loss"),
        ({"loss": True}, "finite number"),
        ({"backend": "tbf"}, "backend"),
    ],
)
def test_bad_requests_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Impairment(**kwargs)  # type: ignore[arg-type]


def test_renderings() -> None:
    imp = Impairment(delay_ms=20, jitter_ms=5, loss=0.02, seed=3)
    assert imp.netem_args() == ["delay", "20ms", "5ms", "loss", "2%"]
    assert Impairment(delay_ms=7).netem_args() == ["delay", "7ms"]
    args = imp.process_args()
    assert args[args.index("--seed") + 1] == "3"
    rules = [line for line in impair.iptables_restore(imp).splitlines() if line.startswith("-A ")]
    assert len(rules) == 1 and rules[0].startswith("-A FORWARD")
    assert f'--comment "{COMMENT_TAG} impairment: ' in rules[0] and rules[0].endswith("--queue-bypass")
    assert "-A " not in impair.iptables_undo()
    assert not Impairment().active and Impairment(loss=0.1).active


def test_parse_impairment() -> None:
    assert parse_impairment("delay=20,jitter=5,loss=0.02,seed=1") == Impairment(20, 5, 0.02, 1)
    assert parse_impairment("loss=0.1, backend=userspace") == Impairment(loss=0.1, backend="userspace")
    with pytest.raises(ValueError, match="key=value"):
        parse_impairment("latency=20")


def test_schedule_drops_a_share_and_delays_uniformly() -> None:
    imp = Impairment(delay_ms=20, jitter_ms=5, loss=0.1)
    schedule = Schedule(imp, random.Random(42))
    releases = [schedule.release_at(100.0) for _ in range(20000)]
    kept = [(r - 100.0) * 1000 for r in releases if r is not None]
    assert abs((1 - len(kept) / len(releases)) - 0.1) < 0.01
    assert min(kept) >= 15 and max(kept) <= 25
    assert abs(statistics.median(kept) - 20) < 0.2
    assert abs(statistics.pstdev(kept) - 5 / 3**0.5) < 0.1  # uniform +-J


def test_no_impairment_releases_at_once() -> None:
    schedule = Schedule(Impairment(), random.Random(1))
    assert all(schedule.release_at(5.0) == 5.0 for _ in range(100))


def test_held_releases_in_time_order_and_ties_in_arrival_order() -> None:
    held: Held[str] = Held()
    for release, item in ((3.0, "c"), (1.0, "a"), (1.0, "a2"), (2.0, "b")):
        held.push(release, item)
    assert held.next_release() == 1.0
    assert list(held.due(1.5)) == ["a", "a2"]
    assert len(held) == 2 and held.next_release() == 2.0
    assert list(held.drain()) == ["b", "c"] and held.next_release() is None


def test_ping_result_arithmetic() -> None:
    result = PingResult(100, 90, 81, tuple([20.0] * 81), tuple([21.0] * 81))
    assert result.forward_loss == pytest.approx(0.1) and result.backward_loss == pytest.approx(0.1)
    assert result.median_ms() == (20.0, 21.0) and result.jitter_ms() == (0.0, 0.0)
    assert "loss 10.00% / 10.00%" in str(result)
