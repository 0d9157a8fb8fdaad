"""A small matrix through the command line, as a user runs it: 2 NAT pairs x 1-2 strategies x 2 repetitions.

The first run stops after 3 punches (``--limit``), the second resumes and runs only the missing ones; the
results file, the Markdown table and the PNG are checked after each. Another run is interrupted with SIGINT
during a punch: it exits 130, records nothing for the punch in flight and leaves no namespace behind. In a
third, the lab's rendezvous server is killed from outside: the punch under it is not recorded and the
matrix goes on in a fresh lab.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rawpunch.lab.matrix_render import figure_size
from rawpunch.lab.matrix_run import BASELINE_STRATEGY, runnable_strategies
from rawpunch.lab.netns import netns_name
from rawpunch.lab.nsproc import list_netns

pytestmark = pytest.mark.root

PAIRS = (("eim-apdf", "eim-apdf"), ("eim-eif", "eim-apdf"))
# The baseline, and auto when the strategies have landed: both must traverse these EIM pairs.
STRATEGIES = tuple(s for s in (BASELINE_STRATEGY, "auto") if s in runnable_strategies())
REPS = 2
RUN_TIMEOUT = 120.0


def _matrix(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "rawpunch", "lab", "matrix", "--nat-a", "eim-apdf,eim-eif", "--nat-b",
            "eim-apdf", "--strategies", ",".join(STRATEGIES), "--reps", str(REPS), "--timeout", "45",
            "--out", str(out), *extra]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)


def _lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_small_matrix_runs_resumes_and_renders(tmp_path: Path) -> None:
    out = tmp_path / "m"
    first = _matrix(out, "--limit", "3", "--jobs", "2")
    assert first.returncode == 0, first.stderr
    head, *done = _lines(out)
    assert head["matrix"] == 1 and head["conditions"]["hops"] == 2 and head["kernel"]
    assert len(done) == 3

    second = _matrix(out)
    assert second.returncode == 0, second.stderr
    total = len(PAIRS) * len(STRATEGIES) * REPS
    assert "3 were already recorded" in second.stderr
    lines = _lines(out)
    assert lines[: 1 + len(done)] == [head, *done]  # recorded punches were not run again
    records = lines[1:]
    cells = [(r["nat_a"], r["nat_b"], r["strategy"], r["rep"]) for r in records]
    assert len(cells) == total and len(set(cells)) == total
    for r in records:
        assert r["success"], r
        assert r["connect_ms"] > 0 and r["reason"] is None

    markdown = (out / "matrix.md").read_text()
    assert f"| NAT a \u00d7 NAT b | {' | '.join(STRATEGIES)} |" in markdown
    for a, b in PAIRS:
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {a} \u00d7 {b} |"))
        assert row.count(f"100% ({REPS}/{REPS})") == len(STRATEGIES), row
    assert head["kernel"] in markdown
    assert _png_size(out / "matrix.png") == figure_size(2, 1, len(STRATEGIES))  # a: 2 profiles, b: 1
    if "auto" in STRATEGIES:  # the goals, computed from these records: two EIM pairs, all connected
        goal = next(line for line in markdown.splitlines() if line.startswith("| 100% on every pair"))
        assert goal.endswith(f"| 100.0% ({len(PAIRS) * REPS}/{len(PAIRS) * REPS}) | met |"), goal

    third = _matrix(out)  # nothing missing: renders only
    assert third.returncode == 0 and len(_lines(out)) == 1 + total


def _start_baseline(out: Path, reps: int) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "rawpunch", "lab", "matrix", "--nat-a", "eim-apdf", "--strategies",
            BASELINE_STRATEGY, "--reps", str(reps), "--out", str(out)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_records(proc: subprocess.Popen[str], out: Path, count: int) -> None:
    results = out / "results.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 1 + count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {count} punches recorded in time:\n{proc.communicate()[1]}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_an_interrupted_matrix_records_no_half_punch_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = _start_baseline(out, reps=50)
    try:
        _wait_for_records(proc, out, 2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 130, stderr
    _, *records = _lines(out)
    assert 2 <= len(records) < 50
    assert all(r["success"] for r in records), records  # the punch cut short was not recorded as a failure
    lab = records[0]["lab"]
    assert lab and not [ns for ns in list_netns() if ns.startswith(netns_name(lab, ""))]
    assert (out / "matrix.md").exists() and "| eim-apdf \u00d7 eim-apdf |" in (out / "matrix.md").read_text()


def test_a_lab_broken_from_outside_is_replaced_and_its_punch_not_recorded(tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = _start_baseline(out, reps=6)
    try:
        _wait_for_records(proc, out, 2)
        first_lab = _lines(out)[1]["lab"]
        server_ns = netns_name(first_lab, "server")
        pids = subprocess.run(["ip", "netns", "pids", server_ns], capture_output=True, text=True, check=True)
        assert pids.stdout.split(), f"no rendezvous server in {server_ns}"
        for pid in pids.stdout.split():
            subprocess.run(["kill", "-KILL", pid], check=False)
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        _stop(proc)
    assert proc.returncode == 0, stderr
    assert "building a new lab" in stderr
    records = _lines(out)[1:]
    assert sorted(r["rep"] for r in records) == list(range(6))  # every punch once, none lost or doubled
    assert all(r["success"] for r in records), records  # the punch under the dead server was not recorded
    labs = {r["lab"] for r in records}
    assert first_lab in labs and len(labs) == 2
    assert not [ns for lab in labs for ns in list_netns() if ns.startswith(netns_name(lab, ""))]
