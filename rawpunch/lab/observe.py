"""Observability for a lab run: what each NAT saw, and the facts that explain it, stored with the results.

A punch that fails (or succeeds) in the lab is only explicable with the evidence: ``Recorder(lab, DIR)``
around a run writes, per NAT node,

* ``<nat>-wan.pcap``: every packet on the NAT's WAN side (``tcpdump -U``: written packet by packet), i.e.
  exactly what the internet saw and sent;
* ``<nat>-conntrack.txt``: conntrack events (``conntrack -E -o timestamp``: NEW, UPDATE, DESTROY with their
  tuples, so the mapping of each flow and its state changes). A userspace NAT keeps TCP out of conntrack
  (profiles.py); its own log (new mappings, answers, drops) is ``<nat>-usernat.log``;
* ``<nat>-rules.txt``: ``iptables-save`` at the start, the rules in force;

and ``environment.json``: the kernel release (every namespace shares the kernel) and, per NAT, its profile's
ground truth and its conntrack sysctls (``nf_conntrack_tcp_loose``: pick up flows mid-stream;
``nf_conntrack_tcp_be_liberal``: skip the window checks that mark out-of-window segments INVALID; the
timeouts), which are per network namespace. ``Recorder.save(name, data)`` adds results (e.g. a self-test's)
as JSON next to them.

Start and end are checked, not assumed. tcpdump says ``listening on`` once its capture is open; the
conntrack listener is proven subscribed by an event it must report (a marker entry inserted and deleted in
the NAT's own table, between two TEST-NET-1 addresses nothing else uses). Before the captures stop, a marker
goes through each (a UDP datagram out of the WAN interface, the marker entry again) and the recorder waits
until both are in the files: both tools read their kernel queue in order, so everything that happened before
is written too. (tcpdump runs with ``--immediate-mode``: with TPACKET_V3 it would otherwise hold packets in a
ring block until a timeout, and lose them when stopped first.)
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from rawpunch.lab.profiles import get_profile

if TYPE_CHECKING:
    from rawpunch.lab.netns import Lab

SYSCTL_DIR = "/proc/sys/net/netfilter"
#: The sysctls the issue asks for by name; every other nf_conntrack_tcp_* is recorded too.
KEY_SYSCTLS = ("nf_conntrack_tcp_loose", "nf_conntrack_tcp_be_liberal")
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_MARKER = ("192.0.2.250", "192.0.2.251", "9")
_DISCARD_PORT = 9


def send_mark(dst: str, payload: bytes) -> None:
    """Runs inside a node: one UDP datagram (to the discard port of the WAN peer)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, (dst, _DISCARD_PORT))


class RecorderError(RuntimeError):
    """A capture could not start."""


def conntrack_sysctls() -> dict[str, str]:
    """Runs inside a node (``LabNode.call``): its namespace's ``nf_conntrack_tcp_*`` sysctls."""
    names = sorted(n for n in os.listdir(SYSCTL_DIR) if n.startswith("nf_conntrack_tcp_"))
    return {n: Path(SYSCTL_DIR, n).read_text().strip() for n in names}


class Recorder:
    """Capture pcaps and conntrack events on the NATs of a running lab; a context manager."""

    def __init__(self, lab: Lab, directory: str | Path, nats: tuple[str, ...] | None = None) -> None:
        self.lab = lab
        self.directory = Path(directory)
        self.nats = nats if nats is not None else tuple(n.name for n in lab.topology.nodes if n.role == "nat")
        self._procs: list[tuple[subprocess.Popen[Any], signal.Signals]] = []
        self._files: list[IO[Any]] = []

    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            for nat in self.nats:
                self._rules(nat)
                self._pcap(nat)
                self._conntrack(nat)
            self.save("environment", self.environment())
        except BaseException:
            self.stop()
            raise

    def environment(self) -> dict[str, Any]:
        """Kernel release, and per NAT its ground truth and conntrack sysctls."""
        nats = {}
        for nat in self.nats:
            profile = get_profile(self.lab.topology.node(nat).profile or "")
            sysctls = self.lab.node(nat).call(conntrack_sysctls)
            nats[nat] = {"profile": profile.ground_truth(), "conntrack_sysctls": sysctls}
        return {"kernel": os.uname().release, "run_id": self.lab.run_id, "nats": nats}

    def save(self, name: str, data: object) -> Path:
        """Store *data* as ``<name>.json`` with the captures."""
        path = self.directory / f"{name}.json"
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
        return path

    def stop(self) -> None:
        """Flush the captures (markers through each), stop them and copy the userspace NATs' logs."""
        if self._procs and all(proc.poll() is None for proc, _ in self._procs):
            for nat in self.nats:
                self._flush(nat)
        procs, self._procs = self._procs, []
        for proc, sig in procs:
            if proc.poll() is None:
                proc.send_signal(sig)
        for proc, _ in procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        files, self._files = self._files, []
        for f in files:
            f.close()
        for nat in self.nats:
            log = self.lab.daemon_log(nat)
            if log:
                (self.directory / f"{nat}-usernat.log").write_text(log)

    # --- the captures --------------------------------------------------------------------------------------

    def _rules(self, nat: str) -> None:
        rules = self.lab.node(nat).run(["iptables-save"]).stdout
        (self.directory / f"{nat}-rules.txt").write_text(rules)

    def _pcap(self, nat: str) -> None:
        pcap = self.directory / f"{nat}-wan.pcap"
        # -Z root: Debian's tcpdump would drop to its own user and then fail to write into root's directory.
        argv = ["tcpdump", "-i", "wan", "-n", "-U", "--immediate-mode", "-Z", "root", "-w", str(pcap)]
        proc = self.lab.node(nat).popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._procs.append((proc, signal.SIGINT))
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], START_TIMEOUT_S)
        line = proc.stderr.readline() if ready else ""
        if "listening on" not in line:
            raise RecorderError(f"tcpdump on {nat} did not start: {line.strip() or 'no output'}")

    def _conntrack(self, nat: str) -> None:
        path = self.directory / f"{nat}-conntrack.txt"
        out = path.open("w")
        self._files.append(out)
        argv = ["conntrack", "-E", "-o", "timestamp"]
        proc = self.lab.node(nat).popen(argv, stdout=out, stderr=subprocess.PIPE, text=True)
        self._procs.append((proc, signal.SIGTERM))
        self._prove_subscribed(nat, path, proc)

    def _prove_subscribed(self, nat: str, path: Path, proc: subprocess.Popen[Any]) -> None:
        """The marker entry's events reach the file (an event before the subscription would be lost)."""
        before = path.read_bytes().count(f"src={_MARKER[0]} dst={_MARKER[1]}".encode())
        self._mark_conntrack(nat, path, before, proc)

    def _mark_conntrack(self, nat: str, path: Path, seen: int, proc: subprocess.Popen[Any] | None) -> None:
        """Insert (and delete) the marker entry until the listener has written a new event about it."""
        src, dst, port = _MARKER
        tuple_args = ["-p", "udp", "-s", src, "-d", dst, "--sport", port, "--dport", port]
        insert = ["conntrack", "-I", *tuple_args, "-r", dst, "-q", src]
        insert += ["--reply-port-src", port, "--reply-port-dst", port, "-t", "10"]
        node = self.lab.node(nat)

        def cycle() -> None:
            node.run(["conntrack", "-D", *tuple_args], check=False)
            node.run(insert)

        needle = f"src={src} dst={dst}".encode()
        _until(lambda: path.read_bytes().count(needle) > seen, cycle, proc, f"conntrack -E on {nat}")
        node.run(["conntrack", "-D", *tuple_args], check=False)

    def _flush(self, nat: str) -> None:
        """Wait until a marker sent now is in the pcap and the conntrack file: so is everything before."""
        pcap, events = self.directory / f"{nat}-wan.pcap", self.directory / f"{nat}-conntrack.txt"
        mark = f"rawpunch-lab-mark-{secrets.token_hex(8)}".encode()
        wan_peer = str(self.lab.topology.interface(nat, "wan").peer_address)
        node = self.lab.node(nat)
        _until(
            lambda: mark in pcap.read_bytes(),
            lambda: node.call(send_mark, wan_peer, mark),
            None,
            f"pcap {nat}",
        )
        needle = f"src={_MARKER[0]} dst={_MARKER[1]}".encode()
        self._mark_conntrack(nat, events, events.read_bytes().count(needle), None)


def _until(
    done: Callable[[], bool], act: Callable[[], None], proc: subprocess.Popen[Any] | None, what: str
) -> None:
    """Repeat *act* until *done* (a tool writes asynchronously: re-read its file), at most START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not done():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RecorderError(f"{what}: the marker never arrived")
        act()
        time.sleep(0.01)
