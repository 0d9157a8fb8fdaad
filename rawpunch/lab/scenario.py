"""Rendezvous scenarios in a running lab: start the server, run two peers, read conntrack.

Shared by ``scripts/demo`` and the lab tests, so both exercise the same commands a user types.
Every process is started through ``LabNode.popen`` and so is stopped at lab teardown whatever
happens here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rawpunch.lab.netns import Lab
from rawpunch.proto.codec import Endpoint

RAWPUNCH = [sys.executable, "-m", "rawpunch"]
SERVER_PORT = 3478


class ScenarioError(Exception):
    """A scenario step failed; the message carries the process output that says why."""


@dataclass
class RunningServer:
    proc: subprocess.Popen[str]
    endpoint: Endpoint
    log: list[str] = field(default_factory=list)


def _drain(stream: IO[str], into: list[str], ready: threading.Event, marker: str) -> None:
    for line in stream:
        into.append(line.rstrip("\n"))
        if marker in line:
            ready.set()
    ready.set()  # EOF: the process is gone; let the waiter look at the log


def start_server(
    lab: Lab, node: str = "server", port: int = SERVER_PORT, args: tuple[str, ...] = (), timeout: float = 15.0
) -> RunningServer:
    """``rawpunch server`` in ``node``; returns once its log says it is listening."""
    host = str(lab.node(node).address)
    proc = lab.node(node).popen(
        [*RAWPUNCH, "server", "--listen", f"{host}:{port}", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = RunningServer(proc, Endpoint(host, port))
    ready = threading.Event()
    assert proc.stderr is not None
    threading.Thread(
        target=_drain, args=(proc.stderr, server.log, ready, "listening on"), daemon=True
    ).start()
    if not ready.wait(timeout) or proc.poll() is not None:
        raise ScenarioError(f"rawpunch server did not start in {node}:\n" + "\n".join(server.log))
    return server


@dataclass
class PeerRun:
    node: str
    returncode: int
    events: dict[str, dict[str, Any]]
    stderr: str


def run_peers(
    lab: Lab,
    server: Endpoint,
    secret: str,
    nodes: tuple[str, ...] = ("a", "b"),
    args: tuple[str, ...] = (),
    timeout: float = 60.0,
) -> dict[str, PeerRun]:
    """Run ``rawpunch peer --rendezvous-only`` in each node at once and collect its JSON-line events."""
    procs = {
        n: lab.node(n).popen(
            [*RAWPUNCH, "peer", "--rendezvous-only", "--server", str(server), "--session", secret, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in nodes
    }
    deadline = time.monotonic() + timeout
    runs = {}
    for n, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n(killed after {timeout:.0f} s)"
        events = {
            e["event"]: e for e in (json.loads(line) for line in out.splitlines() if line.startswith("{"))
        }
        runs[n] = PeerRun(n, proc.returncode, events, err)
    return runs


_CT_LINE = re.compile(
    r"src=(?P<osrc>\S+) dst=(?P<odst>\S+) sport=(?P<osport>\d+) dport=(?P<odport>\d+) .*?"
    r"src=(?P<rsrc>\S+) dst=(?P<rdst>\S+) sport=(?P<rsport>\d+) dport=(?P<rdport>\d+)"
)


def conntrack_public(lab: Lab, nat: str, private: Endpoint, proto: str = "tcp") -> list[Endpoint]:
    """The public endpoints ``nat``'s conntrack maps ``private`` to (reply-direction destination)."""
    out = (
        lab.node(nat)
        .run(
            [
                "conntrack",
                "-L",
                "-p",
                proto,
                "--orig-src",
                private.host,
                "--orig-port-src",
                str(private.port),
            ],
            check=False,
        )
        .stdout
    )
    found = []
    for m in _CT_LINE.finditer(out):
        found.append(Endpoint(m["rdst"], int(m["rdport"])))
    return found


@dataclass
class PunchRun:
    node: str
    returncode: int
    received: bytes
    """What came out of the punched connection (the peer's stdin)."""
    events: list[dict[str, Any]]
    stderr: str

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == name), None)


def punch_peers(
    lab: Lab,
    server: Endpoint,
    secret: str,
    send: dict[str, bytes],
    args: tuple[str, ...] = (),
    timeout: float = 60.0,
) -> dict[str, PunchRun]:
    """``rawpunch peer`` (netcat mode) in each node of ``send``: each sends its bytes, then EOF.

    Both run at once; each one's stdout is what the other sent. Events come from ``--events``.
    """
    with tempfile.TemporaryDirectory(prefix="rawpunch-") as tmp:
        files = {n: os.path.join(tmp, f"{n}.jsonl") for n in send}
        procs = {
            n: lab.node(n).popen(
                [
                    *RAWPUNCH,
                    "peer",
                    "--server",
                    str(server),
                    "--session",
                    secret,
                    "--events",
                    files[n],
                    *args,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for n in send
        }
        deadline = time.monotonic() + timeout
        boxes = {n: _communicate(proc, send[n], deadline) for n, proc in procs.items()}  # all at once
        runs = {}
        for n, box in boxes.items():
            box["thread"].join(max(0.1, deadline - time.monotonic()) + 10)
            out, err = box.get("out", (b"", b"(no result)"))
            code = procs[n].returncode if procs[n].returncode is not None else -1
            path = Path(files[n])
            lines = path.read_text().splitlines() if path.exists() else []
            runs[n] = PunchRun(
                n, code, out, [json.loads(line) for line in lines], err.decode(errors="replace")
            )
    return runs


def _communicate(proc: subprocess.Popen[bytes], data: bytes, deadline: float) -> dict[str, Any]:
    """Feed ``data`` then EOF and collect the output in a thread; join ``box["thread"]`` for the result."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["out"] = proc.communicate(data, timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            box["out"] = (out, err + b"\n(killed at the deadline)")

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box
