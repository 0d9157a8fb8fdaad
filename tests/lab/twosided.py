"""Two sides of one lab test in one process: side a on the calling thread, side b on a thread that moved
itself into b's network namespace (setns is per thread). They share a ``threading.Barrier`` for their
handshakes, and sockets never cross a process. Used by test_firewall and test_splice."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pyroute2 import netns as pr_netns

A = TypeVar("A")
B = TypeVar("B")


def run_two_sided(
    ns_b: str,
    side_a: Callable[[threading.Barrier], A],
    side_b: Callable[[threading.Barrier], B],
    barrier_timeout: float = 10.0,
    join_timeout: float = 20.0,
) -> tuple[A, B]:
    """``side_a(sync)`` here and ``side_b(sync)`` in namespace *ns_b*; either side's exception is raised,
    after the barrier was broken so that the other side stops waiting."""
    sync = threading.Barrier(2, timeout=barrier_timeout)
    result_b: dict[str, Any] = {}

    def run_b() -> None:
        try:
            pr_netns.setns(ns_b, flags=0)
            result_b["ok"] = side_b(sync)
        except BaseException as e:
            result_b["error"] = e
            sync.abort()

    thread = threading.Thread(target=run_b, name="side-b")
    thread.start()
    try:
        result_a = side_a(sync)
    except BaseException:
        sync.abort()
        raise
    finally:
        thread.join(join_timeout)
    if thread.is_alive():
        raise TimeoutError("side b did not finish")
    if "error" in result_b:
        raise result_b["error"]
    ok: B = result_b["ok"]
    return result_a, ok
