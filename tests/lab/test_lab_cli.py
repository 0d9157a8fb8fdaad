"""``rawpunch lab up|run|shell|down|clean`` as a researcher types them: a lab that outlives the command.

Every test drives the real CLI in subprocesses. The lab's owner is the detached supervisor, not this
process, so the conftest leak check cannot see it: the ``lab_name`` fixture removes whatever a test left
(``lab down``, else the namespaces, their processes and the record directly), and the tests themselves
check that nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rawpunch.lab import persist
from rawpunch.lab.labspec import LabSpec
from rawpunch.lab.nsproc import (
    create_netns,
    kill_netns_processes,
    list_netns,
    pids_in_netns,
    proc_exited,
    remove_netns,
)
from rawpunch.lab.registry import read_record, record_path, remove_record

pytestmark = pytest.mark.root

RAWPUNCH = [sys.executable, "-m", "rawpunch"]
DELAY_MS = 10


def cli(*args: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RAWPUNCH, *args], capture_output=True, text=True, timeout=timeout, input=stdin, check=False
    )


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = "t" + secrets.token_hex(4)
    yield name
    record = read_record(name)
    if record is not None:
        cli("lab", "down", name, timeout=120)
        if record.owner_alive():  # `lab down` failed: no supervisor may sleep on in the host namespace
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.owner_pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        leftovers = list_netns(f"rp-{name}-")
        kill_netns_processes(leftovers)
        for ns in leftovers:
            remove_netns(ns)
    remove_record(name)


def assert_nothing_left(name: str, pids: list[int]) -> None:
    assert list_netns(f"rp-{name}-") == []
    assert not record_path(name).exists()
    # Exited, or a zombie: here init does not reap orphans, and a zombie runs nothing.
    assert [p for p in pids if not proc_exited(p)] == []


def up(name: str, *options: str) -> dict[str, Any]:
    result = cli("lab", "up", "--name", name, "--json", *options)
    assert result.returncode == 0, result.stderr
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def lab_pids(name: str) -> list[int]:
    """The supervisor and every process inside the lab's namespaces (daemons, the server)."""
    record = read_record(name)
    assert record is not None
    inside = pids_in_netns(record.namespaces)
    return [record.owner_pid, *(pid for group in inside.values() for pid in group)]


def peer(name: str, node: str, server: str, secret: str, stdin: Path) -> subprocess.Popen[str]:
    argv = [*RAWPUNCH, "peer", "--server", server, "--session", secret]
    with stdin.open() as data:  # a file, not a pipe: both peers have their input and EOF at once
        return subprocess.Popen(
            [*RAWPUNCH, "lab", "run", name, node, "--", *argv],
            stdin=data,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def test_up_run_shell_punch_down(lab_name: str, tmp_path: Path) -> None:
    info = up(lab_name, "--delay", str(DELAY_MS), "--server")
    nodes = {n["name"]: n for n in info["nodes"]}
    assert nodes["r1"]["impairment"].startswith(f"delay {DELAY_MS} ms")
    listed = cli("lab", "list", "--running", "--json")
    assert lab_name in [lab["name"] for lab in json.loads(listed.stdout) if lab["alive"]]
    pids = lab_pids(lab_name)
    assert len(pids) >= 3  # supervisor, impairment daemon, rendezvous server

    # lab run: a command in a node, its output and exit status
    addr = cli("lab", "run", lab_name, "a", "--", "ip", "-4", "-br", "addr", "show", "eth0")
    assert addr.returncode == 0, addr.stderr
    assert f" {nodes['a']['address']}/24" in addr.stdout
    assert cli("lab", "run", lab_name, "nat-b", "--", "sh", "-c", "exit 7").returncode == 7

    # the impairment is on the path: a to the server crosses r1 out and back
    ping = cli("lab", "run", lab_name, "a", "--", "ping", "-c", "3", "-i", "0.2", "-n", "203.0.113.10")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    rtt_min = float(re.search(r"= ([\d.]+)/", ping.stdout).group(1))  # type: ignore[union-attr]
    assert rtt_min > DELAY_MS  # 2 x 10 ms asked; a clean lab answers in well under 1 ms

    # lab shell: the prompt names the node, commands run in its namespace
    shell = cli(
        "lab", "shell", lab_name, "nat-a", stdin="ip -4 -br addr show lan\necho node=$RAWPUNCH_NODE\n"
    )
    assert shell.returncode == 0, shell.stderr
    assert f"[lab {lab_name}:nat-a]" in shell.stderr
    assert " 10.0.1.1/24" in shell.stdout and "node=nat-a" in shell.stdout

    # a punch between the two hosts through the lab, with the lab's rendezvous server
    secret = secrets.token_urlsafe(16)
    sent = {n: f"hello from {n} {secrets.token_hex(8)}\n" for n in ("a", "b")}
    for n, text in sent.items():
        (tmp_path / n).write_text(text)
    peers = {n: peer(lab_name, n, str(info["server"]), secret, tmp_path / n) for n in sent}
    outputs = {n: p.communicate(timeout=120) for n, p in peers.items()}
    for name, other in (("a", "b"), ("b", "a")):
        out, err = outputs[name]
        assert peers[name].returncode == 0, err
        assert out == sent[other]

    down = cli("lab", "down", lab_name, timeout=120)
    assert down.returncode == 0, down.stderr
    assert down.stdout == f"lab {lab_name} is down\n"
    assert_nothing_left(lab_name, pids)
    assert cli("lab", "run", lab_name, "a", "--", "true").returncode == 1


@pytest.mark.usefixtures("exclusive_cleanup")
def test_a_name_in_use_is_refused_and_clean_removes_a_killed_lab(lab_name: str) -> None:
    up(lab_name, "--nat-b", "apdm-sequential", "--loss", "1")  # a userspace NAT and an impairment daemon
    again = cli("lab", "up", "--name", lab_name)
    assert again.returncode == 1
    assert again.stderr.startswith(f"rawpunch lab up: lab name '{lab_name}' is in use")
    assert f"rawpunch lab down {lab_name}" in again.stderr

    pids = lab_pids(lab_name)
    assert len(pids) >= 3  # supervisor, usernat, impairment
    os.kill(pids[0], signal.SIGKILL)
    _wait_gone(pids[0])
    listed = json.loads(cli("lab", "list", "--running", "--json").stdout)
    assert [lab["alive"] for lab in listed if lab["name"] == lab_name] == [False]
    leftover = cli("lab", "up", "--name", lab_name)
    assert leftover.returncode == 1 and "leftovers of a dead run" in leftover.stderr

    clean = cli("lab", "clean", timeout=120)
    assert clean.returncode == 0, clean.stderr
    assert str(record_path(lab_name)) in clean.stdout.splitlines()
    assert_nothing_left(lab_name, pids)


def test_down_removes_a_lab_whose_supervisor_was_killed(lab_name: str) -> None:
    up(lab_name, "--nat-a", "eim-eif")  # a userspace NAT daemon that outlives the killed supervisor
    pids = lab_pids(lab_name)
    os.kill(pids[0], signal.SIGKILL)
    _wait_gone(pids[0])
    down = cli("lab", "down", lab_name, timeout=120)
    assert down.returncode == 0, down.stderr
    assert down.stdout == f"lab {lab_name} is down (its supervisor was already gone; removed what it left)\n"
    assert_nothing_left(lab_name, pids)


def _wait_gone(pid: int) -> None:
    """Wait (bounded) until a process that is not our child has exited: its pidfd becomes readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([fd], [], [], 30)[0], f"pid {pid} still runs 30 s after SIGKILL"
    finally:
        os.close(fd)


def test_down_of_an_unknown_lab_is_an_error() -> None:
    name = "t" + secrets.token_hex(4)
    result = cli("lab", "down", name)
    assert result.returncode == 1
    assert result.stderr.startswith(f"rawpunch lab down: no lab named '{name}'")
    assert len(result.stderr.splitlines()) == 1
    run = cli("lab", "run", name, "a", "--", "true")
    assert run.returncode == 1 and f"no running lab named '{name}'" in run.stderr


def test_a_supervisor_that_cannot_build_reports_why_and_leaves_nothing(
    lab_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build fails in the supervisor (a namespace of the name is taken): lab up relays its reason."""
    create_netns(f"rp-{lab_name}-a")
    try:
        monkeypatch.setattr(persist, "check_free", lambda name: None)  # let the supervisor find the clash
        with pytest.raises(
            persist.LabError, match=rf"lab {lab_name} did not come up: FileExistsError: .*in use"
        ):
            persist.start(LabSpec(lab_name))
    finally:
        remove_netns(f"rp-{lab_name}-a")
    assert_nothing_left(lab_name, [])
