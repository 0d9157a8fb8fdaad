"""Transaction ids and the anti-replay window (``rawpunch.proto.replay``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rawpunch.proto.replay import WINDOW, ReplayWindow, TxidSource, split_txid

# sequence numbers fed in order -> whether each is accepted
CASES: dict[str, tuple[list[int], list[bool]]] = {
    "in order": ([1, 2, 3], [True, True, True]),
    "duplicate": ([1, 1], [True, False]),
    "duplicate of an older one": ([1, 2, 3, 2], [True, True, True, False]),
    "out of order within the window": ([5, 3, 4, 1, 2], [True] * 5),
    "out of order, then replayed": ([5, 3, 3, 5], [True, True, False, False]),
    "sequence 0 once": ([0, 0], [True, False]),
    "63 behind the top is still tracked": ([100, 37, 37], [True, True, False]),
    "64 behind the top is too old": ([100, 36], [True, False]),
    "far too old": ([10_000, 1], [True, False]),
    "shift of 63 keeps the old top": ([1, 64, 1, 2], [True, True, False, True]),
    "shift of 64 forgets the old top": ([1, 65, 1, 2], [True, True, False, True]),
    "shift of 65": ([1, 66, 2, 3], [True, True, False, True]),
    "huge shift clears the bitmap": (
        [1, 2, 3, 1_000_000, 999_999, 999_937, 999_936],
        [True, True, True, True, True, True, False],
    ),
    "shift below 64 keeps the bitmap": ([1, 2, 3, 40, 2, 39], [True, True, True, True, False, True]),
}


@pytest.mark.parametrize("case", CASES)
def test_window(case: str) -> None:
    sequence, expected = CASES[case]
    window = ReplayWindow()
    assert [window.check_and_update(seq) for seq in sequence] == expected


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.integers(0, 400), max_size=80))
def test_window_agrees_with_a_set_of_every_sequence_seen(sequence: list[int]) -> None:
    window, seen = ReplayWindow(), set[int]()
    for seq in sequence:
        top = max(seen, default=0)
        fresh = seq not in seen and (seq > top or top - seq < WINDOW)
        assert window.check_and_update(seq) is fresh, (seq, sorted(seen))
        if fresh:
            seen.add(seq)
        assert 0 <= window.bits < 1 << WINDOW  # O(1) state, whatever comes in


def test_txids_are_instance_then_a_growing_sequence() -> None:
    source = TxidSource(b"inst")
    ids = [source.next() for _ in range(3)]
    assert [split_txid(t) for t in ids] == [(b"inst", 1), (b"inst", 2), (b"inst", 3)]
    assert all(len(t) == 12 for t in ids)
    assert ids[0] == b"inst" + bytes(7) + b"\x01"


def test_each_run_gets_its_own_random_instance() -> None:
    assert TxidSource().instance != TxidSource().instance
    assert len(TxidSource().instance) == 4
